"""Per-entity window features: the accumulator, its bounds, and event-time behaviour."""

import contextlib
import copy
import pickle

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow, TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import simulate
from schemas import Signal
from schemas.features import EntityFeatures
from tests.kit import HOUR_MS, T0_MS, features_of, plain_state, rich_signals, signal, streaming_options
from transforms import distinct, fold
from transforms import features as F
from transforms.distinct import HyperLogLog, distinct_values
from transforms.features import (
    DISTINCT_CAP,
    FEATURES,
    TRACE_SAMPLE,
    Accumulator,
    ComputeFeatures,
    MergeAccumulatorsFn,
    PreAggregateFn,
    ToEntityFeaturesFn,
    WindowConfig,
    WindowFeatures,
    add_signal,
    compute_features,
    entity_keys,
    fold_signal,
    merge,
)
from transforms.parse import parse_signal

MIN = 60_000
_ONE_HOUR = IntervalWindow(T0_MS / 1000, T0_MS / 1000 + 3600)
# The property tests run with the real cap and with a cap of 2, where their few ids overflow into sketches.
_caps = st.sampled_from([DISTINCT_CAP, 2])


@contextlib.contextmanager
def _distinct_cap(cap: int):
    """Every distinct-value state holds at most ``cap`` values exactly (features' and extractors')."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "DISTINCT_CAP", cap)
        patch.setattr(fold, "DISTINCT_CAP", cap)
        patch.setattr(distinct, "DISTINCT_CAP", cap)
        yield


# --- feature values ------------------------------------------------------------------
def test_stream_features():
    f = features_of(
        [
            signal("stream", T0_MS, ms_played=31_000, track_id="t1"),
            signal("stream", T0_MS + MIN, ms_played=35_000, track_id="t1"),
            signal("stream", T0_MS + 2 * MIN, ms_played=10_000, track_id="t2"),
            signal("stream", T0_MS + 3 * MIN, ms_played=200_000, track_id="t3", artist_id="a2"),
        ]
    )
    assert f["streams"] == 4
    assert f["near_threshold_streams"] == 2
    assert f["near_threshold_share"] == 0.5
    assert f["skip_share"] == 0.25
    assert f["distinct_tracks"] == 3
    assert f["top_artist_share"] == 0.75
    assert f["top_track_share"] == 0.5
    assert f["span_minutes"] == 3


def test_plays_cut_off_before_a_known_track_end():
    f = features_of(
        [
            signal("stream", T0_MS, ms_played=32_000, track_duration_ms=200_000),  # cut off, near the threshold
            signal("stream", T0_MS, ms_played=32_000, track_duration_ms=52_000),  # 20 s short: a cross-fade, not cut
            signal("stream", T0_MS, ms_played=32_000, track_duration_ms=52_001),  # cut off
            signal("stream", T0_MS, ms_played=34_000, track_duration_ms=34_000),  # a short track in full
            signal("stream", T0_MS, ms_played=33_000),  # length unknown: never cut off
            signal("stream", T0_MS, ms_played=65_000, track_duration_ms=180_000),  # cut off past a minute
            signal("stream", T0_MS, ms_played=10_000, track_duration_ms=180_000),  # a skip: not a paid play
        ]
    )
    assert (f["near_threshold_streams"], f["paid_streams"]) == (5, 6)
    assert f["near_threshold_cut_share"] == 2 / 5
    assert f["cut_paid_share"] == 3 / 6
    assert features_of([signal("stream", ms_played=10_000)])["near_threshold_cut_share"] == 0.0


def test_login_payment_and_signup_features():
    f = features_of(
        [
            signal("login", success=False, user_id="v1"),
            signal("login", success=False, user_id="v2"),
            signal("login", success=True, user_id="v3"),
            signal("payment", success=False, amount_cents=100, card_fingerprint="c1"),
            signal("payment", success=True, amount_cents=999, card_fingerprint="c2"),
            signal("signup", device_id="d1"),
        ]
    )
    assert (f["logins"], f["failed_logins"]) == (3, 2)
    assert f["failed_login_ratio"] == pytest.approx(2 / 3)
    assert (f["payments"], f["failed_payment_ratio"], f["small_payment_share"], f["distinct_cards"]) == (2, 0.5, 0.5, 2)
    assert f["signups"] == 1
    assert f["distinct_users"] == 4  # v1..v3 plus u1 on the payments and sign-up


def test_ratios_of_empty_windows_are_zero_not_errors():
    assert all(value == 0 for value in compute_features(Accumulator(), 3600).values())


def test_active_hours_count_hours_of_day():
    f = features_of([signal("signup", T0_MS + h * HOUR_MS) for h in (0, 1, 1, 5, 23)], window_sec=86400)
    assert f["active_hours"] == 4


def test_distinct_counts_are_exact_to_the_cap_and_estimated_past_it():
    acc = Accumulator()
    for n in range(DISTINCT_CAP):
        add_signal(acc, signal("login", user_id=f"v{n}"))
    assert compute_features(acc, 3600)["distinct_users"] == DISTINCT_CAP
    for n in range(DISTINCT_CAP, 3 * DISTINCT_CAP):
        add_signal(acc, signal("login", user_id=f"v{n}"))
    assert acc.users.__class__ is HyperLogLog
    assert abs(compute_features(acc, 3600)["distinct_users"] / (3 * DISTINCT_CAP) - 1) < 0.05  # was the cap


def test_trace_sample_is_the_smallest_ids_whatever_the_order():
    ids = [f"tr{n:03d}" for n in range(50)]
    forward, backward = Accumulator(), Accumulator()
    for i in ids:
        add_signal(forward, signal("signup", trace_id=i))
    for i in reversed(ids):
        add_signal(backward, signal("signup", trace_id=i))
    assert forward.trace_ids == backward.trace_ids == ids[:TRACE_SAMPLE]


_signals = st.lists(
    st.builds(
        lambda kind, user, minute, ms, ok: signal(
            kind,
            T0_MS + minute * MIN,
            user_id=f"u{user}",
            # A stream's track is 0 to 59 s longer than its play (minute seconds): cut off past 20 s.
            **(
                {"ms_played": ms, "track_duration_ms": ms + minute * 1000 or None}
                if kind == "stream"
                else {"success": ok}
                if kind in ("login", "payment")
                else {}
            ),
        ),
        st.sampled_from(["stream", "login", "signup", "playlist_add", "payment"]),
        st.integers(0, 5),
        st.integers(0, 59),
        st.integers(0, 400_000) | st.integers(30_000, 39_999),  # a third just past the royalty threshold
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(_signals, st.integers(0, 40), _caps)
def test_merging_partial_accumulators_equals_one_pass(signals, cut, cap):
    whole, left, right = Accumulator(), Accumulator(), Accumulator()
    with _distinct_cap(cap):
        for s in signals:
            add_signal(whole, s)
        for s in signals[:cut]:
            add_signal(left, s)
        for s in signals[cut:]:
            add_signal(right, s)
        assert compute_features(merge([left, right]), 3600) == compute_features(whole, 3600)


def test_entity_keys_skip_missing_entities():
    s = signal("login", device_id="d1")
    keys = [k for k, _ in entity_keys(s, ("user", "device", "ip", "track"))]
    assert keys == [("user", "u1"), ("device", "d1")]


def test_feature_registry_describes_every_feature():
    assert all(f.description.endswith(".") for f in FEATURES.values())


# --- event time: on time, out of order, late within lateness, too late -------------
def _stream_options():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options


def _at(ms):
    return TimestampedValue(signal("signup", ms, user_id="u1"), ms / 1000)


def test_windows_fire_on_time_then_once_per_late_signal_and_drop_too_late():
    lateness_sec = 600
    stream = (
        TestStream(coder=beam.coders.registry.get_coder(Signal))
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([_at(T0_MS + 10 * MIN), _at(T0_MS + 20 * MIN)])  # on time
        .add_elements([_at(T0_MS + 5 * MIN)])  # out of order, still before the watermark passes
        .advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000)  # window 1 closes: on-time pane
        .add_elements([_at(T0_MS + 30 * MIN)])  # late, within allowed lateness: late pane
        .add_elements([_at(T0_MS + HOUR_MS + 5 * MIN)])  # next window, on time
        .advance_watermark_to((T0_MS + HOUR_MS + 20 * MIN) / 1000)  # past window 1's lateness
        .add_elements([_at(T0_MS + 40 * MIN)])  # too late: dropped
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=_stream_options()) as p:
        (features,) = p | stream | ComputeFeatures({3600: ("user",)}, WindowConfig(allowed_lateness_sec=lateness_sec))
        assert_that(
            features | beam.Map(lambda f: (f.window_start_ms - T0_MS, f.features["events"])),
            equal_to([(0, 3.0), (0, 4.0), (HOUR_MS, 1.0)]),
        )


def test_window_sizes_and_entity_types_come_from_the_plan():
    with TestPipeline() as p:
        signals = (
            p
            | beam.Create(
                [signal("login", T0_MS + 5 * MIN, ip="10.0.0.1"), signal("login", T0_MS + 15 * MIN, ip="10.0.0.1")]
            )
            | beam.Map(lambda s: TimestampedValue(s, s.event_time_ms / 1000))
        )
        (features,) = signals | ComputeFeatures({600: ("ip",), 3600: ("user",)})
        assert_that(
            features
            | beam.Map(lambda f: (f.entity_type, f.window_sec, f.window_start_ms - T0_MS, f.features["logins"])),
            equal_to([("ip", 600, 0, 1.0), ("ip", 600, 600_000, 1.0), ("user", 3600, 0, 2.0)]),
        )


def test_keyed_windows_give_the_same_features_as_beam_windows():
    signals = [
        signal(kind, T0_MS + minute * MIN, user_id=f"u{minute % 3}", ip=f"10.0.0.{minute % 2}")
        for minute, kind in enumerate(["stream", "login", "signup", "payment", "playlist_add"] * 30)
    ]
    plan = {600: ("ip",), 3600: ("user", "ip")}

    def as_rows(features, label):
        """(window key, features) pairs, to join the two strategies window by window."""

        def row(f):
            return (f.entity_type, f.entity_id, f.window_sec, f.window_start_ms, f.window_end_ms), dict(f.features)

        return features | f"{label}Flatten" >> beam.Flatten() | label >> beam.Map(row)

    with TestPipeline() as p:
        stamped = p | beam.Create(signals) | beam.Map(lambda s: TimestampedValue(s, s.event_time_ms / 1000))
        beam_windows = as_rows(stamped | "Beam" >> ComputeFeatures(plan), "BeamRows")
        keyed = as_rows(stamped | "Keyed" >> ComputeFeatures(plan, WindowConfig(keyed_windows=True)), "KeyedRows")
        joined = {"beam": beam_windows, "keyed": keyed} | beam.CoGroupByKey()
        assert_that(
            joined | beam.Map(lambda kv: (len(kv[1]["beam"]), kv[1]["beam"] == kv[1]["keyed"])) | beam.Distinct(),
            equal_to([(1, True)]),
            label="Same",
        )
        assert_that(beam_windows | beam.combiners.Count.Globally(), equal_to([3 * 3 + 3 * 2 + 15 * 2]), label="Count")


def test_merging_nothing_gives_an_empty_accumulator():
    assert compute_features(merge([]), 3600) == compute_features(Accumulator(), 3600)


@pytest.mark.parametrize("cap", [DISTINCT_CAP, 2])
def test_a_copied_accumulator_is_equal_and_shares_nothing_mutable(cap):
    acc = Accumulator()
    patch = _distinct_cap(cap)
    patch.__enter__()
    # three of everything: every distinct-value field a set (a sketch with a cap of 2), every counter and sample filled
    for n in (1, 2, 3):
        for s in [
            signal(
                "stream",
                ms_played=35_000,
                track_duration_ms=200_000,  # cut off near the threshold
                user_id=f"u{n}",
                device_id=f"d{n}",
                ip=f"10.0.0.{n}",
                country=("SE", "NO", "FI")[n - 1],
                artist_id=f"a{n}",
            ),
            signal("stream", ms_played=50_000, track_duration_ms=200_000 * n),  # cut off, not near: counts differ
            signal("login", success=False, user_agent="python-requests/2.31", trace_id=f"tr{n}", country="US"),
            signal("playlist_add", playlist_id=f"p{n}", track_id=f"t{n}", artist_id=f"a{n}"),
            signal("payment", success=True, amount_cents=150, currency="EUR", card_fingerprint=f"c{n}"),
        ]:
            add_signal(acc, s)
    patch.__exit__(None, None, None)
    copied = F.copy_accumulator(acc)
    original, state = acc.__getstate__(), copied.__getstate__()  # __getstate__ fails on a slot left unset
    assert plain_state(state) == plain_state(original)
    for name, mine, theirs in zip(Accumulator.__slots__, original, state, strict=True):
        if name in fold._DISTINCT_FIELDS or name in fold._TOP_FIELDS or name in ("trace_ids", "extra"):
            assert mine is not None, f"{name} was not filled: the test would not see it shared"
        if name in fold._DISTINCT_FIELDS:
            assert isinstance(mine, HyperLogLog if cap == 2 else set), f"{name} is not what the test means to copy"
        if isinstance(mine, (set, dict, list, HyperLogLog)):
            assert mine is not theirs, f"{name} is shared"
    for name, mine in acc.extra.items():
        assert mine is not copied.extra[name], f"extractor state {name} is shared"


def test_a_retired_extractors_state_is_carried_through_merges_and_copies():
    """A streaming job updated after an extractor was removed still holds its states in open windows: merging
    and copying carry them (nothing reads them) instead of failing on the missing extractor."""
    login = signal("login", success=False)
    older, newer, adopting = Accumulator(), Accumulator(), Accumulator()
    for acc in (older, newer, adopting):
        add_signal(acc, login)
    older.extra["retired_share"] = [1, [2]]
    newer.extra["retired_share"] = [5, [6]]
    merged = F.merge([newer, older])  # both hold it: the first's is kept, as nothing can merge it
    assert merged.extra["retired_share"] == [5, [6]]
    adopted = F.merge([adopting, older])  # only the second holds it: a deep copy
    assert (
        adopted.extra["retired_share"] == [1, [2]]
        and adopted.extra["retired_share"][1] is not older.extra["retired_share"][1]
    )
    copied = F.copy_accumulator(older)
    assert (
        copied.extra["retired_share"] == [1, [2]]
        and copied.extra["retired_share"][1] is not older.extra["retired_share"][1]
    )
    assert features_of([login])["login_accounts"] == compute_features(copied, 3600)["login_accounts"]


def test_a_merged_accumulator_shares_nothing_mutable_with_what_was_merged_into_it():
    """Merging adopts the other's sets, counters, sample and extractor states as copies: folding a signal
    into either one afterwards must not change the other (extractors' ``add`` updates a state in place)."""
    theirs = Accumulator()
    for n in (1, 2):
        for s in [
            signal("stream", ms_played=35_000, user_id=f"u{n}", track_id=f"t{n}", artist_id=f"a{n}", trace_id=f"s{n}"),
            signal("login", success=False, user_agent="python-requests/2.31", ip=f"10.0.0.{n}"),
        ]:
            add_signal(theirs, s)
    merged = merge([Accumulator(), theirs])
    before = pickle.dumps(merged)
    later = signal("login", success=True, user_agent="python-requests/2.31", user_id="u9", ip="10.0.0.9")
    add_signal(theirs, signal("stream", ms_played=31_000, track_id="t9", artist_id="a9", trace_id="s0"))
    add_signal(theirs, later)
    assert pickle.dumps(merged) == before, "folding into the merged-in accumulator changed the merge"
    add_signal(merged, later)
    assert theirs.extra["scripted_client_share"] == merged.extra["scripted_client_share"] == [3, 3]  # each its own


def test_a_day_copied_from_whole_hours_counts_what_folding_counts_when_a_top_counter_fills(monkeypatch):
    """A user's day is built from copies of the user's whole hours. An hour whose top-share counter filled
    dropped later plays of keys it met too late, which the day may already count: such an hour's signals
    are folded into the day instead (a cap of 2 to see it)."""
    monkeypatch.setattr(F, "TOP_CAP", 2)
    monkeypatch.setattr(fold, "TOP_CAP", 2)
    plays = [("t1", 0), ("t2", 60), ("t3", 61)] + [("t1", 62 + n) for n in range(10)]  # minutes; hour 1 from 60
    signals = [signal("stream", T0_MS + m * MIN, track_id=t, artist_id=f"a{t}", ms_played=31_000) for t, m in plays]
    fn = PreAggregateFn({3600: ("user",), 86400: ("user",)}, whole_batch_ms=3_600_000)
    fn.start_bundle()
    for hour in (signals[:1], signals[1:]):
        list(fn.process_batch(hour))
    ((key, day),) = [wv.value for wv in fn.finish_bundle()]
    assert key[0] == 86400
    one_pass = Accumulator()
    for s in signals:
        add_signal(one_pass, s)
    assert compute_features(day, 86400) == compute_features(one_pass, 86400)
    assert compute_features(day, 86400)["top_track_share"] == 11 / 13


@settings(max_examples=60, deadline=None)
@given(_signals, st.integers(1, 6), _caps)
def test_pre_aggregated_partials_merge_to_the_one_pass_features(signals, max_keys, cap):
    """However often PreAggregateFn flushes (here every few keys), its partials merge to the one-pass accumulator."""
    plan = {600: ("user",), 3600: ("user", "device")}
    fn = PreAggregateFn(plan, max_keys=max_keys)
    fn.start_bundle()
    with _distinct_cap(cap):
        partials = [kv for s in signals for kv in fn.process(s)] + [wv.value for wv in fn.finish_bundle()]
        _assert_merge_to_one_pass(partials, signals, plan)


def _assert_merge_to_one_pass(partials, signals, plan):
    combiner = MergeAccumulatorsFn()
    merged: dict = {}
    for key, acc in partials:
        merged[key] = combiner.add_input(merged.get(key, combiner.create_accumulator()), acc)
    expected: dict = {}
    for s in signals:
        for size, types in plan.items():
            start = s.event_time_ms - s.event_time_ms % (size * 1000)
            for entity_type in types:
                entity_id = s.user_id if entity_type == "user" else s.device_id
                if entity_id is not None:
                    add_signal(expected.setdefault((size, entity_type, entity_id, start), Accumulator()), s)
    assert merged.keys() == expected.keys()
    for key, acc in expected.items():
        assert compute_features(merged[key], key[0]) == compute_features(acc, key[0])
        assert merged[key].trace_ids == acc.trace_ids


def test_partials_merged_across_the_runner_s_shuffle_equal_merging_them_in_process():
    """``MergeAccumulatorsFn``'s partials cross the shuffle in ``AccumulatorCoder``'s form: what the runner merges
    equals merging the same partials here, lone values, sets, sketches, counters, samples and extractor states."""
    assert isinstance(MergeAccumulatorsFn().get_accumulator_coder(), F.AccumulatorCoder)
    lines, _ = simulate.simulate(seed=5, hours=2, scale=0.02, malformed=0)
    signals = sorted((parse_signal(line).signal for line in lines), key=lambda s: s.event_time_ms)
    plan = {600: ("ip",), 3600: ("user", "device"), 86400: ("user",)}
    fn = PreAggregateFn(plan, max_keys=50)  # flushes often, so most windows come in several partials
    fn.start_bundle()
    partials = [kv for s in signals for kv in fn.process(s)] + [wv.value for wv in fn.finish_bundle()]
    many = [f"v{n}" for n in range(2 * DISTINCT_CAP + 20)]  # past the cap: a sketch in each partial
    for half in (many[::2], many[1::2]):
        acc = Accumulator()
        for user in half:
            add_signal(acc, signal("login", T0_MS, user_id=user, ip="10.9.9.9", success=False))
        partials.append(((3600, "ip", "10.9.9.9", T0_MS), acc))
    assert sum(1 for _, acc in partials if acc.extra) > 10
    by_key: dict = {}
    for key, acc in partials:
        by_key.setdefault(key, []).append(copy.deepcopy(acc))
    assert sum(len(accs) > 1 for accs in by_key.values()) > 100
    expected = [(key, plain_state(merge(accs).__getstate__())) for key, accs in by_key.items()]
    users = fold.FIELDS.index("users")
    assert any(isinstance(state[users], bytes) for _, state in expected)  # a sketch, as plain_state gives it
    with TestPipeline() as p:
        merged = p | beam.Create(partials) | beam.CombinePerKey(MergeAccumulatorsFn())
        assert_that(merged | beam.MapTuple(lambda key, acc: (key, plain_state(acc.__getstate__()))), equal_to(expected))


_three_hours_of_plays_and_logins = st.lists(
    st.builds(
        lambda login, user, device, minute, agent: signal(
            "login" if login else "stream",
            T0_MS + minute * MIN,
            user_id=f"u{user}",
            device_id=f"d{device}" if device < 3 else None,  # some signals name no device: no window for them
            # the scripted_client_share extractor reads logins' agents: its state is copied and merged too
            **({"success": True, "user_agent": agent} if login else {}),
        ),
        st.booleans(),
        st.integers(0, 5),
        st.integers(0, 3),
        st.integers(0, 179),
        st.sampled_from(["python-requests/2.31", "Mozilla/5.0"]),
    ),
    max_size=60,
)


# With a user's hour and day, the day's partial of each hour is a copy of the user's whole hour. Without the
# hour, or for a length no hour batch tiles or divides into (90 minutes), longer windows are folded signal by
# signal beside the whole ones, and flushed at max_keys in the middle of a batch.
_HOUR_BATCH_PLANS = [
    {600: ("user", "device"), 3600: ("user", "device"), 86400: ("user",)},
    {600: ("user",), 5400: ("device",), 7200: ("user", "device"), 86400: ("device",)},
]


@settings(max_examples=60, deadline=None)
@given(_three_hours_of_plays_and_logins, st.integers(1, 6), _caps, st.sampled_from(_HOUR_BATCH_PLANS))
def test_hour_batches_send_whole_windows_once_and_the_rest_merges_to_one_pass(signals, max_keys, cap, plan):
    """Given each hour as one batch, windows that tile the hour go out whole, once; longer ones as partials.

    Where the plan has a user's hour and day, the day's partial of each hour is a copy of the user's whole
    hour: merging partials must leave the whole hours it was copied from as they were."""
    fn = PreAggregateFn(plan, max_keys=max_keys, whole_batch_ms=3_600_000)
    fn.start_bundle()
    hours: dict = {}
    for s in sorted(signals, key=lambda s: s.event_time_ms):
        hours.setdefault(s.event_time_ms // 3_600_000, []).append(s)
    whole, partials = [], []
    with _distinct_cap(cap):
        for hour in sorted(hours):
            for out in fn.process_batch(hours[hour]):
                if isinstance(out, TaggedOutput):
                    assert out.tag == PreAggregateFn.WHOLE
                    whole.append(out.value)
                else:
                    partials.append(out)
        partials += [wv.value for wv in fn.finish_bundle()]
        whole_keys = [key for key, _ in whole]
        assert len(whole_keys) == len(set(whole_keys)), "a whole window went out twice"
        assert {key[0] for key in whole_keys} <= {size for size in plan if size <= 3600}
        assert {key[0] for key, _ in partials} <= {size for size in plan if size > 3600}
        _assert_merge_to_one_pass(whole + partials, signals, plan)


@settings(max_examples=40, deadline=None)
@given(_three_hours_of_plays_and_logins, st.sampled_from(_HOUR_BATCH_PLANS))
def test_whole_windows_sent_as_records_are_the_records_the_features_step_makes(signals, plan):
    """``ComputeFeatures`` has the fold send whole windows as ``EntityFeatures`` (``whole_as_features``): the same
    records ``SizedToEntityFeaturesFn`` makes of the (key, accumulator) pairs the fold sends otherwise."""
    hours: dict = {}
    for s in sorted(signals, key=lambda s: s.event_time_ms):
        hours.setdefault(s.event_time_ms // 3_600_000, []).append(s)
    sent = {}
    for as_features in (False, True):
        fn = PreAggregateFn(plan, whole_batch_ms=3_600_000, whole_as_features=as_features)
        fn.start_bundle()
        outputs = [out for hour in sorted(hours) for out in fn.process_batch(hours[hour])]
        sent[as_features] = [out.value for out in outputs if isinstance(out, TaggedOutput)]
    made = [record for pair in sent[False] for record in F.SizedToEntityFeaturesFn().process(pair)]
    assert all(type(record) is EntityFeatures for record in sent[True])

    def plain(record):
        return (*record[:5], dict(record.features), record.trace_ids, record.last_event_ms)

    assert [plain(r) for r in sent[True]] == [plain(r) for r in made]
    assert bool(made) == bool(signals)


# --- the optimised fold against a plain one ---------------------------------------------------
def _reference_fold(acc: Accumulator, s: Signal) -> None:
    """What ``fold_signal`` must do to one accumulator, written for clarity rather than speed."""

    def distinct(values, value):  # every value, exactly: _canonical makes a sketch of more than the cap
        if value is None:
            return values
        values = values if values is not None else set()
        values.add(value)
        return values

    def top(counts, key):
        counts = counts if counts is not None else {}
        if key in counts or len(counts) < F.TOP_CAP:
            counts[key] = counts.get(key, 0) + 1
        return counts

    t = s.event_time_ms
    acc.events += 1
    acc.first_ms, acc.last_ms = min(acc.first_ms, t), max(acc.last_ms, t)
    acc.hours |= 1 << ((t // HOUR_MS) % 24)
    acc.users, acc.devices = distinct(acc.users, s.user_id), distinct(acc.devices, s.device_id)
    acc.ips, acc.countries = distinct(acc.ips, s.ip), distinct(acc.countries, s.country)
    if s.trace_id is not None:
        acc.trace_ids = sorted(set(acc.trace_ids or ()) | {s.trace_id})[:TRACE_SAMPLE]
    if s.event_type == "stream":
        acc.streams += 1
        acc.stream_ms += s.ms_played
        acc.short_streams += s.ms_played < F.ROYALTY_THRESHOLD_MS
        acc.near_threshold += F.ROYALTY_THRESHOLD_MS <= s.ms_played < F.NEAR_THRESHOLD_MS
        acc.short_paid += F.ROYALTY_THRESHOLD_MS <= s.ms_played < F.SHORT_PAID_MS
        length = s.track_duration_ms
        cut = s.ms_played >= F.ROYALTY_THRESHOLD_MS and length is not None and length - s.ms_played > F.CUT_SLACK_MS
        acc.cut_paid += cut
        acc.cut_near += cut and s.ms_played < F.NEAR_THRESHOLD_MS
        acc.tracks, acc.artists = distinct(acc.tracks, s.track_id), distinct(acc.artists, s.artist_id)
        acc.stream_tracks, acc.stream_artists = top(acc.stream_tracks, s.track_id), top(acc.stream_artists, s.artist_id)
    elif s.event_type == "login":
        acc.logins += 1
        acc.failed_logins += not s.success
    elif s.event_type == "signup":
        acc.signups += 1
    elif s.event_type == "playlist_add":
        acc.playlist_adds += 1
        acc.playlists, acc.tracks = distinct(acc.playlists, s.playlist_id), distinct(acc.tracks, s.track_id)
        if s.artist_id is not None:
            acc.playlist_artists = top(acc.playlist_artists, s.artist_id)
    elif s.event_type == "payment":
        acc.payments += 1
        acc.failed_payments += not s.success
        acc.small_payments += s.amount_cents <= F.SMALL_PAYMENT_CENTS
        acc.cards = distinct(acc.cards, s.card_fingerprint)
    for extractor in F.EXTRACTORS.values():
        if s.event_type in extractor.event_types:
            acc.extra = acc.extra if acc.extra is not None else {}
            state = acc.extra.get(extractor.name, extractor.create())
            acc.extra[extractor.name] = extractor.add(state, s)


@settings(max_examples=150, deadline=None)
@given(rich_signals, st.integers(1, 3), _caps)
def test_fold_signal_matches_a_plain_fold_field_by_field(signals, n_accs, cap):
    folded = [Accumulator() for _ in range(n_accs)]
    expected = Accumulator()
    with _distinct_cap(cap):
        for s in signals:
            fold_signal(folded, s)
        for s in signals:
            _reference_fold(expected, s)
    for acc in folded:
        assert _canonical(acc, cap) == _canonical(expected, cap)


def _canonical(acc: Accumulator, cap: int) -> list:
    """An accumulator's state with each distinct-value field as the set of its values (it may hold a lone value
    itself), or as a sketch past ``cap`` values (the sketch of every value it was given)."""

    def values(state):
        if state.__class__ is HyperLogLog:
            return bytes(state.registers)
        exact = set(distinct_values(state))
        return exact if len(exact) <= cap else bytes(HyperLogLog.of(exact).registers)

    def extra(states):  # extractors' states: the login-account ones are distinct-value states
        return None if states is None else {name: plain_state([state])[0] for name, state in states.items()}

    return [
        values(value) if name in fold._DISTINCT_FIELDS else extra(value) if name == "extra" else value
        for name, value in zip(Accumulator.__slots__, acc.__getstate__(), strict=True)
    ]


def test_a_distinct_field_holds_a_lone_value_itself_and_a_set_from_the_second():
    acc = Accumulator()
    add_signal(acc, signal("login", user_id="u1", ip="10.0.0.1"))
    add_signal(acc, signal("login", user_id="u1", ip="10.0.0.2"))
    assert acc.users == "u1" and acc.ips == {"10.0.0.1", "10.0.0.2"}
    assert (F.distinct_count(acc.users), F.distinct_count(acc.ips), F.distinct_count(acc.cards)) == (1, 2, 0)
    lone, pair = Accumulator(), Accumulator()
    add_signal(lone, signal("login", user_id="u2"))
    add_signal(pair, signal("login", user_id="u3"))
    add_signal(pair, signal("login", user_id="u4"))
    assert merge([Accumulator(), lone]).users == "u2"
    assert merge([lone, pair]).users == {"u2", "u3", "u4"}  # merges into lone


def test_fold_signal_keeps_its_caps(monkeypatch):
    """The inline distinct-value updates turn a full set into a sketch, and top counters stop at their cap
    (small caps to see it)."""
    for module in (F, fold):
        monkeypatch.setattr(module, "DISTINCT_CAP", 3)
        monkeypatch.setattr(module, "TOP_CAP", 2)
    acc = Accumulator()
    for n in [*range(3), 0, 1, 2]:  # a full set meeting values it has stays a set
        fold_signal([acc], signal("stream", T0_MS + n, track_id=f"t{n}", artist_id=f"a{n}", ip=f"10.0.0.{n}"))
    assert (acc.tracks, acc.artists, acc.ips) == (
        {"t0", "t1", "t2"},
        {"a0", "a1", "a2"},
        {f"10.0.0.{n}" for n in range(3)},
    )
    for n in range(3, 6):
        fold_signal([acc], signal("stream", T0_MS + n, track_id=f"t{n}", artist_id=f"a{n}", ip=f"10.0.0.{n}"))
    assert acc.tracks.registers == HyperLogLog.of(f"t{n}" for n in range(6)).registers
    assert acc.artists.registers == HyperLogLog.of(f"a{n}" for n in range(6)).registers
    assert acc.ips.registers == HyperLogLog.of(f"10.0.0.{n}" for n in range(6)).registers
    assert [compute_features(acc, 3600)[f] for f in ("distinct_tracks", "distinct_artists", "distinct_ips")] == [6] * 3
    assert acc.stream_tracks == {"t0": 2, "t1": 2} and acc.stream_artists == {"a0": 2, "a1": 2}


# --- batch windows compute features as rules read them (WindowFeatures) ---------------------------------------
def _folded(signals) -> Accumulator:
    acc = Accumulator()
    for s in signals:
        add_signal(acc, s)
    return acc


@settings(max_examples=150, deadline=None)
@given(
    rich_signals,
    st.sampled_from([600, 3600, 86400]),
    st.permutations(sorted(FEATURES)),
    st.integers(0, len(FEATURES)),
)
def test_window_features_read_in_any_order_equal_computing_them_all(signals, window_sec, order, n_read):
    acc = _folded(signals)
    expected = compute_features(acc, window_sec)
    lazy = F.WindowFeatures(acc, window_sec)
    for name in order[:n_read]:  # some or all features first, as rules read them, then the whole mapping
        assert lazy[name] == expected[name]
        assert type(lazy[name]) is float
    assert list(lazy) == list(expected) == list(FEATURES)
    assert dict(lazy) == expected
    assert lazy == expected and expected == lazy
    assert len(lazy) == len(expected)


def test_window_features_behave_as_a_read_only_dict():
    lazy = F.WindowFeatures(_folded([signal("stream", ms_played=31_000)]), 3600)
    with pytest.raises(KeyError):
        lazy["no_such_feature"]  # simpleeval relies on KeyError to report an unknown name
    assert "streams" in lazy and "no_such_feature" not in lazy
    assert lazy.get("no_such_feature", -1.0) == -1.0
    restored = pickle.loads(pickle.dumps(lazy))
    assert type(restored) is dict and restored == compute_features(lazy._acc, 3600)
    assert repr(lazy).startswith("WindowFeatures({'events': 1.0")


def test_a_batch_window_computes_only_the_features_read():
    acc = _folded([signal("stream", ms_played=31_000)])
    acc.stream_tracks = "not a counter"  # top_track_share would fail: reading anything else must not compute it
    (ef,) = F.SizedToEntityFeaturesFn().process(((3600, "user", "u1", T0_MS), acc))
    assert isinstance(ef.features, F.WindowFeatures)
    assert (ef.features["streams"], ef.features["near_threshold_share"]) == (1.0, 1.0)
    with pytest.raises(AttributeError):
        ef.features["top_track_share"]
    with pytest.raises(AttributeError):
        dict(ef.features)  # listing them computes them all


def test_every_feature_read_then_listed_keeps_the_features_order():
    lazy = F.WindowFeatures(_folded([signal("stream", ms_played=31_000)]), 3600)
    for name in reversed(list(FEATURES)):
        lazy[name]
    assert list(lazy) == list(FEATURES)
    assert list(pickle.loads(pickle.dumps(lazy))) == list(FEATURES)


def test_a_batch_window_runs_its_extractors_even_when_no_rule_reads_them():
    # As the streaming job does: an extractor that fails on a window fails the backtest too.
    acc = _folded([signal("login", success=False)])
    acc.extra = {"scripted_client_share": "ab"}  # a state the extractor cannot read ("a" / "b")
    with pytest.raises(TypeError):
        list(F.ToEntityFeaturesFn(3600).process((("ip", "10.0.0.1"), acc), window=_ONE_HOUR))
    with pytest.raises(TypeError):
        list(F.SizedToEntityFeaturesFn().process(((3600, "ip", "10.0.0.1", T0_MS), acc)))


def test_entity_features_with_window_features_survive_the_record_coder():
    # Fused steps pass records as objects; a runner that encodes them between steps gets every feature back.
    acc = _folded([signal("stream", ms_played=31_000), signal("login", success=False)])
    (lazy,) = F.SizedToEntityFeaturesFn().process(((3600, "user", "u1", T0_MS), acc))
    eager = lazy._replace(features=compute_features(acc, 3600))
    coder = beam.coders.registry.get_coder(EntityFeatures)
    decoded = coder.decode(coder.encode(lazy))
    assert decoded == eager and type(decoded.features) is dict


def test_late_signals_count_for_hot_keys_as_for_users():
    """An ip (a hot-key type) and a user see the same signals, some late within the allowed lateness: both
    windows must fire the same panes. Beam 2.77's hot-key fan-out dropped the lateness, and every late
    signal of an ip, track or artist with it (transforms.features, ComputeFeatures)."""

    def at(ms):
        return TimestampedValue(signal("login", ms, user_id="u1", ip="10.0.0.1"), ms / 1000)

    minute = 60_000
    stream = (
        TestStream(coder=beam.coders.registry.get_coder(Signal))
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([at(T0_MS + 10 * minute), at(T0_MS + 20 * minute), at(T0_MS + 5 * minute)])
        .advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000)  # on time: 3 signals
        .add_elements([at(T0_MS + 30 * minute)])  # late, within the 10 minutes: a pane each
        .add_elements([at(T0_MS + 31 * minute)])
        .advance_watermark_to((T0_MS + HOUR_MS + 5 * minute) / 1000)
        .add_elements([at(T0_MS + 32 * minute)])
        .advance_watermark_to((T0_MS + HOUR_MS + 20 * minute) / 1000)
        .add_elements([at(T0_MS + 40 * minute)])  # past the lateness: dropped for both
        .advance_watermark_to_infinity()
    )
    panes = [(0, 3.0), (0, 4.0), (0, 5.0), (0, 6.0)]
    with TestPipeline(options=streaming_options()) as p:
        (features,) = p | stream | ComputeFeatures({3600: ("user", "ip")}, WindowConfig(allowed_lateness_sec=600))
        rows = features | beam.Map(lambda f: (f.entity_type, f.window_start_ms - T0_MS, f.features["events"]))
        for kind in ("user", "ip"):
            picked = rows | f"Only{kind}" >> beam.Filter(lambda r, k=kind: r[0] == k)
            assert_that(picked | f"Panes{kind}" >> beam.Map(lambda r: r[1:]), equal_to(panes), label=kind)


@pytest.mark.parametrize(
    "missing",
    [("short_paid", "cut_paid", "cut_near"), ("cut_paid", "cut_near")],
    ids=["before short_paid", "before cut"],
)
def test_accumulator_state_written_before_later_counters_still_reads(missing):
    """A running job's windows hold pickled accumulators; a Dataflow --update hands them to this code."""
    acc = F.Accumulator()
    for ms in (45_000, 32_000):
        F.add_signal(acc, signal("stream", ms_played=ms, track_duration_ms=200_000))
    assert F.Accumulator.__slots__[-len(missing) :] == missing
    old = acc.__getstate__()[: -len(missing)]  # as the code before these counters wrote it
    restored = F.Accumulator.__new__(F.Accumulator)
    restored.__setstate__(old)
    assert (restored.streams, restored.near_threshold) == (2, 1)
    assert all(getattr(restored, name) == 0 for name in missing)
    copied = pickle.loads(pickle.dumps(acc))
    assert (copied.short_paid, copied.cut_paid, copied.cut_near) == (2, 2, 1)
    with pytest.raises(ValueError, match="more than this code's"):
        restored.__setstate__([*acc.__getstate__(), 0])
    with pytest.raises(ValueError, match="fewer than any code wrote"):
        restored.__setstate__(acc.__getstate__()[:-4])


def _play(ms, **fields):
    fields.setdefault("user_id", "u1")
    fields.setdefault("ip", "10.0.0.1")
    return TimestampedValue(signal("stream", ms, **fields), ms / 1000)


def _panes_stream():
    """Plays of several users, tracks and artists over one IP: early panes, closing 10-minute windows with
    late signals after them, the hour closing, and a late signal for it."""
    return (
        TestStream(coder=beam.coders.registry.get_coder(Signal))
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([_play(T0_MS + MIN, track_id="t1"), _play(T0_MS + 2 * MIN, user_id="u2", track_id="t1")])
        .add_elements([_play(T0_MS + 3 * MIN, track_id="t2", artist_id="a2")])
        .advance_processing_time(31)
        .add_elements([_play(T0_MS + 4 * MIN, user_id="u3"), _play(T0_MS + 5 * MIN, track_id="t1")])
        .add_elements([_play(T0_MS + 12 * MIN, user_id="u2")])
        .advance_processing_time(31)
        .add_elements([_play(T0_MS + 6 * MIN, track_id="t3")])
        .advance_processing_time(31)
        .advance_watermark_to((T0_MS + 11 * MIN) / 1000)  # the first 10-minute windows close
        .add_elements([_play(T0_MS + 7 * MIN), _play(T0_MS + 30 * MIN, user_id="u2")])
        .advance_processing_time(31)
        .advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000)  # the hour closes
        .add_elements([_play(T0_MS + 40 * MIN, user_id="u4")])  # late for it
        .advance_processing_time(31)
        .advance_watermark_to_infinity()
    )


_KEPT: list = []


class _KeepPanes(beam.DoFn):
    def process(self, ef):
        _KEPT.append(ef)


def _run_panes(lateness_sec: int, every_feature: bool) -> list:
    _KEPT.clear()
    plan = {600: ("ip", "track", "user"), 3600: ("artist", "ip", "track", "user")}
    config = WindowConfig(allowed_lateness_sec=lateness_sec, early_firing_sec=30, every_feature=every_feature)
    with TestPipeline(options=_stream_options()) as p:
        (features,) = p | _panes_stream() | ComputeFeatures(plan, config)
        _ = features | beam.ParDo(_KeepPanes())
    return sorted(
        (ef.window_sec, ef.entity_type, ef.entity_id, ef.window_start_ms, sorted(dict(ef.features).items()))
        for ef in _KEPT
    )


@pytest.mark.parametrize("lateness_sec", [0, 600], ids=["hot-key fan-out", "allowed lateness"])
def test_a_streaming_pane_s_features_are_read_from_an_accumulator_nothing_changes_after_it_fired(
    lateness_sec, monkeypatch
):
    """A pane's features are computed as rules read them (WindowFeatures over the pane's accumulator), so no
    runner may change that accumulator after the pane fired. Each WindowFeatures is recorded as it is made,
    with every feature and the accumulator's state at that moment; after the run (early, on-time and late
    panes of 10-minute and hourly windows of users, tracks, artists and an IP since, with Beam's hot-key
    fan-out when there is no lateness), every accumulator is as it was and every pane lists what it fired
    with, and the panes are those a run computing every feature at once gives."""
    from transforms import features as features_module

    made: list = []

    class Recorded(features_module.WindowFeatures):
        __slots__ = ()

        def __init__(self, acc, window_sec):
            super().__init__(acc, window_sec)
            made.append((self, compute_features(acc, window_sec), copy.deepcopy(acc.__getstate__())))

    monkeypatch.setattr(features_module, "WindowFeatures", Recorded)
    lazy = _run_panes(lateness_sec, every_feature=False)
    monkeypatch.undo()

    assert len(made) == len(lazy) > 30
    assert all(wf._acc.__getstate__() == state for wf, _, state in made)
    assert all(dict(wf) == fired for wf, fired, _ in made)
    assert lazy == _run_panes(lateness_sec, every_feature=True)


def test_a_pane_computes_its_features_as_rules_read_them_unless_every_pane_is_written_as_a_row():
    acc = Accumulator()
    for minute, kind in enumerate(["stream", "login", "payment", "stream"]):
        add_signal(acc, signal(kind, T0_MS + minute * MIN))
    [lazy] = ToEntityFeaturesFn(3600).process((("user", "u1"), acc), _ONE_HOUR)
    [every] = ToEntityFeaturesFn(3600, every_feature=True).process((("user", "u1"), acc), _ONE_HOUR)
    assert isinstance(lazy.features, WindowFeatures) and type(every.features) is dict
    assert dict(lazy.features) == every.features == compute_features(acc, 3600)
    assert (lazy.window_start_ms, lazy.window_end_ms) == (T0_MS, T0_MS + HOUR_MS)
