"""Repeats are dropped while remembered, and the memory is released by a timer."""

import time

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from schemas import Signal
from tests.kit import T0_MS, signal
from transforms.dedupe import (
    DeduplicateSignals,
    DropRepeatedHitsFn,
    DropRepeatedSignalsFn,
    PackByHourFn,
    decode_pack,
    earliest_copies,
    encode_pack,
    hit_key,
)
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


def test_a_decision_is_remembered_for_its_own_ttl_capped_and_while_its_window_can_fire():
    from tests.schemas.test_schemas import _decision

    hit = RuleHit(_decision(), "issued", "{}", 1, "p@1")  # a 1 h window; expires one hour after it was decided
    assert DropRepeatedHitsFn(max_ttl_sec=86400).ttl_sec(hit) == 3600
    # the window (1 h) and its lateness (1 h) outlast the decision: a late pane would repeat its id
    assert DropRepeatedHitsFn(max_ttl_sec=86400, allowed_lateness_sec=3600).ttl_sec(hit) == 7200
    week = hit._replace(decision=hit.decision._replace(expires_at_ms=hit.decision.decided_at_ms + 7 * 86400_000))
    assert DropRepeatedHitsFn(max_ttl_sec=86400).ttl_sec(week) == 86400  # the TTL, capped
    assert DropRepeatedHitsFn(max_ttl_sec=60).ttl_sec(week) == 3600  # the cap never cuts the window's life
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


@pytest.mark.parametrize("shards_per_hour, pack_size", [(1, 1000), (1, 2), (3, 1)])
def test_batch_keeps_the_earliest_copy_across_packs_and_shards(shards_per_hour, pack_size):
    hour = 3_600_000
    copies = [
        signal("signup", T0_MS + 5, event_id="e1"),  # re-timed copy: later, dropped
        signal("signup", T0_MS, event_id="e1", country="SE"),  # same time, content breaks the tie
        signal("signup", T0_MS, event_id="e1", country="DE"),  # kept: "DE" sorts before "SE"
        signal("signup", T0_MS + 1, event_id="e2"),
        signal("signup", T0_MS + 2 * hour, event_id="e3"),
        signal("signup", T0_MS + 2 * hour, event_id="e3"),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(copies) | DeduplicateSignals(600, False, shards_per_hour, pack_size)
        assert_that(
            out | beam.Map(lambda s: (s.event_id, s.event_time_ms, s.country)),
            equal_to([("e1", T0_MS, "DE"), ("e2", T0_MS + 1, None), ("e3", T0_MS + 2 * hour, None)]),
        )


def test_a_group_comes_out_once_per_event_id_in_event_time_order():
    signals = [signal("login", T0_MS + ms, event_id=f"e{ms % 7}") for ms in (40, 3, 7, 3, 12, 5, 40)]
    packs = [encode_pack([tuple(s) for s in signals[:4]]), encode_pack([tuple(s) for s in signals[4:]])]
    kept, dropped = earliest_copies(packs)
    # e5 has copies at 40, 12, 5 and 40 ms; e3 two identical copies at 3 ms.
    assert [(s.event_id, s.event_time_ms - T0_MS) for s in kept] == [("e3", 3), ("e5", 5), ("e0", 7)]
    assert dropped == 4


def test_copies_straddling_an_hour_are_both_kept_in_batch():
    """The documented limit: batch de-duplicates within an event-time hour, as streaming does within its TTL."""
    before, after = signal("signup", T0_MS - 1, event_id="e1"), signal("signup", T0_MS, event_id="e1")
    assert T0_MS % 3_600_000 == 0, "T0 must start an hour for this test"
    with TestPipeline() as p:
        out = p | beam.Create([before, after]) | DeduplicateSignals(600, streaming=False)
        assert_that(out | beam.Map(lambda s: s.event_time_ms), equal_to([T0_MS - 1, T0_MS]))


def test_a_pack_is_compressed_and_decodes_to_its_signals():
    signals = [signal("stream", t_ms=T0_MS + i * 1000, event_id=f"e{i}") for i in range(200)]
    signals[7] = signal("payment", T0_MS, event_id="p1", success=False, ip="::1", user_agent='é\u2603 "x"')
    fields = [tuple(s) for s in signals]
    for packed in (signals, fields):  # PackByHourFn packs the signals themselves; tuples pack the same
        pack = encode_pack(packed)
        decoded = decode_pack(pack)
        assert decoded == signals and all(type(s) is Signal for s in decoded)
        assert [[type(v) for v in s] for s in decoded] == [[type(v) for v in s] for s in signals]  # False is not 0
    # Repetitive signals shrink several times over; a pack stored as its plain JSON would not.
    assert len(pack) * 4 < len(orjson.dumps(fields))


def test_packing_a_batch_packs_as_its_signals_one_by_one():
    signals = [signal("stream", t_ms=T0_MS + i * 600_000, event_id=f"e{i}") for i in range(25)]
    one_by_one, batched = PackByHourFn(pack_size=4), PackByHourFn(pack_size=4)
    one_by_one.start_bundle()
    batched.start_bundle()
    expected = [out for s in signals for out in one_by_one.process(s)]
    assert expected and list(batched.process_batch(signals)) == expected  # full packs, as they fill
    rest = [wv.value for wv in batched.finish_bundle()]
    assert rest and rest == [wv.value for wv in one_by_one.finish_bundle()]  # partly filled hours


@pytest.mark.parametrize("se_first", [True, False])
def test_of_two_copies_at_one_moment_the_same_is_kept_whichever_comes_first(se_first):
    """Content breaks the tie, so the copy kept never depends on file order (keeping the first or the last
    copy seen passed the test above, where the kept copy came last)."""
    se = signal("signup", T0_MS, event_id="e1", country="SE")
    de = signal("signup", T0_MS, event_id="e1", country="DE")
    packs = [[se], [de]] if se_first else [[de], [se]]
    kept, dropped = earliest_copies([encode_pack([tuple(s) for s in pack]) for pack in packs])
    assert [s.country for s in kept] == ["DE"] and dropped == 1


def test_copies_straddling_an_hour_inside_a_day_are_both_kept_in_batch():
    """The group is the event-time hour, not a longer span (the straddle test above crosses midnight too)."""
    hour = 3_600_000
    before = signal("signup", T0_MS + 5 * hour - 1, event_id="e1")
    after = signal("signup", T0_MS + 5 * hour, event_id="e1")
    with TestPipeline() as p:
        out = p | beam.Create([before, after]) | DeduplicateSignals(600, streaming=False)
        assert_that(out | beam.Map(lambda s: s.event_time_ms), equal_to([T0_MS + 5 * hour - 1, T0_MS + 5 * hour]))


def test_batch_counts_the_copies_it_drops():
    copies = [signal("signup", T0_MS + i, event_id="e1") for i in range(3)] + [signal("signup", event_id="e2")]
    pipeline = TestPipeline()
    out = pipeline | beam.Create(copies) | DeduplicateSignals(600, streaming=False)
    assert_that(out | beam.Map(lambda s: s.event_id), equal_to(["e1", "e2"]))
    result = pipeline.run()
    result.wait_until_finish()
    from apache_beam.metrics import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_name("duplicates_dropped"))["counters"]
    assert sum(c.committed for c in counters) == 2


def test_a_negative_ttl_is_refused_when_the_graph_is_built():
    with pytest.raises(ValueError, match="ttl_sec must be >= 0"):
        DeduplicateSignals(-1, streaming=True)
