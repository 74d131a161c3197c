"""The fold's two builds: Cython's (what ``make`` and Dataflow workers build, so what the rest of the suite runs)
and the plain Python of the same file (what runs where nothing was built). They must give the same results and
read each other's pickled state."""

import importlib.util
import pathlib
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import simulate
from tests.kit import HOUR_MS, T0_MS, plain_state, rich_signals, signal
from transforms import distinct, fold
from transforms.features import PreAggregateFn
from transforms.parse import parse_signal

FOLD_SOURCE = pathlib.Path(fold.__file__).with_name("fold.py")
DATA = pathlib.Path(__file__).with_name("data")


def _plain_build():
    """transforms/fold.py imported as plain Python under another name, beside the compiled module."""
    spec = importlib.util.spec_from_file_location("fold_as_plain_python", FOLD_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plain = _plain_build()


def test_the_suite_runs_the_compiled_fold_and_it_is_built_from_the_current_source():
    """``make`` builds the extension (setup.py build_ext --inplace) before the tests; a missing or stale build would
    leave the rest of the suite testing something other than what workers run."""
    assert fold.COMPILED, f"transforms.fold is plain Python ({fold.__file__}): run make, or setup.py build_ext"
    assert not plain.COMPILED
    built = pathlib.Path(fold.__file__).stat().st_mtime
    for source in (FOLD_SOURCE, FOLD_SOURCE.with_suffix(".pxd")):
        assert source.stat().st_mtime <= built, f"{source.name} changed after {pathlib.Path(fold.__file__).name}"


def test_both_builds_declare_the_same_fields():
    pxd = FOLD_SOURCE.with_suffix(".pxd").read_text()
    body = pxd.split("cdef class Accumulator:")[1].split("\n\n\n")[0]
    declared = [
        name.strip()
        for names in re.findall(r"cdef public (?:long long|object) (.+)", body)
        for name in names.split(",")
    ]
    assert sorted(declared) == sorted(plain.FIELDS) == sorted(fold.FIELDS)
    assert plain.FIELDS == fold.FIELDS


def _state(acc) -> list:
    return plain_state(acc.__getstate__())


@settings(max_examples=100, deadline=None)
@given(rich_signals, st.integers(1, 3), st.sampled_from([distinct.DISTINCT_CAP, 2]), st.integers(0, 60))
def test_both_builds_fold_merge_and_copy_alike(signals, n_accs, cap, cut):
    with pytest.MonkeyPatch.context() as patch:
        for module in (fold, plain, distinct):
            patch.setattr(module, "DISTINCT_CAP", cap)
        results = []
        for build in (fold, plain):
            accs = [build.Accumulator() for _ in range(n_accs)]
            left, right = build.Accumulator(), build.Accumulator()
            for n, s in enumerate(signals):
                build.fold_signal(accs, s)
                build.fold_signal([left if n < cut else right], s)
            merged = build.merge([left, build.copy_accumulator(right)])
            results.append([_state(acc) for acc in (*accs, merged, build.copy_accumulator(merged))])
    assert results[0] == results[1]


@settings(max_examples=50, deadline=None)
@given(rich_signals, st.integers(1, 8))
def test_both_builds_fold_an_hour_batch_alike(signals, max_keys):
    """``fold_batch`` with whole hours and partial 10-minute and 1-day windows, flushing at ``max_keys``."""
    hour = sorted((s for s in signals if s.event_time_ms < T0_MS + HOUR_MS), key=lambda s: s.event_time_ms)
    plan = {600: ("ip",), 3600: ("user", "device"), 86400: ("user",)}
    results = []
    for build in (fold, plain):
        fn = PreAggregateFn(plan, max_keys=max_keys, whole_batch_ms=HOUR_MS)
        tables = tuple(
            (size_sec, size_ms, tuple((entity_type, index, {}) for entity_type, index in fields))
            for size_sec, size_ms, fields in fn._whole_fields
        )
        flushed, partials, done = [], {}, 0
        while done < len(hour):
            done = build.fold_batch(hour, done, tables, fn._batch_rest, partials, max_keys)
            flushed.append(sorted((key, _state(acc)) for key, acc in partials.items()))
            partials = {}
        whole = sorted(
            ((size_sec, entity_type, start, entity_id), _state(acc))
            for size_sec, _, fields in tables
            for entity_type, _, by_start in fields
            for start, by_id in by_start.items()
            for entity_id, acc in by_id.items()
        )
        results.append((flushed, whole))
    assert results[0] == results[1]


def test_both_builds_fold_simulated_traffic_alike():
    """A day of the simulator's traffic (listeners, stream farms, credential stuffing, card testing...): its
    branches are taken far more often than in the property tests' few signals. Every entity's 10-minute, hourly
    and daily windows, and each day merged from its hours."""
    lines, _ = simulate.simulate(seed=3, hours=24, scale=0.2, malformed=0)
    signals = [parse_signal(line).signal for line in lines]
    results = []
    for build in (fold, plain):
        windows: dict = {}
        for s in signals:
            t = s.event_time_ms
            accs = [
                windows.setdefault((size_ms, field, value, t - t % size_ms), build.Accumulator())
                for size_ms in (600_000, HOUR_MS, 24 * HOUR_MS)
                for field, value in zip(("user", "device", "ip", "track", "artist"), entity_ids(s), strict=True)
                if value is not None
            ]
            build.fold_signal(accs, s)
        days: dict = {}
        for (size_ms, field, value, start), acc in windows.items():
            if size_ms == HOUR_MS:
                day = (field, value, start - start % (24 * HOUR_MS))
                days[day] = build.merge([days.get(day) or build.Accumulator(), build.copy_accumulator(acc)])
        results.append(
            (sorted((k, _state(a)) for k, a in windows.items()), sorted((k, _state(a)) for k, a in days.items()))
        )
    assert len(results[0][0]) > 10_000
    assert results[0] == results[1]


def entity_ids(s):
    return s.user_id, s.device_id, s.ip, s.track_id, s.artist_id


def _golden_signals():
    """What the pickle in ``data/`` was folded from: signals of every kind, and more users than DISTINCT_CAP, so
    one field is a sketch."""
    out = [
        signal(
            "stream",
            T0_MS,
            user_id="u1",
            device_id="d1",
            ip="10.0.0.1",
            country="SE",
            track_id="t1",
            artist_id="a1",
            ms_played=35_000,
            track_duration_ms=200_000,
            trace_id="tr1",
        ),
        signal(
            "stream",
            T0_MS + 60_000,
            user_id="u2",
            device_id="d2",
            ip="2001:db8::1",
            country="NO",
            track_id="t2",
            artist_id="a1",
            ms_played=50_000,
            trace_id="tr0",
        ),
        signal(
            "login", T0_MS + 120_000, user_id="u1", success=False, user_agent="python-requests/2.31", trace_id="tr2"
        ),
        signal("signup", T0_MS + 180_000, user_id="u3", device_id="d1"),
        signal("playlist_add", T0_MS + 240_000, user_id="u1", playlist_id="p1", track_id="t2", artist_id="a2"),
        signal(
            "payment",
            T0_MS + 300_000,
            user_id="u1",
            success=False,
            amount_cents=150,
            currency="EUR",
            card_fingerprint="c1",
        ),
    ]
    return out + [signal("login", T0_MS + 360_000 + n, user_id=f"v{n}", success=True) for n in range(4_200)]


def test_state_pickled_before_the_fold_was_compiled_still_reads():
    """A streaming job updated in place (Dataflow ``--update``) keeps its windows' accumulators as the previous
    release pickled them. ``data/accumulator_before_compiling.pickle`` is ``_golden_signals`` folded by the plain
    Python ``transforms.features.Accumulator`` of the release before this module (commit 83b944a)."""
    old = pickle.loads((DATA / "accumulator_before_compiling.pickle").read_bytes())
    assert type(old) is fold.Accumulator
    for build in (fold, plain):
        acc = build.Accumulator()
        for s in _golden_signals():
            build.fold_signal([acc], s)
        assert acc.users.__class__ is distinct.HyperLogLog
        assert _state(old) == _state(acc)


def test_both_builds_pickle_the_same_state():
    acc, plain_acc = fold.Accumulator(), plain.Accumulator()
    for s in _golden_signals()[:6]:
        fold.fold_signal([acc], s)
        plain.fold_signal([plain_acc], s)
    compiled_reduce, plain_reduce = acc.__reduce_ex__(4), plain_acc.__reduce_ex__(4)
    assert compiled_reduce[0] is plain_reduce[0]  # copyreg.__newobj__: the class, then its state
    assert compiled_reduce[1] == (fold.Accumulator,) and plain_reduce[1] == (plain.Accumulator,)
    assert compiled_reduce[2] == plain_reduce[2] == acc.__getstate__()
    assert _state(pickle.loads(pickle.dumps(acc))) == _state(acc)


@pytest.mark.parametrize("build", [fold, plain], ids=["compiled", "plain"])
def test_the_state_lists_every_field_in_the_order_fields_names_them(build):
    """``__getstate__`` and ``__setstate__`` name each field in turn (for speed): a field out of FIELDS' order
    would swap two fields' values in every pickle, both builds alike, so the cross-build tests above would not
    see it."""
    acc = build.Accumulator()
    for n, name in enumerate(build.FIELDS):
        setattr(acc, name, n + 1 if isinstance(getattr(acc, name), int) else f"value of {name}")
    state = acc.__getstate__()
    assert state == [getattr(acc, name) for name in build.FIELDS]
    back = build.Accumulator()
    back.__setstate__(state)
    assert [getattr(back, name) for name in build.FIELDS] == state


def _folded(build, signals) -> list:
    """Accumulators of ``signals`` by user, with the default extractors' states (``extra``) where there are logins."""
    by_user: dict = {}
    for s in signals:
        build.fold_signal([by_user.setdefault(s.user_id, build.Accumulator())], s)
    return [by_user[user] for user in sorted(by_user)]


@settings(max_examples=100, deadline=None)
@given(rich_signals, st.sampled_from([distinct.DISTINCT_CAP, 2]))
def test_the_shuffle_form_reads_back_the_same_accumulator_in_either_build(signals, cap):
    """``encode_accumulator`` and ``decode_accumulator`` (the batch merge shuffle's form,
    ``transforms.features.AccumulatorCoder``): every field reads back, lone values, sets, sketches, counters,
    samples and extractor states, whichever build wrote it and whichever reads it."""
    from apache_beam.coders import FastPrimitivesCoder

    extra = FastPrimitivesCoder().get_impl()
    with pytest.MonkeyPatch.context() as patch:
        for module in (fold, plain, distinct):
            patch.setattr(module, "DISTINCT_CAP", cap)
        folded = {build: _folded(build, signals) for build in (fold, plain)}
    for writer in (fold, plain):
        for reader in (fold, plain):
            for written, expected in zip(folded[writer], folded[reader], strict=True):
                back = reader.decode_accumulator(writer.encode_accumulator(written, extra.encode), extra.decode)
                assert type(back) is reader.Accumulator
                assert _state(back) == _state(expected)


@pytest.mark.parametrize("build", [fold, plain], ids=["compiled", "plain"])
def test_the_shuffle_form_refuses_what_is_not_an_accumulator(build):
    import msgspec
    from apache_beam.coders import FastPrimitivesCoder

    extra = FastPrimitivesCoder().get_impl()
    with pytest.raises(ValueError, match=f"not an encoded accumulator: {len(build.FIELDS)} fields expected"):
        build.decode_accumulator(msgspec.msgpack.encode([1, 2, 3]), extra.decode)
    good = build.Accumulator()
    good.users = "u1"
    fields = msgspec.msgpack.decode(build.encode_accumulator(good, extra.encode))
    fields[15] = msgspec.msgpack.Ext(9, b"?")  # an extension that is not a sketch's
    with pytest.raises(ValueError, match="distinct-value field holds a Ext"):
        build.decode_accumulator(msgspec.msgpack.encode(fields), extra.decode)
    bad = build.Accumulator()
    bad.users = ["u1"]  # a list is no distinct-value form: it would read back as a set
    with pytest.raises(TypeError, match="distinct-value field holds a list"):
        build.encode_accumulator(bad, extra.encode)
