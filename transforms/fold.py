"""The fold: one signal into the accumulators of its entity windows, the job's most-run code.

``transforms.features`` builds on it (features, merging, the pre-aggregating
``DoFn``); this module holds only what runs per signal and window, so it can
be compiled. Where the package is built (``setup.py build_ext``, which
``make`` runs, and ``pip install`` on Dataflow workers), Cython compiles this
file as it is, and ``fold.pxd`` beside it makes ``Accumulator`` an extension
type whose counters are C integers and whose other fields are C pointers, and
types ``fold_signal``'s loop variables: the fold then costs about a third
less (benchmarks/README.md, change 30). This is how Beam compiles its own
per-element code (``apache_beam/runners/common.py`` and ``common.pxd``).
Where it is not built, the same file runs as plain Python, with the same
results and the same pickled form; ``tests/transforms/test_fold.py`` checks
both against each other. ``COMPILED`` says which one was imported.

Keep the file valid for both: counters hold Python ints up to 2**63 (a
count or a millisecond time), and only the fields ``fold.pxd`` declares as
``object`` may hold ``None``, a set, a dict or a list.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable
from copy import deepcopy

import msgspec

from schemas import EVENT_TYPES, Signal
from transforms.distinct import DISTINCT_CAP, HyperLogLog, add_distinct, merge_distinct, overflow
from transforms.extractors import EXTRACTORS

# True when this module is the Cython build (an extension module), False when it runs as plain Python.
COMPILED = not __file__.endswith(".py")

# DISTINCT_CAP (4096) is defined in transforms.distinct, which extractors' distinct counts use too.
TOP_CAP = 256
TRACE_SAMPLE = 10
# A play counts for royalties from 30 s; farms play just past it to earn the
# most plays per hour. "Near threshold" is [30 s, 40 s).
ROYALTY_THRESHOLD_MS = 30_000
NEAR_THRESHOLD_MS = 40_000
# Paid plays ending within a minute: a farm that stops at 41 to 59 s instead of just past 30 s still earns
# two paid plays for every minute a listener's one full track takes.
SHORT_PAID_MS = 60_000
# A paid play is "cut off" when it stopped more than this before its track's end (``track_duration_ms``,
# from the catalogue). Players cross-fade into the next track by up to 12 s, so a track played to its end
# can report that much less, and a little more with the player's latency: 12 s exactly would suspend a
# nursery speaker cross-fading its sleep sounds by 1 ms of latency. A play of a track whose length is unknown
# never counts as cut off.
CUT_SLACK_MS = 20_000
SMALL_PAYMENT_CENTS = 200


# The accumulator's fields, in the order its pickled state lists them (fold.pxd declares each one's C type).
FIELDS = (
    "events",
    "streams",
    "stream_ms",
    "near_threshold",
    "short_streams",
    "logins",
    "failed_logins",
    "signups",
    "playlist_adds",
    "payments",
    "failed_payments",
    "small_payments",
    "first_ms",
    "last_ms",
    "hours",
    "users",
    "devices",
    "ips",
    "tracks",
    "artists",
    "playlists",
    "cards",
    "countries",
    "stream_artists",
    "stream_tracks",
    "playlist_artists",
    "trace_ids",
    "extra",
    # Added later, so last: state written before them (a shorter list) still reads (__setstate__).
    "short_paid",
    "cut_paid",
    "cut_near",
)


class Accumulator:
    """Counters for one entity in one window. Slots keep it small when shuffled.

    Sets, counters and samples stay ``None`` until a signal needs them: most
    keys see few kinds of signal, and every container is one more object for
    the garbage collector to scan. A worker holds tens of thousands of
    accumulators at once, and Python's collector rescans all of them as they
    are created, which made eager containers the largest single CPU cost in a
    backtest (benchmarks/README.md).

    A distinct-value field holds ``None`` (no value yet), the value itself
    (one distinct value: most keys see one user, device, IP and country), a
    set (two to ``DISTINCT_CAP``), or a ``HyperLogLog`` sketch past that. A
    one-element set costs 216 bytes and a collector entry; the value costs
    only the reference (sets refer to their values too). ``distinct_count``
    reads every form (``transforms.distinct``).
    """

    __slots__ = FIELDS

    def __init__(self):
        self.events = self.streams = self.stream_ms = self.near_threshold = self.short_streams = 0
        self.logins = self.failed_logins = self.signups = self.playlist_adds = 0
        self.payments = self.failed_payments = self.small_payments = 0
        self.first_ms = 1 << 62
        self.last_ms = 0
        self.hours = 0
        # None | a value | a set of 2..DISTINCT_CAP values | a HyperLogLog: distinct values (class docstring).
        self.users = self.devices = self.ips = self.tracks = None
        self.artists = self.playlists = self.cards = self.countries = None
        # dict | None: top-share counters, at most TOP_CAP keys.
        self.stream_artists = self.stream_tracks = self.playlist_artists = None
        self.trace_ids = None  # list | None: the TRACE_SAMPLE smallest trace ids, sorted
        self.extra = None  # dict | None: extractor name -> its state (transforms.extractors)
        self.short_paid = 0  # plays in [30 s, 60 s)
        self.cut_paid = 0  # paid plays cut off (CUT_SLACK_MS) before the end of a track of known length
        self.cut_near = 0  # of those, plays in [30 s, 40 s)

    def __getstate__(self):
        # Field by field in FIELDS' order (tests/transforms/test_fold.py checks the order): compiled, each is a
        # read of the struct, where a loop of getattr by name looked every field up (about 3 µs an accumulator,
        # a fifth of pickling one; benchmarks/README.md, change 40).
        return [
            self.events,
            self.streams,
            self.stream_ms,
            self.near_threshold,
            self.short_streams,
            self.logins,
            self.failed_logins,
            self.signups,
            self.playlist_adds,
            self.payments,
            self.failed_payments,
            self.small_payments,
            self.first_ms,
            self.last_ms,
            self.hours,
            self.users,
            self.devices,
            self.ips,
            self.tracks,
            self.artists,
            self.playlists,
            self.cards,
            self.countries,
            self.stream_artists,
            self.stream_tracks,
            self.playlist_artists,
            self.trace_ids,
            self.extra,
            self.short_paid,
            self.cut_paid,
            self.cut_near,
        ]

    def __setstate__(self, state):
        slots = FIELDS
        if len(state) > len(slots):
            raise ValueError(f"accumulator state has {len(state)} fields, more than this code's {len(slots)}")
        if len(state) < len(slots) - len(_LATER_SLOTS):
            raise ValueError(f"accumulator state has {len(state)} fields, fewer than any code wrote")
        if len(state) == len(slots):  # what this code writes: field by field, as __getstate__ reads them
            (
                self.events,
                self.streams,
                self.stream_ms,
                self.near_threshold,
                self.short_streams,
                self.logins,
                self.failed_logins,
                self.signups,
                self.playlist_adds,
                self.payments,
                self.failed_payments,
                self.small_payments,
                self.first_ms,
                self.last_ms,
                self.hours,
                self.users,
                self.devices,
                self.ips,
                self.tracks,
                self.artists,
                self.playlists,
                self.cards,
                self.countries,
                self.stream_artists,
                self.stream_tracks,
                self.playlist_artists,
                self.trace_ids,
                self.extra,
                self.short_paid,
                self.cut_paid,
                self.cut_near,
            ) = state
            return
        for name, value in zip(slots, state, strict=False):
            setattr(self, name, value)
        for name in slots[len(state) :]:  # written before these were counted: the window counts from here on
            setattr(self, name, 0)


# Counters added after the first release, in the order they were added: state from before them reads as 0.
_LATER_SLOTS = ("short_paid", "cut_paid", "cut_near")
assert FIELDS[-len(_LATER_SLOTS) :] == _LATER_SLOTS, "new accumulator slots go last"


def _distinct(values, value):
    """A distinct-value field with ``value`` added (values are ids: never a set)."""
    return add_distinct(values, value, DISTINCT_CAP)


def _top(counts: dict | None, key) -> dict:
    """A top-share counter with ``key`` counted, as ``_fold_stream`` counts its two inline: a get and a set."""
    if counts is None:
        return {key: 1}
    if (count := counts.get(key)) is not None:
        counts[key] = count + 1
    elif len(counts) < TOP_CAP:
        counts[key] = 1
    return counts


def add_signal(acc: Accumulator, s: Signal) -> Accumulator:
    """Fold one signal into an accumulator."""
    fold_signal((acc,), s)
    return acc


def fold_signal(accs, s: Signal) -> None:
    """Fold one signal into each of ``accs`` (the per-element hot path).

    One signal feeds about five accumulators (one per entity window), so what
    depends only on the signal is worked out once, and the bounded-set and
    counter updates are written inline rather than as a call per field: this
    is the most-run code in the job, and the two together took about 28% off
    it (benchmarks/README.md). ``tests/transforms/test_features.py`` checks it
    against a plain reference fold.
    """
    t = s.event_time_ms
    hour_bit = 1 << ((t // 3_600_000) % 24)
    user, device, ip, country = s.user_id, s.device_id, s.ip, s.country
    trace = s.trace_id
    cap = DISTINCT_CAP
    trace_cap = TRACE_SAMPLE  # a C integer where compiled: comparing with the global would box len() first
    for acc in accs:
        acc.events += 1
        if t < acc.first_ms:  # noqa: PLR1730 - hot path: a comparison costs less than calling min()
            acc.first_ms = t
        if t > acc.last_ms:  # noqa: PLR1730
            acc.last_ms = t
        acc.hours |= hour_bit
        if user is not None:
            v = acc.users
            if v is None:
                acc.users = user
            elif type(v) is set:
                values = v  # typed as a set where compiled: len, add and in are then C calls
                if len(values) < cap:
                    values.add(user)
                elif user not in values:
                    acc.users = overflow(values, user)
            elif v != user:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(user)
                else:
                    acc.users = {v, user}
        if device is not None:
            v = acc.devices
            if v is None:
                acc.devices = device
            elif type(v) is set:
                values = v
                if len(values) < cap:
                    values.add(device)
                elif device not in values:
                    acc.devices = overflow(values, device)
            elif v != device:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(device)
                else:
                    acc.devices = {v, device}
        if ip is not None:
            v = acc.ips
            if v is None:
                acc.ips = ip
            elif type(v) is set:
                values = v
                if len(values) < cap:
                    values.add(ip)
                elif ip not in values:
                    acc.ips = overflow(values, ip)
            elif v != ip:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(ip)
                else:
                    acc.ips = {v, ip}
        if country is not None:
            v = acc.countries
            if v is None:
                acc.countries = country
            elif type(v) is set:
                values = v
                if len(values) < cap:
                    values.add(country)
                elif country not in values:
                    acc.countries = overflow(values, country)
            elif v != country:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(country)
                else:
                    acc.countries = {v, country}
        if trace is not None:
            sample = acc.trace_ids
            # Most signals come after the sample is full and sort above it: nothing to do.
            if sample is None or len(sample) < trace_cap or trace < sample[-1]:
                acc.trace_ids = _add_trace(sample, trace)
    kind = s.event_type
    if kind == "stream":
        _fold_stream(accs, s)
    elif kind == "login":
        failed = not s.success
        for acc in accs:
            acc.logins += 1
            if failed:
                acc.failed_logins += 1
    elif kind == "signup":
        for acc in accs:
            acc.signups += 1
    elif kind == "playlist_add":
        for acc in accs:
            acc.playlist_adds += 1
            acc.playlists = _distinct(acc.playlists, s.playlist_id)
            acc.tracks = _distinct(acc.tracks, s.track_id)
            if s.artist_id is not None:
                acc.playlist_artists = _top(acc.playlist_artists, s.artist_id)
    elif kind == "payment":
        failed = not s.success
        small = s.amount_cents <= SMALL_PAYMENT_CENTS
        for acc in accs:
            acc.payments += 1
            if failed:
                acc.failed_payments += 1
            if small:
                acc.small_payments += 1
            acc.cards = _distinct(acc.cards, s.card_fingerprint)
    by_type = _EXTRACTORS_BY_TYPE  # a typed dict where compiled: .get is then a C call, not a method lookup
    extractors = by_type.get(kind)
    if extractors:
        for acc in accs:
            extra = acc.extra
            if extra is None:
                extra = acc.extra = {}
            for extractor in extractors:
                state = extra.get(extractor.name)
                extra[extractor.name] = extractor.add(extractor.create() if state is None else state, s)


def _fold_stream(accs, s: Signal) -> None:
    """The stream part of ``fold_signal``: nine in ten signals are plays."""
    ms = s.ms_played
    # The thresholds as locals: where compiled they are C integers, so each test is a C comparison rather
    # than a module lookup, a boxed ms and a Python comparison.
    paid_ms, short_paid_ms, near_ms, slack_ms = ROYALTY_THRESHOLD_MS, SHORT_PAID_MS, NEAR_THRESHOLD_MS, CUT_SLACK_MS
    short = ms < paid_ms
    short_paid = not short and ms < short_paid_ms
    near = short_paid and ms < near_ms
    length = s.track_duration_ms
    cut = not short and length is not None and ms + slack_ms < length
    track, artist = s.track_id, s.artist_id
    cap, top_cap = DISTINCT_CAP, TOP_CAP
    for acc in accs:
        acc.streams += 1
        acc.stream_ms += ms
        if short:
            acc.short_streams += 1
        else:
            if short_paid:
                acc.short_paid += 1
                if near:
                    acc.near_threshold += 1
            if cut:
                acc.cut_paid += 1
                if near:
                    acc.cut_near += 1
        if track is not None:
            v = acc.tracks
            if v is None:
                acc.tracks = track
            elif type(v) is set:
                values = v  # typed as a set where compiled: len, add and in are then C calls
                if len(values) < cap:
                    values.add(track)
                elif track not in values:
                    acc.tracks = overflow(values, track)
            elif v != track:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(track)
                else:
                    acc.tracks = {v, track}
            c = acc.stream_tracks
            if c is None:
                acc.stream_tracks = {track: 1}
            elif (count := c.get(track)) is not None:  # a get and a set, where "in" then "+=" looked up three times
                c[track] = count + 1
            elif len(c) < top_cap:
                c[track] = 1
        if artist is not None:
            v = acc.artists
            if v is None:
                acc.artists = artist
            elif type(v) is set:
                values = v
                if len(values) < cap:
                    values.add(artist)
                elif artist not in values:
                    acc.artists = overflow(values, artist)
            elif v != artist:  # a lone value or a sketch, tested here so a lone equal value costs no more
                if type(v) is HyperLogLog:
                    v.add(artist)
                else:
                    acc.artists = {v, artist}
            c = acc.stream_artists
            if c is None:
                acc.stream_artists = {artist: 1}
            elif (count := c.get(artist)) is not None:  # a get and a set, where "in" then "+=" looked up three times
                c[artist] = count + 1
            elif len(c) < top_cap:
                c[artist] = 1


def _add_trace(sample: list | None, trace_id: str) -> list:
    """Keep the TRACE_SAMPLE smallest ids, sorted, so the sample ignores arrival order."""
    if sample is None:
        return [trace_id]
    i = bisect_left(sample, trace_id)
    n = len(sample)
    if i < n and sample[i] == trace_id:
        return sample
    cap = TRACE_SAMPLE
    if n < cap:
        sample.insert(i, trace_id)
    elif i < n:  # smaller than the largest kept: it goes in, the largest goes out
        sample.insert(i, trace_id)
        sample.pop()
    return sample


_EXTRACTORS_BY_TYPE = {t: tuple(e for e in EXTRACTORS.values() if t in e.event_types) for t in EVENT_TYPES}


# A signal's fields by position: the batch fold reads them from the tuple, without an attribute lookup.
SIGNAL_INDEX = {name: i for i, name in enumerate(Signal._fields)}
_TIME_INDEX = SIGNAL_INDEX["event_time_ms"]


def fold_batch(batch, begin: int, tables, rest, partials: dict, max_keys: int) -> int:
    """Fold ``batch[begin:]`` as ``PreAggregateFn.process_batch`` does, stopping early when ``partials`` reaches
    ``max_keys``: returns the index of the first signal not folded (``len(batch)`` when all were), so the caller
    can flush the partials and go on from there.

    ``tables`` holds the windows the batch holds whole, as ``(size_sec, size_ms, ((entity_type, the signal
    field's index, {window start: {entity id: Accumulator}}), ...))``, filled here; ``rest`` the other windows,
    as ``PreAggregateFn``'s plan entries, whose accumulators are partials kept in ``partials``
    (``add_partials``).
    """
    n = len(batch)
    i = begin
    while i < n:
        signal = batch[i]
        i += 1
        t = signal[_TIME_INDEX]
        accs = []
        for _, size_ms, fields in tables:
            window_start = t - t % size_ms
            start = window_start  # where compiled, the start as a Python int once per size, not per entity type
            for _, index, by_start in fields:
                entity_id = signal[index]
                if entity_id is None:
                    continue
                by_id = by_start.get(start)
                if by_id is None:
                    by_id = by_start[start] = {}
                acc = by_id.get(entity_id)
                if acc is None:
                    acc = by_id[entity_id] = Accumulator()
                accs.append(acc)
        if rest:
            add_partials(signal, rest, partials, accs)
        fold_signal(accs, signal)
        if len(partials) >= max_keys:
            return i
    return n


def add_partials(signal, plan, partials: dict, accs: list) -> None:
    """Append to ``accs`` the accumulators in ``partials`` of the signal's windows in ``plan`` (entries
    ``(size_sec, size_ms, ((entity_type, signal field), ...), tiles)``), creating those it is the first
    signal of, keyed ``(size_sec, entity_type, entity_id, window start)``."""
    t = signal.event_time_ms
    for size_sec, size_ms, fields, _ in plan:
        window_start = t - t % size_ms
        for entity_type, field in fields:
            entity_id = getattr(signal, field)
            if entity_id is None:
                continue
            key = (size_sec, entity_type, entity_id, window_start)
            acc = partials.get(key)
            if acc is None:
                acc = partials[key] = Accumulator()
            accs.append(acc)


_DISTINCT_FIELDS = ("users", "devices", "ips", "tracks", "artists", "playlists", "cards", "countries")
_TOP_FIELDS = ("stream_artists", "stream_tracks", "playlist_artists")


def merge(accs: Iterable[Accumulator]) -> Accumulator:
    """Merge partial accumulators into the first one (combiner lifting and fan-out rely on this)."""
    accs = iter(accs)
    out = next(accs, None)
    if out is None:  # Beam may merge an empty list (hot-key fan-out does)
        return Accumulator()
    for a in accs:
        out.events += a.events
        out.streams += a.streams
        out.stream_ms += a.stream_ms
        out.near_threshold += a.near_threshold
        out.short_streams += a.short_streams
        out.short_paid += a.short_paid
        out.cut_paid += a.cut_paid
        out.cut_near += a.cut_near
        out.logins += a.logins
        out.failed_logins += a.failed_logins
        out.signups += a.signups
        out.playlist_adds += a.playlist_adds
        out.payments += a.payments
        out.failed_payments += a.failed_payments
        out.small_payments += a.small_payments
        out.first_ms = min(out.first_ms, a.first_ms)
        out.last_ms = max(out.last_ms, a.last_ms)
        out.hours |= a.hours
        for name in _DISTINCT_FIELDS:
            theirs = getattr(a, name)
            if theirs is None:
                continue
            mine = getattr(out, name)
            if type(theirs) is str:  # a lone id, the commonest: nothing to do when it is mine too
                if mine is None:
                    setattr(out, name, theirs)
                elif mine != theirs:
                    setattr(out, name, add_distinct(mine, theirs, DISTINCT_CAP))
            else:
                setattr(out, name, merge_distinct(mine, theirs, DISTINCT_CAP))
        for name in _TOP_FIELDS:
            theirs = getattr(a, name)
            if not theirs:
                continue
            mine = getattr(out, name)
            if mine is None:
                setattr(out, name, dict(theirs))
                continue
            for key, count in theirs.items():
                if key in mine:
                    mine[key] += count
                elif len(mine) < TOP_CAP:
                    mine[key] = count
        if a.trace_ids:
            out.trace_ids = heapq.nsmallest(TRACE_SAMPLE, set(out.trace_ids or ()) | set(a.trace_ids))
        if a.extra:
            if out.extra is None:
                out.extra = {}
            for name, state in a.extra.items():
                mine = out.extra.get(name)
                extractor = EXTRACTORS.get(name)
                if extractor is None:  # retired (see _copy_state): nothing reads it, so it is carried, not merged
                    if mine is None:
                        out.extra[name] = _copy_state(name, state)
                    continue
                # A copy, not ``a``'s own state: extractors' ``add`` updates a state in place (the example's
                # does), so a shared state would count a signal folded into either accumulator in both.
                out.extra[name] = extractor.copy(state) if mine is None else extractor.merge(mine, state)
    return out


def copy_accumulator(a: Accumulator) -> Accumulator:
    """An accumulator equal to ``a`` that shares no mutable state with it (extractor states by their ``copy``).

    Slot by slot, because it runs once per entity per hour in a backtest and a loop over slot names cost
    more than folding a user's few signals again; a slot missed here fails ``tests/transforms/test_features.py``.
    """
    c = Accumulator.__new__(Accumulator)
    c.events, c.streams, c.stream_ms, c.near_threshold = a.events, a.streams, a.stream_ms, a.near_threshold
    c.short_streams, c.logins, c.failed_logins, c.signups = a.short_streams, a.logins, a.failed_logins, a.signups
    c.short_paid, c.cut_paid, c.cut_near = a.short_paid, a.cut_paid, a.cut_near
    c.playlist_adds, c.payments, c.failed_payments = a.playlist_adds, a.payments, a.failed_payments
    c.small_payments, c.first_ms, c.last_ms, c.hours = a.small_payments, a.first_ms, a.last_ms, a.hours
    c.users = v.copy() if type(v := a.users) is set or type(v) is HyperLogLog else v
    c.devices = v.copy() if type(v := a.devices) is set or type(v) is HyperLogLog else v
    c.ips = v.copy() if type(v := a.ips) is set or type(v) is HyperLogLog else v
    c.tracks = v.copy() if type(v := a.tracks) is set or type(v) is HyperLogLog else v
    c.artists = v.copy() if type(v := a.artists) is set or type(v) is HyperLogLog else v
    c.playlists = v.copy() if type(v := a.playlists) is set or type(v) is HyperLogLog else v
    c.cards = v.copy() if type(v := a.cards) is set or type(v) is HyperLogLog else v
    c.countries = v.copy() if type(v := a.countries) is set or type(v) is HyperLogLog else v
    c.stream_artists = None if a.stream_artists is None else a.stream_artists.copy()
    c.stream_tracks = None if a.stream_tracks is None else a.stream_tracks.copy()
    c.playlist_artists = None if a.playlist_artists is None else a.playlist_artists.copy()
    c.trace_ids = None if a.trace_ids is None else a.trace_ids.copy()
    extra = a.extra
    c.extra = None if extra is None else {name: _copy_state(name, state) for name, state in extra.items()}
    return c


def _copy_state(name: str, state):
    """An extractor state copied by its extractor's ``copy``. A state whose extractor is no longer registered
    (a streaming job updated after one was removed keeps its states in older windows) is deep-copied, as every
    state was before extractors had a ``copy``: no feature reads it, and a window carries it until it closes."""
    extractor = EXTRACTORS.get(name)
    return deepcopy(state) if extractor is None else extractor.copy(state)


def _has_full_top_counter(acc: Accumulator) -> bool:
    for counts in (acc.stream_artists, acc.stream_tracks, acc.playlist_artists):
        if counts is not None and len(counts) >= TOP_CAP:
            return True
    return False


def copy_to_longer_windows(whole: dict, partials: dict, span_sec: int, copied: dict) -> set:
    """``PreAggregateFn._copy_to_longer_windows``' common case: add a copy of each batch-long window in
    ``whole`` to the partials of the longer windows of its entity type in ``copied`` (``{entity type: ((size_sec,
    size_ms), ...)}``). Returns the ``(entity type, entity id)`` pairs skipped because a top-share counter of
    theirs is full, whose signals the caller folds into the longer windows instead."""
    refold = set()
    for (size_sec, entity_type, entity_id, start), acc in whole.items():
        if size_sec != span_sec or entity_type not in copied:
            continue
        if _has_full_top_counter(acc):
            refold.add((entity_type, entity_id))
            continue
        for longer_sec, longer_ms in copied[entity_type]:
            key = (longer_sec, entity_type, entity_id, start - start % longer_ms)
            mine = partials.get(key)
            partials[key] = copy_accumulator(acc) if mine is None else merge([mine, copy_accumulator(acc)])
    return refold


# --- An accumulator as the batch merge shuffle carries it (transforms.features.AccumulatorCoder) -----------------
# msgpack of the fields in FIELDS' order, each distinct-value field as None, its lone value (a str), a list (a set's
# values) or an extension holding a sketch's registers. Pickling a partial spent much of its time outside the
# content: building the state by name (until __getstate__ read the fields one by one), and naming the class in
# every pickle, which the pickler checks and the unpickler imports and looks up (benchmarks/README.md, change 40).
# Extractor states (``extra``) can be any Python value, so the caller's coder encodes them. Nothing outside one
# backtest's shuffle reads this form, so it carries no version: a streaming job's state keeps the pickled form
# (``Accumulator.__getstate__``), which Dataflow's --update needs.
_SKETCH_EXT = 1  # the msgpack extension code of a HyperLogLog's registers
_WIRE_ENCODER = msgspec.msgpack.Encoder()
_WIRE_DECODER = msgspec.msgpack.Decoder()


def _distinct_to_wire(v):
    if v is None or type(v) is str:
        return v
    if type(v) is set:
        return list(v)
    if type(v) is HyperLogLog:
        return msgspec.msgpack.Ext(_SKETCH_EXT, bytes(v.registers))
    raise TypeError(f"a distinct-value field holds a {type(v).__name__}: None, a str, a set or a HyperLogLog expected")


def _distinct_from_wire(v):
    if v is None or type(v) is str:
        return v
    if type(v) is list:
        return set(v)
    if type(v) is msgspec.msgpack.Ext and v.code == _SKETCH_EXT:
        return HyperLogLog(v.data)
    raise ValueError(f"an encoded distinct-value field holds a {type(v).__name__}: not an accumulator's")


def encode_accumulator(a: Accumulator, encode_extra) -> bytes:
    """``a`` as msgpack bytes (see above), its extractor states encoded by ``encode_extra`` (a coder's encode)."""
    extra = a.extra
    return _WIRE_ENCODER.encode(
        (
            a.events,
            a.streams,
            a.stream_ms,
            a.near_threshold,
            a.short_streams,
            a.logins,
            a.failed_logins,
            a.signups,
            a.playlist_adds,
            a.payments,
            a.failed_payments,
            a.small_payments,
            a.first_ms,
            a.last_ms,
            a.hours,
            _distinct_to_wire(a.users),
            _distinct_to_wire(a.devices),
            _distinct_to_wire(a.ips),
            _distinct_to_wire(a.tracks),
            _distinct_to_wire(a.artists),
            _distinct_to_wire(a.playlists),
            _distinct_to_wire(a.cards),
            _distinct_to_wire(a.countries),
            a.stream_artists,
            a.stream_tracks,
            a.playlist_artists,
            a.trace_ids,
            None if extra is None else encode_extra(extra),
            a.short_paid,
            a.cut_paid,
            a.cut_near,
        )
    )


def decode_accumulator(data: bytes, decode_extra) -> Accumulator:
    """What ``encode_accumulator`` encoded; extractor states decoded by ``decode_extra`` (the same coder's decode)."""
    f = _WIRE_DECODER.decode(data)
    if type(f) is not list or len(f) != len(FIELDS):
        raise ValueError(f"not an encoded accumulator: {len(FIELDS)} fields expected")
    a = Accumulator.__new__(Accumulator)
    (
        a.events,
        a.streams,
        a.stream_ms,
        a.near_threshold,
        a.short_streams,
        a.logins,
        a.failed_logins,
        a.signups,
        a.playlist_adds,
        a.payments,
        a.failed_payments,
        a.small_payments,
        a.first_ms,
        a.last_ms,
        a.hours,
    ) = f[:15]
    a.users = _distinct_from_wire(f[15])
    a.devices = _distinct_from_wire(f[16])
    a.ips = _distinct_from_wire(f[17])
    a.tracks = _distinct_from_wire(f[18])
    a.artists = _distinct_from_wire(f[19])
    a.playlists = _distinct_from_wire(f[20])
    a.cards = _distinct_from_wire(f[21])
    a.countries = _distinct_from_wire(f[22])
    a.stream_artists, a.stream_tracks, a.playlist_artists, a.trace_ids = f[23], f[24], f[25], f[26]
    extra = f[27]
    a.extra = None if extra is None else decode_extra(extra)
    a.short_paid, a.cut_paid, a.cut_near = f[28], f[29], f[30]
    return a
