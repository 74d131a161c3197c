"""Parse and validate raw signals; anything unusable goes to the dead-letter output.

The validation rules are the signal contract in ``schemas/signal_v1.avsc`` plus
what the Avro schema cannot say (id grammar, RFC 3339 times, IP syntax, value
ranges). ``parse_signal`` is a plain function so most tests need no pipeline;
``ParseSignals`` wraps it with a dead-letter output that keeps the raw bytes
and a reason for every rejection: a hostile or broken producer must never
crash the job, and a rejected signal must never vanish without a trace.

``parse_signal_checked`` is the contract written out, one check at a time; it
names the reason for every rejection. ``parse_signal`` gives its answer, but
takes well-formed signals through msgspec's typed decoder first (about a third
fewer instructions a signal), and leaves anything that decoder declines to
``parse_signal_checked``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import typing
from collections.abc import Mapping

import apache_beam as beam
import msgspec
import orjson
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue

from schemas import EVENT_TYPES, REQUIRED_FOR, DeadLetter, Signal
from schemas.avro import datetime_to_millis
from transforms import accept
from transforms.accept import (  # noqa: F401 (the value checks, compiled where built: re-exported)
    _ACCEPTED_IDS,
    _CONTROL_RE,
    _CURRENCY_RE,
    _ID_RE,
    _IP_CACHE,
    _MINUTE_CACHE,
    MAX_EVENT_TIME_MS,
    MAX_ID_CHARS,
    MAX_USER_AGENT_CHARS,
    MIN_EVENT_TIME_MS,
    IpZoneIdError,
    _day_ms,
    _id_match,
    _new_signal,
    _parse_rfc3339_ms,
    accept_typed,
    normalise_ip,
    parse_rfc3339_ms,
)
from transforms.batch_gc import tune_gc_for_batch

_LOGGER = logging.getLogger(__name__)

# Pub/Sub allows 10 MB messages; a real signal is a few hundred bytes. Anything
# past this is a flood or an attack, and parsing it would only cost CPU.
MAX_PAYLOAD_BYTES = 16 * 1024
# A dead letter keeps the payload's bytes as received, up to this many. Pub/Sub allows 10 MB; base64 in a
# BigQuery row, a payload of about 7 MB passes the row size Beam's BigQuery write accepts, and a row the
# write refuses is only counted and logged. The first 64 KiB show what it was; the detail gives its size.
MAX_DEAD_LETTER_BYTES = 64 * 1024
MAX_MS_PLAYED = 24 * 3600 * 1000
# In minor units of any currency: 10^12 is 10 billion rupiah or 10 billion dollars, far past any payment, and
# well inside the int64 the schema and BigQuery hold. 10^8 refused a Rp 1,000,001 payment (about US$60).
MAX_AMOUNT_CENTS = 1_000_000_000_000
# ISO 3166-1 alpha-2, officially assigned codes.
_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW""".split()
)

_ID_FIELDS = (
    "event_id",
    "user_id",
    "device_id",
    "track_id",
    "artist_id",
    "playlist_id",
    "card_fingerprint",
    "trace_id",
)
KNOWN_FIELDS = frozenset(Signal._fields) | {"event_time"}
# The ids after event_id, in the order they are checked (so the first bad one is the one reported): those
# whose values repeat from signal to signal (users, devices, tracks...), then the trace id.
_REPEATED_ID_FIELDS = _ID_FIELDS[1:-1]
if _ID_FIELDS[-1] != "trace_id":
    raise ImportError(f"parse_signal checks the trace id last: update _REPEATED_ID_FIELDS ({_ID_FIELDS})")
_REQUIRED_IDS = {t: frozenset({"user_id", *REQUIRED_FOR[t]} & set(_ID_FIELDS)) for t in EVENT_TYPES}
_SIGNAL_ORDER = (
    "event_id",
    "event_type",
    "event_time_ms",
    "user_id",
    "device_id",
    "ip",
    "country",
    "user_agent",
    "trace_id",
    "track_id",
    "artist_id",
    "ms_played",
    "success",
    "playlist_id",
    "amount_cents",
    "currency",
    "card_fingerprint",
    "track_duration_ms",
)
if Signal._fields != _SIGNAL_ORDER:  # parse_signal builds a Signal positionally in this order
    raise ImportError(f"signal_v1.avsc field order changed: update parse_signal ({Signal._fields})")


class InvalidSignal(ValueError):
    """A signal that breaks the contract; ``reason`` is a stable code for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ParsedSignal(typing.NamedTuple):
    signal: Signal
    unknown_fields: int


_new_parsed = functools.partial(tuple.__new__, ParsedSignal)  # as _new_signal


def clear_caches() -> None:
    """Empty this process's parsing caches (accepted ids, IPs, minutes, days), as in a worker new to its input.

    Parsing answers the same with them empty or full; benchmarks empty them so each timed pass pays what a
    fresh worker pays. A cache added here must be emptied here too.
    """
    _ACCEPTED_IDS.clear()
    _IP_CACHE.clear()
    _MINUTE_CACHE.clear()
    _day_ms.cache_clear()


def _id(obj: Mapping, name: str, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidSignal("missing_field", f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise InvalidSignal("wrong_type", f"'{name}' must be a string, got {type(value).__name__}")
    if not _ID_RE.fullmatch(value):
        raise InvalidSignal(
            "invalid_value",
            f"'{name}' must be 1..{MAX_ID_CHARS} characters of letters, digits and ._:@+/=- "
            "(starting with a letter or digit)",
        )
    return value


def _accept_id(obj: Mapping, name: str, value, required: bool):
    """An id ``_ACCEPTED_IDS`` does not hold: the pattern's answer, remembered when it accepts; else ``_id``'s."""
    if value.__class__ is str and _id_match(value) is not None:
        if len(_ACCEPTED_IDS) >= accept._ACCEPTED_IDS_MAX:  # the module's bound, which accept_typed reads too
            _ACCEPTED_IDS.clear()
        _ACCEPTED_IDS.add(value)
        return value
    return _id(obj, name, required)


def _int(obj: Mapping, name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if value is None:
        raise InvalidSignal("missing_field", f"'{name}' is required for event_type '{obj['event_type']}'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSignal("wrong_type", f"'{name}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidSignal("invalid_value", f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _bool(obj: Mapping, name: str) -> bool:
    value = obj.get(name)
    if value is None:
        raise InvalidSignal("missing_field", f"'{name}' is required for event_type '{obj['event_type']}'")
    if not isinstance(value, bool):
        raise InvalidSignal("wrong_type", f"'{name}' must be true or false, got {type(value).__name__}")
    return value


def _optional_int(obj: Mapping, name: str, low: int, high: int, event_type: str) -> int | None:
    if obj.get(name) is None and name not in REQUIRED_FOR[event_type]:
        return None
    return _int(obj, name, low, high)


def _optional_bool(obj: Mapping, name: str, event_type: str) -> bool | None:
    if obj.get(name) is None and name not in REQUIRED_FOR[event_type]:
        return None
    return _bool(obj, name)


# --- The typed decoder: the common case, well-formed signals, decoded and type-checked in C ----------------------
#
# msgspec decodes a payload straight into a struct of its event type, checking in C what parse_signal_checked
# checks in Python one field at a time: a JSON object, a known event type, each field's JSON type, the fields
# the event type requires, integer ranges, a known country, no unknown field. ``accept_typed`` then makes the
# checks msgspec cannot (id grammar, event time, IP, user agent, currency, a trace-id attribute) with the same
# functions and caches as parse_signal_checked. Anything either declines goes to parse_signal_checked, which
# decides and gives the reason, so the typed decoder only ever accepts what parse_signal_checked accepts, with
# the same Signal: tests/transforms/test_parse.py and tests/reliability/test_properties.py compare the two.
# Besides every invalid signal, it declines a few valid ones, all rare, and leaves them to parse_signal_checked:
# an unknown field (counted there), an ``event_time_ms`` key (ignored there), an event type given twice with
# different values (the last one counts there, as in any JSON object), a track length out of range (dropped
# and counted there), a bad trace-id attribute (counted there), a str subclass as the attribute.
# Counted with callgrind (benchmarks/README.md, change 27): 53,918 instructions a signal before, 34,820 after.
_TYPED_FIELDS: dict[str, object] = {
    "event_id": str,
    "event_time": str,
    "user_id": str,
    "device_id": str,
    "ip": str,
    "country": typing.Literal[tuple(sorted(_COUNTRIES))],
    "user_agent": str,
    "trace_id": str,
    "track_id": str,
    "artist_id": str,
    "ms_played": typing.Annotated[int, msgspec.Meta(ge=0, le=MAX_MS_PLAYED)],
    "success": bool,
    "playlist_id": str,
    "amount_cents": typing.Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT_CENTS)],
    "currency": str,
    "card_fingerprint": str,
    "track_duration_ms": typing.Annotated[int, msgspec.Meta(ge=1, le=MAX_MS_PLAYED)],
}
if set(_TYPED_FIELDS) != KNOWN_FIELDS - {"event_type", "event_time_ms"}:  # the wire's fields, but the struct's tag
    raise ImportError(f"signal_v1.avsc fields changed: update _TYPED_FIELDS ({sorted(KNOWN_FIELDS)})")
# accept_typed (transforms/accept.py) checks each text field by name: the ids (the recurring ones in this order,
# then event and trace ids), and these four. A new text field must get its check there before this passes.
_TYPED_REPEATED_IDS = ("user_id", "device_id", "track_id", "artist_id", "playlist_id", "card_fingerprint")
_TYPED_CHECKED_TEXT = frozenset({"event_time", "ip", "user_agent", "currency"})
if (
    _TYPED_REPEATED_IDS != _REPEATED_ID_FIELDS
    or {n for n, k in _TYPED_FIELDS.items() if k is str} != set(_ID_FIELDS) | _TYPED_CHECKED_TEXT
):
    raise ImportError(f"signal ids or text fields changed: update accept_typed ({_ID_FIELDS}, {_TYPED_CHECKED_TEXT})")
# Every field may be absent or null except those parse_signal_checked requires whatever the publish time:
# event_id and user_id always, and the event type's own (REQUIRED_FOR). event_time may be absent in streaming.
_TYPED_REQUIRED = {t: frozenset({"event_id", "user_id", *REQUIRED_FOR[t]}) for t in EVENT_TYPES}
_TYPED_STRUCTS = tuple(
    msgspec.defstruct(
        f"_Typed_{event_type}",
        [
            (name, kind) if name in _TYPED_REQUIRED[event_type] else (name, kind | None, None)
            for name, kind in _TYPED_FIELDS.items()
        ],
        kw_only=True,  # so a required field may follow an optional one
        tag_field="event_type",
        tag=event_type,
        forbid_unknown_fields=True,
    )
    for event_type in EVENT_TYPES
)
# One decoder, shared by a worker's threads: it holds only the types, and decodes holding the GIL (8 threads
# parsing 20,000 signals each, thread switches every microsecond, gave parse_signal_checked's answer every time).
_TYPED_DECODER = msgspec.json.Decoder(typing.Union[_TYPED_STRUCTS])  # noqa: UP007 (a union of a tuple)
# What the typed decoder raises for a payload it declines: a ValidationError is a DecodeError, and nesting past
# its depth recurses. The checked parser then names the reason.
_TYPED_DECLINES = (msgspec.DecodeError, RecursionError)
_EVENT_TYPE_OF = {struct: struct.__struct_config__.tag for struct in _TYPED_STRUCTS}


def parse_signal(
    raw: bytes,
    *,
    trace_id_attribute: str | None = None,
    publish_time_ms: int | None = None,
) -> ParsedSignal:
    """Validate one raw signal and return it as a typed ``Signal``; the answer of ``parse_signal_checked``.

    A well-formed signal takes the typed decoder (``_TYPED_DECODER``, then ``accept_typed``, compiled where
    built); anything it declines, and every rejection, is ``parse_signal_checked``'s, so the dead letters'
    reasons and details have one source.
    Arguments and errors as ``parse_signal_checked``.
    """
    if len(raw) <= MAX_PAYLOAD_BYTES:
        try:
            decoded = _TYPED_DECODER.decode(raw)
        except _TYPED_DECLINES:
            pass
        else:
            signal = accept_typed(decoded, _EVENT_TYPE_OF[decoded.__class__], trace_id_attribute, publish_time_ms)
            if signal is not None:
                return _new_parsed((signal, 0))
    return parse_signal_checked(raw, trace_id_attribute=trace_id_attribute, publish_time_ms=publish_time_ms)


def parse_signal_checked(
    raw: bytes,
    *,
    trace_id_attribute: str | None = None,
    publish_time_ms: int | None = None,
) -> ParsedSignal:
    """Validate one raw signal, every check in turn, and return it as a typed ``Signal``: the signal contract.

    ``parse_signal`` gives the same answer faster for well-formed signals; this is the reference it is
    tested against, and what names the reason for every rejection.

    Args:
      raw: the payload bytes, one JSON object.
      trace_id_attribute: a trace id carried as a Pub/Sub attribute; the
        payload's own ``trace_id`` wins when both are present.
      publish_time_ms: the Pub/Sub publish time, used as event time only when
        the payload has no ``event_time`` (streaming input); files have none.

    Raises:
      InvalidSignal: with a stable ``reason`` code and a ``detail`` naming the field.
    """
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidSignal("payload_too_large", f"{len(raw)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as utf_err:
            raise InvalidSignal(
                "invalid_utf8", f"payload is not valid UTF-8 ({utf_err.reason} at byte {utf_err.start})"
            ) from None
        raise InvalidSignal("invalid_json", f"payload is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise InvalidSignal("not_an_object", f"payload must be a JSON object, got {type(obj).__name__}")

    get = obj.get
    event_id = get("event_id")
    if event_id.__class__ is not str or _id_match(event_id) is None:  # the common case inline; else _id decides
        event_id = _id(obj, "event_id", required=True)
    event_type = get("event_type")
    if event_type is None:
        raise InvalidSignal("missing_field", "'event_type' is required")
    if event_type not in EVENT_TYPES:
        if event_type.__class__ is not str:  # not repr(): a nested list 1,000 deep passes orjson and breaks repr
            raise InvalidSignal("wrong_type", f"'event_type' must be a string, got {type(event_type).__name__}")
        shown = repr(event_type)[:40]
        raise InvalidSignal("invalid_value", f"'event_type' must be one of {', '.join(EVENT_TYPES)}, got {shown}")

    raw_time = obj.get("event_time")
    if raw_time is None:
        if publish_time_ms is None:
            raise InvalidSignal("missing_field", "'event_time' is required")
        event_time_ms = publish_time_ms
    else:
        if not isinstance(raw_time, str):
            raise InvalidSignal("wrong_type", f"'event_time' must be an RFC 3339 string, got {type(raw_time).__name__}")
        try:
            event_time_ms = parse_rfc3339_ms(raw_time)
        except (ValueError, OverflowError) as err:
            raise InvalidSignal("invalid_value", f"'event_time' {err}") from None
    if not MIN_EVENT_TIME_MS <= event_time_ms < MAX_EVENT_TIME_MS:
        raise InvalidSignal("event_time_out_of_range", "'event_time' must be in the years 2000..2099")

    ip = obj.get("ip")
    if ip is not None:
        if not isinstance(ip, str):
            raise InvalidSignal("wrong_type", f"'ip' must be a string, got {type(ip).__name__}")
        try:
            ip = normalise_ip(ip)
        except IpZoneIdError:
            raise InvalidSignal("invalid_value", "'ip' must not carry an IPv6 zone id ('%...')") from None
        except ValueError:
            raise InvalidSignal("invalid_value", "'ip' is not an IPv4 or IPv6 address") from None

    country = obj.get("country")
    if country is not None and (not isinstance(country, str) or country not in _COUNTRIES):
        raise InvalidSignal("invalid_value", "'country' must be an ISO 3166-1 alpha-2 code such as 'SE'")

    user_agent = obj.get("user_agent")
    if user_agent is not None:
        if not isinstance(user_agent, str):
            raise InvalidSignal("wrong_type", f"'user_agent' must be a string, got {type(user_agent).__name__}")
        if len(user_agent) > MAX_USER_AGENT_CHARS or _CONTROL_RE.search(user_agent):
            raise InvalidSignal(
                "invalid_value",
                f"'user_agent' must be at most {MAX_USER_AGENT_CHARS} characters without control characters",
            )

    # Ids: the common case (absent, or a plain string already accepted) is checked inline, in one loop;
    # anything else goes through ``_accept_id``: the pattern, then ``_id``, which raises with the field's
    # reason or, for a str subclass, returns the value. The trace id is new in every signal: pattern only.
    required_ids = _REQUIRED_IDS[event_type]
    accepted = _ACCEPTED_IDS
    ids = []
    for name in _REPEATED_ID_FIELDS:
        value = get(name)
        if value is None:
            if name in required_ids:
                _id(obj, name, required=True)
        elif value.__class__ is not str or value not in accepted:
            value = _accept_id(obj, name, value, name in required_ids)
        ids.append(value)
    user_id, device_id, track_id, artist_id, playlist_id, card_fingerprint = ids
    trace_id = get("trace_id")
    if trace_id is None:
        if "trace_id" in required_ids:
            _id(obj, "trace_id", required=True)
    elif trace_id.__class__ is not str or _id_match(trace_id) is None:
        trace_id = _id(obj, "trace_id", required="trace_id" in required_ids)
    if trace_id is None and trace_id_attribute is not None:
        # Optional metadata beside the payload (a tracing header, say): a malformed one is ignored and
        # counted, not a reason to lose the signal, whose bytes a dead letter would keep without it.
        try:
            trace_id = _id({"trace_id": trace_id_attribute}, "trace_id", required=False)
        except InvalidSignal:
            Metrics.counter("signals", "invalid_trace_attribute").inc()

    required = REQUIRED_FOR[event_type]
    currency = get("currency")
    if currency is not None or "currency" in required:
        if not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency):
            if currency is None:
                raise InvalidSignal("missing_field", f"'currency' is required for event_type '{event_type}'")
            raise InvalidSignal("invalid_value", "'currency' must be an ISO 4217 code such as 'EUR'")

    # Numbers and flags: an exact int in range, or a bool, inline (bool is not int here: exact classes);
    # anything else, absent included, through _optional_int and _optional_bool, which decide.
    ms_played = get("ms_played")
    if ms_played.__class__ is not int or not 0 <= ms_played <= MAX_MS_PLAYED:
        ms_played = _optional_int(obj, "ms_played", 0, MAX_MS_PLAYED, event_type)
    success = get("success")
    if success.__class__ is not bool:
        success = _optional_bool(obj, "success", event_type)
    amount_cents = get("amount_cents")
    if amount_cents.__class__ is not int or not 0 <= amount_cents <= MAX_AMOUNT_CENTS:
        amount_cents = _optional_int(obj, "amount_cents", 0, MAX_AMOUNT_CENTS, event_type)
    track_duration_ms = get("track_duration_ms")
    if track_duration_ms is not None and (
        track_duration_ms.__class__ is not int or not 1 <= track_duration_ms <= MAX_MS_PLAYED
    ):
        # The catalogue's enrichment, not the producer's event: a bad one (0 as "unknown", a float) is dropped
        # and counted, as a bad trace-id attribute is. Dead-lettering the play would blind every stream rule
        # whenever the catalogue lookup misbehaves; without a length the play is simply never "cut off".
        track_duration_ms = None
        Metrics.counter("signals", "invalid_track_duration").inc()

    # Positional, in Signal's field order (_SIGNAL_ORDER, checked at import): keywords cost a dict per signal.
    signal = _new_signal(
        (
            event_id,
            event_type,
            event_time_ms,
            user_id,
            device_id,
            ip,
            country,
            user_agent,
            trace_id,
            track_id,
            artist_id,
            ms_played,
            success,
            playlist_id,
            amount_cents,
            currency,
            card_fingerprint,
            track_duration_ms,
        )
    )
    unknown = 0 if KNOWN_FIELDS.issuperset(obj) else len(obj.keys() - KNOWN_FIELDS)
    return _new_parsed((signal, unknown))


def _payload_of(element) -> tuple[bytes, str | None, int | None]:
    """Raw bytes, trace-id attribute and publish time of a file line or Pub/Sub message."""
    if isinstance(element, PubsubMessage):
        attributes = element.attributes or {}
        publish_time = getattr(element, "publish_time", None)
        publish_ms = datetime_to_millis(publish_time) if publish_time is not None else None
        return element.data or b"", attributes.get("trace_id"), publish_ms
    if isinstance(element, str):
        # surrogateescape gives back the bytes a file's undecodable line came from. Any other lone surrogate
        # is encoded as it stands (surrogatepass): not UTF-8, so it is dead-lettered as invalid_utf8.
        try:
            return element.encode("utf-8", "surrogateescape"), None, None
        except UnicodeEncodeError:
            return element.encode("utf-8", "surrogatepass"), None, None
    return bytes(element), None, None


@dataclasses.dataclass(frozen=True)
class ArrivalBounds:
    """Streaming: how a signal's event time may stand to its message's publish time; empty = unchecked.

    Attributes:
      window_sizes_ms, allowed_lateness_ms: the windows the job computes. A signal published after the
        last of its windows has ended and its lateness passed is dead-lettered as ``event_time_too_late``:
        once the watermark (which follows publish times) catches up, Beam would drop it from all of them
        without a trace. Judged by the publish time, not the watermark, so the answer does not depend on
        the job's progress: during a backlog, when the watermark is behind the publish times, such a
        signal is dead-lettered although a window could still have counted it. A signal late only for its
        shorter windows still counts in the longer ones, as Beam's lateness rule gives.
      max_future_ms: a producer clock this far ahead is refused as ``event_time_in_future``: its windows
        would keep state until the watermark reached them, and fire hours after the decision memories that
        stop a re-fired window from publishing again. 0 = unchecked.
    """

    window_sizes_ms: tuple[int, ...] = ()
    allowed_lateness_ms: int = 0
    max_future_ms: int = 0

    @property
    def active(self) -> bool:
        return bool(self.window_sizes_ms or self.max_future_ms)

    def check(self, event_time_ms: int, publish_ms: int) -> None:
        ahead = event_time_ms - publish_ms
        if self.max_future_ms and ahead > self.max_future_ms:
            raise InvalidSignal(
                "event_time_in_future",
                f"'event_time' is {ahead / 1000:.0f} s after the message was published "
                f"(at most {self.max_future_ms / 1000:.0f} s: --max_future_skew_sec)",
            )
        if self.window_sizes_ms:
            # Beam's fixed windows start at multiples of their size; the signal's last window ends last.
            last_end = max((event_time_ms // size + 1) * size for size in self.window_sizes_ms)
            if last_end + self.allowed_lateness_ms < publish_ms:
                raise InvalidSignal(
                    "event_time_too_late",
                    f"'event_time' is {-ahead / 1000:.0f} s before the message was published, after its last "
                    f"window ended and its lateness ({self.allowed_lateness_ms / 1000:.0f} s) passed: no window "
                    "can count it",
                )


NO_ARRIVAL_BOUNDS = ArrivalBounds()


class ParseSignalFn(beam.DoFn):
    """Validates each payload; rejects go to the ``dead_letter`` output with the raw bytes."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, source: str, arrival: ArrivalBounds = NO_ARRIVAL_BOUNDS):
        self._source = source
        self._arrival = arrival
        self._check_arrival = arrival.active
        self._read = {t: Metrics.counter("signals", f"read_{t}") for t in EVENT_TYPES}
        self._unknown = Metrics.counter("signals", "unknown_fields")
        self._rejected = Metrics.counter("signals", "dead_lettered")
        # Event lag: how long after it happened a signal reached us (processing minus event time).
        self._lag = Metrics.distribution("latency", "event_lag_ms")

    def _dead_letter(self, raw: bytes, err: InvalidSignal) -> DeadLetter:
        self._rejected.inc()
        Metrics.counter("dead_letters", err.reason).inc()
        if len(raw) > MAX_DEAD_LETTER_BYTES:  # only payload_too_large can be this long; its detail gives the size
            raw = raw[:MAX_DEAD_LETTER_BYTES]
        return DeadLetter(
            stage="parse",
            reason=err.reason,
            detail=err.detail,
            raw_payload=raw,
            source=self._source,
            failed_at_ms=int(time.time() * 1000),
        )

    def _validate(self, element) -> ParsedSignal | DeadLetter:
        raw, trace_attr, publish_ms = _payload_of(element)
        try:
            parsed = parse_signal(raw, trace_id_attribute=trace_attr, publish_time_ms=publish_ms)
            if publish_ms is not None and self._check_arrival:
                self._arrival.check(parsed.signal.event_time_ms, publish_ms)
            return parsed
        except InvalidSignal as err:
            return self._dead_letter(raw, err)

    def process(self, element):
        parsed = self._validate(element)
        if parsed.__class__ is DeadLetter:
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, parsed)
            return
        self._read[parsed.signal.event_type].inc()
        self._lag.update(max(0, int(time.time() * 1000) - parsed.signal.event_time_ms))
        if parsed.unknown_fields:
            self._unknown.inc(parsed.unknown_fields)
        yield parsed.signal


class ParseSignalBatchFn(ParseSignalFn):
    """Batch only: ``ParseSignalFn`` over Beam batches (lists) of payloads, such as ``ReadLineBlocks`` yields.

    One call validates a whole list and hands on one list of signals (and one
    of dead letters, on their own output), so a backtest's signals reach
    ``PackByHourFn.process_batch`` without a runner element each. The same
    checks, records and metrics as ``process``, which still takes any input
    that arrives one element at a time (a backtest of Avro files); the
    signals-read and unknown-field counters are added once per batch, and
    every signal's event lag is measured from one clock reading per batch.

    Declared ``Any``: Beam sizes every list a ``process_batch`` yields, the
    dead letters' too, with the main output's element coder (it samples a
    fifth of each list, up to 100), so a ``Signal`` coder would be asked to
    encode dead letters. The output was ``Any`` before too: Beam gives a
    multi-output step's outputs that type. A test checks that the backtest
    graph passes the batches on: where the producer's and consumer's batch
    types differ, Beam quietly unpacks them and calls ``process`` instead.

    On Dataflow, metrics a ``process_batch`` updates, and its CPU time, are
    shown under the step that handed the batch over (Beam 2.77 enters a
    step's own state only around ``process``), here the file reader; the
    totals are the same. The streaming job keeps ``ParseSignalFn``, its
    coders and its graph.
    """

    def setup(self):
        # A backtest's first step per signal: the worker's collector runs far less often from here on, while it
        # holds batches of parsed signals and later while it folds hours (transforms.batch_gc).
        tune_gc_for_batch()

    def infer_output_type(self, input_type):
        return typing.Any

    def get_input_batch_type(self, input_element_type):
        return beam.typehints.List[input_element_type]

    def get_output_batch_type(self, input_element_type):
        return beam.typehints.List[typing.Any]

    def process_batch(self, batch):
        signals, dead = [], []
        read = dict.fromkeys(EVENT_TYPES, 0)
        unknown = 0
        # parse_signal's typed path, written out for a file's lines (bytes, with no trace attribute or publish
        # time): a line it accepts costs no call of _validate, _payload_of or parse_signal, which took about a
        # third of this loop's time (benchmarks/README.md, change 36). Every other element, and every line it
        # declines, goes through _validate, as before.
        decode, event_type_of, max_bytes = _TYPED_DECODER.decode, _EVENT_TYPE_OF, MAX_PAYLOAD_BYTES
        for element in batch:
            if element.__class__ is bytes and len(element) <= max_bytes:
                try:
                    decoded = decode(element)
                except _TYPED_DECLINES:
                    decoded = None
                if decoded is not None:
                    signal = accept_typed(decoded, event_type_of[decoded.__class__], None, None)
                    if signal is not None:
                        signals.append(signal)
                        read[signal.event_type] += 1
                        continue
            parsed = self._validate(element)
            if parsed.__class__ is DeadLetter:
                dead.append(parsed)
                continue
            signal = parsed.signal
            signals.append(signal)
            read[signal.event_type] += 1
            unknown += parsed.unknown_fields
        now_ms = int(time.time() * 1000)
        for signal in signals:
            self._lag.update(max(0, now_ms - signal.event_time_ms))
        for event_type, n in read.items():
            if n:
                self._read[event_type].inc(n)
        if unknown:
            self._unknown.inc(unknown)
        if signals:
            yield signals
        if dead:
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, dead)


class ParsedSignals(typing.NamedTuple):
    signals: beam.PCollection
    dead_letters: beam.PCollection


class ParseSignals(beam.PTransform):
    """Raw payloads (bytes, str lines or ``PubsubMessage``) to ``Signal`` records.

    Returns ``ParsedSignals(signals, dead_letters)``. Nothing is dropped: every
    input is either a signal or a ``DeadLetter`` carrying its bytes and reason.
    ``batched`` (batch pipelines only) validates Beam batches of payloads in
    one call each (``ParseSignalBatchFn``); the output is the same.
    """

    def __init__(self, source: str = "unknown", batched: bool = False, arrival: ArrivalBounds = NO_ARRIVAL_BOUNDS):
        super().__init__()
        self._source = source
        self._batched = batched
        self._arrival = arrival

    def expand(self, payloads):
        fn = ParseSignalBatchFn(self._source) if self._batched else ParseSignalFn(self._source, self._arrival)
        results = payloads | "Validate" >> beam.ParDo(fn).with_outputs(ParseSignalFn.DEAD_LETTER, main="signals")
        return ParsedSignals(results.signals, results[ParseSignalFn.DEAD_LETTER])


class AssignEventTime(beam.PTransform):
    """Stamp each signal with its own event time, so windows follow when things happened."""

    def expand(self, signals):
        return signals | "FromEventTime" >> beam.Map(
            lambda s: TimestampedValue(s, s.event_time_ms / 1000.0)
        ).with_output_types(Signal)
