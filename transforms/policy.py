"""The policy in force (rule pack, allowlist, rule pauses), re-read periodically so it changes without a redeploy.

Each DoFn that needs the policy holds a ``PolicySource`` and asks it for
``current()``. With ``reload_sec > 0`` the source re-reads both files (local
or ``gs://``, through Beam's ``FileSystems``) at most that often. It does the
same validation as start-up. A valid change takes effect on that worker, and
every worker picks it up within ``reload_sec``. An invalid file is rejected:
logged once per distinct content, counted (``policy/rejected``), and the last
good policy stays in force.

Why not a PeriodicImpulse side input? The rules read features keyed by
*event* time, which can lag processing time by hours (late data, backfills).
A side input refreshed by processing-time impulses is windowed by processing
time. A main-input element whose event-time window has no matching side-input
window would wait for it forever, and a global-window side input with
triggers has no defined "latest value" across Python runners. Polling in the
DoFn has neither problem, at the cost of each worker reading two small files
every ``reload_sec``.

A reloaded pack may change thresholds, actions, modes, caps and expiry, and
may add or remove rules. It may not need a window size or entity type that the
running job does not compute (``ComputeFeatures`` was built for the start-up
pack); such a pack is rejected with that reason, and needs a new job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import typing

from apache_beam.metrics import Metrics

from transforms.rulepack import RulePack, RulePackError, parse_rule_overrides, parse_rule_pack, paused_rules
from transforms.safeguards import EMPTY_ALLOWLIST, Allowlist, AllowlistError, parse_allowlist

_LOGGER = logging.getLogger(__name__)
# Rejections remembered per process, so each distinct bad file is logged once; bounded, as a storage
# outage's error messages (one per reload) can all differ.
_MAX_REJECTED = 1000


@dataclasses.dataclass(frozen=True)
class Policy:
    pack: RulePack
    allowlist: Allowlist = EMPTY_ALLOWLIST


def _read(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return handle.read()


class PolicySource:
    """The start-up policy, optionally re-read from its files every ``reload_sec`` seconds.

    Runners create and discard DoFn instances (the local runner even per
    bundle), so the last good policy is kept per worker process in
    ``_accepted``, a class-level registry keyed by the file paths, guarded by a
    lock. A new instance in the same process starts from it, not from the
    start-up pack. A brand-new worker process starts from the start-up pack
    until its first read.
    """

    _accepted: typing.ClassVar[dict[tuple, tuple[str, Policy]]] = {}  # paths -> (digest, policy)
    _rejected_digests: typing.ClassVar[set[str]] = set()
    _lock = threading.Lock()

    def __init__(
        self,
        initial: Policy,
        rules_path: str | None = None,
        allowlist_path: str | None = None,
        reload_sec: float = 0,
        overrides_path: str | None = None,
    ):
        self._initial = initial
        self._rules_path, self._allowlist_path, self._overrides_path = rules_path, allowlist_path, overrides_path
        self._reload_sec = reload_sec if rules_path else 0
        self._plan = initial.pack.feature_plan()
        self.reset()

    @property
    def _key(self) -> tuple:
        return (self._rules_path, self._allowlist_path, self._overrides_path, self._initial.pack.digest)

    def reset(self) -> None:
        """Runtime state for a new DoFn instance: the process's last good policy, else the start-up one."""
        with self._lock:
            digest, policy = self._accepted.get(self._key, (None, self._initial))
        self._policy = policy
        self._seen_digest = digest
        self._next_check = 0.0
        self._reloaded = Metrics.counter("policy", "reloaded")
        self._rejected = Metrics.counter("policy", "rejected")

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_reloaded", "_rejected"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.reset()

    def current(self) -> Policy:
        if self._reload_sec <= 0:
            return self._policy
        now = time.monotonic()
        if now < self._next_check:
            return self._policy
        self._next_check = now + self._reload_sec
        try:
            rules_text = _read(self._rules_path)
            allow_text = _read(self._allowlist_path) if self._allowlist_path else b""
            overrides_text = _read(self._overrides_path) if self._overrides_path else b""
        except Exception as err:  # unreadable for now (permissions, a GCS blip): keep the policy in force
            self._reject(f"cannot read the policy files: {err}", digest=f"read-error:{err}")
            return self._policy
        digest = hashlib.sha256(rules_text + b"\0" + allow_text + b"\0" + overrides_text).hexdigest()
        if digest == self._seen_digest:
            return self._policy
        self._seen_digest = digest
        with self._lock:
            accepted = self._accepted.get(self._key)
        if accepted and accepted[0] == digest:  # another instance in this process already loaded it
            self._policy = accepted[1]
            return self._policy
        try:
            pack = parse_rule_pack(rules_text.decode("utf-8"), self._rules_path)
            if self._overrides_path:
                paused = parse_rule_overrides(overrides_text.decode("utf-8"), self._overrides_path, pack.rule_ids)
                pack = paused_rules(pack, paused)
            allowlist = (
                parse_allowlist(allow_text.decode("utf-8"), self._allowlist_path, {r.id for r in pack.rules})
                if self._allowlist_path
                else EMPTY_ALLOWLIST
            )
            self._check_plan(pack)
        except (RulePackError, AllowlistError, UnicodeDecodeError) as err:
            self._reject(str(err), digest)
            return self._policy
        except Exception as err:  # a loader bug must not take the running job down: keep the last good policy
            self._reject(f"{type(err).__name__} while loading: {err}", digest)
            return self._policy
        self._policy = Policy(pack, allowlist)
        with self._lock:
            self._accepted[self._key] = (digest, self._policy)
        if accepted is not None or pack != self._initial.pack or allowlist != self._initial.allowlist:
            self._reloaded.inc()
            _LOGGER.info(
                "policy loaded: pack %s (%d rules, %d paused, sha256 %s), %d allowlist entries",
                pack.label,
                len(pack.rules),
                sum(r.paused for r in pack.rules),
                pack.digest[:12],
                len(allowlist.entries),
            )
        return self._policy

    def _check_plan(self, pack: RulePack) -> None:
        for size, types in pack.feature_plan().items():
            missing = set(types) - set(self._plan.get(size, ()))
            if missing:
                raise RulePackError(
                    pack.source,
                    f"needs {', '.join(sorted(missing))} features over {size} s windows, which this job does not "
                    "compute; deploy a new job for it",
                )

    def _reject(self, problem: str, digest: str) -> None:
        self._seen_digest = digest
        with self._lock:
            if digest in self._rejected_digests:
                return
            if len(self._rejected_digests) >= _MAX_REJECTED:  # read errors may carry request ids: all distinct
                self._rejected_digests.clear()
            self._rejected_digests.add(digest)
        self._rejected.inc()
        _LOGGER.warning("policy change rejected, the previous policy stays in force: %s", problem)
