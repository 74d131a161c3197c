"""Safeguards between the rules and enforcement: allowlists, caps (circuit breakers) and the action ladder.

A rule hit that would enforce passes three checks, in this order:

1. **Allowlist.** The entity, matched by exact id, id prefix or IP network
   (optionally for some rules only, optionally until a date), is never
   enforced against. The hit becomes a shadow decision with status
   ``suppressed_allowlist`` and the entry's reason, so the audit shows what
   would have happened.
2. **Caps.** A rule may enforce against at most ``max_entities_per_window``
   distinct entities per window, and all rules together against at most the
   global cap. Past the cap, further hits in that window become shadow
   (``capped``), and one ``rule_tripped`` audit record plus a metric alert the
   operator. This bounds the blast radius of a bad rule or a bad deploy.
3. **Action ladder.** While an entity has an active action (until its
   ``expires_at``), a weaker action is not issued (``superseded``) and the same
   action is not issued again (``cooldown``). Severity only rises inside a TTL.

Only hits still ``issued`` after all three are published. Every hit is audited.

A cap of 0, or an action memory of 0, turns that safeguard off without changing
the graph, so it can be changed with a Dataflow ``--update``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import logging
import time
import typing

import apache_beam as beam
import yaml
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from schemas import ACTIONS, ENTITY_TYPES, Decision
from transforms.parse import normalise_ip
from transforms.rulepack import expiry_end_ms, format_duration, load_yaml
from transforms.rules import ISSUED, RuleHit

if typing.TYPE_CHECKING:
    from transforms.policy import PolicySource

_LOGGER = logging.getLogger(__name__)

SUPPRESSED_ALLOWLIST = "suppressed_allowlist"
CAPPED = "capped"
RULE_TRIPPED = "rule_tripped"
COOLDOWN = "cooldown"
SUPERSEDED = "superseded"
SEVERITY = {action: rank for rank, action in enumerate(ACTIONS)}
# The widest network an allowlist entry may name: 0.0.0.0/0 would switch every IP rule off for everyone.
_MIN_PREFIX = {4: 8, 6: 32}
_ENTRY_FIELDS = ("entity", "id", "id_prefix", "cidr", "rules", "expires", "reason", "owner")


def _enforcing(hit: RuleHit) -> bool:
    return hit.status == ISSUED and hit.decision.mode == "enforce"


def _downgrade(hit: RuleHit, status: str, note: str, to_shadow: bool = True) -> RuleHit:
    decision = hit.decision._replace(mode="shadow") if to_shadow else hit.decision
    return hit._replace(decision=decision, status=status, safeguard_note=note)


def _stamp(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- allowlists ------------------------------------------------------------------------
class AllowlistError(ValueError):
    """An allowlist that cannot be used. The message names file, entry and field."""

    def __init__(self, source: str, problem: str, entry: int | None = None, field: str | None = None):
        where = source + (f": entry #{entry}" if entry is not None else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True)
class AllowEntry:
    entity: str
    reason: str
    owner: str
    id: str | None = None
    id_prefix: str | None = None
    cidr: str | None = None
    rules: tuple[str, ...] = ()  # empty: every rule
    expires_ms: int | None = None

    def covers(self, rule_id: str, at_ms: int) -> bool:
        return (not self.rules or rule_id in self.rules) and (self.expires_ms is None or at_ms < self.expires_ms)


@dataclasses.dataclass(frozen=True)
class Allowlist:
    """Entities no enforce decision may target. Lookups are indexed: exact ids by dict, then prefixes and networks."""

    source: str
    entries: tuple[AllowEntry, ...]

    def __post_init__(self):
        exact: dict[tuple[str, str], list[AllowEntry]] = {}
        for entry in self.entries:
            if entry.id is not None:
                exact.setdefault((entry.entity, entry.id), []).append(entry)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_prefixes", [e for e in self.entries if e.id_prefix is not None])
        object.__setattr__(
            self, "_networks", [(ipaddress.ip_network(e.cidr), e) for e in self.entries if e.cidr is not None]
        )

    def match(self, entity_type: str, entity_id: str, rule_id: str, at_ms: int) -> AllowEntry | None:
        for entry in self._exact.get((entity_type, entity_id), ()):
            if entry.covers(rule_id, at_ms):
                return entry
        for entry in self._prefixes:
            if entry.entity == entity_type and entity_id.startswith(entry.id_prefix) and entry.covers(rule_id, at_ms):
                return entry
        if entity_type == "ip" and self._networks:
            try:
                address = ipaddress.ip_address(entity_id)
            except ValueError:
                return None
            if address.version == 6 and address.ipv4_mapped is not None:  # as parsing writes it; ids kept from before
                address = address.ipv4_mapped
            for network, entry in self._networks:
                if address.version == network.version and address in network and entry.covers(rule_id, at_ms):
                    return entry
        return None


EMPTY_ALLOWLIST = Allowlist("(none)", ())


def parse_allowlist(text: str, source: str, known_rules: typing.Collection[str] = ()) -> Allowlist:
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as err:
        raise AllowlistError(source, f"not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("allowlist"), list):
        raise AllowlistError(source, "must be a mapping with an 'allowlist' list")
    entries = []
    for n, raw in enumerate(doc["allowlist"], start=1):
        if not isinstance(raw, dict):
            raise AllowlistError(source, "must be a mapping", n)
        for key in raw:
            if key not in _ENTRY_FIELDS:
                raise AllowlistError(source, f"unknown field (allowed: {', '.join(_ENTRY_FIELDS)})", n, str(key))
        entity = raw.get("entity")
        if entity not in ENTITY_TYPES:
            raise AllowlistError(source, f"must be one of {', '.join(ENTITY_TYPES)}", n, "entity")
        for key in ("reason", "owner"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise AllowlistError(source, "is required: say why and who answers for it", n, key)
        selectors = [k for k in ("id", "id_prefix", "cidr") if raw.get(k) is not None]
        if len(selectors) != 1:
            raise AllowlistError(
                source, "give exactly one of id, id_prefix, cidr", n, selectors[1] if selectors else "id"
            )
        if "cidr" in selectors:
            if entity != "ip":
                raise AllowlistError(source, "cidr applies only to ip entries", n, "cidr")
            try:
                network = ipaddress.ip_network(str(raw["cidr"]), strict=False)
            except ValueError:
                raise AllowlistError(
                    source, f"{raw['cidr']!r} is not an IP network such as 10.0.0.0/8", n, "cidr"
                ) from None
            if network.prefixlen < _MIN_PREFIX[network.version]:  # as a short id_prefix: it covers too much
                widest = f"/{_MIN_PREFIX[4]} for IPv4 and /{_MIN_PREFIX[6]} for IPv6"
                raise AllowlistError(source, f"{network} covers too much: at least {widest}", n, "cidr")
        for key in ("id", "id_prefix"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                # YAML reads 007 as 7 and 12:30 as 750: the entry would protect someone else.
                raise AllowlistError(
                    source, f"must be text, got {raw[key]!r}: quote it so YAML keeps it as written", n, key
                )
        entry_id = raw.get("id")
        if entry_id is not None and entity == "ip":
            try:  # in the form parsing gives ip entity ids, or an exact entry would never match
                entry_id = normalise_ip(entry_id)
            except ValueError:
                raise AllowlistError(source, f"{entry_id!r} is not an IPv4 or IPv6 address", n, "id") from None
        if raw.get("id_prefix") is not None and len(str(raw["id_prefix"])) < 3:
            raise AllowlistError(
                source, "must be at least 3 characters (a shorter prefix covers too much)", n, "id_prefix"
            )
        rules = raw.get("rules") or []
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise AllowlistError(source, "must be a list of rule ids", n, "rules")
        unknown = [r for r in rules if known_rules and r not in known_rules]
        if unknown:
            raise AllowlistError(source, f"unknown rule ids {unknown}", n, "rules")
        expires_ms = None
        if raw.get("expires") is not None:
            try:
                expires_ms = expiry_end_ms(raw["expires"])
            except ValueError as err:
                raise AllowlistError(source, str(err), n, "expires") from None
        entries.append(
            AllowEntry(
                entity=entity,
                reason=raw["reason"].strip(),
                owner=raw["owner"].strip(),
                id=entry_id,
                id_prefix=raw.get("id_prefix"),
                cidr=str(ipaddress.ip_network(str(raw["cidr"]), strict=False)) if raw.get("cidr") is not None else None,
                rules=tuple(rules),
                expires_ms=expires_ms,
            )
        )
    return Allowlist(source, tuple(entries))


def load_allowlist(path: str, known_rules: typing.Collection[str] = ()) -> Allowlist:
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except Exception as err:  # Beam wraps filesystem errors in BeamIOError
        raise AllowlistError(path, f"cannot be read: {err}") from None
    return parse_allowlist(text, path, known_rules)


class ApplyAllowlistFn(beam.DoFn):
    """The allowlist in force (re-read with the policy) applied to each hit."""

    def __init__(self, source: PolicySource):
        self._source = source

    def setup(self):
        self._source.reset()

    def process(self, hit: RuleHit):
        yield apply_allowlist(hit, self._source.current().allowlist)


def apply_allowlist(hit: RuleHit, allowlist: Allowlist) -> RuleHit:
    if not _enforcing(hit):
        return hit
    d = hit.decision
    entry = allowlist.match(d.entity_type, d.entity_id, d.rule_id, d.decided_at_ms)
    if entry is None:
        return hit
    Metrics.counter("safeguards", "suppressed_allowlist").inc()
    return _downgrade(hit, SUPPRESSED_ALLOWLIST, f"allowlisted: {entry.reason} (owner {entry.owner})")


# --- caps --------------------------------------------------------------------------------
def tripped_record(hit: RuleHit, scope: str, cap: int, lateness_sec: int) -> RuleHit:
    """The audit record that tells an operator a cap was hit."""
    d = hit.decision
    window = format_duration((d.window_end_ms - d.window_start_ms) // 1000)
    what = f"rule {d.rule_id}" if scope == "rule" else "all rules together"
    reason = (
        f"Circuit breaker: {what} reached the cap of {cap} entities in the {window} window starting "
        f"{_stamp(d.window_start_ms)}; further decisions in this window are shadow only."
    )
    key = f"tripped\x1f{scope}\x1f{d.rule_id if scope == 'rule' else '*'}\x1f{d.window_start_ms}\x1f{d.window_end_ms}"
    record = Decision(
        decision_id=hashlib.sha256(key.encode()).hexdigest()[:32],
        entity_type="rule",
        entity_id=d.rule_id if scope == "rule" else "*",
        action=d.action,
        rule_id=d.rule_id,
        rule_version=d.rule_version,
        mode="shadow",
        reason=reason,
        evidence={"cap": float(cap)},
        window_start_ms=d.window_start_ms,
        window_end_ms=d.window_end_ms,
        decided_at_ms=d.decided_at_ms,
        expires_at_ms=d.window_end_ms + lateness_sec * 1000,
        trace_ids=[],
    )
    return RuleHit(record, RULE_TRIPPED, "{}", 0, hit.rule_pack, f"cap {cap} ({scope})")


class _Cap:
    """One cap scope's check, shared by the streaming ``CapFn`` and the batch ``CapBatchFn``."""

    def __init__(self, scope: str, global_cap: int, lateness_sec: int, source: PolicySource):
        super().__init__()
        self._scope, self._global_cap, self._lateness = scope, global_cap, lateness_sec
        self._source = source
        self._capped = Metrics.counter("safeguards", f"capped_{scope}")
        self._tripped = Metrics.counter("safeguards", "rule_tripped")

    def setup(self):
        self._source.reset()

    def cap_for(self, hit: RuleHit) -> int:
        """The cap this hit counts against; 0 when none applies (cap off, or the hit does not enforce)."""
        if not _enforcing(hit):
            return 0
        if self._scope != "rule":
            return self._global_cap
        for rule in self._source.current().pack.rules:  # a handful of rules: a scan is cheapest
            if rule.id == hit.decision.rule_id:
                return rule.max_entities_per_window
        return 0

    def step(self, seen: frozenset, tripped: bool, hit: RuleHit, cap: int) -> tuple[list[RuleHit], frozenset, bool]:
        """One hit against the entities already enforced in its (scope, window) and whether the cap tripped.

        ``cap`` is ``cap_for(hit)``. Returns the records to emit, and the new entities and tripped flag.
        """
        d = hit.decision
        entity = (d.entity_type, d.entity_id)
        if cap <= 0 or entity in seen:
            return [hit], seen, tripped
        if len(seen) < cap:
            return [hit], seen | {entity}, tripped
        self._capped.inc()
        out = [_downgrade(hit, CAPPED, f"over the {self._scope} cap of {cap} entities in this window")]
        if not tripped:
            self._tripped.inc()
            record = tripped_record(hit, self._scope, cap, self._lateness)
            _LOGGER.warning(
                "circuit breaker tripped: %s",
                record.decision.reason,
                extra={"rule_id": d.rule_id, "decision_id": record.decision.decision_id},
            )
            out.append(record)
        return out, seen, True


class CapFn(_Cap, beam.DoFn):
    """Streaming: counts distinct entities enforced per (scope, window); past the cap, hits go to shadow.

    Timeline for a rule with a cap of 2 in the 10:00-11:00 window (lateness 1 h)::

        10:05  user A hit: 1 entity -> enforce
        10:20  user B hit: 2 entities -> enforce
        10:30  user A again (a re-fired pane): already counted -> enforce (same decision id)
        10:40  user C hit: over the cap -> shadow, status capped; one rule_tripped record
        10:50  user D hit: shadow, status capped (no second rule_tripped)
        12:00  watermark passes window end + lateness: the timer clears the state
    """

    ENTITIES = ReadModifyWriteStateSpec("entities", PickleCoder())
    TRIPPED = ReadModifyWriteStateSpec("tripped", BooleanCoder())
    CLEANUP = TimerSpec("cleanup", TimeDomain.WATERMARK)

    def process(
        self,
        element,
        entities=beam.DoFn.StateParam(ENTITIES),
        tripped=beam.DoFn.StateParam(TRIPPED),
        cleanup=beam.DoFn.TimerParam(CLEANUP),
    ):
        _, hit = element
        cap = self.cap_for(hit)
        if cap <= 0:  # most hits: no state read
            yield hit
            return
        seen = entities.read() or frozenset()
        was_tripped = bool(tripped.read())
        out, now_seen, now_tripped = self.step(seen, was_tripped, hit, cap)
        if now_seen is not seen:
            entities.write(now_seen)
            d = hit.decision
            cleanup.set(Timestamp(micros=(d.window_end_ms + self._lateness * 1000 + 1000) * 1000))
        if now_tripped and not was_tripped:
            tripped.write(True)
        yield from out

    @on_timer(CLEANUP)
    def clear(self, entities=beam.DoFn.StateParam(ENTITIES), tripped=beam.DoFn.StateParam(TRIPPED)):
        entities.clear()
        tripped.clear()


def _cap_order(hit: RuleHit):
    """Batch: the order a window's hits take the cap's places in (all are decided at the window's end)."""
    d = hit.decision
    return (d.decided_at_ms, d.entity_type, d.entity_id, d.rule_id, d.decision_id)


class CapBatchFn(_Cap, beam.DoFn):
    """Batch: one (scope, window)'s hits, grouped, through the same check in a fixed order.

    A stateful DoFn would do the same, but the local runner then runs the whole
    fused stage before it (features and rules for every window) on one worker,
    and which entities fill a cap would depend on arrival order. Grouping keeps
    that stage parallel and makes a backtest's capped entities the same
    whatever the worker count: places go in ``_cap_order``.
    """

    def process(self, element):
        _, hits = element
        seen, tripped = frozenset(), False
        for hit in sorted(hits, key=_cap_order):
            out, seen, tripped = self.step(seen, tripped, hit, self.cap_for(hit))
            yield from out


def _cap_key(scope: str):
    def key(hit: RuleHit) -> str:
        d = hit.decision
        owner = d.rule_id if scope == "rule" else "*"
        return f"{owner}|{d.window_start_ms}|{d.window_end_ms}"

    return key


# --- action ladder -------------------------------------------------------------------------
def _until(entry) -> int:
    """An active action's expiry. Entries are (expires_at_ms, decision_id); state written before the
    decision id was kept holds the expiry alone, and is read as it is (a Dataflow --update keeps state)."""
    return entry if isinstance(entry, int) else entry[0]


def ladder_step(active: dict[str, tuple], hit: RuleHit, memory_max_sec: int) -> tuple[RuleHit, dict[str, tuple]]:
    """One hit against an entity's active actions ({action: (expires_at_ms, decision_id)}); returns
    (hit, new active).

    The decision that put an action in force passes unchanged when it comes again: in streaming, every
    pane of its window re-evaluates the rule and reaches the ladder (the repeats are dropped after it).
    """
    if memory_max_sec <= 0 or not _enforcing(hit):
        return hit, active
    d = hit.decision
    now = d.decided_at_ms
    active = {action: entry for action, entry in active.items() if _until(entry) > now}
    current = active.get(d.action)
    if current is not None and not isinstance(current, int) and current[1] == d.decision_id:
        return hit, active
    stronger = [a for a in active if SEVERITY[a] > SEVERITY[d.action]]
    if stronger:
        top = max(stronger, key=SEVERITY.get)
        note = f"{top} is active until {_stamp(_until(active[top]))}"
        return _downgrade(hit, SUPERSEDED, note, to_shadow=False), active
    if current is not None:
        note = f"{d.action} already active until {_stamp(_until(current))}"
        return _downgrade(hit, COOLDOWN, note, to_shadow=False), active
    active[d.action] = (min(d.expires_at_ms, now + memory_max_sec * 1000), d.decision_id)
    return hit, active


def _ladder_order(hit: RuleHit):
    """Earliest first; at the same moment the strongest action first, so weaker ones are superseded."""
    d = hit.decision
    return (d.decided_at_ms, -SEVERITY[d.action], d.rule_id, d.decision_id)


class LadderFn(beam.DoFn):
    """Streaming: an entity's active actions in state, cleared by a timer when the last one expires.

    Timeline for user U (exclude_streams TTL 7 d, suspend TTL 30 d)::

        day 0 10:00  exclude_streams (decision E1) -> issued; active {exclude_streams: (day 7, E1)}
        day 0 10:05  E1 again (its window's next pane) -> unchanged; dropped after the ladder as a repeat
        day 0 11:00  exclude_streams from another window (E2) -> cooldown (not re-issued)
        day 1 00:00  suspend -> issued (severity rises); active adds suspend: day 31
        day 2 10:00  exclude_streams -> superseded (suspend is stronger and active)
        day 31       timer fires: state cleared

    With a hold (``hold_sec`` > 0), an entity's enforcing hits wait that long (processing time) from the
    first one, then go through the ladder together in the backtest's order: earliest decision first, and
    at the same moment the strongest action first. Two rules firing in one pane (credential stuffing's
    ``challenge`` and ``block_ip``) reach this step in any order after the shuffles before it; held, the
    weaker is ``superseded`` as in a backtest, instead of both being issued. Timeline, hold 2 s::

        t 0.0 s  challenge (window W, decided at D) -> held; flush timer at t 2.0 s
        t 0.4 s  block_ip  (window W, decided at D) -> held
        t 2.0 s  flush: block_ip issued, then challenge superseded (block_ip is active)

    Hits further apart than the hold are taken as they come. A hold of 0 takes every hit as it arrives,
    without changing the graph.
    """

    ACTIVE = ReadModifyWriteStateSpec("active", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)
    PENDING = BagStateSpec("pending", PickleCoder())
    FLUSH_SET = ReadModifyWriteStateSpec("flush_set", BooleanCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def __init__(self, memory_max_sec: int, hold_sec: float = 0):
        self._max = memory_max_sec
        self._hold_sec = hold_sec
        self._counters = {s: Metrics.counter("safeguards", s) for s in (COOLDOWN, SUPERSEDED)}

    def process(
        self,
        element,
        active=beam.DoFn.StateParam(ACTIVE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
        pending=beam.DoFn.StateParam(PENDING),
        flush_set=beam.DoFn.StateParam(FLUSH_SET),
        flush=beam.DoFn.TimerParam(FLUSH),
    ):
        _, hit = element
        if self._hold_sec > 0 and self._max > 0 and _enforcing(hit):
            pending.add(hit)
            if not flush_set.read():
                flush.set(Timestamp.of(time.time() + self._hold_sec))
                flush_set.write(True)
            return
        yield from self._through_ladder([hit], active, expiry)

    @on_timer(FLUSH)
    def release(
        self,
        active=beam.DoFn.StateParam(ACTIVE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
        pending=beam.DoFn.StateParam(PENDING),
        flush_set=beam.DoFn.StateParam(FLUSH_SET),
    ):
        held = sorted(pending.read(), key=_ladder_order)
        pending.clear()
        flush_set.clear()
        yield from self._through_ladder(held, active, expiry)

    def _through_ladder(self, hits, active, expiry):
        before = active.read() or {}
        after = before
        for hit in hits:
            out, after = ladder_step(after, hit, self._max)
            if out.status in self._counters:
                self._counters[out.status].inc()
            yield out
        if after != before:
            active.write(after)
            expiry.set(Timestamp(micros=max(_until(entry) for entry in after.values()) * 1000))

    @on_timer(EXPIRY)
    def expire(self, active=beam.DoFn.StateParam(ACTIVE)):
        active.clear()


def ladder_batch(element, memory_max_sec: int):
    """Batch: an entity's hits in time order through the same ``ladder_step`` (deterministic)."""
    _, hits = element
    active: dict[str, int] = {}
    for hit in sorted(hits, key=_ladder_order):
        out, active = ladder_step(active, hit, memory_max_sec)
        if out.status in (COOLDOWN, SUPERSEDED):
            Metrics.counter("safeguards", out.status).inc()
        yield out


@dataclasses.dataclass(frozen=True)
class SafeguardConfig:
    """Attributes (the allowlist and per-rule caps come with the policy, see ``transforms.policy``):
    global_cap_per_window: most distinct entities all rules together may enforce against per window; 0 = off.
    action_memory_max_sec: how long an entity's active actions are remembered for the ladder; 0 = off.
    ladder_hold_sec: streaming: how long an entity's hits wait at the ladder to be taken in order; 0 = no wait.
    allowed_lateness_sec: keeps cap state until a window can no longer fire.
    streaming: state and timers (streaming) or grouped, ordered passes (batch) for the caps and the ladder.
    """

    global_cap_per_window: int = 0
    action_memory_max_sec: int = 31 * 86400
    ladder_hold_sec: float = 0
    allowed_lateness_sec: int = 0
    streaming: bool = False


class EnforceSafeguards(beam.PTransform):
    """Rule hits through allowlist, caps and the action ladder (see module docstring)."""

    def __init__(self, source: PolicySource, config: SafeguardConfig):
        super().__init__()
        self._source = source
        self._config = config

    def expand(self, hits):
        cfg = self._config
        allowed = hits | "Allowlist" >> beam.ParDo(ApplyAllowlistFn(self._source)).with_output_types(RuleHit)
        capped = allowed
        for scope in ("rule", "global"):
            label = "RuleCap" if scope == "rule" else "GlobalCap"
            args = (scope, cfg.global_cap_per_window, cfg.allowed_lateness_sec, self._source)
            keyed_hits = capped | f"{label}/Key" >> beam.Map(lambda h, k=_cap_key(scope): (k(h), h)).with_output_types(
                tuple[str, RuleHit]
            )
            if cfg.streaming:
                capped = keyed_hits | f"{label}/Count" >> beam.ParDo(CapFn(*args)).with_output_types(RuleHit)
            else:
                capped = (
                    keyed_hits
                    | f"{label}/Group" >> beam.GroupByKey()
                    | f"{label}/Count" >> beam.ParDo(CapBatchFn(*args)).with_output_types(RuleHit)
                )
        keyed = capped | "Ladder/KeyByEntity" >> beam.Map(
            lambda h: (f"{h.decision.entity_type}:{h.decision.entity_id}", h)
        ).with_output_types(tuple[str, RuleHit])
        if cfg.streaming:
            return keyed | "Ladder/Apply" >> beam.ParDo(
                LadderFn(cfg.action_memory_max_sec, cfg.ladder_hold_sec)
            ).with_output_types(RuleHit)
        return (
            keyed
            | "Ladder/Group" >> beam.GroupByKey()
            | "Ladder/Apply" >> beam.FlatMap(ladder_batch, cfg.action_memory_max_sec).with_output_types(RuleHit)
        )
