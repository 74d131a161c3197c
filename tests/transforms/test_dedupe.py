"""Repeats are dropped while remembered, and the memory is released by a timer."""

import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from schemas import Signal
from tests.kit import T0_MS, signal
from transforms.dedupe import DeduplicateSignals, DropRepeatedHitsFn, DropRepeatedSignalsFn, hit_key
from transforms.rules import RuleHit


class _State:
    """Stands in for Beam's state cell when calling the DoFn's methods directly."""

    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.at = None

    def set(self, at):
        self.at = at


def test_first_copy_passes_repeats_drop_and_the_timer_releases_the_key():
    fn = DropRepeatedSignalsFn(ttl_sec=600)
    state, timer = _State(), _Timer()
    s = signal("signup", event_id="e1")
    before = time.time()
    assert list(fn.process(("e1", s), state, timer)) == [s]
    assert state.value is True
    assert before + 600 <= timer.at.micros / 1e6 <= time.time() + 600
    assert list(fn.process(("e1", s), state, timer)) == []  # redelivery inside the TTL
    fn.expire(state)  # the timer fires
    assert state.value is None
    assert list(fn.process(("e1", s), state, timer)) == [s]  # remembered no longer


def test_ttl_zero_passes_everything_and_keeps_no_state():
    fn = DropRepeatedSignalsFn(ttl_sec=0)
    state, timer = _State(), _Timer()
    s = signal("signup", event_id="e1")
    assert list(fn.process(("e1", s), state, timer)) == [s]
    assert list(fn.process(("e1", s), state, timer)) == [s]
    assert state.value is None and timer.at is None


def test_a_decision_is_remembered_for_its_own_ttl_capped():
    from tests.schemas.test_schemas import _decision

    hit = RuleHit(_decision(), "issued", "{}", 1, "p@1")  # expires one hour after it was decided
    assert DropRepeatedHitsFn(max_ttl_sec=86400).ttl_sec(hit) == 3600
    assert DropRepeatedHitsFn(max_ttl_sec=60).ttl_sec(hit) == 60
    assert hit_key(hit) == "d1/issued/enforce"


def _stream_options():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options


def test_in_a_streaming_pipeline_copies_are_dropped_until_the_timer_fires():
    e1, e2 = signal("signup", T0_MS, event_id="e1"), signal("signup", T0_MS, event_id="e2")
    # The de-duplication timer is set on the processing-time clock (wall time on a
    # runner). TestStream's clock starts at 0, so jump it past wall time + TTL.
    past_ttl = int(time.time()) + 600 + 60  # whole seconds: TestStream wants millisecond-aligned values
    stream = (
        TestStream(coder=beam.coders.registry.get_coder(Signal))
        .add_elements([TimestampedValue(e1, T0_MS / 1000), TimestampedValue(e2, T0_MS / 1000)])
        .add_elements([TimestampedValue(e1, T0_MS / 1000)])  # redelivered: dropped
        .advance_processing_time(past_ttl)
        .add_elements([TimestampedValue(e1, T0_MS / 1000)])  # after the TTL: passes again
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=_stream_options()) as p:
        out = p | stream | DeduplicateSignals(ttl_sec=600, streaming=True)
        assert_that(out | beam.Map(lambda s: s.event_id), equal_to(["e1", "e2", "e1"]))


def test_batch_keeps_the_earliest_copy():
    early, late = signal("signup", T0_MS, event_id="e1"), signal("signup", T0_MS + 5, event_id="e1")
    with TestPipeline() as p:
        out = p | beam.Create([late, early, signal("signup", event_id="e2")]) | DeduplicateSignals(600, streaming=False)
        assert_that(out | beam.Map(lambda s: (s.event_id, s.event_time_ms)), equal_to([("e1", T0_MS), ("e2", T0_MS)]))
