"""Property-based hostile input for the signal parser: whatever arrives is a contract-clean signal or a dead letter.

Each property counts the examples it tried and the ones that held; the last test
puts the counts into the reliability report and fails unless every example held.
"""

import calendar
import collections
import contextlib
import ipaddress
import json
import string

from apache_beam.pvalue import TaggedOutput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import EVENT_TYPES, REQUIRED_FOR, SIGNAL_SCHEMA, DeadLetter, Signal, to_json_dict
from schemas.avro import millis_to_rfc3339
from tests.kit import parse_answer, payload_dict
from transforms.parse import (
    KNOWN_FIELDS,
    MAX_PAYLOAD_BYTES,
    InvalidSignal,
    ParseSignalFn,
    parse_signal,
    parse_signal_checked,
)

CATEGORY = "hostile input (property-based)"
REASONS = {"payload_too_large", "invalid_utf8", "invalid_json", "not_an_object"}
REASONS |= {"missing_field", "wrong_type", "invalid_value", "event_time_out_of_range"}
LOW_MS = calendar.timegm((2000, 1, 1, 0, 0, 0)) * 1000  # the contract's bounds, computed here, not imported
HIGH_MS = calendar.timegm((2100, 1, 1, 0, 0, 0)) * 1000
ID_FIELDS = ("event_id", "user_id", "device_id", "trace_id", "track_id", "artist_id", "playlist_id", "card_fingerprint")
WIRE_FIELDS = sorted(KNOWN_FIELDS - {"event_time_ms"})  # event_time_ms is the record's name, not a wire field
_ALNUM = set(string.ascii_letters + string.digits)
_ID_CHARS = _ALNUM | set("._:@+/=-")
PROPERTY = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
_COUNTS: collections.Counter = collections.Counter()  # (property, "tried" | "handled") -> examples
PROPERTIES = ("any bytes", "any JSON value", "one field replaced or deleted", "unknown fields ignored and counted")
PROPERTIES += ("JSON round trip", "event time accepted iff well-formed and in 2000..2099", "event time to the ms")

# --- strategies ------------------------------------------------------------------------
_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,127}", fullmatch=True)
_ips = st.ip_addresses().map(str) | st.ip_addresses(v=6).map(lambda a: a.exploded)
_ips |= st.ip_addresses(v=4).map("::ffff:{}".format)  # a dual-stack server's IPv4 client
_v6 = st.ip_addresses(v=6) | st.ip_addresses(v=4).map("::ffff:{}".format)
_zoned = st.builds("{}%{}".format, _v6, st.sampled_from(["eth0", "1", "a\nb", ""]))  # RFC 4007 zone
_ip_like = _zoned | _ips | _ips.map(" {}".format)
# Any text but Unicode's control characters (C0, DEL, C1: category Cc) and its line and paragraph separators.
_user_agents = st.text(st.characters(exclude_characters="\u2028\u2029", exclude_categories=["Cs", "Cc"]))
_big_ints = st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
_texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20) | st.text(st.characters(max_codepoint=0x1F))
_scalars = st.none() | st.booleans() | st.integers() | _big_ints | st.floats() | _texts  # floats: nan and +-inf too
_keys = st.sampled_from(sorted(KNOWN_FIELDS)) | st.text(max_size=8)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4), max_leaves=20
)
_OPTIONAL = {"device_id": _ids, "ip": _ips, "country": st.sampled_from(["SE", "US", "BR"]), "trace_id": _ids}
_OPTIONAL |= {"user_agent": _user_agents, "track_id": _ids, "artist_id": _ids, "playlist_id": _ids}
_OPTIONAL |= {"ms_played": st.integers(0, 86_400_000), "amount_cents": st.integers(0, 10**12), "success": st.booleans()}
_OPTIONAL |= {"card_fingerprint": _ids, "currency": st.from_regex(r"[A-Z]{3}", fullmatch=True)}
_OPTIONAL |= {"track_duration_ms": st.integers(1, 86_400_000)}
_fractions = st.none() | st.text(string.digits, min_size=1, max_size=9)
_DIGITS = {"ascii": string.digits, "arabic-indic": "٠١٢٣٤٥٦٧٨٩", "fullwidth": "０１２３４５６７８９"}


@st.composite
def valid_payloads(draw) -> dict:
    event_type = draw(st.sampled_from(EVENT_TYPES))
    t_ms = draw(st.integers(LOW_MS, HIGH_MS - 1))
    d = payload_dict(event_type, t_ms, event_id=draw(_ids), user_id=draw(_ids))
    for name, values in _OPTIONAL.items():
        if name in REQUIRED_FOR[event_type] or draw(st.booleans()):
            d[name] = draw(values)
    return d


@st.composite
def times(draw) -> tuple[str, int | None]:
    """An RFC 3339-like string with at most one part broken, and its epoch ms (computed here) if well-formed."""
    broken = draw(st.sampled_from([None] * 3 + ["month", "day", "clock", "frac", "sep", "junk", "digits", "offset"]))

    def num(name, low, high):  # a broken number may be one past either end
        return draw(st.integers(low - 1, high + 1) if broken == name else st.integers(low, high))

    def pick(name, good, bad):
        return draw(st.sampled_from(bad if broken == name else good))

    year = draw(st.integers(1995, 2105) | st.sampled_from([0, 1, 1999, 2000, 2099, 2100, 9999]))
    month, day = num("month", 1, 12), num("day", 1, 31)
    hour, minute, second = num("clock", 0, 23), num("clock", 0, 59), num("clock", 0, 59)
    frac = draw(st.text(string.digits, max_size=10) if broken == "frac" else _fractions)
    sep, junk = pick("sep", "Tt", " _"), pick("junk", [""], [" ", "\n", "x"])
    digits, sign = pick("digits", ["ascii"], list(_DIGITS)), pick("offset", ["Z", "z", "+", "-"], ["", "+", "-"])
    off_h, off_m = num("offset", 0, 23), num("offset", 0, 59)
    offset = f"{sign}{off_h:02d}:{off_m:02d}" if sign in ("+", "-") else sign
    text = f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}"
    text += ("" if frac is None else "." + frac) + offset + junk
    text = text.translate(str.maketrans(string.digits, _DIGITS[digits]))
    well_formed = 1 <= year and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
    well_formed &= 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59 and (frac is None or 0 < len(frac) < 10)
    well_formed &= sep in "Tt" and not junk and digits == "ascii"  # RFC 3339 digits are ASCII only
    well_formed &= sign in ("Z", "z") or (sign in ("+", "-") and 0 <= off_h <= 23 and 0 <= off_m <= 59)
    if not well_formed:
        return text, None
    shift_min = 0 if sign in ("Z", "z") else (1 if sign == "+" else -1) * (off_h * 60 + off_m)
    ms = (calendar.timegm((year, month, day, hour, minute, second)) - shift_min * 60) * 1000
    return text, ms + int((frac or "0")[:3].ljust(3, "0"))


# --- checks ----------------------------------------------------------------------------
def assert_contract(s: Signal) -> None:
    """What any accepted signal must satisfy, checked without the parser's own regexes."""
    assert s.event_type in EVENT_TYPES
    assert isinstance(s.event_time_ms, int) and LOW_MS <= s.event_time_ms < HIGH_MS
    for name in ID_FIELDS:
        v = getattr(s, name)
        assert v is None or (0 < len(v) <= 128 and v[0] in _ALNUM and set(v) <= _ID_CHARS), name
    assert s.event_id is not None and s.user_id is not None
    assert s.ip is None or (s.ip == ipaddress.ip_address(s.ip).compressed and set(s.ip) <= set("0123456789abcdef.:"))
    for name, size in (("country", 2), ("currency", 3)):
        v = getattr(s, name)
        assert v is None or (len(v) == size and v.isascii() and v.isalpha() and v.isupper()), name
    controls = [c for c in s.user_agent or "" if c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029"]
    assert s.user_agent is None or (len(s.user_agent) <= 512 and not controls)
    assert s.ip is None or getattr(ipaddress.ip_address(s.ip), "ipv4_mapped", None) is None  # mapped: as IPv4
    for name, low, high in (
        ("ms_played", 0, 86_400_000),
        ("amount_cents", 0, 10**12),
        ("track_duration_ms", 1, 86_400_000),
    ):
        v = getattr(s, name)
        assert v is None or (type(v) is int and low <= v <= high), name
    assert s.success is None or type(s.success) is bool
    assert all(getattr(s, name) is not None for name in REQUIRED_FOR[s.event_type])


_FN = ParseSignalFn(source="property")


def run_fn(raw: bytes) -> Signal | DeadLetter:
    """One payload through the DoFn: exactly one output, a clean signal or a reasoned dead letter with the raw bytes.

    Also: parse_signal, which takes well-formed signals through msgspec's typed decoder, answers exactly as
    parse_signal_checked, the field-by-field reference."""
    assert parse_answer(parse_signal, raw) == parse_answer(parse_signal_checked, raw)
    (out,) = list(_FN.process(raw))
    if isinstance(out, TaggedOutput):
        assert out.tag == ParseSignalFn.DEAD_LETTER and isinstance(out.value, DeadLetter)
        assert (out.value.reason == "payload_too_large") == (len(raw) > MAX_PAYLOAD_BYTES)
        assert out.value.reason in REASONS and out.value.detail and out.value.stage == "parse"
        assert out.value.raw_payload == raw and type(out.value.raw_payload) is bytes
        return out.value
    assert isinstance(out, Signal) and len(raw) <= MAX_PAYLOAD_BYTES
    assert_contract(out)
    return out


def is_finite_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def counting(name: str):
    """Counts an example as tried on entry and as handled only if the body finished without a failed check."""
    _COUNTS[name, "tried"] += 1
    yield
    _COUNTS[name, "handled"] += 1


# --- properties --------------------------------------------------------------------------
_any_bytes = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda b, n: (b * MAX_PAYLOAD_BYTES)[:MAX_PAYLOAD_BYTES + n], st.binary(min_size=1, max_size=8),
              st.integers(-2, 2)),
    st.builds(lambda d, at, junk: (raw := json.dumps(d).encode())[:at] + junk + raw[at:], valid_payloads(),
              st.integers(0, 400), st.binary(max_size=8)),
)  # fmt: skip


@settings(PROPERTY, max_examples=500)
@given(_any_bytes)
def test_any_bytes(raw):
    with counting("any bytes"):
        run_fn(raw)


@settings(PROPERTY, max_examples=500)
@given(_json, st.booleans())
def test_any_json_value(value, ascii_only):
    with counting("any JSON value"):
        out = run_fn(json.dumps(value, ensure_ascii=ascii_only).encode())
        if not is_finite_json(value):
            assert isinstance(out, DeadLetter) and out.reason == "invalid_json"
        elif not isinstance(value, dict):
            assert isinstance(out, DeadLetter) and out.reason == "not_an_object"


_DELETE = object()
_odd = st.sampled_from(list("._:@+/=-_ \t\n\x00'\"<>%é€"))
_near_ids = st.builds("{}{}".format, _odd, _ids) | st.builds("{}{}{}".format, _ids, _odd, _ids)
_near_ints = st.integers(-2, 2) | st.sampled_from([86_400_000, 86_400_001, 10**12, 10**12 + 1, 2**63]) | st.booleans()
_NEAR = {name: _ids | _near_ids | st.sampled_from([128, 129]).map("a".__mul__) for name in ID_FIELDS}
_NEAR |= {"ms_played": _near_ints, "amount_cents": _near_ints, "track_duration_ms": _near_ints, "success": _near_ints}
_NEAR |= {"ip": _ip_like}
_NEAR |= {"country": st.sampled_from(["SE", "XX", "se", "SE "]), "currency": st.sampled_from(["EUR", "eur", "EURO"])}
_NEAR |= {"event_time": times().map(lambda t: t[0]), "event_type": st.sampled_from(EVENT_TYPES) | st.text(max_size=8)}
_NEAR |= {"user_agent": st.text(st.characters(max_codepoint=0xA0)) | st.sampled_from([512, 513]).map("a".__mul__)}
_NEAR["user_agent"] |= st.sampled_from(["a\u2028b", "a\u2029b", "a\u2027b"])
_mutations = st.sampled_from(WIRE_FIELDS).flatmap(lambda f: st.tuples(st.just(f), st.just(_DELETE) | _json | _NEAR[f]))


@settings(PROPERTY, max_examples=1100)
@given(valid_payloads(), _mutations)
def test_one_field_mutated(d, mutation):
    field, value = mutation
    with counting("one field replaced or deleted"):
        before = parse_signal(json.dumps(d).encode()).signal
        if value is _DELETE:
            d.pop(field, None)
        else:
            d[field] = value
        raw = json.dumps(d).encode()
        assert parse_answer(parse_signal, raw) == parse_answer(parse_signal_checked, raw)
        try:
            after = parse_signal(raw).signal
        except InvalidSignal as err:
            assert err.reason in REASONS
            if err.reason == "invalid_json":
                assert not is_finite_json(value)
            elif field == "event_type" and value in EVENT_TYPES:  # a new type may require fields the payload lacks
                assert err.reason == "missing_field" and err.detail.split("'")[1] in REQUIRED_FOR[value], err.detail
            else:
                assert err.detail.startswith(f"'{field}'"), (field, err.detail)
        else:
            assert_contract(after)
            name = "event_time_ms" if field == "event_time" else field
            assert after._replace(**{name: None}) == before._replace(**{name: None}), "another field changed"
            got = getattr(after, name)
            if value is _DELETE or value is None:
                assert got is None
            elif field == "ip":
                address = ipaddress.ip_address(value)
                assert got == (getattr(address, "ipv4_mapped", None) or address).compressed
            elif field == "track_duration_ms" and not (type(value) is int and 1 <= value <= 86_400_000):
                assert got is None  # the catalogue's enrichment: a bad one is dropped, never costs the signal
            elif field != "event_time":
                assert got == value and type(got) is type(value)


_unknown_keys = st.text(max_size=20) | st.sampled_from(sorted(KNOWN_FIELDS)).map(str.upper) | _keys.map("{} ".format)


@settings(PROPERTY, max_examples=250)
@given(valid_payloads(), st.dictionaries(_unknown_keys.filter(lambda k: k not in KNOWN_FIELDS), _json), st.booleans())
def test_unknown_fields(d, extra, extra_first):
    with counting("unknown fields ignored and counted"):
        extra = {k: v for k, v in extra.items() if is_finite_json(v)}
        merged = {**extra, **d} if extra_first else {**d, **extra}
        raw = json.dumps(merged).encode()
        if len(raw) > MAX_PAYLOAD_BYTES:  # forward compatible within the size limit, not past it
            assert isinstance(run_fn(raw), DeadLetter)  # run_fn checks the reason is payload_too_large
        else:
            parsed = parse_signal(raw)
            assert parsed.signal == parse_signal(json.dumps(d).encode()).signal
            assert parsed.unknown_fields == len(extra)


@settings(PROPERTY, max_examples=250)
@given(valid_payloads())
def test_json_round_trip(d):
    with counting("JSON round trip"):
        s = parse_signal(json.dumps(d).encode()).signal
        assert millis_to_rfc3339(s.event_time_ms) == d["event_time"], "event time not read to the millisecond"
        wire = to_json_dict(SIGNAL_SCHEMA, s)  # the record's JSON form; on the wire the time is called event_time
        wire["event_time"] = wire.pop("event_time_ms")
        assert parse_signal(json.dumps(wire).encode()).signal == s


@settings(PROPERTY, max_examples=600)
@given(times())
def test_event_time_bounds(case):
    with counting("event time accepted iff well-formed and in 2000..2099"):
        text, expected_ms = case
        in_bounds = expected_ms is not None and LOW_MS <= expected_ms < HIGH_MS
        raw = json.dumps(payload_dict("signup", event_time=text)).encode()
        assert parse_answer(parse_signal, raw) == parse_answer(parse_signal_checked, raw)
        try:
            got = parse_signal(raw).signal.event_time_ms
        except InvalidSignal as err:
            reason = "invalid_value" if expected_ms is None else "event_time_out_of_range"
            assert not in_bounds and err.reason == reason and err.detail.startswith("'event_time'"), (text, err)
        else:
            assert in_bounds and got == expected_ms, (text, got)


_stamps = st.integers(LOW_MS - 10**10, HIGH_MS + 10**10) | st.sampled_from([LOW_MS - 1, LOW_MS, HIGH_MS - 1, HIGH_MS])


@settings(PROPERTY, max_examples=200)
@given(st.lists(_stamps, min_size=1, max_size=100))
def test_event_time_to_the_millisecond(stamps):
    """A slip that hits one time in a few hundred needs many stamps; a list per example keeps it cheap."""
    with counting("event time to the ms"):
        for ms in stamps:
            try:
                got = parse_signal(json.dumps(payload_dict("signup", ms)).encode()).signal.event_time_ms
            except InvalidSignal as err:
                assert not LOW_MS <= ms < HIGH_MS and err.reason == "event_time_out_of_range", (ms, err)
            else:
                assert LOW_MS <= ms < HIGH_MS and got == ms, (ms, got)


def test_every_property_ran_and_held(reliability):
    """Runs last in this file: records what each property tried and how much held, then fails on any gap."""
    counts = {name: (_COUNTS[name, "tried"], _COUNTS[name, "handled"]) for name in PROPERTIES}
    for name, (tried, handled) in counts.items():
        reliability.record(CATEGORY, name, tried, handled, detail="hypothesis examples")
    assert all(tried > 0 for tried, _ in counts.values()), f"a property ran no example: {counts}"
    assert all(handled == tried for tried, handled in counts.values()), f"some examples broke a property: {counts}"
