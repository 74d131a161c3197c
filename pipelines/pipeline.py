"""The mitigation pipeline's graph, built from input PCollections; no I/O here.

``build_pipeline`` takes raw payloads (file lines, bytes or Pub/Sub messages)
and returns every output as a ``PipelineOutputs`` NamedTuple. Entry points
(``pipelines.backtest`` for files, the streaming job for Pub/Sub) wire sources
and sinks around it; tests wire ``Create`` or ``TestStream`` in and assert on
the returned PCollections.

Stage labels are part of the job's identity on Dataflow (``--update`` matches
state by step name): rename one only together with ``--transform_name_mapping``.
"""

from __future__ import annotations

import dataclasses
import typing

import apache_beam as beam

from transforms.dedupe import BATCH_GROUP_MS, DeduplicateHits, DeduplicateSignals
from transforms.features import ComputeFeatures, WindowConfig
from transforms.parse import ArrivalBounds, AssignEventTime, ParseSignals
from transforms.policy import Policy, PolicySource
from transforms.rulepack import RulePack
from transforms.rules import ApplyRules, EmitDecisions
from transforms.safeguards import EMPTY_ALLOWLIST, Allowlist, EnforceSafeguards, SafeguardConfig


class PipelineOutputs(typing.NamedTuple):
    signals: beam.PCollection  # validated, de-duplicated Signal records (event-time stamped in streaming)
    # EntityFeatures per entity and window, as ComputeFeatures' branches (one in streaming, two in batch): apply
    # per-window steps to each, and flatten only in streaming or for small inputs (see ComputeFeatures).
    features: tuple[beam.PCollection, ...]
    hits: beam.PCollection  # RuleHit, every rule match with its status
    decisions: beam.PCollection  # Decision records to publish
    audit: beam.PCollection  # AuditRow for every hit
    dead_letters: beam.PCollection  # DeadLetter from any stage


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the graph behaves in batch (backtests) and streaming (the Pub/Sub job).

    Attributes:
      streaming: True for the unbounded Pub/Sub job. Batch computes windows by
        key (everything is on time), stamps decisions at their window's end so
        a backtest is reproducible, and keeps the earliest copy of each event
        id within its event-time hour (``transforms.dedupe``). Streaming uses
        Beam windows with early and late firings, stamps decisions with the
        wall clock, and drops repeated signals and decisions with state and
        timers.
      allowed_lateness_sec: streaming only: how long after a window's end late
        signals still update it.
      max_future_skew_sec: streaming only: dead-letter a signal whose event time
        is further than this after its message's publish time; 0 = unchecked.
        A signal published after its last window ended and the allowed lateness
        passed is always dead-lettered in streaming (``transforms.parse.ArrivalBounds``).
      early_firing_sec: streaming only: fire a speculative pane this often
        (processing time) so a decision need not wait for the window's end; 0
        fires only at the watermark.
      signal_dedup_ttl_sec: streaming only: how long an event id is remembered
        (processing time); 0 turns de-duplication off without changing the graph.
      dedupe_shards_per_hour: batch only: split each event-time hour's
        de-duplication group this many ways by event id, so one group stays
        small enough for one worker (``transforms.dedupe``).
      decision_dedup_max_ttl_sec: streaming only: upper bound on how long a
        decision id is remembered to drop repeats (each is kept for its own TTL,
        and at least until its window can no longer fire).
      allowlist, global_cap_per_window, action_memory_max_sec: the
        safeguards (see ``transforms.safeguards``); caps and memory of 0 are off.
      ladder_hold_sec: streaming only: how long an entity's hits wait at the
        action ladder so hits arriving together are taken strongest first, as a
        backtest takes them (``transforms.safeguards.LadderFn``); 0 = no wait.
      rules_path, allowlist_path, rule_overrides_path, policy_reload_sec:
        streaming only: re-read the pack, allowlist and operators' rule pauses
        this often so changes apply without a redeploy
        (``transforms.policy``); 0 keeps the start-up policy.
      feature_rows: streaming only: every pane's features are written as a row
        (``--features_table``), so compute them all as the pane fires rather
        than each as a rule reads it (``WindowConfig.every_feature``).
    """

    streaming: bool = False
    allowed_lateness_sec: int = 0
    early_firing_sec: int = 0
    max_future_skew_sec: int = 0
    signal_dedup_ttl_sec: int = 600
    dedupe_shards_per_hour: int = 1
    decision_dedup_max_ttl_sec: int = 2 * 86400
    allowlist: Allowlist = EMPTY_ALLOWLIST
    global_cap_per_window: int = 0
    action_memory_max_sec: int = 31 * 86400
    ladder_hold_sec: float = 0
    rules_path: str | None = None
    allowlist_path: str | None = None
    rule_overrides_path: str | None = None
    policy_reload_sec: float = 0
    feature_rows: bool = False

    def policy_source(self, pack: RulePack) -> PolicySource:
        return PolicySource(
            Policy(pack, self.allowlist),
            rules_path=self.rules_path,
            allowlist_path=self.allowlist_path,
            reload_sec=self.policy_reload_sec if self.streaming else 0,
            overrides_path=self.rule_overrides_path,
        )

    def safeguard_config(self) -> SafeguardConfig:
        return SafeguardConfig(
            global_cap_per_window=self.global_cap_per_window,
            action_memory_max_sec=self.action_memory_max_sec,
            ladder_hold_sec=self.ladder_hold_sec,
            allowed_lateness_sec=self.allowed_lateness_sec,
            streaming=self.streaming,
        )

    def window_config(self) -> WindowConfig:
        if not self.streaming:
            # Unsharded, batch de-duplication hands each event-time hour over as one batch.
            whole = BATCH_GROUP_MS if self.dedupe_shards_per_hour == 1 else 0
            return WindowConfig(keyed_windows=True, whole_batch_ms=whole)
        return WindowConfig(
            allowed_lateness_sec=self.allowed_lateness_sec,
            early_firing_sec=self.early_firing_sec,
            every_feature=self.feature_rows,
        )

    @property
    def decision_clock(self) -> str:
        return "processing" if self.streaming else "event"


def build_pipeline(
    payloads: beam.PCollection,
    pack: RulePack,
    *,
    source: str = "unknown",
    config: PipelineConfig = PipelineConfig(),
) -> PipelineOutputs:
    """Wire parse -> de-duplicate -> event time -> features -> rules -> safeguards -> decisions.

    Args:
      payloads: raw signals: ``bytes``, ``str`` lines or ``PubsubMessage``.
      pack: a validated rule pack (``transforms.rulepack.load_rule_pack``).
      source: names the input in dead-letter rows.
      config: batch or streaming behaviour (see ``PipelineConfig``).
    """
    # Batch validates Beam batches of lines in one call each where the source yields them (ReadLineBlocks).
    arrival = ArrivalBounds()
    if config.streaming:
        arrival = ArrivalBounds(
            window_sizes_ms=tuple(size * 1000 for size in pack.feature_plan()),
            allowed_lateness_ms=config.allowed_lateness_sec * 1000,
            max_future_ms=config.max_future_skew_sec * 1000,
        )
    parsed = payloads | "ParseSignals" >> ParseSignals(source, batched=not config.streaming, arrival=arrival)
    unique = parsed.signals | "DeduplicateSignals" >> DeduplicateSignals(
        config.signal_dedup_ttl_sec, config.streaming, config.dedupe_shards_per_hour
    )
    # Batch windows are keyed by each signal's own event time (WindowConfig.keyed_windows), so it
    # needs no timestamps, and the de-duplicated signals stay in hour batches (see transforms.dedupe).
    signals = unique | "AssignEventTime" >> AssignEventTime() if config.streaming else unique
    features = signals | "ComputeFeatures" >> ComputeFeatures(pack.feature_plan(), config.window_config())
    policy = config.policy_source(pack)
    rule_outputs = features | "ApplyRules" >> ApplyRules(policy, config.decision_clock)
    hits = rule_outputs.hits | "EnforceSafeguards" >> EnforceSafeguards(policy, config.safeguard_config())
    if config.streaming:
        # Early, on-time and late panes of one window re-evaluate the same rules and yield the same
        # decision id; publish and audit each decision once per outcome. After the safeguards, so the
        # outcome is the final one: a hit superseded in an early pane is issued by a later pane once
        # the stronger action has expired, and an allowlist entry that ends mid-window stops covering it.
        hits = hits | "DeduplicateHits" >> DeduplicateHits(
            config.decision_dedup_max_ttl_sec, config.allowed_lateness_sec
        )
    outputs = hits | "EmitDecisions" >> EmitDecisions()
    dead_letters = (parsed.dead_letters, rule_outputs.dead_letters) | "AllDeadLetters" >> beam.Flatten()
    return PipelineOutputs(
        signals=signals,
        features=features,
        hits=hits,
        decisions=outputs.decisions,
        audit=outputs.audit,
        dead_letters=dead_letters,
    )
