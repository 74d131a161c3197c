"""The whole graph from raw payloads to decisions, audit rows and dead letters (Scio-style:
inputs swapped for Create/TestStream, outputs asserted; no I/O, no mocks)."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from schemas.features import EntityFeatures
from tests.kit import HOUR_MS, T0_MS, default_rule_version, payload, streaming_options
from tests.transforms.test_rulepack import pack_text, rule
from transforms.lines import ReadLineBlocks
from transforms.rulepack import load_rule_pack, parse_rule_pack
from transforms.rules import BELOW_MIN_EVENTS, ISSUED, decision_id

PACK = load_rule_pack(DEFAULT_RULES)


def farm_and_fan(t0_ms: int = T0_MS):
    farm = [
        payload("stream", t0_ms + i * 75_000, user_id="bot1", device_id="dbot", ms_played=32_000, track_id=f"t{i % 3}")
        for i in range(45)
    ]
    fan = [
        payload("stream", t0_ms + i * 180_000, user_id="fan1", ms_played=175_000, track_id=f"t{i % 10}")
        for i in range(20)
    ]
    return farm + fan


def test_stream_farm_is_excluded_and_the_fan_is_not():
    malformed = [b"{oops", payload("stream", ms_played=-3)]
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create(farm_and_fan() + malformed), PACK, source="test")
        assert_that(
            out.decisions
            | "D" >> beam.Map(lambda d: (d.rule_id, d.entity_type, d.entity_id, d.action, d.mode, d.decision_id)),
            equal_to(
                [
                    (
                        "stream_farm_exclude",
                        "user",
                        "bot1",
                        "exclude_streams",
                        "enforce",
                        decision_id(
                            "stream_farm_exclude",
                            default_rule_version("stream_farm_exclude"),
                            "user",
                            "bot1",
                            T0_MS,
                            T0_MS + HOUR_MS,
                        ),
                    )
                ]
            ),
            label="Decisions",
        )
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.rule_id, a.status, a.event_count, a.rule_pack)),
            equal_to([("stream_farm_exclude", ISSUED, 45, PACK.label)]),
            label="Audit",
        )
        assert_that(
            out.dead_letters | "DL" >> beam.Map(lambda d: (d.reason, d.raw_payload)),
            equal_to([("invalid_json", malformed[0]), ("invalid_value", malformed[1])]),
            label="DeadLetters",
        )


def test_decision_carries_evidence_reason_ttl_and_trace_sample():
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create(farm_and_fan()), PACK)
        assert_that(
            out.decisions
            | beam.Map(
                lambda d: (
                    d.evidence["streams"],
                    d.evidence["near_threshold_share"],
                    d.reason.startswith("45 plays in an hour: 100% ended just past the 30 s royalty threshold"),
                    d.decided_at_ms == T0_MS + HOUR_MS,
                    d.expires_at_ms - d.decided_at_ms,
                    len(d.trace_ids),
                )
            ),
            equal_to([(45.0, 1.0, True, True, 7 * 86400 * 1000, 0)]),
        )


def test_too_little_evidence_is_audited_but_never_enforced():
    pack = parse_rule_pack(pack_text(rule(when="streams >= 2", min_events=10)), "p.yaml")
    two = [payload("stream", T0_MS + i * 1000) for i in range(2)]
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create(two), pack)
        assert_that(out.decisions, equal_to([]), label="NoDecision")
        assert_that(
            out.audit | beam.Map(lambda a: (a.status, a.mode)), equal_to([(BELOW_MIN_EVENTS, "shadow")]), label="Audit"
        )


def test_a_condition_failing_at_run_time_is_dead_lettered_and_the_windows_other_rules_still_run():
    # Passes the load-time check on zeros (distinct_ips - 1 is -1 there); divides by zero on a window with one IP.
    broken = rule(when="streams / (distinct_ips - 1) > 1")
    pack = parse_rule_pack(pack_text(broken, rule(id="other_rule", when="streams >= 1")), "p.yaml")
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create([payload("stream", ip="198.51.100.7")]), pack)
        assert_that(
            out.dead_letters | beam.Map(lambda d: (d.stage, d.reason, "many_plays" in d.detail)),
            equal_to([("rules", "rule_evaluation_error", True)]),
            label="DeadLetter",
        )
        assert_that(out.audit | beam.Map(lambda a: (a.rule_id, a.status)), equal_to([("other_rule", ISSUED)]))


def test_a_condition_failing_at_run_time_is_dead_lettered_when_no_rule_of_the_window_matches():
    # ApplyRulesFn first asks whether any rule matches and stops there when none does: a failing condition must
    # still reach the dead letters then.
    broken = rule(when="streams / (distinct_ips - 1) > 1")
    pack = parse_rule_pack(pack_text(rule(id="other_rule", when="streams >= 1000"), broken), "p.yaml")
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create([payload("stream", ip="198.51.100.7")]), pack)
        assert_that(
            out.dead_letters | beam.Map(lambda d: (d.stage, d.reason, "many_plays" in d.detail)),
            equal_to([("rules", "rule_evaluation_error", True)]),
            label="DeadLetter",
        )
        assert_that(out.audit, equal_to([]), label="NoAudit")


def test_streaming_late_signal_refires_the_window_and_completes_the_evidence():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    farm = farm_and_fan()[:39]
    last = payload("stream", T0_MS + 39 * 75_000, user_id="bot1", device_id="dbot", ms_played=32_000)
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in farm])
        .advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000)  # 39 plays: below the rule's 40
        .add_elements([TimestampedValue(last, (T0_MS + 39 * 75_000) / 1000)])  # the 40th, late but within lateness
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, PACK, config=PipelineConfig(streaming=True, allowed_lateness_sec=3600))
        assert_that(
            out.decisions | beam.Map(lambda d: (d.rule_id, d.entity_id, d.evidence["streams"])),
            equal_to([("stream_farm_exclude", "bot1", 40.0)]),
        )


def test_streaming_redeliveries_are_not_counted_and_refired_windows_publish_once():
    """Early pane then on-time pane of the same window: one decision, one audit row;
    redelivered signals count once."""
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    farm = farm_and_fan()[:45]
    redelivered = farm[:12]  # same bytes, same event ids
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in farm])
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in redelivered])
        .advance_processing_time(60)  # early firing: 45 unique plays already decide
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in redelivered])
        .advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000)  # on-time pane, same window
        .advance_watermark_to_infinity()
    )
    config = PipelineConfig(streaming=True, early_firing_sec=30, allowed_lateness_sec=600)
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, PACK, config=config)
        assert_that(
            out.decisions | "D" >> beam.Map(lambda d: (d.rule_id, d.entity_id, d.evidence["streams"])),
            equal_to([("stream_farm_exclude", "bot1", 45.0)]),
            label="OneDecision",
        )
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.rule_id, a.event_count)),
            equal_to([("stream_farm_exclude", 45)]),
            label="AuditedOnce",
        )


def test_a_late_pane_after_the_decision_expired_does_not_publish_its_id_again():
    """A throttle (1 h TTL) on a 1 h window with 1 h of lateness: 90 minutes after it was issued, the decision
    and the ladder's memory of it have expired, but the window can still fire. A late signal re-fires it; the
    same decision id must not be published twice (consumers would drop the second as a duplicate)."""
    import time

    pack = parse_rule_pack(pack_text(rule(when="streams >= 3", action="throttle")), "p.yaml")
    plays = [payload("stream", T0_MS + i * 60_000, user_id="u1", track_id=f"t{i}") for i in range(4)]
    late = payload("stream", T0_MS + 50 * 60_000, user_id="u1", track_id="t-late")
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in plays])
        .advance_watermark_to((T0_MS + HOUR_MS) / 1000 + 60)  # on-time pane: throttle issued
        # Processing-time timers are set from the wall clock; TestStream's clock starts at 0.
        .advance_processing_time(int(time.time()) + 90 * 60)
        .add_elements([TimestampedValue(late, (T0_MS + 50 * 60_000) / 1000)])  # late, within the lateness
        .advance_watermark_to_infinity()
    )
    config = PipelineConfig(streaming=True, allowed_lateness_sec=3600)
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, pack, config=config)
        assert_that(out.decisions | beam.Map(lambda d: (d.rule_id, d.action)), equal_to([("many_plays", "throttle")]))


def test_streaming_dead_letters_a_signal_too_old_for_any_window_or_from_a_clock_far_ahead():
    """Published after its every window (the default pack's largest is a day) has ended and its hour of
    lateness passed, a signal would be dropped by Beam without a trace; ahead of the publish time by more
    than the skew allowed, it would hold window state until the watermark reached it."""
    import datetime as dt

    from apache_beam.io.gcp.pubsub import PubsubMessage

    published = T0_MS + 30 * HOUR_MS

    def message(event_ms):
        stamp = dt.datetime.fromtimestamp(published / 1000, tz=dt.UTC)
        return PubsubMessage(payload("stream", event_ms, user_id="u1"), {}, publish_time=stamp)

    on_time, too_late, ahead = (
        message(published - 60_000),
        message(published - 25 * HOUR_MS - 1000),
        message(published + 3 * HOUR_MS),
    )
    stream = (
        TestStream()
        .advance_watermark_to(published / 1000)
        .add_elements([TimestampedValue(m, published / 1000) for m in (on_time, too_late, ahead)])
        .advance_watermark_to_infinity()
    )
    config = PipelineConfig(streaming=True, allowed_lateness_sec=3600, max_future_skew_sec=600)
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, PACK, config=config)
        assert_that(
            out.dead_letters | "DL" >> beam.Map(lambda d: (d.reason, d.raw_payload)),
            equal_to([("event_time_too_late", too_late.data), ("event_time_in_future", ahead.data)]),
            label="DeadLetters",
        )
        assert_that(out.signals | "S" >> beam.Map(lambda s: s.event_time_ms), equal_to([published - 60_000]))


def test_a_window_whose_watermark_is_held_back_past_the_decisions_memory_publishes_its_id_once():
    """An early pane issues a 1 h throttle; the watermark then stalls (a Pub/Sub backlog) while three hours
    of wall clock pass, so the processing-time memories of the decision and of the ladder have run out when
    the on-time pane re-fires the window. The decision id must not be published again (with a fresh expiry);
    the hit's memory also waits for the watermark to pass the window's end plus the lateness."""
    import time

    pack = parse_rule_pack(pack_text(rule(when="streams >= 3", action="throttle")), "p.yaml")
    plays = [payload("stream", T0_MS + i * 60_000, user_id="u1", track_id=f"t{i}") for i in range(4)]
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in plays])
        .advance_processing_time(11)  # early pane: throttle issued
        # Processing-time timers are set from the wall clock; TestStream's clock starts at 0.
        .advance_processing_time(int(time.time()) + 3 * 3600)  # three hours pass; the watermark stays
        .advance_watermark_to((T0_MS + HOUR_MS) / 1000 + 60)  # on-time pane: the same decision again
        .advance_watermark_to_infinity()
    )
    config = PipelineConfig(streaming=True, early_firing_sec=10, allowed_lateness_sec=3600)
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, pack, config=config)
        assert_that(out.decisions | beam.Map(lambda d: (d.rule_id, d.action)), equal_to([("many_plays", "throttle")]))


class _LadderClock:
    """The ladder's clock for the test below: its first hold is timed from the wall clock, later ones ten
    hours on, so TestStream's processing clock can pass the decision memory's TTL (set from the wall clock)
    while a later hold is still pending. Both clocks are read in this process (the DirectRunner)."""

    def __init__(self):
        self.calls = 0

    def time(self):
        import time

        self.calls += 1
        return time.time() + (0 if self.calls == 1 else 10 * 3600)


def test_a_re_fired_hit_held_at_the_ladder_while_the_watermark_passes_its_window_is_still_a_repeat(monkeypatch):
    """The ladder's hold does not hold the watermark back, so the on-time pane's repeat of a decision can still
    be held when the watermark passes the window's end plus lateness. The decision's memory must outlast
    that (a grace after the window can no longer fire), or the held repeat is published again."""
    import time

    from transforms import safeguards

    monkeypatch.setattr(safeguards, "time", _LadderClock())
    pack = parse_rule_pack(pack_text(rule(when="streams >= 3", action="throttle")), "p.yaml")
    plays = [payload("stream", T0_MS + i * 60_000, user_id="u1", track_id=f"t{i}") for i in range(4)]
    window_end = (T0_MS + HOUR_MS) / 1000
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in plays])
        .advance_processing_time(11)  # early pane: the throttle is held at the ladder
        .advance_processing_time(int(time.time()) + 10)  # the hold ends: issued, remembered for 2 h of clock
        .advance_processing_time(3 * 3600)  # the watermark stalls for 3 h of clock: that memory runs out
        .advance_watermark_to(window_end + 60)  # on-time pane: the same decision, held
        .advance_watermark_to(window_end + 3600 + 60)  # past the window's end plus lateness, still held
        .advance_processing_time(11 * 3600)  # the hold ends: the repeat reaches the de-duplication
        .advance_watermark_to_infinity()
    )
    config = PipelineConfig(streaming=True, early_firing_sec=10, allowed_lateness_sec=3600, ladder_hold_sec=2)
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, pack, config=config)
        assert_that(out.decisions | beam.Map(lambda d: (d.rule_id, d.action)), equal_to([("many_plays", "throttle")]))


def test_a_hit_superseded_early_in_its_window_is_issued_by_a_later_pane_once_the_stronger_action_expired():
    """X throttles for an hour from a 10-minute window; Y (exclude_streams, a day's window, early panes) is
    superseded by it in its first pane. Two hours on, two more plays (too few for X) fire Y's window again
    with nothing in force: Y is issued, as the backtest issues it at the window's end. De-duplicating before
    the safeguards dropped that pane as a repeat of the first (the rules said 'issued' both times)."""
    import time

    pack = parse_rule_pack(
        pack_text(
            rule(id="x_throttle", window="10m", when="streams >= 3", action="throttle"),
            rule(id="y_exclude", window="1d", when="streams >= 3", action="exclude_streams"),
        ),
        "p.yaml",
    )

    def plays(start, n, tag):
        return [payload("stream", start + i * 60_000, user_id="u1", track_id=f"{tag}{i}") for i in range(n)]

    later = T0_MS + 2 * HOUR_MS
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in plays(T0_MS, 4, "a")])
        .advance_watermark_to((T0_MS + 11 * 60_000) / 1000)  # X's window closes: throttle issued for 1 h
        .advance_processing_time(11)  # Y's early pane while the throttle is in force: superseded
        # Processing-time timers are set from the wall clock; TestStream's clock starts at 0.
        .advance_processing_time(int(time.time()) + 2 * 3600)  # the throttle has expired
        .add_elements([TimestampedValue(x, later / 1000) for x in plays(later, 2, "b")])
        .advance_processing_time(11)  # Y's window fires again
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, pack, config=PipelineConfig(streaming=True, early_firing_sec=10))
        assert_that(
            out.decisions | "D" >> beam.Map(lambda d: (d.rule_id, d.action)),
            equal_to([("x_throttle", "throttle"), ("y_exclude", "exclude_streams")]),
            label="Decisions",
        )
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.rule_id, a.status)),
            equal_to([("x_throttle", ISSUED), ("y_exclude", "superseded"), ("y_exclude", ISSUED)]),
            label="AuditedOncePerOutcome",
        )


def test_no_batch_flatten_takes_every_windows_features():
    """The local runner materialises each input of a Flatten, even one nothing reads: at 1M signals a
    Flatten of the features took a backtest from about 2.2 GB to over 4 GB, and one of the accumulators
    before them cost 2.7 GB against 2.2 (benchmarks/README.md). Batch rules run on each features branch
    where it is made; only hits and dead letters are flattened."""
    pipeline = beam.Pipeline()
    out = build_pipeline(pipeline | beam.Create([b"{}"]), PACK, config=PipelineConfig())
    inputs = []  # (flatten, producer of one input, that input's element type)

    class Flattens(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.Flatten):
                inputs.extend((node.full_label, pc.producer.full_label, pc.element_type) for pc in node.inputs)

    pipeline.visit(Flattens())
    assert len(out.features) == 2, "batch computes merged and whole windows in two branches"
    assert {flatten for flatten, _, _ in inputs} >= {"ApplyRules/AllHits", "AllDeadLetters"}, "visitor missed them"
    # Neither the windows' accumulators nor their features: nothing ComputeFeatures makes.
    assert [i for i in inputs if i[1].startswith("ComputeFeatures/") or i[2] is EntityFeatures] == []


def test_a_backtest_hands_batches_from_the_file_to_the_fold_without_unpacking_them(tmp_path):
    # Beam passes a batch on only where the producer's and consumer's batch converters are equal; otherwise it
    # quietly unpacks it and calls process() per element, which gives the same output, so only this sees it.
    (tmp_path / "signals.jsonl").write_bytes(payload("signup") + b"\n")
    pipeline = beam.Pipeline()
    lines = pipeline | "ReadSignals" >> ReadLineBlocks(str(tmp_path / "signals.jsonl"))
    build_pipeline(lines, PACK, config=PipelineConfig())
    fns = {}

    class FindParDos(PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                fns[node.full_label] = node.transform.fn

    pipeline.visit(FindParDos())
    chain = ["ReadSignals/ReadRanges", "ParseSignals/Validate/ParDo(ParseSignalBatchFn)"]
    chain.append("DeduplicateSignals/PackByHour")
    for producer, consumer in zip(chain, chain[1:], strict=False):
        assert fns[producer].output_batch_converter is not None, producer
        assert fns[producer].output_batch_converter == fns[consumer].input_batch_converter, (producer, consumer)
    hour = fns["DeduplicateSignals/KeepEarliest"].output_batch_converter
    assert hour is not None and hour == fns["ComputeFeatures/PreAggregate/ParDo(PreAggregateFn)"].input_batch_converter


def test_ips_with_thousands_of_accounts_are_judged_on_estimated_counts_through_the_runner():
    """Past 4,096 accounts an IP's account counts are sketches (transforms.distinct), pickled across the runner's
    shuffle and merged there. A carrier NAT's re-login wave (12,000 accounts, 5,000 mistyping once) is left
    alone; stuffing over 6,000 accounts, 95% failing, is blocked. Saturated at 4,096, both read 1.0."""
    carrier = [
        payload("login", T0_MS + i * 34, user_id=f"m{i % 12_000}", ip="100.64.0.1", success=i >= 5_000)
        for i in range(17_000)
    ]
    stuffing = [
        payload("login", T0_MS + i * 50, user_id=f"victim{i}", ip="203.0.113.66", success=i % 20 == 0)
        for i in range(6_000)
    ]
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create(carrier + stuffing), PACK)
        assert_that(
            out.decisions | beam.Map(lambda d: (d.rule_id, d.entity_id, d.mode)),
            equal_to([("credential_stuffing_block", "203.0.113.66", "enforce")]),
        )
