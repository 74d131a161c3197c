"""Drop repeats: Pub/Sub delivers at least once, and producers retry.

Two places need it. Signals are keyed by ``event_id``, so a redelivered or
republished signal is not counted twice in any feature. Rule hits are keyed by
``decision_id`` and outcome, so a window that fires again (an early pane, then
the on-time pane, then a late pane) does not publish or audit the same
decision twice.

State is one boolean per key, cleared by a processing-time timer, so it stays
bounded by (keys per TTL); a rule hit's is also kept until the watermark has
passed its window's end plus the allowed lateness (``DropRepeatedHitsFn``).
Timeline for a signal with a 600 s TTL::

    T0      e1 arrives: state empty -> remember e1, set timer T0+600, emit
    T0+5    e1 redelivered: state set -> drop, count signals/duplicates_dropped
    T0+600  timer fires: state cleared
    T0+900  e1 replayed again: treated as new. Its window is by now closed, or
            past allowed lateness, so it cannot inflate a feature a rule already
            judged (set the TTL >= allowed lateness to keep that true).

A TTL of 0 passes everything through unchanged without changing the graph, so
it can be switched off with a Dataflow ``--update``.

In batch (``streaming=False``) there is no redelivery clock. Signals are
grouped by the hour of their event time (split ``shards_per_hour`` ways by a
hash of the event id), the earliest copy of each event id is kept, and each
hour comes out as one batch of signals in event-time order for the feature
pre-aggregation (``transforms.features.PreAggregateFn``). The output does not
depend on file order. Copies of one event carry its event time, so they meet
in one group; copies whose event times were changed by enough to straddle an
hour are both kept, as the streaming job keeps copies further apart than its
TTL.
"""

from __future__ import annotations

import operator
import zlib

import apache_beam as beam
import msgspec
import zstandard
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import Signal
from transforms.features import GLOBAL_WINDOWS
from transforms.rules import RuleHit


class DropRepeatedSignalsFn(beam.DoFn):
    """Emit the first signal per event id; drop repeats until the id's TTL timer clears it (0 = off)."""

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, ttl_sec: int):
        self._ttl = ttl_sec
        self._dropped = Metrics.counter("signals", "duplicates_dropped")

    def process(self, element, seen=beam.DoFn.StateParam(SEEN), expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, value = element
        if self._ttl <= 0:
            yield value
            return
        if seen.read():
            self._dropped.inc()
            return
        seen.write(True)
        expiry.set(Timestamp.now() + self._ttl)
        yield value

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


# Event time a hit is remembered past its window's last possible firing (DropRepeatedHitsFn).
HELD_HIT_GRACE_MS = 3_600_000


class DropRepeatedHitsFn(beam.DoFn):
    """A rule hit is remembered until both its clocks have run out: for its decision's own TTL
    (``expires_at - decided_at``, capped) and at least the window's length plus the allowed lateness, on
    the processing-time clock from the first sight; and until the watermark has passed the window's end
    plus the allowed lateness, after which the window can no longer fire, plus ``HELD_HIT_GRACE_MS``: a
    repeat can still be on its way then, held at the action ladder (``LadderFn``'s hold does not hold the
    watermark back), and a backlog can move the watermark minutes in a second.

    Repeats come only from re-fired panes of the hit's own window (the decision id names the window).
    Forgotten while the window could still fire, a later pane would publish the same decision id a second
    time, which consumers drop as a duplicate. The processing-time memory alone covers that while the
    watermark keeps up with the clock; the event-time timer covers a watermark held back (a Pub/Sub
    backlog, or a producer whose clock runs ahead). Timeline, 1 h throttle on a 1 h window W, 1 h of
    lateness, the watermark stalled by a backlog::

        T0      early pane of W: throttle D issued; remembered; timers at T0+2h (clock) and W.end+1h (watermark)
        T0+2h   clock timer: TTL passed, but W can still fire: still remembered
        T0+3h   the watermark reaches W.end: on-time pane, D again -> dropped (before: published twice)
        ...     the watermark passes W.end+1h+1h (the grace): both have run out: forgotten
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)
    TTL_PASSED = ReadModifyWriteStateSpec("ttl_passed", BooleanCoder())
    WINDOW_CLOSED = ReadModifyWriteStateSpec("window_closed", BooleanCoder())
    CLOSED = TimerSpec("closed", TimeDomain.WATERMARK)

    def __init__(self, max_ttl_sec: int, allowed_lateness_sec: int = 0):
        self._max = max_ttl_sec
        self._lateness = allowed_lateness_sec
        self._dropped = Metrics.counter("decisions", "duplicates_dropped")

    def ttl_sec(self, value) -> float:
        d = value.decision
        own = min(self._max, max(0, (d.expires_at_ms - d.decided_at_ms) / 1000))
        return max(own, (d.window_end_ms - d.window_start_ms) / 1000 + self._lateness)

    def process(
        self,
        element,
        seen=beam.DoFn.StateParam(SEEN),
        expiry=beam.DoFn.TimerParam(EXPIRY),
        closed=beam.DoFn.TimerParam(CLOSED),
    ):
        _, hit = element
        if seen.read():
            self._dropped.inc()
            return
        seen.write(True)
        expiry.set(Timestamp.now() + self.ttl_sec(hit))  # never 0: at least the window's length
        forget_ms = hit.decision.window_end_ms + self._lateness * 1000 + HELD_HIT_GRACE_MS
        closed.set(Timestamp(micros=forget_ms * 1000))
        yield hit

    @on_timer(EXPIRY)
    def clock_ran_out(
        self,
        seen=beam.DoFn.StateParam(SEEN),
        ttl_passed=beam.DoFn.StateParam(TTL_PASSED),
        window_closed=beam.DoFn.StateParam(WINDOW_CLOSED),
    ):
        _ran_out(ttl_passed, window_closed, seen)

    @on_timer(CLOSED)
    def window_can_no_longer_fire(
        self,
        seen=beam.DoFn.StateParam(SEEN),
        ttl_passed=beam.DoFn.StateParam(TTL_PASSED),
        window_closed=beam.DoFn.StateParam(WINDOW_CLOSED),
    ):
        _ran_out(window_closed, ttl_passed, seen)


def _ran_out(this, other, seen) -> None:
    """One of a hit's two memories ran out: forget the hit if the other had too, else note this one."""
    if other.read():
        for state in (seen, this, other):
            state.clear()
    else:
        this.write(True)


def _earlier(a: Signal, b: Signal) -> Signal:
    """Of two copies of one event, the earlier (ties broken by content, so file order never matters)."""
    if a.event_time_ms != b.event_time_ms:
        return a if a.event_time_ms < b.event_time_ms else b
    return a if repr(a) <= repr(b) else b


BATCH_GROUP_MS = 3_600_000  # batch de-duplicates within each hour of event time
PACK_SIZE = 1000  # signals per shuffled element in batch (PackByHourFn)
# zstd's level 1. On the 1M benchmark input's first 100,000 signals (benchmarks/README.md, change 25), packs
# came out 6.2 times smaller than their JSON for 0.35 µs a signal to compress and 0.15 to decompress, where
# zlib's fastest level (before) gave 4.4 times for 1.2 and 0.5 µs. Beam depends on zstandard (requirements.txt).
PACK_ZSTD_LEVEL = 1


def group_key(s: Signal, shards_per_hour: int) -> int:
    """The batch de-duplication group: the event-time hour, split by a hash of the event id."""
    hour = s.event_time_ms // BATCH_GROUP_MS
    if shards_per_hour == 1:
        return hour
    return hour * shards_per_hour + zlib.crc32(s.event_id.encode()) % shards_per_hour


# A pack's signals, typed: msgspec decodes each JSON array straight into a Signal (a NamedTuple, checked
# against its annotations), where orjson gave lists for Python to make into Signals one by one.
_PACK_DECODER = msgspec.json.Decoder(list[Signal])


def encode_pack(signals: list[Signal] | list[tuple]) -> bytes:
    """Signals (or their field tuples) to one shuffle value: a JSON array of arrays, compressed.

    zstd's module functions make a compressor per call, so threads of one worker never share one (a
    ``ZstdCompressor`` is not safe for concurrent use); per pack of a thousand signals that costs nothing.
    The frame records its content size, which ``decode_pack`` needs. msgspec writes a NamedTuple as an
    array, as orjson wrote the tuples made from each signal before (change 28).
    """
    return zstandard.compress(msgspec.json.encode(signals), PACK_ZSTD_LEVEL)


def decode_pack(pack: bytes) -> list[Signal]:
    """``encode_pack``'s signals, as ``Signal`` records."""
    return _PACK_DECODER.decode(zstandard.decompress(pack))


class PackByHourFn(beam.DoFn):
    """Batch: signals to (group, ``encode_pack`` of up to ``pack_size`` signals), packed per bundle.

    Every signal crosses the de-duplication shuffle. As one element per signal
    the runner encodes, buffers and decodes each one; packed a thousand to a
    JSON array, those costs are per pack, and msgspec does the array in C.
    JSON of the fields also keeps Beam's pickling out of it. Only for the
    global window: packs flushed at a bundle's end carry the minimum timestamp.

    The shuffle holds every signal at once, in the local runner's memory and
    then in each worker's input queue, so packs are compressed, with zstd: about
    6 times smaller for about 0.5 µs a signal (compress and decompress;
    ``PACK_ZSTD_LEVEL``). When packs were first compressed, with zlib (4.7
    times for about 2.1 µs in that session's measurement), two workers at 1M
    signals peaked at 1,686-1,777 MiB against 2,131-2,318 MiB uncompressed,
    and were no slower (benchmarks/README.md, changes 12 and 25).
    """

    def __init__(self, shards_per_hour: int = 1, pack_size: int = PACK_SIZE):
        self._shards = shards_per_hour
        self._pack_size = pack_size
        self._packs: dict[int, list] = {}

    def start_bundle(self):
        self._packs = {}

    def _add(self, s: Signal) -> tuple[int, bytes] | None:
        """Add a signal to its group's pack; the (group, pack) if that filled it."""
        key = group_key(s, self._shards)
        pack = self._packs.get(key)
        if pack is None:
            pack = self._packs[key] = []
        pack.append(s)
        if len(pack) < self._pack_size:
            return None
        del self._packs[key]
        return key, encode_pack(pack)

    def process(self, s: Signal):
        full = self._add(s)
        if full is not None:
            yield full

    def get_input_batch_type(self, input_element_type):
        # Lists of signals, as a backtest's parse step hands them over (transforms.parse.ParseSignalBatchFn).
        return beam.typehints.List[input_element_type]

    @beam.DoFn.yields_elements
    def process_batch(self, batch):
        add = self._add
        for s in batch:
            full = add(s)
            if full is not None:
                yield full

    def finish_bundle(self):
        packs, self._packs = self._packs, {}
        for key, pack in packs.items():
            yield WindowedValue((key, encode_pack(pack)), MIN_TIMESTAMP, GLOBAL_WINDOWS)


_time_order = operator.attrgetter("event_time_ms", "event_id")


def earliest_copies(packs) -> tuple[list[Signal], int]:
    """Packs of one group to its signals, each event id once (the earliest copy), in event-time order;
    and how many copies were dropped."""
    earliest: dict[str, Signal] = {}
    keep = earliest.setdefault  # one lookup for an id seen first, which nearly every one is
    n = 0
    for pack in packs:
        signals = decode_pack(pack)
        n += len(signals)
        for s in signals:
            kept = keep(s.event_id, s)
            if kept is not s:
                earliest[s.event_id] = _earlier(kept, s)
    return sorted(earliest.values(), key=_time_order), n - len(earliest)


class KeepEarliestFn(beam.DoFn):
    """Batch: (group, packs) to one batch (a list) of the group's signals: ``earliest_copies``.

    Yielding a batch lets ``PreAggregateFn.process_batch`` take an hour's
    signals in one call, in time order, instead of one runner element each.
    A consumer that takes elements gets them one by one; Beam unpacks the list.
    """

    def __init__(self):
        self._dropped = Metrics.counter("signals", "duplicates_dropped")

    def infer_output_type(self, input_type):
        return Signal

    def get_output_batch_type(self, input_element_type):
        return list[Signal]

    @beam.DoFn.yields_batches
    def process(self, element):
        signals, dropped = earliest_copies(element[1])
        if dropped:
            self._dropped.inc(dropped)
        yield signals


class DeduplicateSignals(beam.PTransform):
    """Signals with a repeated ``event_id`` are dropped (see module docstring)."""

    def __init__(self, ttl_sec: int, streaming: bool, shards_per_hour: int = 1, pack_size: int = PACK_SIZE):
        super().__init__()
        if ttl_sec < 0:
            raise ValueError("ttl_sec must be >= 0")
        if shards_per_hour < 1 or pack_size < 1:
            raise ValueError("shards_per_hour and pack_size must be >= 1")
        self._ttl = ttl_sec
        self._streaming = streaming
        self._shards = shards_per_hour
        self._pack_size = pack_size

    def expand(self, signals):
        if self._streaming:
            keyed = signals | "KeyByEventId" >> beam.Map(lambda s: (s.event_id, s)).with_output_types(
                tuple[str, Signal]
            )
            return keyed | "DropRepeats" >> beam.ParDo(DropRepeatedSignalsFn(self._ttl)).with_output_types(Signal)
        return (
            signals
            # Batch only, so the streaming job's graph and coders, and with them Dataflow's --update
            # compatibility, stay as they are.
            | "PackByHour"
            >> beam.ParDo(PackByHourFn(self._shards, self._pack_size)).with_output_types(tuple[int, bytes])
            | "GroupByHour" >> beam.GroupByKey()
            | "KeepEarliest" >> beam.ParDo(KeepEarliestFn()).with_output_types(Signal)
        )


def hit_key(hit: RuleHit) -> str:
    """Same decision, same outcome: an early pane and the on-time pane of one window collapse.
    A change of outcome is kept: it is news. The outcome is the one after the safeguards (the streaming
    job de-duplicates after them): too little evidence at first and enough later, or superseded while a
    stronger action was active and issued once it has expired."""
    return f"{hit.decision.decision_id}/{hit.status}/{hit.decision.mode}"


class DeduplicateHits(beam.PTransform):
    """Rule hits repeated by re-fired panes are dropped, so each decision is published, and
    audited, once per outcome within its TTL."""

    def __init__(self, max_ttl_sec: int, allowed_lateness_sec: int = 0):
        super().__init__()
        self._max = max_ttl_sec
        self._lateness = allowed_lateness_sec

    def expand(self, hits):
        return (
            hits
            | "KeyByDecision" >> beam.Map(lambda h: (hit_key(h), h)).with_output_types(tuple[str, RuleHit])
            | "DropRepeats" >> beam.ParDo(DropRepeatedHitsFn(self._max, self._lateness)).with_output_types(RuleHit)
        )
