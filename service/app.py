"""The Mitigation API: active mitigations for enforcement services, and the operator's levers.

Enforcement services (gateways, the player, payments) ask which mitigations
are active for an entity; operators reverse decisions, change the allowlist
and pause rules. Every operator write is audited with the token's actor and a
reason, in the same BigQuery audit table as the pipeline's decisions.

Reads come from Bigtable (``schemas/mitigation_state.py``), one ``ReadRows``
per request. Writes reuse the pipeline's own code: ``pipelines.reverse`` for
reversals, ``parse_allowlist`` and ``parse_rule_overrides`` to validate a file
before it replaces the old one, so the streaming job never reads a file the
API made invalid.

Policy files are local files or the Cloud Storage objects the Dataflow job
re-reads (``service/policy_files.py``). Order of a write to one: validate,
write the new file beside the old, write the audit row, then replace the old
file in one step. If the audit table is unavailable, or the new file cannot
be written, nothing changes (503): an unaudited change is worse than a
delayed one, and an audited change that never happened misleads (a
replacement that fails after the audit is audited as not made, or, when
whether it happened cannot be told, answered as unconfirmed). A reversal (``pipelines.reverse``) writes the
decisions row and then the audit row, which marks it made, then publishes it;
only then is the mitigation lifted. If a step fails the API answers 503 and
the mitigation stays active: before the audit row nothing was published, and
calling again makes the reversal; after it, calling again (a 409: already
reversed) publishes the recorded reversal again and lifts the mitigation. Its
id is fixed, so consumers de-duplicate a second delivery. Files are rewritten
from parsed YAML, so only their leading comment block survives; comments
between entries are lost. Writes to one file are serialised across this
host's server processes; run one host per file.

Serve it with ``python -m service`` (see ``service/__main__.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import gc
import hashlib
import logging
import os
import time
import typing

import orjson
import yaml
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Request, Response, Security, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery.retry import DEFAULT_RETRY
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.reverse import (
    ReversalError,
    ReversalRefused,
    ReversalUndelivered,
    _table_id,
    find_decision,
    redeliver,
    reverse,
)
from schemas import AUDIT_SCHEMA, ENTITY_TYPES, AuditRow, to_bigquery_row
from schemas.mitigation_state import TABLE_ID
from service.auth import CHALLENGE, OPERATE, READ, UNAUTHENTICATED, Principal, load_tokens
from service.policy_files import (
    PolicyChangeUnconfirmed,
    PolicyFile,
    PolicyFileNotText,
    PolicyFileUnreadable,
    PolicyFileUnwritable,
    Snapshot,
    policy_file,
)
from transforms.parse import _ID_RE, normalise_ip
from transforms.rulepack import _RULE_ID_RE, Rule, RulePackError, load_rule_pack, parse_rule_overrides
from transforms.safeguards import AllowlistError, parse_allowlist

if typing.TYPE_CHECKING:
    from google.cloud import bigquery, pubsub_v1

    from service.store import MitigationStore

_LOGGER = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# A BigQuery or Pub/Sub call that has not succeeded in this many seconds, retries included, is a 503: the
# client libraries' defaults wait ten minutes and more, holding a worker thread (and, for the audit insert of
# a policy change, the file's lock). Bigtable's is service.store.DEADLINE_SEC.
BIGQUERY_DEADLINE_SEC = 10.0
# BigQuery and Pub/Sub failures worth a 503 and a retry.
_TRANSIENT = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.RetryError,
    TimeoutError,
)
MAX_BATCH = 100
MAX_REASON = 500
# The id grammar of signals (transforms.parse), anchored: pydantic's pattern is a search, not a full match.
ID_PATTERN = f"^{_ID_RE.pattern}$"
# An entity id: that grammar, or an IPv6 address starting with "::" (::ffff:192.0.2.9), which only an ip may be.
ENTITY_ID_PATTERN = f"^(?:{_ID_RE.pattern}|:[0-9A-Fa-f:.]{{1,45}})$"
RULE_ID_PATTERN = f"^{_RULE_ID_RE.pattern}$"
# One human sentence, at least one visible character. No control characters (C0, DEL, C1: U+009B is a
# terminal's escape introducer, U+0085 a line break), no line or paragraph separators (the set parsing
# refuses in a user agent, transforms.parse._CONTROL_RE), and no invisible format characters (zero-width
# spaces and joiners, bidirectional overrides that make a reason read differently from what it holds, the
# byte-order mark). At least one character must be none of these nor a space: "\S" there let a lone control
# character through ("\x9b31m", "\x01").
_UNPRINTABLE = r"\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
REASON_PATTERN = rf"^[^{_UNPRINTABLE}]*[^\s{_UNPRINTABLE}][^{_UNPRINTABLE}]*$"
OPERATOR_PACK = "operator"
# Audit statuses of operators' changes (reversals keep pipelines.reverse's own status, "reversal").
OPERATOR_ALLOWLIST_ADD = "operator_allowlist_add"
OPERATOR_ALLOWLIST_EXPIRE = "operator_allowlist_expire"
OPERATOR_RULE_PAUSE = "operator_rule_pause"
OPERATOR_RULE_RESUME = "operator_rule_resume"
# The file could not be replaced after its change was audited: this row, naming the first in
# reverses_decision_id, records that the change did not happen.
OPERATOR_CHANGE_FAILED = "operator_change_failed"
_UNPUBLISHED = "the reversal is recorded but not yet published, and the mitigation is still active; try again"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the API reads and writes. Tables are ``PROJECT:DATASET.TABLE``, as for ``pipelines.reverse``."""

    project: str
    bigtable_instance: str
    decisions_topic: str
    decisions_table: str
    audit_table: str
    allowlist_path: str
    rule_overrides_path: str
    rules_path: str
    tokens_path: str | None
    bigtable_table: str = TABLE_ID
    max_body_bytes: int = MAX_BODY_BYTES
    # Set by python -m service: after start-up, everything made so far is frozen out of the collector's sight
    # (_lifespan). Not for apps made and dropped in one process, as tests do: their cycles would never go.
    freeze_gc: bool = False


# --- models -----------------------------------------------------------------------------------
EntityType = enum.StrEnum("EntityType", {name: name for name in ENTITY_TYPES})
EntityId = typing.Annotated[str, Field(pattern=ENTITY_ID_PATTERN, max_length=128, examples=["u-1001"])]
RuleId = typing.Annotated[str, Field(pattern=RULE_ID_PATTERN, max_length=64, examples=["stream_farm_exclude"])]
Reason = typing.Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_REASON,
        pattern=REASON_PATTERN,
        description="Why (appeal or incident number, finding). Stored in the audit table.",
        examples=["Appeal 4411 upheld"],
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    error: str = Field(description="What went wrong, for a person to read.")


class Problem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationFailure(BaseModel):
    error: str
    detail: list[Problem]


class Mitigation(BaseModel):
    """One active enforce decision against an entity, as the pipeline stored it."""

    decision_id: str
    entity_type: str
    entity_id: str
    action: str = Field(description="flag_for_review, exclude_streams, throttle, challenge, block_ip or suspend.")
    rule_id: str
    rule_version: int
    reason: str
    decided_at_ms: int = Field(description="Epoch milliseconds.")
    expires_at_ms: int = Field(description="Epoch milliseconds; the mitigation is active until then.")
    window_start_ms: int
    window_end_ms: int


class EntityMitigations(BaseModel):
    entity_type: str
    entity_id: str
    mitigations: list[Mitigation] = Field(description="Active mitigations, soonest expiry first; empty if none.")


class EntityRef(_Strict):
    entity_type: EntityType
    entity_id: EntityId


class BatchLookupRequest(_Strict):
    entities: list[EntityRef] = Field(min_length=1, max_length=MAX_BATCH)


class BatchLookupResponse(BaseModel):
    results: list[EntityMitigations] = Field(description="One per requested entity, in request order.")


class ReasonRequest(_Strict):
    reason: Reason


class ReversalResponse(BaseModel):
    decision_id: str = Field(description="The reversed decision.")
    reversal_decision_id: str = Field(description="The compensating decision, published and audited.")
    entity_type: str
    entity_id: str
    action: str
    rule_id: str
    actor: str
    reason: str


class AllowlistEntryRequest(_Strict):
    """An allowlist entry as in the YAML file: exactly one of id, id_prefix, cidr (ip only)."""

    entity: EntityType
    id: EntityId | None = None
    id_prefix: typing.Annotated[str, Field(min_length=3, pattern=ID_PATTERN, max_length=128)] | None = None
    cidr: typing.Annotated[str, Field(min_length=3, max_length=64, pattern=r"^[0-9A-Fa-f:./]+$")] | None = None
    rules: list[RuleId] = Field(default_factory=list, max_length=100, description="Empty: every rule.")
    expires: dt.date | None = Field(default=None, description="Last day the entry applies (UTC); none: no end.")
    reason: Reason
    owner: typing.Annotated[str, Field(min_length=1, max_length=200, pattern=REASON_PATTERN)]


class AllowlistEntry(BaseModel):
    index: int = Field(description="Position in the file, from 0; what /v1/allowlist/{index}/expire takes.")
    entity: str
    id: str | None = None
    id_prefix: str | None = None
    cidr: str | None = None
    rules: list[str]
    expires: dt.date | None
    reason: str
    owner: str
    active: bool = Field(description="False once the expiry day has passed.")


class AllowlistResponse(BaseModel):
    version: str = Field(description="SHA-256 of the file; send it as If-Match to refuse a write on a changed file.")
    entries: list[AllowlistEntry]


class AllowlistChange(BaseModel):
    version: str = Field(description="SHA-256 of the file after the change.")
    entry: AllowlistEntry
    audit_id: str


class PausedRule(BaseModel):
    rule: str
    actor: str
    reason: str
    paused_at: str | None = None


class PausedRules(BaseModel):
    paused: list[PausedRule]


class RuleChange(BaseModel):
    rule: str
    paused: bool
    actor: str
    reason: str
    audit_id: str


class Health(BaseModel):
    status: str


def _errors(*codes: int) -> dict[int | str, dict[str, typing.Any]]:
    return {code: {"model": ValidationFailure if code == 422 else Error} for code in codes}


# --- the service's state -----------------------------------------------------------------
class AuditUnavailable(RuntimeError):
    """The audit row could not be written, so the change was not made."""


class _Service:
    """Settings, tokens and the cloud clients, made on first use (the store's at start-up); one per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokens = load_tokens(settings.tokens_path)
        self.known_rules()  # fail at start on a broken pack, not on the first operator call
        # Local paths or gs:// objects (service.policy_files); each carries the lock its changes are made under.
        self.allowlist_file = policy_file(settings.allowlist_path, settings.project)
        self.overrides_file = policy_file(settings.rule_overrides_path, settings.project)

    def known_rules(self) -> dict[str, Rule]:
        """The pack's rules by id, re-read on each use: rules added since start can be paused without a restart."""
        return {rule.id: rule for rule in load_rule_pack(self.settings.rules_path).rules}

    @functools.cached_property
    def store(self) -> MitigationStore:
        from service.store import MitigationStore

        return MitigationStore(self.settings.project, self.settings.bigtable_instance, self.settings.bigtable_table)

    @functools.cached_property
    def bigquery(self) -> bigquery.Client:
        from pipelines.provision import client_for

        return client_for(self.settings.project)

    @functools.cached_property
    def publisher(self) -> pubsub_v1.PublisherClient:
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient()

    def audit(self, row: AuditRow) -> None:
        try:
            errors = self.bigquery.insert_rows_json(
                _table_id(self.settings.audit_table),
                [to_bigquery_row(AUDIT_SCHEMA, row)],
                row_ids=[row.decision_id],
                retry=DEFAULT_RETRY.with_timeout(BIGQUERY_DEADLINE_SEC),
                timeout=BIGQUERY_DEADLINE_SEC,
            )
        except Exception as err:  # any client or transport failure: the caller refuses the change
            _LOGGER.exception("audit insert failed", extra={"decision_id": row.decision_id})
            raise AuditUnavailable(str(err)) from err
        if errors:
            _LOGGER.error("audit table rejected a row: %s", errors, extra={"decision_id": row.decision_id})
            raise AuditUnavailable(str(errors))


async def _service(request: Request) -> _Service:
    # Dependencies are async, though they never wait: FastAPI runs a plain def dependency in its thread pool,
    # a thread hop per dependency per request (benchmarks/README.md, Mitigation API lookups).
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False, description="A token from the token file; scopes read and operate.")


def _requires(scope: str):
    async def dependency(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)
    ) -> Principal:
        return request.app.state.service.tokens.require(credentials.credentials if credentials else None, scope)

    return dependency


reader = _requires(READ)
operator = _requires(OPERATE)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _today(now_ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC).date()


def _rfc3339(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def operator_audit_row(
    *,
    status_: str,
    target: str,
    entity_type: str,
    entity_id: str,
    action: str,
    rule_id: str,
    rule_version: int,
    reason: str,
    actor: str,
    note: str,
    now_ms: int,
) -> AuditRow:
    """An operator's change as an audit row: same table and shape as decisions, rule pack ``operator``."""
    return AuditRow(
        decision_id=hashlib.sha256(f"{status_}\x1f{target}\x1f{now_ms}".encode()).hexdigest()[:32],
        entity_type=entity_type,
        entity_id=entity_id,
        action=action,
        rule_id=rule_id,
        rule_version=rule_version,
        rule_pack=OPERATOR_PACK,
        mode="enforce",
        status=status_,
        reason=reason,
        evidence_json="{}",
        features_json="{}",
        event_count=0,
        window_start_ms=now_ms,
        window_end_ms=now_ms,
        decided_at_ms=now_ms,
        expires_at_ms=now_ms,
        trace_ids=[],
        safeguard_note=note,
        reverses_decision_id=None,
        actor=actor,
    )


# --- policy files --------------------------------------------------------------------------
def _version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_version(text: str, if_match: str | None) -> None:
    if if_match is not None and if_match.strip().strip('"') not in (_version(text), "*"):
        raise HTTPException(status.HTTP_412_PRECONDITION_FAILED, "the file changed since that version; read it again")


def _leading_comments(text: str) -> str:
    """The file's opening comment block, which explains the format to whoever edits it by hand next."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or (lines and not line.strip()):
            lines.append(line)
        else:
            break
    block = "\n".join(lines).rstrip()
    return block + "\n" if block else ""


def _rewrite(text: str, key: str, entries: list) -> str:
    """The file with its ``key`` list replaced; other top-level keys and the leading comments are kept."""
    doc = yaml.safe_load(text) if text.strip() else None
    doc = dict(doc) if isinstance(doc, dict) else {}
    doc[key] = entries
    dumped = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return _leading_comments(text) + dumped


def _audited_write(service: _Service, row: AuditRow, file: PolicyFile, snapshot: Snapshot, text: str) -> None:
    """Audit a change to a policy file and make it: stage the new file beside the old one (a temp file in the
    same directory, or a temp object in the same bucket), then write the audit row, then replace the old file in
    one step (a rename, or a copy conditional on the generation read: readers see old or new). If the new file
    cannot be staged (a missing directory or bucket, a full disk, no permission) nothing is audited; if the
    audit fails the staged file is removed. If the replacement fails after the audit (a file bind-mounted on
    its own refuses a rename; another host changed the object since it was read), a second row,
    ``operator_change_failed``, records that the audited change did not happen; either way the answer is a 503
    and the file is unchanged. If whether it happened cannot be told (``PolicyChangeUnconfirmed``: the copy
    failed and the object could not be read back), the answer is a 503 that says so, and it is logged."""
    staged = file.stage(text)
    try:
        service.audit(row)
    except BaseException:
        file.discard(staged)
        raise
    try:
        file.commit(staged, snapshot)
    except PolicyFileUnwritable as err:
        file.discard(staged)
        failed = row._replace(
            decision_id=hashlib.sha256(f"{OPERATOR_CHANGE_FAILED}\x1f{row.decision_id}".encode()).hexdigest()[:32],
            status=OPERATOR_CHANGE_FAILED,
            safeguard_note=f"not applied: the file could not be replaced ({_error_kind(err)}); {row.safeguard_note}",
            reverses_decision_id=row.decision_id,
        )
        try:
            service.audit(failed)
        except AuditUnavailable:
            _LOGGER.error(
                "an audited change was not made, and that could not be audited", extra={"decision_id": row.decision_id}
            )
        raise
    except PolicyChangeUnconfirmed:
        file.discard(staged)
        _LOGGER.error("an audited change may or may not have been made", extra={"decision_id": row.decision_id})
        raise


def _error_kind(err: PolicyFileUnwritable) -> str:
    """The failure's type name for the audit note (``OSError``, ``PreconditionFailed``): not its message,
    which may carry paths."""
    cause = err.__cause__
    return type(cause).__name__ if cause is not None else type(err).__name__


def _raw_entries(text: str, key: str) -> list:
    """The file's ``key`` list as plain YAML data (call after the file has been validated)."""
    doc = yaml.safe_load(text) if text.strip() else None
    entries = doc.get(key) if isinstance(doc, dict) else None
    return list(entries) if isinstance(entries, list) else []  # not a list: the validation names the problem


def _day_before(expires_ms: int | None) -> dt.date | None:
    """parse_allowlist keeps the exclusive end (midnight after the day); the file names the day itself."""
    if expires_ms is None:
        return None
    return (dt.datetime.fromtimestamp(expires_ms / 1000, tz=dt.UTC) - dt.timedelta(days=1)).date()


def _parse_allowlist(text: str, known_rules: typing.Collection[str], now_ms: int) -> list[AllowlistEntry]:
    """The entries, validated as the streaming job validates them; raises AllowlistError."""
    parsed = parse_allowlist(text if text.strip() else "allowlist: []", "allowlist", known_rules)
    return [
        AllowlistEntry(
            index=n,
            entity=e.entity,
            id=e.id,
            id_prefix=e.id_prefix,
            cidr=e.cidr,
            rules=list(e.rules),
            expires=_day_before(e.expires_ms),
            reason=e.reason,
            owner=e.owner,
            active=e.expires_ms is None or now_ms < e.expires_ms,
        )
        for n, e in enumerate(parsed.entries)
    ]


def _current_allowlist(text: str, known_rules: typing.Collection[str], now_ms: int) -> list[AllowlistEntry]:
    """The file as it is; a broken file is a conflict for a person to fix, not something to write over."""
    try:
        return _parse_allowlist(text, known_rules, now_ms)
    except AllowlistError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the allowlist file needs fixing by hand first: {err}") from None


def _changed_allowlist(text: str, known_rules: typing.Collection[str], now_ms: int) -> list[AllowlistEntry]:
    """The file after the caller's change; a problem is the request's (422)."""
    try:
        return _parse_allowlist(text, known_rules, now_ms)
    except AllowlistError as err:
        raise HTTPException(422, str(err)) from None


def _allowlist_audit(status_: str, entry: AllowlistEntry, reason: str, actor: str, now_ms: int) -> AuditRow:
    key, value = next((k, getattr(entry, k)) for k in ("id", "id_prefix", "cidr") if getattr(entry, k) is not None)
    rules = ",".join(entry.rules) or "*"
    expires = entry.expires.isoformat() if entry.expires else "never"
    return operator_audit_row(
        status_=status_,
        target=f"allowlist\x1f{entry.entity}\x1f{key}\x1f{value}",
        entity_type=entry.entity,
        entity_id=value,
        action="allowlist",
        rule_id=rules,
        rule_version=0,
        reason=reason,
        actor=actor,
        note=f"allowlist entry #{entry.index}: {key} {value}, rules {rules}, expires {expires}, owner {entry.owner}",
        now_ms=now_ms,
    )


def _paused_entries(text: str, known_rules: typing.Collection[str]) -> list[dict]:
    """The overrides file's entries, validated with parse_rule_overrides; a broken file is a conflict (409)."""
    try:
        parse_rule_overrides(text, "rule overrides", known_rules)
    except RulePackError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the rule overrides file needs fixing: {err}") from None
    return _raw_entries(text, "paused")


def _paused_ids(text: str) -> set[str]:
    """Rule ids named in the file, whether or not the pack still has them (so they can be resumed)."""
    try:
        entries = _raw_entries(text, "paused")
    except yaml.YAMLError:
        return set()
    return {e["rule"] for e in entries if isinstance(e, dict) and isinstance(e.get("rule"), str)}


def _as_text(value) -> str | None:
    if isinstance(value, dt.datetime):  # an unquoted timestamp written by hand; YAML gives one without a zone as UTC
        stamp = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    return None if value is None else str(value)


def _rule_audit(status_: str, rule: Rule | None, rule_id: str, reason: str, actor: str, now_ms: int) -> AuditRow:
    pausing = status_ == OPERATOR_RULE_PAUSE
    return operator_audit_row(
        status_=status_,
        target=f"rule\x1f{rule_id}",
        entity_type="rule",
        entity_id=rule_id,
        action=rule.action if rule else "none",
        rule_id=rule_id,
        rule_version=rule.version if rule else 0,
        reason=reason,
        actor=actor,
        note="paused: runs in shadow until resumed" if pausing else "resumed: enforces from the next policy reload",
        now_ms=now_ms,
    )


# --- endpoints -------------------------------------------------------------------------------
router = APIRouter()
EntityTypePath = typing.Annotated[EntityType, Path(description="One of the platform's entity types.")]
EntityIdPath = typing.Annotated[
    str, Path(pattern=ENTITY_ID_PATTERN, max_length=128, description="The entity's id; an ip's in any form.")
]
DecisionIdPath = typing.Annotated[str, Path(pattern=ID_PATTERN, max_length=128, description="A decision id.")]
RuleIdPath = typing.Annotated[str, Path(pattern=RULE_ID_PATTERN, max_length=64, description="A rule id of the pack.")]
IndexPath = typing.Annotated[int, Path(ge=0, le=100_000, description="The entry's index from GET /v1/allowlist.")]
IfMatch = typing.Annotated[
    str | None,
    Header(max_length=200, description="The version from GET /v1/allowlist; the write is refused (412) if stale."),
]
RequiredIfMatch = typing.Annotated[
    str,
    Header(
        max_length=200,
        description="Required: the version from GET /v1/allowlist (* for any); refused (412) if stale. An index "
        "names an entry only in the version of the file the caller read.",
    ),
]
Service = typing.Annotated[_Service, Depends(_service)]
Reader = typing.Annotated[Principal, Depends(reader)]
Operator = typing.Annotated[Principal, Depends(operator)]
_READ_ERRORS = _errors(401, 403, 413, 422, 503)
_RULE_ERRORS = _errors(401, 403, 404, 409, 413, 422, 503)  # pause and resume take no If-Match


@router.get("/healthz", tags=["ops"], operation_id="healthz")
async def healthz() -> Health:
    """Liveness: the process serves requests. Needs no token and touches no backend.

    Async, so it runs on the event loop: it answers while every worker thread waits on a slow backend.
    """
    return Health(status="ok")


def _stored_id(entity_type: str, entity_id: str) -> str:
    """The id as the pipeline stores it: an IP in the form parsing gives it (compressed, IPv4-mapped as IPv4),
    so a gateway that prints 2001:DB8::7 or ::ffff:192.0.2.9 is told what is active against 2001:db8::7 or
    192.0.2.9. An ip that is not an address is a 422, not an empty answer."""
    if entity_type != "ip":
        if entity_id.startswith(":"):  # the pattern lets "::..." through for IPs only
            raise HTTPException(422, "entity_id must start with a letter or digit")
        return entity_id
    try:
        return normalise_ip(entity_id)
    except ValueError:
        raise HTTPException(422, "an ip entity's id must be an IPv4 or IPv6 address") from None


@router.get(
    "/v1/entities/{entity_type}/{entity_id:path}/mitigations",
    tags=["mitigations"],
    responses=_READ_ERRORS,
    operation_id="getEntityMitigations",
)
async def entity_mitigations(
    entity_type: EntityTypePath, entity_id: EntityIdPath, service: Service, _: Reader
) -> EntityMitigations:
    """Active (not yet expired) enforce mitigations against one entity; an empty list if there are none.

    An IP may be written in any form; the answer names it in the pipeline's (compressed; IPv4-mapped as IPv4).
    """
    entity = (entity_type.value, _stored_id(entity_type.value, entity_id))
    found = await service.store.lookup([entity], _now_ms())
    return EntityMitigations(entity_type=entity[0], entity_id=entity[1], mitigations=found[entity])


@router.post(
    "/v1/mitigations:batchLookup",
    tags=["mitigations"],
    responses=_READ_ERRORS,
    operation_id="batchLookupMitigations",
)
async def batch_lookup(body: BatchLookupRequest, service: Service, _: Reader) -> BatchLookupResponse:
    """Active mitigations for 1 to 100 entities, in one Bigtable read; IPs as in the single lookup."""
    wanted = [(e.entity_type.value, _stored_id(e.entity_type.value, e.entity_id)) for e in body.entities]
    found = await service.store.lookup(wanted, _now_ms())
    return BatchLookupResponse(
        results=[EntityMitigations(entity_type=t, entity_id=i, mitigations=found[(t, i)]) for t, i in wanted]
    )


@router.post(
    "/v1/decisions/{decision_id:path}/reversal",
    tags=["decisions"],
    responses=_errors(401, 403, 404, 409, 413, 422, 503),
    operation_id="reverseDecision",
)
def reverse_decision(
    decision_id: DecisionIdPath, body: ReasonRequest, service: Service, caller: Operator
) -> ReversalResponse:
    """Reverse a decision (pipelines.reverse: written, audited and published), then lift its active mitigation.

    A second call is refused (409) but publishes the recorded reversal again and lifts the mitigation, so a retry
    after a failed publish or a failed Bigtable write completes the reversal.
    """
    settings, reason = service.settings, body.reason.strip()
    try:
        original = find_decision(service.bigquery, settings.decisions_table, decision_id, BIGQUERY_DEADLINE_SEC)
    except ReversalError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such decision") from None
    except _TRANSIENT as err:  # a missing table or a bad query is a bug or a misconfiguration: 500, logged
        _LOGGER.error("decision lookup failed: %s", type(err).__name__)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the decisions table is unavailable; try again"
        ) from None
    try:
        reversal = reverse(
            service.bigquery,
            service.publisher,
            decision_id=decision_id,
            reason=reason,
            actor=caller.actor,
            decisions_table=settings.decisions_table,
            audit_table=settings.audit_table,
            decisions_topic=settings.decisions_topic,
            deadline_sec=BIGQUERY_DEADLINE_SEC,
        )
    except ReversalRefused as err:
        if not original.reverses_decision_id:
            try:
                redeliver(
                    service.bigquery,
                    service.publisher,
                    decision_id=original.decision_id,
                    decisions_table=settings.decisions_table,
                    decisions_topic=settings.decisions_topic,
                    deadline_sec=BIGQUERY_DEADLINE_SEC,
                )
            except (ReversalError, api_exceptions.GoogleAPIError) as publish_err:  # unpublished, or lookup failed
                _LOGGER.error("redelivery failed: %s", type(publish_err).__name__, extra={"decision_id": decision_id})
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, _UNPUBLISHED) from None
            service.store.remove(original.entity_type, original.entity_id, original.decision_id)
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    except ReversalUndelivered:
        _LOGGER.error("reversal recorded, not published", extra={"decision_id": original.decision_id})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, _UNPUBLISHED) from None
    except (ReversalError, api_exceptions.GoogleAPIError, TimeoutError) as err:
        # A row refused or a table unreachable before the audit row: nothing was published and the mitigation
        # stays active; calling again makes the reversal (module docstring).
        _LOGGER.error("reversal not made: %s", type(err).__name__, extra={"decision_id": original.decision_id})
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the reversal was not made: nothing was published and the mitigation is still active; try again",
        ) from None
    service.store.remove(original.entity_type, original.entity_id, original.decision_id)
    _LOGGER.info("decision reversed", extra={"decision_id": original.decision_id, "rule_id": original.rule_id})
    return ReversalResponse(
        decision_id=original.decision_id,
        reversal_decision_id=reversal.decision_id,
        entity_type=original.entity_type,
        entity_id=original.entity_id,
        action=original.action,
        rule_id=original.rule_id,
        actor=caller.actor,
        reason=reason,
    )


@router.get(
    "/v1/allowlist",
    tags=["allowlist"],
    responses=_errors(401, 403, 409, 413, 422, 503),
    operation_id="listAllowlist",
)
def list_allowlist(response: Response, service: Service, _: Reader) -> AllowlistResponse:
    """Every allowlist entry, ended ones included (``active`` false), and the file's version (also the ETag)."""
    text = service.allowlist_file.read().text
    version = _version(text)
    response.headers["ETag"] = f'"{version}"'
    return AllowlistResponse(version=version, entries=_current_allowlist(text, (), _now_ms()))


@router.post(
    "/v1/allowlist",
    tags=["allowlist"],
    status_code=status.HTTP_201_CREATED,
    responses=_errors(401, 403, 409, 412, 413, 422, 503),
    operation_id="addAllowlistEntry",
)
def add_allowlist_entry(
    body: AllowlistEntryRequest, service: Service, caller: Operator, if_match: IfMatch = None
) -> AllowlistChange:
    """Append an entry. The whole new file is validated (rule ids against the pack) before it replaces the old."""
    now_ms = _now_ms()
    if body.expires is not None and body.expires < _today(now_ms):
        raise HTTPException(422, "expires is in the past")
    if body.id is not None:
        _stored_id(body.entity.value, body.id)  # 422 for a "::" id on anything but an ip, or an ip that is not one
    raw: dict[str, typing.Any] = {"entity": body.entity.value}
    raw.update({key: getattr(body, key) for key in ("id", "id_prefix", "cidr") if getattr(body, key) is not None})
    raw.update(reason=body.reason.strip(), owner=body.owner.strip())
    if body.rules:
        raw["rules"] = list(body.rules)
    if body.expires is not None:
        raw["expires"] = body.expires
    file = service.allowlist_file
    with file.lock:
        snapshot = file.read()
        text = snapshot.text
        _check_version(text, if_match)
        known = service.known_rules()
        _current_allowlist(text, known, now_ms)
        new_text = _rewrite(text, "allowlist", [*_raw_entries(text, "allowlist"), raw])
        entry = _changed_allowlist(new_text, known, now_ms)[-1]
        row = _allowlist_audit(OPERATOR_ALLOWLIST_ADD, entry, body.reason.strip(), caller.actor, now_ms)
        _audited_write(service, row, file, snapshot, new_text)
    _LOGGER.info("allowlist entry %d added", entry.index, extra={"decision_id": row.decision_id})
    return AllowlistChange(version=_version(new_text), entry=entry, audit_id=row.decision_id)


@router.post(
    "/v1/allowlist/{index}/expire",
    tags=["allowlist"],
    responses=_errors(401, 403, 404, 409, 412, 413, 422, 503),
    operation_id="expireAllowlistEntry",
)
def expire_allowlist_entry(
    index: IndexPath, body: ReasonRequest, service: Service, caller: Operator, if_match: RequiredIfMatch
) -> AllowlistChange:
    """End an entry today: it still applies until the end of today (UTC), as any ``expires`` day does.

    The entry stays in the file, so the file keeps its history. An entry that already ends today or earlier is
    a conflict (409): setting today would extend it. If-Match is required (422 without it; ``*`` accepts any
    version): an index names an entry only in the version of the file the caller read, and after a hand edit
    in between, index 0 may be another entry.
    """
    now_ms = _now_ms()
    today = _today(now_ms)
    file = service.allowlist_file
    with file.lock:
        snapshot = file.read()
        text = snapshot.text
        _check_version(text, if_match)
        known = service.known_rules()
        entries = _current_allowlist(text, known, now_ms)
        if index >= len(entries):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no allowlist entry {index} (there are {len(entries)})")
        if entries[index].expires is not None and entries[index].expires <= today:
            raise HTTPException(status.HTTP_409_CONFLICT, f"entry {index} already ends on {entries[index].expires}")
        raw = _raw_entries(text, "allowlist")
        raw[index] = {**raw[index], "expires": today}
        new_text = _rewrite(text, "allowlist", raw)
        entry = _changed_allowlist(new_text, known, now_ms)[index]
        row = _allowlist_audit(OPERATOR_ALLOWLIST_EXPIRE, entry, body.reason.strip(), caller.actor, now_ms)
        _audited_write(service, row, file, snapshot, new_text)
    _LOGGER.info("allowlist entry %d expired", index, extra={"decision_id": row.decision_id})
    return AllowlistChange(version=_version(new_text), entry=entry, audit_id=row.decision_id)


@router.get(
    "/v1/rules/paused",
    tags=["rules"],
    responses=_errors(401, 403, 409, 413, 422, 503),
    operation_id="listPausedRules",
)
def list_paused_rules(service: Service, _: Reader) -> PausedRules:
    """Rules operators paused: the streaming job runs them in shadow."""
    text = service.overrides_file.read().text
    entries = _paused_entries(text, _paused_ids(text))  # shape only: a rule gone from the pack is still listed
    return PausedRules(
        paused=[
            PausedRule(rule=e["rule"], actor=e["actor"], reason=e["reason"], paused_at=_as_text(e.get("paused_at")))
            for e in entries
        ]
    )


@router.post("/v1/rules/{rule_id}/pause", tags=["rules"], responses=_RULE_ERRORS, operation_id="pauseRule")
def pause_rule(rule_id: RuleIdPath, body: ReasonRequest, service: Service, caller: Operator) -> RuleChange:
    """Pause a rule: from the job's next policy reload it runs in shadow (audited ``rule_paused``)."""
    return _set_paused(service, rule_id, True, body.reason.strip(), caller.actor)


@router.post("/v1/rules/{rule_id}/resume", tags=["rules"], responses=_RULE_ERRORS, operation_id="resumeRule")
def resume_rule(rule_id: RuleIdPath, body: ReasonRequest, service: Service, caller: Operator) -> RuleChange:
    """Resume a paused rule: it enforces again from the job's next policy reload."""
    return _set_paused(service, rule_id, False, body.reason.strip(), caller.actor)


def _set_paused(service: _Service, rule_id: str, pause: bool, reason: str, actor: str) -> RuleChange:
    """Add or remove the rule's entry. The new file must pass the job's own check against the current pack."""
    now_ms = _now_ms()
    file = service.overrides_file
    with file.lock:
        rules = service.known_rules()
        snapshot = file.read()
        text = snapshot.text
        entries = _paused_entries(text, set(rules) | _paused_ids(text))
        paused_ids = [e["rule"] for e in entries]
        if pause and rule_id not in rules:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rule {rule_id} in the rule pack")
        if not pause and rule_id not in rules and rule_id not in paused_ids:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rule {rule_id} in the rule pack")
        if pause and rule_id in paused_ids:
            raise HTTPException(status.HTTP_409_CONFLICT, f"rule {rule_id} is already paused")
        if not pause and rule_id not in paused_ids:
            raise HTTPException(status.HTTP_409_CONFLICT, f"rule {rule_id} is not paused")
        if pause:
            entries.append({"rule": rule_id, "actor": actor, "reason": reason, "paused_at": _rfc3339(now_ms)})
        else:  # resuming a rule the pack no longer has is allowed: it drops an entry the job would refuse
            entries = [e for e in entries if e["rule"] != rule_id]
        new_text = _rewrite(text, "paused", entries)
        try:
            parse_rule_overrides(new_text, "rule overrides", rules)
        except RulePackError as err:  # e.g. another entry names a rule the pack has dropped: resume that first
            raise HTTPException(status.HTTP_409_CONFLICT, f"the job would refuse the new file: {err}") from None
        status_ = OPERATOR_RULE_PAUSE if pause else OPERATOR_RULE_RESUME
        row = _rule_audit(status_, rules.get(rule_id), rule_id, reason, actor, now_ms)
        _audited_write(service, row, file, snapshot, new_text)
    _LOGGER.info(
        "rule %s", "paused" if pause else "resumed", extra={"rule_id": rule_id, "decision_id": row.decision_id}
    )
    return RuleChange(rule=rule_id, paused=pause, actor=actor, reason=reason, audit_id=row.decision_id)


# --- middleware and error handling ---------------------------------------------------------
async def _send_json(send: Send, status_code: int, body: dict, extra_headers: dict[str, str] | None = None) -> None:
    payload = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    for name, value in (extra_headers or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuses a request body over the limit with 413 before anything parses it, declared length or chunked.

    The body (at most the limit) is read here and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, {"error": "invalid Content-Length"})
                return
            if int(declared) > self.max_bytes:
                await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes"})
                return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes"})
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AuthenticateFirstMiddleware:
    """A /v1/ request without a known token gets 401 before its body is parsed.

    FastAPI decodes a JSON body before it runs the endpoint's dependencies, so
    a caller with no token and a malformed body would learn about the body
    (422) instead of being told to authenticate. Scopes (403) stay with each
    endpoint's dependency.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            kind, _, token = header.partition(" ")
            tokens = scope["app"].state.service.tokens
            if kind.lower() != "bearer" or tokens.principal(token.strip()) is None:
                await _send_json(send, 401, {"error": UNAUTHENTICATED}, CHALLENGE)
                return
        await self.app(scope, receive, send)


class CatchAllMiddleware:
    """An unhandled exception becomes ``{"error": "internal error"}`` (500); its stack trace goes to the log only."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            _LOGGER.exception("unhandled error in %s %s", scope.get("method"), _route(scope))
            if started:
                raise
            await _send_json(send, 500, {"error": "internal error"})


class AccessLogMiddleware:
    """One line per request: method, route template (never the ids in the path), status and milliseconds."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        start, code = time.monotonic(), 500

        async def tracking(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        finally:
            elapsed = (time.monotonic() - start) * 1000
            _LOGGER.info("%s %s %d %.1f ms", scope.get("method"), _route(scope), code, elapsed)


def _route(scope: Scope) -> str:
    """The matched route's template: ids in the path (user ids, IPs) stay out of the logs."""
    return getattr(scope.get("route"), "path_format", "(not routed)")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Location, message and type only: the input itself is not echoed back.
    problems = [
        {
            "loc": [p if isinstance(p, int) else str(p)[:64] for p in e.get("loc", ())],
            "msg": e["msg"],
            "type": e["type"],
        }
        for e in exc.errors()[:20]
    ]
    return JSONResponse({"error": "invalid request", "detail": problems}, status_code=422)


async def _audit_unavailable(request: Request, exc: AuditUnavailable) -> JSONResponse:
    return JSONResponse({"error": "the audit table is unavailable; nothing was changed"}, status_code=503)


async def _policy_file_unwritable(request: Request, exc: PolicyFileUnwritable) -> JSONResponse:
    _LOGGER.error("policy file cannot be written: %s", exc)
    return JSONResponse({"error": "the policy file cannot be written; nothing was changed"}, status_code=503)


async def _policy_file_unreadable(request: Request, exc: PolicyFileUnreadable) -> JSONResponse:
    _LOGGER.error("policy file cannot be read: %s", exc)
    return JSONResponse({"error": "the policy file cannot be read; try again"}, status_code=503)


async def _policy_change_unconfirmed(request: Request, exc: PolicyChangeUnconfirmed) -> JSONResponse:
    _LOGGER.error("policy file change unconfirmed: %s", exc)
    return JSONResponse(
        {"error": "the change could not be confirmed; read the policy file before trying again"}, status_code=503
    )


async def _policy_file_not_text(request: Request, exc: PolicyFileNotText) -> JSONResponse:
    _LOGGER.error("policy file is not text: %s", exc)
    return JSONResponse({"error": "the policy file needs fixing by hand first: it is not UTF-8 text"}, status_code=409)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    _LOGGER.error("mitigation store unavailable: %s", exc)
    return JSONResponse({"error": "the mitigation store is unavailable; try again"}, status_code=503)


async def _policy_unreadable(request: Request, exc: RulePackError) -> JSONResponse:
    _LOGGER.error("rule pack cannot be used: %s", exc)
    return JSONResponse({"error": "the rule pack cannot be read; nothing was changed"}, status_code=503)


# --- the app -----------------------------------------------------------------------------------
SETTINGS_ENV = "MITIGATION_API_SETTINGS"


def app_from_environment() -> FastAPI:
    """uvicorn's app factory for several worker processes: each builds its app from the settings its parent
    checked and put in the environment (``python -m service --workers``)."""
    from pipelines.logs import setup_logging  # noqa: PLC0415 - a worker process's own logging, as its parent's

    setup_logging()
    return create_app(Settings(**orjson.loads(os.environ[SETTINGS_ENV])))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> typing.AsyncIterator[None]:
    """At start, in the serving loop: make the store's read client, then (``freeze_gc``) move everything made
    so far out of the garbage collector's sight. Without that, a full collection walks the libraries' whole
    heap: in a run at 500 lookups a second, each worker stalled once or twice in 20 s, for 179 to 279 ms,
    and every request queued behind it waited; with it, those collections took 1.6 and 3.2 ms
    (benchmarks/README.md, Mitigation API lookups)."""
    service: _Service = app.state.service
    store = service.store
    store.connect()
    if service.settings.freeze_gc:
        gc.collect()
        gc.freeze()
    yield
    await store.close()


def create_app(settings: Settings) -> FastAPI:
    """The API over these settings. Tokens and the rule pack are read now (a bad file fails at start)."""
    app = FastAPI(
        lifespan=_lifespan,
        title="Mitigation API",
        version="1",
        description=__doc__.split("\n\n")[0],
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = _Service(settings)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AuditUnavailable, _audit_unavailable)
    app.add_exception_handler(RulePackError, _policy_unreadable)
    app.add_exception_handler(PolicyFileUnwritable, _policy_file_unwritable)
    app.add_exception_handler(PolicyFileUnreadable, _policy_file_unreadable)
    app.add_exception_handler(PolicyChangeUnconfirmed, _policy_change_unconfirmed)
    app.add_exception_handler(PolicyFileNotText, _policy_file_not_text)
    from service.store import StoreUnavailable  # noqa: PLC0415 - the Bigtable client library, only with an app

    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    # add_middleware puts the last one outermost: access log, the catch-all, the body limit, then authentication.
    app.add_middleware(AuthenticateFirstMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(AccessLogMiddleware)

    app.include_router(router)
    return app
