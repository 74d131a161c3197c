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

import typing

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from transforms.features import ComputeFeatures, WindowConfig
from transforms.parse import AssignEventTime, ParseSignals
from transforms.rulepack import RulePack
from transforms.rules import ApplyRules, EmitDecisions


class PipelineOutputs(typing.NamedTuple):
    signals: beam.PCollection  # validated Signal records, event-time stamped
    features: beam.PCollection  # EntityFeatures per entity and window
    hits: beam.PCollection  # RuleHit, every rule match with its status
    decisions: beam.PCollection  # Decision records to publish
    audit: beam.PCollection  # AuditRow for every hit
    dead_letters: beam.PCollection  # DeadLetter from any stage


def build_pipeline(
    payloads: beam.PCollection,
    pack: RulePack,
    *,
    source: str = "unknown",
    window_config: WindowConfig = WindowConfig(),
    decision_clock: str = "event",
) -> PipelineOutputs:
    """Wire parse -> event time -> features -> rules -> decisions.

    Args:
      payloads: raw signals: ``bytes``, ``str`` lines or ``PubsubMessage``.
      pack: a validated rule pack (``transforms.rulepack.load_rule_pack``).
      source: names the input in dead-letter rows.
      window_config: lateness and early-firing settings.
      decision_clock: ``event`` stamps decisions at their window's end (a
        backtest gives the same output whenever it runs); ``processing`` uses
        the wall clock (streaming).
    """
    parsed = payloads | "ParseSignals" >> ParseSignals(source)
    signals = parsed.signals | "AssignEventTime" >> AssignEventTime()
    features = signals | "ComputeFeatures" >> ComputeFeatures(pack.feature_plan(), window_config)
    rule_outputs = features | "ApplyRules" >> ApplyRules(pack, decision_clock)
    outputs = rule_outputs.hits | "EmitDecisions" >> EmitDecisions()
    # Rule dead letters live in feature windows; bring them to the global window to join parse failures.
    rule_dead_letters = rule_outputs.dead_letters | "RuleDeadLettersGlobal" >> beam.WindowInto(GlobalWindows())
    dead_letters = (parsed.dead_letters, rule_dead_letters) | "AllDeadLetters" >> beam.Flatten()
    return PipelineOutputs(
        signals=signals,
        features=features,
        hits=rule_outputs.hits,
        decisions=outputs.decisions,
        audit=outputs.audit,
        dead_letters=dead_letters,
    )
