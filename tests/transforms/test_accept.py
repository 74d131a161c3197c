"""The value checks' two builds (``transforms/accept.py``): Cython's, which ``make`` and Dataflow workers build and
the rest of the suite runs, and the plain Python of the same file, which runs where nothing was built. They must
give the same answer on every input; ``tests/transforms/test_parse.py`` checks the compiled one against the
contract written out (``parse_signal_checked``)."""

import datetime as dt
import importlib.util
import pathlib

import msgspec
import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipelines import simulate
from tests.kit import T0_MS, payload_dict
from transforms import accept
from transforms import parse as parse_module

ACCEPT_SOURCE = pathlib.Path(accept.__file__).with_name("accept.py")


def _plain_build():
    """transforms/accept.py imported as plain Python under another name (caches of its own), beside the compiled
    module."""
    spec = importlib.util.spec_from_file_location("accept_as_plain_python", ACCEPT_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plain = _plain_build()
BUILDS = (accept, plain)


def test_the_suite_runs_the_compiled_checks_and_they_are_built_from_the_current_source():
    """As ``test_fold.py`` for the fold: a missing or stale build would leave the suite testing something other
    than what workers run."""
    assert accept.COMPILED, f"transforms.accept is plain Python ({accept.__file__}): run make, or setup.py build_ext"
    assert not plain.COMPILED
    built = pathlib.Path(accept.__file__).stat().st_mtime
    for source in (ACCEPT_SOURCE, ACCEPT_SOURCE.with_suffix(".pxd")):
        assert source.stat().st_mtime <= built, f"{source.name} changed after {pathlib.Path(accept.__file__).name}"


class _Text(str):
    """A str subclass: never an id (the pattern path checks the exact class too)."""


_ID_CHARS = "aZ09._:@+/=-"
_ids = st.one_of(
    st.text(alphabet=st.sampled_from(_ID_CHARS + " \n\x00é\u2028Ａ٣"), max_size=131),
    st.text(max_size=20),
    st.sampled_from(["u" * 128, "u" * 129, "-u1", ".", "a", "9", "ab=", "a\n", "é"]),
)


@settings(max_examples=500, deadline=None)
@given(_ids)
@example("")
@example("a" * 127 + "-")
@example("-" + "a" * 127)
@example("a" * 300)  # past a byte-sized length
def test_the_id_check_is_the_pattern_in_both_builds(value):
    expected = accept._ID_RE.fullmatch(value) is not None
    assert accept.is_id(value) is expected
    assert plain.is_id(value) is expected
    assert accept.id_ok(value) is expected
    assert plain.id_ok(value) is expected


def test_only_an_exact_str_is_an_id():
    for value in (None, 7, b"u1", _Text("u1"), ["u1"]):
        for build in BUILDS:
            assert build.is_id(value) is False
            assert build.id_ok(value) is False


def _answer(fn, *args):
    try:
        return "value", fn(*args)
    except (ValueError, OverflowError, TypeError) as err:
        return "error", type(err).__name__


_stamps = st.one_of(
    # Every shape the fast path takes, and the full parser's: times, offsets, fractions of 0 to 9 digits.
    st.builds(
        lambda t, frac, tz: t.strftime("%Y-%m-%dT%H:%M:%S") + frac + tz,
        st.datetimes(min_value=dt.datetime(1999, 12, 31), max_value=dt.datetime(2100, 1, 2)),
        st.sampled_from(["", ".1", ".12", ".123", ".1234", ".123456789", ".", ".12a"]),
        st.sampled_from(["Z", "z", "+00:00", "-05:30", "+23:59", "+24:00", "", "Q"]),
    ),
    # Near misses of the common format: a character changed anywhere.
    st.builds(
        lambda i, ch: "2026-11-02T00:00:02.326Z"[:i] + ch + "2026-11-02T00:00:02.326Z"[i + 1 :],
        st.integers(0, 23),
        st.sampled_from(list("0569:.-TZz x٣") + ["", "00"]),
    ),
    st.text(max_size=30),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_stamps, min_size=1, max_size=6))
def test_both_builds_read_times_alike_with_the_minute_cache_empty_and_full(stamps):
    for build in BUILDS:
        build._MINUTE_CACHE.clear()
    for _ in range(2):  # the second pass finds the minutes the first one remembered
        for stamp in stamps:
            assert _answer(accept.parse_rfc3339_ms, stamp) == _answer(plain.parse_rfc3339_ms, stamp), stamp


_ips = st.sampled_from(
    ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "fe80::1%eth0", "10.0.0.256", "", "x", "01.2.3.4"]
)


def _decoded(d: dict):
    try:
        decoded = parse_module._TYPED_DECODER.decode(orjson.dumps(d))
    except msgspec.DecodeError:
        return None
    return decoded, parse_module._EVENT_TYPE_OF[decoded.__class__]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["stream", "login", "signup", "playlist_add", "payment"]),
    st.dictionaries(
        st.sampled_from(["event_id", "user_id", "device_id", "track_id", "artist_id", "trace_id", "card_fingerprint"]),
        _ids,
        max_size=3,
    ),
    st.one_of(st.none(), _stamps),
    st.one_of(st.none(), _ips),
    st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["EUR", "eur", "EURO"])),
    st.one_of(st.none(), st.text(max_size=8), st.just("x" * 513)),
    st.one_of(st.none(), _ids, st.just(7)),
    st.sampled_from([None, T0_MS, 5]),
)
def test_both_builds_accept_a_decoded_signal_alike(
    event_type, ids, stamp, ip, currency, user_agent, attribute, publish_time_ms
):
    d = payload_dict(event_type, **ids)
    for name, value in (("event_time", stamp), ("ip", ip), ("currency", currency), ("user_agent", user_agent)):
        if value is None:
            d.pop(name, None)
        else:
            d[name] = value
    decoded = _decoded(d)
    if decoded is None:
        return
    for build in BUILDS:
        build._ACCEPTED_IDS.clear()
    for _ in range(2):  # with the caches empty, then holding what the first pass accepted
        answers = [build.accept_typed(*decoded, attribute, publish_time_ms) for build in BUILDS]
        assert answers[0] == answers[1]
        assert answers[0] is None or type(answers[0]) is type(answers[1]) is parse_module.Signal


def test_both_builds_accept_a_simulated_day_alike():
    lines, _ = simulate.simulate(seed=7, hours=24, scale=0.05, malformed=40)
    taken = 0
    for raw in lines:
        try:
            decoded = parse_module._TYPED_DECODER.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            continue
        event_type = parse_module._EVENT_TYPE_OF[decoded.__class__]
        compiled = accept.accept_typed(decoded, event_type, None, None)
        assert compiled == plain.accept_typed(decoded, event_type, None, None), raw
        taken += compiled is not None
    assert taken > 1000
