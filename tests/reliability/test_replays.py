"""Duplicates and replays: Pub/Sub redelivers, sometimes out of order and minutes later; nothing is counted twice.

Two streaming runs over the same simulated traffic (attacks included), with the
same watermark and processing-time steps. The clean run sees each message once.
The replayed run also sees about 20% of the messages again: some straight after
the original, shuffled out of order; some a few processing-time minutes later,
after their window has closed (allowed lateness is on, so a duplicate that
slipped through would re-fire the window with a higher count). The replayed run
must publish no decision id twice, the same decision ids as the clean run, and
the same on-time feature values for every entity window.
"""

from __future__ import annotations

import collections
import json
import random

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.windowed_value import PaneInfoTiming

from pipelines import simulate
from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from tests.kit import streaming_options
from transforms.parse import parse_signal
from transforms.rulepack import load_rule_pack

PACK = load_rule_pack(DEFAULT_RULES)
CHUNK = 300
CONFIG = PipelineConfig(streaming=True, early_firing_sec=60, allowed_lateness_sec=3600, signal_dedup_ttl_sec=600)


class _SettledFeaturesFn(beam.DoFn):
    """On-time and late panes; early panes depend on arrival order, and a late pane here means a duplicate got in."""

    def process(self, f, pane=beam.DoFn.PaneInfoParam):
        if pane.timing != PaneInfoTiming.EARLY:
            yield json.dumps([f.entity_type, f.entity_id, f.window_start_ms, sorted(f.features.items())])


def _traffic():
    lines, _ = simulate.simulate(seed=13, hours=3, scale=0.1, malformed=0)
    return sorted((parse_signal(line).signal.event_time_ms, line) for line in lines)


def _build_stream(stamped, replay: bool, rng: random.Random) -> tuple[TestStream, dict[str, int]]:
    """The event-time ordered traffic in chunks; with ``replay``, redeliveries interleaved."""
    stream = TestStream().advance_watermark_to(stamped[0][0] / 1000)
    counts = collections.Counter()
    chunks = [stamped[i : i + CHUNK] for i in range(0, len(stamped), CHUNK)]
    for n, chunk in enumerate(chunks):
        stream = stream.add_elements([TimestampedValue(line, t / 1000) for t, line in chunk])
        counts["original"] += len(chunk)
        if replay:
            again = rng.sample(chunk, len(chunk) // 8)  # redelivered at once, in shuffled order
            stream = stream.add_elements([TimestampedValue(line, t / 1000) for t, line in again])
            counts["redelivered at once, out of order"] += len(again)
        stream = stream.advance_watermark_to(chunk[-1][0] / 1000)
        if n % 3 == 2:
            stream = stream.advance_processing_time(120)  # early panes fire; minutes pass
            if replay and n >= 2:
                old = rng.sample(chunks[n - 2], len(chunks[n - 2]) // 12)  # minutes later, windows closed
                stream = stream.add_elements([TimestampedValue(line, t / 1000) for t, line in old])
                counts["redelivered minutes later, after the window"] += len(old)
    return stream.advance_watermark_to_infinity(), counts


def _run(stream, tmp_path, name: str) -> tuple[list[str], list[str]]:
    """Decision ids (every pane) and settled feature rows of one streaming run, read back from the matchers."""

    def keep(kind):
        def write(items):
            (tmp_path / f"{name}.{kind}.json").write_text(json.dumps(sorted(items)))

        return write

    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, PACK, config=CONFIG)
        assert_that(out.decisions | "Ids" >> beam.Map(lambda d: d.decision_id), keep("decisions"), label="Decisions")
        (features,) = out.features  # streaming: one branch
        assert_that(features | "Settled" >> beam.ParDo(_SettledFeaturesFn()), keep("features"), label="Features")
    return (
        json.loads((tmp_path / f"{name}.decisions.json").read_text()),
        json.loads((tmp_path / f"{name}.features.json").read_text()),
    )


def test_redelivered_and_replayed_signals_change_no_decision_and_no_feature(tmp_path, reliability):
    stamped = _traffic()
    clean_stream, _ = _build_stream(stamped, replay=False, rng=random.Random(1))
    replay_stream, counts = _build_stream(stamped, replay=True, rng=random.Random(1))
    clean_decisions, clean_features = _run(clean_stream, tmp_path, "clean")
    decisions, features = _run(replay_stream, tmp_path, "replayed")

    replayed = counts["redelivered at once, out of order"] + counts["redelivered minutes later, after the window"]
    share = replayed / counts["original"]
    assert 0.10 <= share <= 0.30, f"replay share {share:.0%} outside the 10-30% the test is meant to cover"
    assert len(clean_decisions) > 10, "the traffic should decide against its attackers"

    repeated = sum(n - 1 for n in collections.Counter(decisions).values())
    same_features = sum((collections.Counter(features) & collections.Counter(clean_features)).values())
    reliability.record(
        "duplicates and replays",
        "decisions published once",
        len(decisions),
        len(decisions) - repeated,
        f"{replayed:,} of {counts['original']:,} messages redelivered ({share:.0%})",
    )
    reliability.record(
        "duplicates and replays",
        "same decision ids as the clean stream",
        len(clean_decisions),
        len(set(clean_decisions) & set(decisions)),
    )
    reliability.record(
        "duplicates and replays",
        "entity windows with the clean stream's features",
        len(clean_features),
        max(0, same_features - (len(features) - same_features)),  # an extra (late) pane counts against
        ", ".join(f"{k}: {v:,}" for k, v in counts.items()),
    )
    assert repeated == 0
    assert sorted(set(decisions)) == sorted(set(clean_decisions))
    assert features == clean_features
