"""Backtest and streaming give the same decisions for the same events when streaming fires on-time panes only."""

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines import backtest, simulate
from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from transforms.parse import parse_signal
from transforms.rulepack import load_rule_pack

PACK = load_rule_pack(DEFAULT_RULES)


def test_backtest_and_streaming_decide_the_same_ids(tmp_path):
    lines, _ = simulate.simulate(seed=5, hours=12, scale=0.08, malformed=0)
    stamped = sorted((parse_signal(line).signal.event_time_ms, line) for line in lines)

    # The backtest command's decisions are the expectation.
    signals = tmp_path / "signals.jsonl"
    simulate.write_jsonl(str(signals), [line for _, line in stamped])
    # The action ladder is off on both sides: it orders simultaneous hits strongest-first in
    # batch but by arrival in streaming, which is a documented difference, not a windowing one.
    backtest.run(["--input", str(signals), "--output_dir", str(tmp_path), "--action_memory_max_sec=0"])
    expected = [orjson.loads(x)["decision_id"] for x in (tmp_path / "decisions.jsonl").read_bytes().splitlines()]
    assert len(expected) > 20, "the sample should produce a fair number of decisions"

    # Streaming: events arrive in event-time order with the watermark following
    # them; no early firings and no lateness, so only on-time panes fire.
    stream = TestStream().advance_watermark_to(stamped[0][0] / 1000)
    for start in range(0, len(stamped), 500):
        chunk = stamped[start : start + 500]
        stream = stream.add_elements([TimestampedValue(line, t / 1000) for t, line in chunk])
        stream = stream.advance_watermark_to(chunk[-1][0] / 1000)
    stream = stream.advance_watermark_to_infinity()

    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    config = PipelineConfig(streaming=True, early_firing_sec=0, allowed_lateness_sec=0, action_memory_max_sec=0)
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, PACK, config=config)
        assert_that(out.decisions | beam.Map(lambda d: d.decision_id), equal_to(expected))
