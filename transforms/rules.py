"""Apply a rule pack to windowed features and turn hits into decisions and audit rows."""

from __future__ import annotations

import hashlib
import time
import typing

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from schemas import AuditRow, DeadLetter, Decision
from schemas.features import EntityFeatures
from transforms.rulepack import CompiledRule, RuleEvaluationError, RulePack, render_reason

if typing.TYPE_CHECKING:
    from transforms.policy import PolicySource

# Audit statuses. Only "issued" hits become decisions on the topic; every hit
# becomes an audit row, so we can always see what a rule would have done.
ISSUED = "issued"
BELOW_MIN_EVENTS = "below_min_events"
RULE_EXPIRED = "rule_expired"
RULE_PAUSED = "rule_paused"

DECISION_CLOCKS = ("event", "processing")


class RuleHit(typing.NamedTuple):
    """A rule that matched one entity's window; safeguards may change its mode and status."""

    decision: Decision
    status: str
    features_json: str
    event_count: int
    rule_pack: str
    safeguard_note: typing.Optional[str] = None  # noqa: UP045 - Beam schema inference


beam.coders.registry.register_coder(RuleHit, beam.coders.RowCoder)


def decision_id(rule_id: str, rule_version: int, entity_type: str, entity_id: str, start_ms: int, end_ms: int) -> str:
    """Deterministic id: a replayed or redelivered window yields the same decision id."""
    key = f"{rule_id}\x1f{rule_version}\x1f{entity_type}\x1f{entity_id}\x1f{start_ms}\x1f{end_ms}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def evaluate(
    compiled: list[CompiledRule],
    ef: EntityFeatures,
    pack_label: str,
    decided_at_ms: int,
    errors: list[RuleEvaluationError] | None = None,
):
    """Yield a ``RuleHit`` for each rule whose condition holds on ``ef``.

    A condition that fails at run time raises ``RuleEvaluationError``; with an
    ``errors`` list, the error is appended to it instead and the other rules
    still run, so one broken rule cannot hide a window from the rest.
    """
    features = ef.features
    for cr in compiled:
        rule = cr.rule
        try:
            if not cr.matches(features):
                continue
        except RuleEvaluationError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        evidence = {name: features[name] for name in rule.features}
        evidence["events"] = features["events"]
        enough = features["events"] >= rule.min_events
        # An expired rule keeps running in shadow, so its owner sees what it would still do.
        expired = rule.expires_ms is not None and decided_at_ms >= rule.expires_ms
        # A paused rule (an operator's override) likewise runs in shadow until resumed.
        status = RULE_PAUSED if rule.paused else RULE_EXPIRED if expired else ISSUED if enough else BELOW_MIN_EVENTS
        decision = Decision(
            decision_id=decision_id(
                rule.id, rule.version, ef.entity_type, ef.entity_id, ef.window_start_ms, ef.window_end_ms
            ),
            entity_type=ef.entity_type,
            entity_id=ef.entity_id,
            action=rule.action,
            rule_id=rule.id,
            rule_version=rule.version,
            # Too little evidence, or an expired or paused rule, never enforces: kept as shadow for the audit trail.
            mode=rule.mode if status == ISSUED else "shadow",
            reason=render_reason(rule.reason, features, ef.entity_type, ef.entity_id, ef.window_sec),
            evidence=evidence,
            window_start_ms=ef.window_start_ms,
            window_end_ms=ef.window_end_ms,
            decided_at_ms=decided_at_ms,
            expires_at_ms=decided_at_ms + rule.ttl_sec * 1000,
            trace_ids=list(ef.trace_ids),
        )
        yield RuleHit(
            decision=decision,
            status=status,
            features_json=orjson.dumps(dict(features), option=orjson.OPT_SORT_KEYS).decode(),
            event_count=int(features["events"]),
            rule_pack=pack_label,
        )


class ApplyRulesFn(beam.DoFn):
    """Evaluates the rules that apply to each (entity type, window size).

    The pack travels as plain data and is compiled once per DoFn instance (and
    again only when the source hands back a different pack), so conditions are
    parsed once per worker, not per element. A pack is compared by identity,
    not by its file's digest: pausing a rule (the overrides file) changes the
    pack's rules but not its rules file.
    """

    DEAD_LETTER = "dead_letter"

    def __init__(self, source: PolicySource, decision_clock: str):
        if decision_clock not in DECISION_CLOCKS:
            raise ValueError(f"decision_clock must be one of {DECISION_CLOCKS}, got {decision_clock!r}")
        self._source = source
        self._clock = decision_clock
        self._pack: RulePack | None = None
        self._by_key: dict[tuple[str, int], list[CompiledRule]] = {}
        self._latency = Metrics.distribution("latency", "decision_latency_ms")

    def setup(self):
        self._source.reset()
        self._pack = None

    def _compiled(self) -> tuple[RulePack, dict]:
        pack = self._source.current().pack
        if pack is not self._pack:  # the source returns the same object until it loads a change
            self._by_key = {}
            for rule in pack.rules:
                self._by_key.setdefault((rule.entity, rule.window_sec), []).append(CompiledRule(rule))
            self._pack = pack
        return pack, self._by_key

    def process(self, ef: EntityFeatures):
        pack, by_key = self._compiled()
        compiled = by_key.get((ef.entity_type, ef.window_sec))
        if not compiled:
            return
        # Most windows match none of their rules: find that out first, with nothing else set up. A window that
        # may match (or whose condition fails) goes through evaluate(), which asks every rule again: a rule's
        # answer depends only on the window's features, so it is the same answer.
        features = ef.features
        for cr in compiled:
            try:
                if cr.matches(features):
                    break
            except RuleEvaluationError:
                break
        else:
            return
        decided_at = ef.window_end_ms if self._clock == "event" else int(time.time() * 1000)
        errors: list[RuleEvaluationError] = []
        for hit in evaluate(compiled, ef, pack.label, decided_at, errors):
            Metrics.counter("rule_hits", f"{hit.decision.rule_id}.{hit.status}").inc()
            # Decision latency: from the newest signal behind the features to the decision.
            self._latency.update(max(0, decided_at - ef.last_event_ms))
            yield hit
        for err in errors:  # one dead letter per failing rule; the window's other rules ran
            Metrics.counter("dead_letters", "rule_evaluation_error").inc()
            yield beam.pvalue.TaggedOutput(
                self.DEAD_LETTER,
                DeadLetter(
                    stage="rules",
                    reason="rule_evaluation_error",
                    detail=str(err),
                    # dict(): batch windows' features are a WindowFeatures mapping, which orjson does not know.
                    raw_payload=orjson.dumps({**ef._asdict(), "features": dict(ef.features)}),
                    source=pack.source,
                    failed_at_ms=int(time.time() * 1000),
                ),
            )


class RuleOutputs(typing.NamedTuple):
    hits: beam.PCollection
    dead_letters: beam.PCollection


class ApplyRules(beam.PTransform):
    """``EntityFeatures`` to ``RuleHit`` records; failing conditions go to dead letters.

    Takes one PCollection, or a tuple of them such as ``ComputeFeatures``
    returns: each is evaluated where it is, and only the hits and dead letters
    are flattened (a ``Flatten`` of every window's features would make the
    local runner hold them all; see ``ComputeFeatures``).

    ``source`` is a ``transforms.policy.PolicySource`` (a fixed pack, or one re-read periodically).
    """

    def __init__(self, source: PolicySource, decision_clock: str = "event"):
        super().__init__()
        self._source = source
        self._clock = decision_clock

    def expand(self, features):
        branches = tuple(features) if isinstance(features, (tuple, list)) else (features,)
        # One branch keeps the step name "Evaluate" that the streaming job's state is matched by.
        labels = ["Evaluate"] if len(branches) == 1 else [f"Evaluate{i}" for i in range(len(branches))]
        evaluate = beam.ParDo(ApplyRulesFn(self._source, self._clock)).with_outputs(
            ApplyRulesFn.DEAD_LETTER, main="hits"
        )
        results = [branch | label >> evaluate for label, branch in zip(labels, branches, strict=True)]
        if len(results) == 1:
            return RuleOutputs(results[0].hits, results[0][ApplyRulesFn.DEAD_LETTER])
        return RuleOutputs(
            [r.hits for r in results] | "AllHits" >> beam.Flatten(),
            [r[ApplyRulesFn.DEAD_LETTER] for r in results] | "AllDeadLetters" >> beam.Flatten(),
        )


def count_published(decision: Decision) -> Decision:
    Metrics.counter("decisions", f"{decision.rule_id}.{decision.action}.{decision.mode}").inc()
    return decision


def to_audit_row(hit: RuleHit) -> AuditRow:
    d = hit.decision
    return AuditRow(
        decision_id=d.decision_id,
        entity_type=d.entity_type,
        entity_id=d.entity_id,
        action=d.action,
        rule_id=d.rule_id,
        rule_version=d.rule_version,
        rule_pack=hit.rule_pack,
        mode=d.mode,
        status=hit.status,
        reason=d.reason,
        evidence_json=orjson.dumps(dict(d.evidence), option=orjson.OPT_SORT_KEYS).decode(),
        features_json=hit.features_json,
        event_count=hit.event_count,
        window_start_ms=d.window_start_ms,
        window_end_ms=d.window_end_ms,
        decided_at_ms=d.decided_at_ms,
        expires_at_ms=d.expires_at_ms,
        trace_ids=list(d.trace_ids),
        safeguard_note=hit.safeguard_note,
        reverses_decision_id=d.reverses_decision_id,
        actor=d.actor,
    )


class DecisionOutputs(typing.NamedTuple):
    decisions: beam.PCollection
    audit: beam.PCollection


class EmitDecisions(beam.PTransform):
    """Hits to published decisions (status ``issued`` only) and audit rows (all hits)."""

    def expand(self, hits):
        decisions = (
            hits
            | "Issued" >> beam.Filter(lambda h: h.status == ISSUED)
            | "Decision" >> beam.Map(lambda h: count_published(h.decision)).with_output_types(Decision)
        )
        audit = hits | "AuditRow" >> beam.Map(to_audit_row).with_output_types(AuditRow)
        return DecisionOutputs(decisions, audit)
