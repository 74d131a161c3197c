"""Signal validation: every contract break is a dead letter with a reason, never a crash."""

import datetime as dt
import json

import apache_beam as beam
import msgspec
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import simulate
from schemas import EVENT_TYPES, DeadLetter
from tests.kit import T0_MS, parse_answer, payload, payload_dict, signal_answer
from transforms import accept
from transforms import parse as parse_module
from transforms.lines import ReadLineBlocks
from transforms.parse import (
    MAX_PAYLOAD_BYTES,
    InvalidSignal,
    ParseSignalBatchFn,
    ParseSignalFn,
    ParseSignals,
    parse_rfc3339_ms,
    parse_signal,
    parse_signal_checked,
)


# --- valid signals ---------------------------------------------------------------
@pytest.mark.parametrize("event_type", ["stream", "login", "signup", "playlist_add", "payment"])
def test_each_event_type_parses(event_type):
    parsed = parse_signal(payload(event_type))
    assert parsed.signal.event_type == event_type
    assert parsed.signal.event_time_ms == T0_MS
    assert parsed.unknown_fields == 0


def test_optional_fields_are_normalised():
    s = parse_signal(payload("login", ip="2001:0db8:0000:0000:0000:0000:0000:0001", country="SE")).signal
    assert s.ip == "2001:db8::1"
    assert s.country == "SE"


@pytest.mark.parametrize(
    "written", ["203.0.113.7", "::ffff:203.0.113.7", "::FFFF:cb00:7107", "0:0:0:0:0:ffff:cb00:7107"]
)
def test_an_ipv4_client_seen_through_a_dual_stack_server_is_one_ip(written):
    # One client, one IP entity: per-IP features and block_ip must not split it across two spellings.
    assert parse_signal(payload("login", ip=written)).signal.ip == "203.0.113.7"


@pytest.mark.parametrize("cents", [0, 100_000_100, 10**12])  # Rp 1,000,001 is 100,000,100 minor units
def test_large_payments_in_small_units_are_accepted(cents):
    assert parse_signal(payload("payment", amount_cents=cents)).signal.amount_cents == cents


def test_unknown_fields_are_ignored_and_counted():
    parsed = parse_signal(payload("signup", campaign="x", referrer="y"))
    assert parsed.unknown_fields == 2


@pytest.mark.parametrize(
    "text, expected_ms",
    [
        ("2026-11-02T00:00:00Z", T0_MS),
        ("2026-11-02T01:00:00+01:00", T0_MS),
        ("2026-11-01T19:00:00.250-05:00", T0_MS + 250),
        ("2026-11-02t00:00:00.123456789z", T0_MS + 123),
    ],
)
def test_rfc3339_times(text, expected_ms):
    assert parse_rfc3339_ms(text) == expected_ms


def test_trace_id_may_come_from_an_attribute_but_payload_wins():
    assert parse_signal(payload("signup"), trace_id_attribute="attr1").signal.trace_id == "attr1"
    assert parse_signal(payload("signup", trace_id="own"), trace_id_attribute="attr1").signal.trace_id == "own"


def test_a_malformed_trace_id_attribute_is_ignored_not_a_reason_to_lose_the_signal():
    """A producer passing a Cloud Trace header ('<trace>/<span>;o=1') as the attribute dead-lettered every
    signal it sent, and the dead letter (payload only) could not show why."""
    parsed = parse_signal(payload("signup"), trace_id_attribute="105445aa7843bc8bf206b12000100000/1;o=1")
    assert parsed.signal.trace_id is None and parsed.signal.event_type == "signup"
    with pytest.raises(InvalidSignal, match="trace_id"):  # in the payload it is the producer's contract
        parse_signal(payload("signup", trace_id="105445aa7843bc8bf206b12000100000/1;o=1"))


@pytest.mark.parametrize(
    "event_offset_sec, reason",
    [
        (0, None),
        (-3599, None),  # its hour window ends at the publish time, and an hour of lateness follows
        (-3601, None),  # the hour before's window ended an hour ago: the lateness has just run out
        (-3 * 3600 - 1, "event_time_too_late"),  # its last window ended 3 h before, its lateness 2 h before
        (-30 * 3600, "event_time_too_late"),
        (599, None),
        (601, "event_time_in_future"),
    ],
)
def test_streaming_checks_event_time_against_the_publish_time(event_offset_sec, reason):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from transforms.parse import ArrivalBounds, ParseSignalFn

    publish = dt.datetime.fromtimestamp(T0_MS / 1000, tz=dt.UTC)
    message = PubsubMessage(payload("stream", T0_MS + event_offset_sec * 1000), {}, publish_time=publish)
    bounds = ArrivalBounds(window_sizes_ms=(600_000, 3_600_000), allowed_lateness_ms=3_600_000, max_future_ms=600_000)
    fn = ParseSignalFn("sub", bounds)
    (out,) = list(fn.process(message))
    if reason is None:
        assert out.event_time_ms == T0_MS + event_offset_sec * 1000
    else:
        assert out.value.reason == reason and "'event_time'" in out.value.detail
        assert out.value.raw_payload == message.data
    unchecked = ParseSignalFn("sub")  # a backtest's files have no publish time to check against
    assert list(unchecked.process(message))[0].event_time_ms == T0_MS + event_offset_sec * 1000


def test_publish_time_is_the_fallback_event_time():
    raw = orjson.dumps({k: v for k, v in payload_dict("signup").items() if k != "event_time"})
    assert parse_signal(raw, publish_time_ms=T0_MS + 5).signal.event_time_ms == T0_MS + 5
    with pytest.raises(InvalidSignal, match="event_time"):
        parse_signal(raw)


# --- invalid signals: (payload, reason, field named in the detail) ------------------
def _without(event_type, field):
    d = payload_dict(event_type)
    del d[field]
    return orjson.dumps(d)


INVALID = [
    # encoding and shape
    (b"\xff\xfe{}", "invalid_utf8", "UTF-8"),
    (b"{not json", "invalid_json", "JSON"),
    (b'{"a": NaN}', "invalid_json", "JSON"),
    (b"[" * 2000 + b"]" * 2000, "invalid_json", "JSON"),
    (b'"a string"', "not_an_object", "object"),
    (b"[]", "not_an_object", "object"),
    (b"x" * (MAX_PAYLOAD_BYTES + 1), "payload_too_large", "limit"),
    # required fields
    (_without("stream", "event_id"), "missing_field", "event_id"),
    (_without("stream", "user_id"), "missing_field", "user_id"),
    (_without("stream", "event_type"), "missing_field", "event_type"),
    (_without("stream", "ms_played"), "missing_field", "ms_played"),
    (_without("stream", "track_id"), "missing_field", "track_id"),
    (_without("login", "success"), "missing_field", "success"),
    (_without("playlist_add", "playlist_id"), "missing_field", "playlist_id"),
    (_without("payment", "card_fingerprint"), "missing_field", "card_fingerprint"),
    (_without("payment", "currency"), "missing_field", "currency"),
    # wrong types
    (payload("stream", ms_played="31000"), "wrong_type", "ms_played"),
    (payload("stream", ms_played=True), "wrong_type", "ms_played"),
    (payload("stream", ms_played=31000.5), "wrong_type", "ms_played"),
    (payload("login", success="yes"), "wrong_type", "success"),
    (payload("signup", user_id=42), "wrong_type", "user_id"),
    (payload("signup", event_time=1700000000), "wrong_type", "event_time"),
    (payload("signup", ip=["1.2.3.4"]), "wrong_type", "ip"),
    # invalid values
    (payload("stream", ms_played=-1), "invalid_value", "ms_played"),
    (payload("payment", amount_cents=-100), "invalid_value", "amount_cents"),
    (payload("payment", currency="euro"), "invalid_value", "currency"),
    (payload("signup").replace(b'"signup"', b'"scrobble"'), "invalid_value", "event_type"),
    (payload("signup", ip="999.1.1.1"), "invalid_value", "ip"),
    (payload("signup", ip=""), "invalid_value", "ip"),
    (payload("signup", ip="fe80::1%eth0"), "invalid_value", "ip"),
    (payload("signup", ip="::ffff:192.0.2.1%eth0"), "invalid_value", "ip"),  # a zone on a mapped address too
    (payload("signup", country="XX"), "invalid_value", "country"),
    (payload("signup", event_id=""), "invalid_value", "event_id"),
    (payload("signup", event_id="x" * 129), "invalid_value", "event_id"),
    (payload("signup", user_id="u1'; DROP TABLE users;--"), "invalid_value", "user_id"),
    (payload("signup", device_id="d\x00"), "invalid_value", "device_id"),
    (payload("signup", user_id=["u1"]), "wrong_type", "user_id"),  # unhashable: must not reach the id cache
    (payload("signup", user_agent="ok\nforged log line"), "invalid_value", "user_agent"),
    (payload("signup", user_agent="Mozilla\x9b2J"), "invalid_value", "user_agent"),  # C1: a terminal's CSI
    (payload("signup", user_agent="ok\x85next"), "invalid_value", "user_agent"),  # C1: next line
    (payload("signup", user_agent="ok\u2028next"), "invalid_value", "user_agent"),  # line separator
    (payload("payment", amount_cents=10**12 + 1), "invalid_value", "amount_cents"),
    # an array nested past Python's repr recursion limit but within orjson's depth and the size limit
    (payload("signup").replace(b'"signup"', b"[" * 1000 + b"]" * 1000), "wrong_type", "event_type"),
    (payload("signup").replace(b'"signup"', b"7"), "wrong_type", "event_type"),
    (payload("signup", event_time="2026-11-02 00:00:00"), "invalid_value", "event_time"),
    (payload("signup", event_time="2026-11-02T00:00:00"), "invalid_value", "event_time"),
    (payload("signup", event_time="2026-13-02T00:00:00Z"), "invalid_value", "event_time"),
    (payload("signup", event_time="1970-01-01T00:00:00Z"), "event_time_out_of_range", "event_time"),
    (payload("signup", event_time="2999-01-01T00:00:00Z"), "event_time_out_of_range", "event_time"),
]


def test_a_tracks_length_is_optional_and_kept():
    assert parse_signal(payload("stream", track_duration_ms=180_000)).signal.track_duration_ms == 180_000
    assert parse_signal(payload("stream", track_duration_ms=24 * 3600 * 1000)).signal.track_duration_ms == 86_400_000
    assert parse_signal(payload("stream", track_duration_ms=1)).signal.track_duration_ms == 1
    assert parse_signal(payload("stream")).signal.track_duration_ms is None
    assert parse_signal(payload("stream", track_duration_ms=None)).signal.track_duration_ms is None


@pytest.mark.parametrize("bad", [0, -5, 86_400_001, 2**63, 180_000.5, 180_000.0, "180000", True, [1]])
def test_a_bad_track_length_is_dropped_and_the_play_kept(bad):
    """The catalogue's enrichment, not the producer's event: a bad one must not cost the play (counted in
    the composite's test below)."""
    parsed = parse_signal(payload("stream", track_duration_ms=bad, ms_played=31_000))
    assert parsed.signal.track_duration_ms is None and parsed.signal.ms_played == 31_000


@pytest.mark.parametrize("raw, reason, field", INVALID)
def test_invalid_signals_name_reason_and_field(raw, reason, field):
    with pytest.raises(InvalidSignal) as info:
        parse_signal(raw)
    assert info.value.reason == reason
    assert field in info.value.detail


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_errors(raw):
    try:
        parse_signal(raw)
    except InvalidSignal:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["stream", "login", "signup", "playlist_add", "payment"]), st.text(max_size=12), _json_values)
def test_mutating_any_field_gives_a_signal_or_a_dead_letter(event_type, field, value):
    d = payload_dict(event_type)
    d[field] = value
    try:
        parsed = parse_signal(json.dumps(d).encode())
    except InvalidSignal as err:
        assert err.reason and err.detail
    else:
        assert parsed.signal.event_id == d["event_id"]


_id_fields = st.sampled_from(
    ["event_id", "user_id", "device_id", "track_id", "artist_id", "playlist_id", "card_fingerprint", "trace_id"]
)
_id_values = st.one_of(st.text(max_size=130), st.sampled_from(["u1", "u1 ", "-u1", "u" * 128, "u" * 129, "u\n"]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["stream", "playlist_add", "payment"]), st.lists(st.tuples(_id_fields, _id_values), max_size=4))
def test_an_id_gets_the_same_answer_the_first_time_and_once_remembered(event_type, ids):
    # Ids the pattern accepted are remembered (parse._ACCEPTED_IDS); a remembered id must get the answer the
    # pattern gives, and an id the pattern refused must never be remembered.
    parse_module.clear_caches()
    d = payload_dict(event_type)
    d.update(ids)
    raw = orjson.dumps(d)
    first = parse_answer(parse_signal, raw)
    assert parse_answer(parse_signal, raw) == first
    parse_module.clear_caches()
    assert parse_answer(parse_signal, raw) == first
    assert all(parse_module._ID_RE.fullmatch(value) for value in parse_module._ACCEPTED_IDS)


def test_clearing_the_caches_empties_every_one_of_them():
    """What benchmarks call before each timed pass: every cache a first parse fills is empty afterwards."""
    parse_signal(payload("stream", ip="10.0.0.1"))
    caches = (parse_module._ACCEPTED_IDS, parse_module._IP_CACHE, parse_module._MINUTE_CACHE)
    assert all(caches) and parse_module._day_ms.cache_info().currsize
    parse_module.clear_caches()
    assert not any(caches) and parse_module._day_ms.cache_info().currsize == 0


@pytest.mark.parametrize(
    "event_type, bad, reported",
    [
        ("stream", {"user_id": "u 1", "track_id": "t 1", "trace_id": "x y"}, "user_id"),
        ("stream", {"track_id": "t 1", "trace_id": "x y"}, "track_id"),
        ("payment", {"card_fingerprint": "c 1", "trace_id": "x y", "currency": "euro"}, "card_fingerprint"),
        ("payment", {"trace_id": "x y", "currency": "euro", "success": "yes"}, "trace_id"),
        ("stream", {"ms_played": -1, "success": "yes", "amount_cents": -1}, "ms_played"),
        ("payment", {"success": "yes", "amount_cents": -1}, "success"),
        ("payment", {"event_id": "e 1", "user_id": "u 1"}, "event_id"),
    ],
)
def test_the_first_bad_field_in_check_order_is_the_one_reported(event_type, bad, reported):
    # Ids in the signal's order (event, user, device, track, artist, playlist, card, trace), then currency,
    # ms_played, success and amount_cents: a producer fixing its payloads sees one stable reason at a time.
    d = payload_dict(event_type)
    d.update(bad)
    with pytest.raises(InvalidSignal) as info:
        parse_signal(orjson.dumps(d))
    assert f"'{reported}'" in info.value.detail


def test_remembered_ids_are_bounded(monkeypatch):
    monkeypatch.setattr(accept, "_ACCEPTED_IDS_MAX", 3)  # the cap both parsing paths read
    parse_module._ACCEPTED_IDS.clear()
    for i in range(20):
        assert parse_signal(payload("stream", user_id=f"user{i}", device_id=f"dev{i}")).signal.user_id == f"user{i}"
        assert len(parse_module._ACCEPTED_IDS) <= 3
    assert parse_answer(parse_signal, payload("stream", user_id="user 1"))[:2] == ("dead letter", "invalid_value")


# --- the typed decoder against the checks ---------------------------------------------
def _typed(raw: bytes, trace_id_attribute=None, publish_time_ms=None):
    """The typed decoder's own answer: a ParsedSignal, or None where it leaves the payload to the checks."""
    try:
        decoded = parse_module._TYPED_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    event_type = parse_module._EVENT_TYPE_OF[decoded.__class__]
    signal = accept.accept_typed(decoded, event_type, trace_id_attribute, publish_time_ms)
    return None if signal is None else parse_module.ParsedSignal(signal, 0)


def test_the_typed_decoder_takes_every_simulated_signal_and_agrees_with_the_checks():
    lines, _ = simulate.simulate(seed=5, hours=24, scale=0.05, malformed=40)
    parse_module.clear_caches()
    taken = valid = 0
    for raw in lines:
        expected = parse_answer(parse_signal_checked, raw)
        assert parse_answer(parse_signal, raw) == expected, raw
        typed = _typed(raw)
        if typed is not None:
            assert signal_answer(typed) == expected, raw
        valid += expected[0] == "signal"
        taken += typed is not None
    # Every simulated signal takes the fast path (else it would be dead code); no malformed line does.
    assert valid == taken == len(lines) - 40 > 4000


_STREAM = payload_dict("stream", event_id="e1", user_id="u1")
_BODY = orjson.dumps(_STREAM)[1:-1]  # the stream's fields without braces, to write duplicates and oddities around


@pytest.mark.parametrize(
    "raw, typed_takes_it",
    [
        (b'{"event_type":"login",' + _BODY + b"}", False),  # two event types: JSON's last one wins
        (b"{" + _BODY + b',"event_type":"login","success":true}', False),
        (b"{" + _BODY + b',"event_id":"e2"}', True),  # a repeated field: the last one wins, as with orjson
        (b"{" + _BODY.replace(b'"event_type":"stream"', b'"event\\u005ftype":"str\\u0065am"') + b"}", True),  # escapes
        (b"{" + _BODY + b',"device_id":"d1","device_id":null}', True),
        (b"{" + _BODY + b',"ms_played":"x","ms_played":5}', False),
        (b"{" + _BODY + b',"ms_played":5,"ms_played":"x"}', False),
        (b"{" + _BODY + b',"user_agent":"\\ud800"}', False),  # an escaped lone surrogate
        (b"{" + _BODY + b',"user_agent":"\xff"}', False),  # not UTF-8
        (b"{" + _BODY + b',"user_agent":"a\x01"}', False),  # a raw control character in a string
        (b"{" + _BODY + b',"user_agent":"a\\u0085b"}', False),  # an escaped C1 control
        (b"{" + _BODY + b',"user_agent":"' + b"a" * 513 + b'"}', False),
        (b"{" + _BODY + b"} x", False),
        (b"{" + _BODY + b"} \n", True),
        (b"\xef\xbb\xbf{" + _BODY + b"}", False),  # a byte-order mark
        (b"{" + _BODY + b',"amount_cents":NaN}', False),
        (b"{" + _BODY + b',"amount_cents":1.0}', False),
        (b"{" + _BODY + b',"amount_cents":100000000000000000000000}', False),
        (b"{" + _BODY + b',"amount_cents":1E3}', False),
        (b"{" + _BODY + b',"amount_cents":-0}', True),
        (b"{" + _BODY + b',"success":1}', False),
        (b"{" + _BODY + b',"country":"se"}', False),
        (b"{" + _BODY + b',"currency":"EURO"}', False),
        (b"{" + _BODY + b',"ip":"fe80::1%eth0"}', False),
        (b"{" + _BODY + b',"ip":"::ffff:10.0.0.1"}', True),
        (b"{" + _BODY + b',"track_duration_ms":0}', False),  # dropped and counted by the checks
        (b"{" + _BODY + b',"event_time_ms":5}', False),  # a known name that the wire does not carry
        (b"{" + _BODY + b',"colour":"red"}', False),  # an unknown field: counted by the checks
        (b'{"event_type":"stream","event_id":"e1","user_id":"u1"}', False),
        (orjson.dumps({**_STREAM, "event_time": "2026-01-01T00:00:00.000+00:00"}), True),
        (orjson.dumps({**_STREAM, "event_time": "1999-12-31T23:59:59.999Z"}), False),
        (orjson.dumps({**_STREAM, "event_time": "2026-01-01T00:00:00.000"}), False),
        (orjson.dumps({**_STREAM, "user_id": "u" * 129}), False),
        (orjson.dumps({**_STREAM, "user_id": "u1\n"}), False),
        (orjson.dumps({**_STREAM, "trace_id": "a b"}), False),
        (orjson.dumps({**_STREAM, "artist_id": None}), False),
    ],
)
def test_the_typed_decoder_takes_only_what_the_checks_accept_as_they_accept_it(raw, typed_takes_it):
    assert parse_answer(parse_signal, raw) == parse_answer(parse_signal_checked, raw)
    typed = _typed(raw)
    assert (typed is not None) == typed_takes_it
    if typed is not None:
        assert signal_answer(typed) == parse_answer(parse_signal_checked, raw)


@pytest.mark.parametrize("attribute", [None, "t-1", "t 1", 7, ""])
@pytest.mark.parametrize("publish_time_ms", [None, T0_MS, 5])
@pytest.mark.parametrize("with_time", [True, False])
@pytest.mark.parametrize("with_trace", [True, False])
def test_the_typed_decoder_agrees_on_trace_attributes_and_publish_times(
    attribute, publish_time_ms, with_time, with_trace
):
    d = payload_dict("login", success=True, trace_id="t0" if with_trace else None)
    if not with_time:
        del d["event_time"]
    raw = orjson.dumps(d)
    kwargs = {"trace_id_attribute": attribute, "publish_time_ms": publish_time_ms}
    assert parse_answer(parse_signal, raw, **kwargs) == parse_answer(parse_signal_checked, raw, **kwargs)


_near = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3) | st.sampled_from([86_400_000, 86_400_001, 10**12, 10**12 + 1, 2**63, 2**64]),
    st.floats(),
    st.sampled_from(["SE", "se", "EUR", "EURO", "1.2.3.4", "::1", "fe80::1%1", "2026-01-01T00:00:00.000Z"]),
    st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01t00:00:00.5+01:00", "u1", "u 1", "-u", "a" * 129]),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_field_names = st.sampled_from(sorted(parse_module.KNOWN_FIELDS) + ["colour", ""])


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(["stream", "login", "signup", "playlist_add", "payment", "Stream", None]),
    st.lists(st.tuples(_field_names, _near), max_size=6),
    st.sampled_from([None, "t-1", "t 1"]),
    st.sampled_from([None, T0_MS]),
)
def test_any_mixture_of_fields_gets_the_checks_answer(event_type, fields, attribute, publish_time_ms):
    # Written as text, so a field may repeat (JSON's last one wins) and the event type may come anywhere.
    d = payload_dict(event_type if event_type in EVENT_TYPES else "stream")
    if event_type is None:
        del d["event_type"]
    else:
        d["event_type"] = event_type
    parts = [orjson.dumps({k: v})[1:-1] for k, v in d.items()]
    for name, value in fields:
        try:
            parts.insert(len(name) % (len(parts) + 1), orjson.dumps({name: value})[1:-1])
        except orjson.JSONEncodeError:  # 2**64 and the like: orjson writes no integer past 64 bits
            parts.append(json.dumps({name: value})[1:-1].encode())
    raw = b"{" + b",".join(parts) + b"}"
    kwargs = {"trace_id_attribute": attribute, "publish_time_ms": publish_time_ms}
    assert parse_answer(parse_signal, raw, **kwargs) == parse_answer(parse_signal_checked, raw, **kwargs)


# --- the composite -------------------------------------------------------------------
def test_parse_signals_splits_good_from_bad_keeping_raw_bytes():
    good = payload("signup", event_id="good1")
    bad = [b"\xff", b"{}", payload("signup", ip="nope")]
    with TestPipeline() as p:
        out = p | beam.Create([good, *bad]) | ParseSignals(source="test")
        assert_that(out.signals | "Ids" >> beam.Map(lambda s: s.event_id), equal_to(["good1"]), label="Signals")
        assert_that(
            out.dead_letters | "Raw" >> beam.Map(lambda d: (d.raw_payload, d.stage, d.source)),
            equal_to([(b, "parse", "test") for b in bad]),
            label="DeadLetters",
        )
        assert_that(
            out.dead_letters | "Reasons" >> beam.Map(lambda d: d.reason),
            equal_to(["invalid_utf8", "missing_field", "invalid_value"]),
            label="Reasons",
        )


def test_a_str_line_with_a_lone_surrogate_is_dead_lettered_not_raised():
    # ParseSignalFn takes str lines too. Beam's own str coder cannot carry a lone surrogate between steps,
    # so only a str made in the step before it can bring one; it is not UTF-8, and is dead-lettered as such.
    out = list(ParseSignalFn("t").process('{"event_id": "\ud800"}'))
    assert [(o.tag, o.value.reason, o.value.raw_payload) for o in out] == [
        ("dead_letter", "invalid_utf8", b'{"event_id": "\xed\xa0\x80"}')
    ]


def _without_clock(records):
    return [r._replace(failed_at_ms=0) if isinstance(r, DeadLetter) else r for r in records]


def test_a_batch_is_validated_as_its_elements_one_by_one():
    # process_batch takes the typed decoder's path itself for lines (bytes) and hands everything else, and
    # every line that path declines, to the general one: each kind of element is here, in one batch.
    valid = payload("signup", event_id="padded")
    padded = valid[:-1] + b" " * MAX_PAYLOAD_BYTES + b"}"  # valid JSON, a valid signal, but over the limit
    batch = [
        payload("signup", event_id="a"),
        b"\xff",
        payload("stream", event_id="b"),
        b"{}",
        "not json",
        padded,
        payload("signup", event_id="c", new_field=1),  # the typed decoder declines an unknown field
        payload("signup", event_id="bad id"),  # decoded, then declined by accept_typed
        # nested too deep for msgspec's typed decoder, which raises RecursionError, not DecodeError
        payload("signup").replace(b'"signup"', b"[" * 1000 + b"]" * 1000),
        payload("login", event_id="d").decode(),  # a str line: the general path, and a signal
        bytearray(payload("payment", event_id="e")),  # not bytes: the general path
    ]
    fn = ParseSignalBatchFn("test")
    one_by_one = [out for element in batch for out in fn.process(element)]
    signals = [out for out in one_by_one if not isinstance(out, beam.pvalue.TaggedOutput)]
    dead = [out.value for out in one_by_one if isinstance(out, beam.pvalue.TaggedOutput)]
    outputs = list(fn.process_batch(batch))
    assert outputs[0] == signals and [s.event_id for s in signals] == ["a", "b", "c", "d", "e"]
    assert outputs[1].tag == ParseSignalFn.DEAD_LETTER
    assert _without_clock(outputs[1].value) == _without_clock(dead)
    assert [d.reason for d in dead] == [
        "invalid_utf8",
        "missing_field",
        "invalid_json",
        "payload_too_large",
        "invalid_value",
        "wrong_type",
    ]
    assert list(fn.process_batch([b"{}"]))[0].tag == ParseSignalFn.DEAD_LETTER  # no empty list of signals


def test_the_batched_composite_gives_the_signals_dead_letters_and_counts(tmp_path):
    lines = [payload("signup", event_id=f"e{i}") for i in range(6)] + [b"\xff", b"{}"]
    lines.append(payload("stream", event_id="e6", new_field=1, other_new_field="x"))
    lines.append(payload("stream", event_id="e7", track_duration_ms=0))
    (tmp_path / "signals.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    p = TestPipeline()
    batches = p | ReadLineBlocks(str(tmp_path / "*.jsonl"), block_bytes=1000, lines_per_batch=3)
    out = batches | ParseSignals(source="test", batched=True)
    ids = [f"e{i}" for i in range(8)]
    assert_that(out.signals | "Ids" >> beam.Map(lambda s: s.event_id), equal_to(ids), label="Signals")
    assert_that(
        out.dead_letters | "Raw" >> beam.Map(lambda d: (d.raw_payload, d.reason)),
        equal_to([(b"\xff", "invalid_utf8"), (b"{}", "missing_field")]),
        label="DeadLetters",
    )
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    assert counters["read_signup"] == 6 and counters["read_stream"] == 2
    assert counters["unknown_fields"] == 2 and counters["dead_lettered"] == 2
    assert counters["invalid_track_duration"] == 1
    assert counters["invalid_utf8"] == 1 and counters["missing_field"] == 1
    lag = next(d for d in result.metrics().query()["distributions"] if d.key.metric.name == "event_lag_ms")
    assert lag.committed.count == 8


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 30)),
    st.integers(-23 * 60 - 59, 23 * 60 + 59),
    st.integers(0, 9),
)
def test_rfc3339_parser_agrees_with_datetime(naive, offset_minutes, frac_digits):
    """The parser computes epoch milliseconds by hand (cached days, no datetime per signal); datetime is the oracle."""
    tz = dt.timezone(dt.timedelta(minutes=offset_minutes))
    stamp = naive.replace(tzinfo=tz)
    frac = f"{stamp.microsecond:06d}{'7' * 3}"[:frac_digits]
    sign, minutes = ("+" if offset_minutes >= 0 else "-"), abs(offset_minutes)
    text = (
        stamp.strftime("%Y-%m-%dT%H:%M:%S")
        + (f".{frac}" if frac else "")
        + f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    )
    exact = stamp.replace(microsecond=int(frac[:6].ljust(6, "0")) if frac else 0)
    assert parse_rfc3339_ms(text) == (exact - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 30)),
    st.integers(0, 59),
    st.integers(0, 999),
)
def test_millisecond_z_times_agree_with_datetime_once_their_minute_is_known(naive, second, millis):
    """The common "...:SS.mmmZ" format is parsed from a per-minute cache once the full parser has seen its
    minute: both paths must give datetime's answer."""
    minute = naive.replace(second=0, microsecond=0, tzinfo=dt.UTC)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    first = minute.strftime("%Y-%m-%dT%H:%M:") + f"{(second + 1) % 60:02d}.{(millis + 1) % 1000:03d}Z"
    text = minute.strftime("%Y-%m-%dT%H:%M:") + f"{second:02d}.{millis:03d}Z"
    for stamp in (first, text):  # the first primes the minute (full parse); the second takes the fast path
        exact = minute.replace(second=int(stamp[17:19]), microsecond=int(stamp[20:23]) * 1000)
        assert parse_rfc3339_ms(stamp) == (exact - epoch) // dt.timedelta(milliseconds=1)
        assert stamp[:17] in parse_module._MINUTE_CACHE, "the minute was not cached: the fast path went untested"


@pytest.mark.parametrize(
    "tail",
    ["60.000Z", "5a.123Z", "12.1x3Z", "1\u0663.123Z", "\uff11\uff12.123Z", "12.123z", "12,123Z", "12.123+"],
)
def test_a_known_minute_does_not_let_a_bad_tail_through(tail):
    """After its minute is cached, a time with a malformed second or fraction is still judged by the full parser."""
    assert parse_rfc3339_ms("2026-03-04T05:06:07.890Z") == parse_rfc3339_ms("2026-03-04T05:06:07.890+00:00")
    assert "2026-03-04T05:06:" in parse_module._MINUTE_CACHE
    text = "2026-03-04T05:06:" + tail
    if tail == "12.123z":  # lower-case z is valid RFC 3339: the full parser accepts it
        assert parse_rfc3339_ms(text) == parse_rfc3339_ms("2026-03-04T05:06:12.123Z")
        return
    with pytest.raises(ValueError):
        parse_rfc3339_ms(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:60Z",
        "2026-01-01T00:00:00+24:00",
        "0000-01-01T00:00:00Z",
    ],
)
def test_rfc3339_out_of_range_parts_are_refused(text):
    with pytest.raises(ValueError):
        parse_rfc3339_ms(text)
