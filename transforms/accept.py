"""The checks parsing makes on the values of every well-formed signal, compiled by Cython where built.

``transforms.parse`` decodes a payload with msgspec's typed decoder, which
checks the JSON types, required fields and ranges in C; what is left for
every signal is here: the id grammar, RFC 3339 event times, IP addresses,
user agents and currencies (``accept_typed``), with the caches that make the
common case cheap. Like ``transforms/fold.py``, this file is compiled by
Cython with ``accept.pxd`` beside it where the package is built (``make``,
``pip install`` on a Dataflow worker; setup.py) and runs unchanged as plain
Python where it is not: nothing here is handed to Beam, which inspects the
``DoFn``s and functions it is given (those stay in ``transforms/parse.py``).
``tests/transforms/test_accept.py`` checks that both builds answer alike.

``transforms.parse`` re-exports these names; ``parse_signal_checked`` uses
the same functions and caches, so the two paths give one answer.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re

from schemas import Signal
from schemas.avro import datetime_to_millis

# True where this module is the compiled extension (a .so), False where it runs as plain Python.
COMPILED = not __file__.endswith(".py")

MAX_ID_CHARS = 128
MAX_USER_AGENT_CHARS = 512
# Plausibility bounds on event time: outside them the clock or the producer is
# broken. Fixed dates (not "now") so a backtest gives the same answer whenever
# it runs; streaming also checks event time against each message's publish
# time (transforms.parse.ArrivalBounds).
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_EVENT_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z

# Ids are opaque tokens: letters, digits and a few separators. This rejects
# control characters, whitespace, quotes and markup, so an id can be written
# into logs, BigQuery and dashboards without escaping surprises. ``is_id`` is
# the same test as a loop over the characters, for the compiled build.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,127}")
# Unicode's control characters (C0, DEL, C1: category Cc) and its line and paragraph separators. C1 holds
# U+009B, a terminal's one-character escape sequence introducer, and U+0085, a line break to some readers.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# re.ASCII: RFC 3339 digits are 0-9 only; without it \d also takes Arabic-Indic, fullwidth and other digits.
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_id_match = _ID_RE.fullmatch
_currency_match = _CURRENCY_RE.fullmatch
_control_search = _CONTROL_RE.search

# tuple.__new__ straight from C: NamedTuple._make is a Python function around it, about 0.25 µs a call. It does
# not check the length, so each caller passes every field (the tests compare whole signals with the checks').
_new_signal = functools.partial(tuple.__new__, Signal)

# Ids that matched _ID_RE, for the fields whose values repeat (a user's, device's, track's ids recur in
# every signal they are in): a set lookup costs a fraction of the pattern. Exact str only, and only ever
# added to after the pattern accepts, so a lookup that hits gives the pattern's answer. Bounded like
# _IP_CACHE: cleared when full, so ids that never repeat cost only the pattern and an insert. One per
# process, shared by its threads: every entry is a valid id, so a race (a clear between a check and an add,
# a size briefly past the bound) costs only speed. At most about 13 MiB (65,536 ids of 128 characters).
_ACCEPTED_IDS: set[str] = set()
_ACCEPTED_IDS_MAX = 65_536

# "YYYY-MM-DDTHH:MM:" -> epoch ms of that minute, for prefixes the full parser has accepted. Producers
# write one format, and a stream's signals share few minutes: a signal in that format is then checked
# with a few string operations instead of the regex and seven int() calls. Bounded like _IP_CACHE.
_MINUTE_CACHE: dict[str, int] = {}
_MINUTE_CACHE_MAX = 65_536

# Raw IP text -> its compressed form. Signals repeat addresses (a household, a
# NAT, a farm), and ``ipaddress`` was a quarter of parsing's CPU. Bounded:
# cleared when full, so hostile traffic can cost at most a re-parse.
_IP_CACHE: dict[str, str] = {}
_IP_CACHE_MAX = 65_536


def is_id(value) -> bool:
    """``_ID_RE.fullmatch(value)`` for an exact ``str``, character by character (False for anything else).

    Compiled, this is a loop over the string's code points in C, a few times cheaper than the pattern; as
    plain Python it is slower than the pattern, so ``id_ok`` takes the pattern there.
    """
    if type(value) is not str:
        return False
    text = value
    n = len(text)
    if n == 0 or n > MAX_ID_CHARS:
        return False
    first = True
    for ch in text:
        if not ("a" <= ch <= "z" or "A" <= ch <= "Z" or "0" <= ch <= "9"):
            if first or ch not in "._:@+/=-":
                return False
        first = False
    return True


def id_ok(value) -> bool:
    """Whether ``value``, an exact ``str``, is an id: ``is_id`` compiled, the pattern as plain Python."""
    if COMPILED:
        return is_id(value)
    return type(value) is str and _id_match(value) is not None


def parse_rfc3339_ms(value: str) -> int:
    """RFC 3339 timestamp (offset or ``Z`` required) to epoch milliseconds, exactly (fractions below 1 ms floor)."""
    # Fast path, for the common "YYYY-MM-DDTHH:MM:SS.mmmZ" only: the same answer as the full parse below
    # (tests/transforms/test_parse.py checks both on the same inputs).
    if len(value) == 24 and value[23] == "Z" and value[19] == ".":
        minute_ms = _MINUTE_CACHE.get(value[:17])
        if minute_ms is not None:
            second_millis = value[17:19] + value[20:23]  # "SSmmm"
            if second_millis.isascii() and second_millis.isdigit() and second_millis < "60000":
                return minute_ms + int(second_millis)
    return _parse_rfc3339_ms(value)


def _parse_rfc3339_ms(value: str) -> int:
    match = _RFC3339_RE.fullmatch(value)
    if not match:
        raise ValueError("not an RFC 3339 timestamp with a Z or +hh:mm offset")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    day_ms = _day_ms(year, month, day)
    hours, minutes, seconds = int(hour), int(minute), int(second)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError("time of day out of range")
    offset_ms = 0
    if offset not in ("Z", "z"):
        off_hours, off_minutes = int(offset[1:3]), int(offset[4:6])
        if off_hours > 23 or off_minutes > 59:
            raise ValueError("offset out of range")
        offset_ms = (1 if offset[0] == "+" else -1) * (off_hours * 60 + off_minutes) * 60_000
    millis = int(frac[1:4].ljust(3, "0")) if frac else 0
    if offset_ms == 0 and len(value) == 24 and value[19] == ".":  # the fast path's format: remember its minute
        if len(_MINUTE_CACHE) >= _MINUTE_CACHE_MAX:
            _MINUTE_CACHE.clear()
        _MINUTE_CACHE[value[:17]] = day_ms + (hours * 60 + minutes) * 60_000
    return day_ms + ((hours * 60 + minutes) * 60 + seconds) * 1000 + millis - offset_ms


@functools.lru_cache(maxsize=4096)
def _day_ms(year: str, month: str, day: str) -> int:
    """Epoch milliseconds of a calendar day's midnight UTC; cached, since a stream's signals share few days."""
    return datetime_to_millis(dt.datetime(int(year), int(month), int(day), tzinfo=dt.UTC))


class IpZoneIdError(ValueError):
    """An IPv6 address with a zone id."""


def normalise_ip(ip: str) -> str:
    """An IPv4 or IPv6 address in its compressed form; ``ValueError`` if it is not one or carries a zone id."""
    cached = _IP_CACHE.get(ip)
    if cached is not None:
        return cached
    address = ipaddress.ip_address(ip)
    # An IPv6 zone id ("fe80::1%eth0") is free text that means nothing off the sender's host: it would let
    # one address pose as many in per-IP features and carry newlines or markup into logs. Checked before
    # the mapping below, which would drop it silently.
    if getattr(address, "scope_id", None) is not None:
        raise IpZoneIdError(ip)
    # A dual-stack server reports an IPv4 client as ::ffff:a.b.c.d: one client, so one IP entity, in IPv4 form.
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if len(_IP_CACHE) >= _IP_CACHE_MAX:
        _IP_CACHE.clear()
    _IP_CACHE[ip] = compressed = address.compressed
    return compressed


def accept_typed(decoded, event_type: str, trace_id_attribute: str | None, publish_time_ms: int | None):
    """The checks msgspec cannot make, on a signal its typed decoder accepted (``decoded``, a struct of
    ``event_type``): the ``Signal``, or None to let ``transforms.parse.parse_signal_checked`` decide.

    The id grammar, the event time, IP, user agent, currency and a trace-id attribute, with the same functions
    and caches as ``parse_signal_checked`` (``transforms/parse.py`` says which valid signals it declines).
    """
    event_time = decoded.event_time
    if event_time is None:
        if publish_time_ms is None:
            return None
        event_time_ms = publish_time_ms
    else:
        try:
            event_time_ms = parse_rfc3339_ms(event_time)
        except (ValueError, OverflowError):
            return None
    if not MIN_EVENT_TIME_MS <= event_time_ms < MAX_EVENT_TIME_MS:
        return None
    ip = decoded.ip
    if ip is not None:
        try:
            ip = normalise_ip(ip)
        except ValueError:  # IpZoneIdError too
            return None
    user_agent = decoded.user_agent
    if user_agent is not None and (len(user_agent) > MAX_USER_AGENT_CHARS or _control_search(user_agent)):
        return None
    currency = decoded.currency
    if currency is not None and _currency_match(currency) is None:
        return None
    # Ids: event and trace ids are new in every signal (the grammar); the rest recur (_ACCEPTED_IDS first), in
    # transforms.parse._TYPED_REPEATED_IDS's order, checked at import against _REPEATED_ID_FIELDS.
    event_id = decoded.event_id
    if not id_ok(event_id):
        return None
    user_id, device_id, track_id, artist_id = decoded.user_id, decoded.device_id, decoded.track_id, decoded.artist_id
    playlist_id, card_fingerprint = decoded.playlist_id, decoded.card_fingerprint
    accepted = _ACCEPTED_IDS
    for value in (user_id, device_id, track_id, artist_id, playlist_id, card_fingerprint):
        if value is not None and value not in accepted:
            if not id_ok(value):
                return None
            if len(accepted) >= _ACCEPTED_IDS_MAX:
                accepted.clear()
            accepted.add(value)
    trace_id = decoded.trace_id
    if trace_id is None:
        if trace_id_attribute is not None:
            if not id_ok(trace_id_attribute):  # also a str subclass: parse_signal_checked ignores and counts it
                return None
            trace_id = trace_id_attribute
    elif not id_ok(trace_id):
        return None
    return _new_signal(
        (
            event_id,
            event_type,
            event_time_ms,
            user_id,
            device_id,
            ip,
            decoded.country,
            user_agent,
            trace_id,
            track_id,
            artist_id,
            decoded.ms_played,
            decoded.success,
            playlist_id,
            decoded.amount_cents,
            currency,
            card_fingerprint,
            decoded.track_duration_ms,
        )
    )
