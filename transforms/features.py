"""Windowed per-entity features: the numbers rules are written against.

One signal contributes to every entity it names (its user, device, IP, track
and artist). Per (entity, window) a ``CombineFn`` keeps a compact accumulator
of counters, bounded distinct-value sets and bounded heavy-hitter counters;
``FEATURES`` turns an accumulator into named values. Rules may only reference
names in ``FEATURES``, and the rule loader checks that at start-up.

Bounds, so one attacker cannot make a key's state grow without limit:

* distinct counts are exact up to ``DISTINCT_CAP`` values; past it a field
  becomes a HyperLogLog sketch of 4 KiB, estimated to about 1.6%
  (``transforms.distinct``);
* top-share counters track at most ``TOP_CAP`` keys; a key first seen after
  the counter is full is not counted, so a share is a lower bound (a rule using
  it errs toward not firing, which is the safe side);
* trace ids keep the ``TRACE_SAMPLE`` smallest values, so the sample is the
  same whatever order signals arrive in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import apache_beam as beam
from apache_beam.coders import coder_impl
from apache_beam.coders.coders import FastCoder
from apache_beam.transforms import trigger as beam_trigger
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import ENTITY_TYPES, Signal
from schemas.features import EntityFeatures
from transforms.batch_gc import tune_gc_for_batch
from transforms.distinct import (  # noqa: F401 (distinct_count: re-exported)
    DISTINCT_CAP,
    distinct_count,
    sketch_count,
)
from transforms.extractors import EXTRACTORS
from transforms.fold import (  # noqa: F401 (the fold's names and constants: re-exported)
    CUT_SLACK_MS,
    NEAR_THRESHOLD_MS,
    ROYALTY_THRESHOLD_MS,
    SHORT_PAID_MS,
    SIGNAL_INDEX,
    SMALL_PAYMENT_CENTS,
    TOP_CAP,
    TRACE_SAMPLE,
    Accumulator,
    add_partials,
    add_signal,
    copy_accumulator,
    copy_to_longer_windows,
    decode_accumulator,
    encode_accumulator,
    fold_batch,
    fold_signal,
    merge,
)

_ENTITY_FIELD = {"user": "user_id", "device": "device_id", "ip": "ip", "track": "track_id", "artist": "artist_id"}
assert set(_ENTITY_FIELD) == set(ENTITY_TYPES), "every entity type needs a signal field"
assert DISTINCT_CAP >= 2, "a distinct-value field becomes a set of two at its second value"


@dataclasses.dataclass(frozen=True)
class Feature:
    """A named number derived from an accumulator; rules refer to it by ``name``."""

    name: str
    description: str
    compute: Callable[[Accumulator, int], float]  # (accumulator, window seconds) -> value


# Built-in features: name -> (description, function of the accumulator ``a`` and the window's length in seconds
# ``w``), in the order rules, tables and evidence list them. A new built-in feature is one line here. One
# function per feature, so a rule reading two features computes two (``WindowFeatures``); sizes and ratios
# are written inline rather than through a helper, which would be a second call per feature. A distinct-value
# field is tested in the order its forms are common: nothing, a lone id, a set, a sketch.
_BUILTINS: dict[str, tuple[str, Callable[[Accumulator, int], float]]] = {
    "events": ("All signals in the window.", lambda a, w: float(a.events)),
    "streams": ("Plays.", lambda a, w: float(a.streams)),
    "streams_per_hour": ("Plays per hour of window.", lambda a, w: a.streams * 3600 / w),
    "stream_minutes": ("Minutes played.", lambda a, w: a.stream_ms / 60_000),
    "avg_ms_played": ("Mean play length in ms.", lambda a, w: a.stream_ms / a.streams if a.streams else 0.0),
    "near_threshold_streams": (
        "Plays ending in [30 s, 40 s), just past the royalty threshold.",
        lambda a, w: float(a.near_threshold),
    ),
    "near_threshold_share": (
        "Share of plays ending in [30 s, 40 s).",
        lambda a, w: a.near_threshold / a.streams if a.streams else 0.0,
    ),
    "skip_share": ("Share of plays shorter than 30 s.", lambda a, w: a.short_streams / a.streams if a.streams else 0.0),
    "paid_streams": (
        "Plays of 30 s or more, which count for royalties.",
        lambda a, w: float(a.streams - a.short_streams),
    ),
    "short_paid_share": (
        "Share of paid plays (30 s or more) ending before 60 s; skips do not dilute it.",
        lambda a, w: a.short_paid / (a.streams - a.short_streams) if a.streams > a.short_streams else 0.0,
    ),
    "cut_paid_share": (
        "Share of paid plays stopped more than 20 s before the end of a track of known length (from the catalogue).",
        lambda a, w: a.cut_paid / (a.streams - a.short_streams) if a.streams > a.short_streams else 0.0,
    ),
    "near_threshold_cut_share": (
        "Of the plays ending in [30 s, 40 s), the share that stopped more than 20 s before a known track end.",
        lambda a, w: a.cut_near / a.near_threshold if a.near_threshold else 0.0,
    ),
    "distinct_tracks": (
        "Distinct tracks played or added to playlists.",
        lambda a, w: (
            0.0
            if (v := a.tracks) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "distinct_artists": (
        "Distinct artists played.",
        lambda a, w: (
            0.0
            if (v := a.artists) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "top_artist_share": (
        "Share of plays going to the most-played artist.",
        lambda a, w: max(a.stream_artists.values()) / a.streams if a.stream_artists and a.streams else 0.0,
    ),
    "top_track_share": (
        "Share of plays going to the most-played track.",
        lambda a, w: max(a.stream_tracks.values()) / a.streams if a.stream_tracks and a.streams else 0.0,
    ),
    "logins": ("Login attempts.", lambda a, w: float(a.logins)),
    "failed_logins": ("Failed login attempts.", lambda a, w: float(a.failed_logins)),
    "failed_login_ratio": (
        "Failed share of login attempts.",
        lambda a, w: a.failed_logins / a.logins if a.logins else 0.0,
    ),
    "signups": ("Account sign-ups.", lambda a, w: float(a.signups)),
    "playlist_adds": ("Tracks added to playlists.", lambda a, w: float(a.playlist_adds)),
    "distinct_playlists": (
        "Distinct playlists added to.",
        lambda a, w: (
            0.0
            if (v := a.playlists) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "playlist_top_artist_share": (
        "Share of playlist adds going to the most-added artist.",
        lambda a, w: (
            max(a.playlist_artists.values()) / a.playlist_adds if a.playlist_artists and a.playlist_adds else 0.0
        ),
    ),
    "payments": ("Payment attempts.", lambda a, w: float(a.payments)),
    "failed_payments": ("Declined payment attempts.", lambda a, w: float(a.failed_payments)),
    "failed_payment_ratio": (
        "Declined share of payment attempts.",
        lambda a, w: a.failed_payments / a.payments if a.payments else 0.0,
    ),
    "small_payment_share": (
        "Share of payments of at most 2.00.",
        lambda a, w: a.small_payments / a.payments if a.payments else 0.0,
    ),
    "distinct_cards": (
        "Distinct card fingerprints used.",
        lambda a, w: (
            0.0
            if (v := a.cards) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "distinct_users": (
        "Distinct user ids seen.",
        lambda a, w: (
            0.0
            if (v := a.users) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "distinct_devices": (
        "Distinct device ids seen.",
        lambda a, w: (
            0.0
            if (v := a.devices) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "distinct_ips": (
        "Distinct IP addresses seen.",
        lambda a, w: (
            0.0
            if (v := a.ips) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "distinct_countries": (
        "Distinct countries seen.",
        lambda a, w: (
            0.0
            if (v := a.countries) is None
            else 1.0
            if v.__class__ is str
            else float(len(v) if v.__class__ is set else sketch_count(v, DISTINCT_CAP))
        ),
    ),
    "active_hours": ("Distinct hours of the day (UTC) with any signal.", lambda a, w: float(a.hours.bit_count())),
    "span_minutes": (
        "Minutes from the first to the last signal.",
        lambda a, w: max(0, a.last_ms - a.first_ms) / 60_000,
    ),
}


def _features() -> dict[str, Feature]:
    return {name: Feature(name, description, compute) for name, (description, compute) in _BUILTINS.items()}


def _extractor_feature(extractor) -> Feature:
    def compute(acc: Accumulator, window_sec: int) -> float:
        state = acc.extra.get(extractor.name) if acc.extra else None
        return float(extractor.value(extractor.create() if state is None else state, window_sec))

    return Feature(extractor.name, extractor.description, compute)


def _all_features() -> dict[str, Feature]:
    features = _features()
    for name, extractor in EXTRACTORS.items():
        if name in features:
            raise ValueError(f"extractor {name!r} clashes with a built-in feature")
        features[name] = _extractor_feature(extractor)
    return features


FEATURES: dict[str, Feature] = _all_features()


_COMPUTE = {name: f.compute for name, f in FEATURES.items()}
_COMPUTE_ITEMS = tuple(_COMPUTE.items())
_EXTRACTOR_ITEMS = tuple((name, compute) for name, compute in _COMPUTE_ITEMS if name in EXTRACTORS)


def compute_features(acc: Accumulator, window_sec: int) -> dict[str, float]:
    """Every registered feature's value for one accumulator: built-ins, then extractors."""
    return {name: compute(acc, window_sec) for name, compute in _COMPUTE_ITEMS}


class WindowFeatures(Mapping):
    """An entity window's features, each computed when it is first read (batch windows, streaming panes).

    A backtest's rules read a handful of the 30 built-in features, and most
    windows fail their first test on one of them; computing all of them
    for every window was a fifth of our code's instructions a signal
    (benchmarks/README.md, change 20). This mapping holds the accumulator and
    computes a built-in feature when a rule reads it, and all features at
    once (``compute_features``, in ``FEATURES`` order) when anything lists
    them: a hit's features JSON, ``dict()``, a coder. It equals, and pickles
    as, the dict ``compute_features`` returns. An extractor's feature is
    computed at once for every window that holds its state (a window that
    saw the signal types it reads), as the streaming job computes it: an
    extractor is code from outside this module, and a backtest should fail
    on one that raises on some state whether or not a rule reads it. The
    accumulator must not change after it is wrapped: batch windows are
    complete when they are, and a streaming pane's accumulator is made
    afresh for each pane (``ToEntityFeaturesFn``).
    """

    __slots__ = ("_acc", "_window_sec", "_values", "_complete")

    def __init__(self, acc: Accumulator, window_sec: int):
        self._acc = acc
        self._window_sec = window_sec
        extra = acc.extra
        self._values: dict[str, float] = (
            {}
            if extra is None
            else {name: compute(acc, window_sec) for name, compute in _EXTRACTOR_ITEMS if name in extra}
        )
        self._complete = False  # True once _values holds every feature, in FEATURES order

    def __getitem__(self, name: str) -> float:
        value = self._values.get(name)
        if value is None:
            # KeyError for a name that is not a feature, as a dict raises it (simpleeval relies on that).
            value = self._values[name] = _COMPUTE[name](self._acc, self._window_sec)
        return value

    def _all(self) -> dict[str, float]:
        # Not "every feature read": listing follows FEATURES' order, whatever order rules read them in. What
        # was read already is kept, not computed again: a rule hit's reason and features JSON list them all after
        # its rules read a few.
        if not self._complete:
            acc, window_sec, known = self._acc, self._window_sec, self._values
            self._values = {
                name: known[name] if name in known else compute(acc, window_sec) for name, compute in _COMPUTE_ITEMS
            }
            self._complete = True
        return self._values

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(_COMPUTE)

    def __contains__(self, name) -> bool:
        return name in _COMPUTE

    def __repr__(self) -> str:
        return f"WindowFeatures({self._all()!r})"

    def __reduce__(self):
        return dict, (self._all(),)


class EntityFeaturesFn(beam.CombineFn):
    """Folds an entity's signals in one window into an ``Accumulator``."""

    def create_accumulator(self):
        return Accumulator()

    def add_input(self, acc, signal):
        return add_signal(acc, signal)

    def merge_accumulators(self, accs):
        return merge(accs)

    def extract_output(self, acc):
        return acc


def entity_keys(signal: Signal, entity_types: tuple[str, ...]):
    """(entity_type, entity_id) keys a signal contributes to."""
    for entity_type in entity_types:
        entity_id = getattr(signal, _ENTITY_FIELD[entity_type])
        if entity_id is not None:
            yield (entity_type, entity_id), signal


HOT_KEY_FANOUT = 16
_HOT_ENTITY_TYPES = frozenset({"track", "artist", "ip"})


def hot_key_fanout(key) -> int:
    """Entity types whose single keys can carry a large share of traffic get combiner fan-out."""
    return HOT_KEY_FANOUT if key[0] in _HOT_ENTITY_TYPES else 1


# Partial accumulators a PreAggregateFn holds before it hands them on: bounds a
# worker's memory (an accumulator is a few hundred bytes to a few KB) whatever
# the bundle size, while one flush still covers many signals per key.
PRE_AGGREGATE_MAX_KEYS = 20_000


class PreAggregateFn(beam.DoFn):
    """Batch only: folds signals into partial accumulators per (window size, entity, window start) in memory.

    The combiner lifting Beam does for ``CombinePerKey`` happens after a
    per-key fan-out, which costs the runner one element per (signal, entity,
    window size): about five per signal with the default pack. Folding here,
    in one call per signal, leaves the runner one element per key per flush
    (a backtest of 70,970 signals went from 15.4 s to 13.3 s, one run each;
    benchmarks/README.md). Partials are merged by ``MergeAccumulatorsFn``
    after the shuffle, so the features are the same as folding every signal
    in one place (``merge`` is the operation the lifted combiner uses too),
    up to the caps: a top-share counter that fills in one partial can miss
    plays another partial would have counted, so a share from merged
    partials is a lower bound, as the module docstring says. Streaming
    combines partials the same way.

    Batch de-duplication hands over each event-time hour as one batch, in
    time order (``transforms.dedupe.KeepEarliestFn``), and ``process_batch``
    folds it in one call; other inputs come one element at a time. Time order
    is what keeps partials few: a window's signals arrive together. With
    ``whole_batch_ms`` (the batch is all of that span's signals), windows that
    tile the span are complete at the batch's end and go out whole on the
    ``WHOLE`` output, past the merging shuffle; with the default pack that is
    the 10-minute and 1-hour windows, about four in five at 1M signals.

    Only for keyed windows in the global window: partials flushed mid-bundle
    carry the current signal's timestamp and those flushed at the bundle's
    end their window's end, which is harmless only because nothing downstream
    windows by event time.
    """

    WHOLE = "whole"  # output tag: windows a batch holds whole, as (key, accumulator) or EntityFeatures

    def __init__(
        self,
        plan: dict[int, tuple[str, ...]],
        max_keys: int = PRE_AGGREGATE_MAX_KEYS,
        whole_batch_ms: int = 0,
        whole_as_features: bool = False,
    ):
        # whole_as_features: whole windows go out as the EntityFeatures records SizedToEntityFeaturesFn makes of
        # (key, accumulator) pairs (_keyed_window_record; ComputeFeatures' batch branch), which saves the runner a
        # step, and an element handed on, per whole window: about four windows in five (benchmarks/README.md,
        # change 41).
        self._whole_as_features = whole_as_features
        # (size_sec, size_ms, ((entity_type, signal field), ...), tiles) per window size, where tiles
        # says the size tiles a whole batch, so each batch holds all of its windows' signals.
        self._plan = tuple(
            (
                size,
                size * 1000,
                tuple((t, _ENTITY_FIELD[t]) for t in types),
                bool(whole_batch_ms) and size * 1000 <= whole_batch_ms and whole_batch_ms % (size * 1000) == 0,
            )
            for size, types in sorted(plan.items())
        )
        self._max_keys = max_keys
        self._any_whole = any(tiles for *_, tiles in self._plan)
        # A longer window's partial from one batch holds the same signals as the batch-long window of the
        # same entity (an hour of a user's day is that user's hour), so when the plan has both, the partial
        # is a copy of the whole window instead of a second fold of every signal: with the default pack,
        # 14% of the fold's instructions on the 1M benchmark input's first hour and 2% to 6% on the 20k
        # input, whose users have fewer signals an hour (benchmarks/README.md). {entity type: longer sizes}.
        span_sec = whole_batch_ms // 1000 if whole_batch_ms % 1000 == 0 else 0
        self._span_sec = span_sec
        self._copied: dict[str, tuple[tuple[int, int], ...]] = {}
        for size, types in sorted(plan.items()):
            if span_sec and size > span_sec and size % span_sec == 0:
                for t in set(types) & set(plan.get(span_sec, ())):
                    self._copied[t] = (*self._copied.get(t, ()), (size, size * 1000))
        # What process_batch folds when it builds whole windows: the plan less the copied windows.
        batch_plan = tuple(
            (size, size_ms, tuple((t, f) for t, f in fields if (size, size_ms) not in self._copied.get(t, ())), tiles)
            for size, size_ms, fields, tiles in self._plan
        )
        # process_batch's two kinds of window: those a batch holds whole, as (size_sec, size_ms, ((entity type,
        # the signal field's index), ...)), and the rest, which it folds as partials (entries as self._plan's).
        self._whole_fields = tuple(
            (size_sec, size_ms, tuple((entity_type, SIGNAL_INDEX[field]) for entity_type, field in fields))
            for size_sec, size_ms, fields, tiles in batch_plan
            if tiles and fields
        )
        self._batch_rest = tuple(entry for entry in batch_plan if not entry[3] and entry[2])
        self._partials: dict = {}

    def setup(self):
        tune_gc_for_batch()  # a batch worker's collector runs far less often (transforms.batch_gc)

    def start_bundle(self):
        self._partials = {}

    def process(self, signal: Signal):
        self._fold(signal)
        if len(self._partials) >= self._max_keys:
            yield from self._flush()

    def get_input_batch_type(self, input_element_type):
        # Lists of whatever the input holds: batch de-duplication hands over an hour's signals as one
        # list (transforms.dedupe.KeepEarliestFn); any other input arrives one element at a time.
        return beam.typehints.List[input_element_type]

    @beam.DoFn.yields_elements
    def process_batch(self, batch):
        # With whole_batch_ms, the batch is all the signals of its span (an event-time hour): windows of
        # the sizes that tile it are complete at its end, so they go out whole, past the merging shuffle.
        if not self._any_whole:
            for signal in batch:
                self._fold(signal)
                if len(self._partials) >= self._max_keys:
                    yield from self._flush()
            return
        # _fold's work, written out for a batch (transforms.fold.fold_batch, compiled with the fold): whole
        # windows are looked up by window start and then by entity id, in a table per (size, entity type),
        # instead of by a tuple built and hashed per signal and window; the tuples are built once per window
        # at the end. The keying was a tenth of a 1M backtest's samples in its workers' bundles
        # (benchmarks/README.md, change 29).
        tables = tuple(
            (size_sec, size_ms, tuple((entity_type, index, {}) for entity_type, index in fields))
            for size_sec, size_ms, fields in self._whole_fields
        )
        done, n = 0, len(batch)
        while done < n:
            done = fold_batch(batch, done, tables, self._batch_rest, self._partials, self._max_keys)
            if len(self._partials) >= self._max_keys:
                yield from self._flush()
        whole = {
            (size_sec, entity_type, entity_id, start): acc
            for size_sec, _, fields in tables
            for entity_type, _, by_start in fields
            for start, by_id in by_start.items()
            for entity_id, acc in by_id.items()
        }
        if not whole:
            return
        if self._copied:
            self._copy_to_longer_windows(whole, batch)
        tag = self.WHOLE
        if self._whole_as_features:
            for key, acc in whole.items():
                yield beam.pvalue.TaggedOutput(tag, _keyed_window_record(key, acc))
        else:
            for item in whole.items():
                yield beam.pvalue.TaggedOutput(tag, item)
        if len(self._partials) >= self._max_keys:
            yield from self._flush()

    def _copy_to_longer_windows(self, whole: dict, batch) -> None:
        """Add each batch-long whole window to the partials of the longer windows it is part of (copies:
        the whole window goes on to features, and the partial is merged into by the lifted combiner).

        Merging a window counts what folding its signals counts, except where a top-share counter has
        filled (TOP_CAP keys): it may have dropped plays of a key the longer window already holds. Those
        entities' signals are folded into the longer windows instead, so the result is the same either way.
        """
        partials, copied = self._partials, self._copied
        refold = copy_to_longer_windows(whole, partials, self._span_sec, copied)
        if not refold:
            return
        fields = tuple((entity_type, _ENTITY_FIELD[entity_type], sizes) for entity_type, sizes in copied.items())
        for signal in batch:
            t = signal.event_time_ms
            accs = []
            for entity_type, field, sizes in fields:
                entity_id = getattr(signal, field)
                if entity_id is None or (entity_type, entity_id) not in refold:
                    continue
                for longer_sec, longer_ms in sizes:
                    key = (longer_sec, entity_type, entity_id, t - t % longer_ms)
                    acc = partials.get(key)
                    if acc is None:
                        acc = partials[key] = Accumulator()
                    accs.append(acc)
            if accs:
                fold_signal(accs, signal)

    def _fold(self, signal: Signal) -> None:
        """Fold a signal into the partial accumulators of its windows (``process_batch`` does this for whole
        batches, whose windows it can hold whole)."""
        accs: list = []
        add_partials(signal, self._plan, self._partials, accs)
        fold_signal(accs, signal)

    def finish_bundle(self):
        for key, acc in self._flush():
            yield WindowedValue((key, acc), _window_end(key), GLOBAL_WINDOWS)

    def _flush(self):
        partials, self._partials = self._partials, {}
        return partials.items()


# Beam's GlobalWindow() recomputes its end from a proto on every construction: build it once.
GLOBAL_WINDOWS = (GlobalWindow(),)


def _window_end(key) -> Timestamp:
    size_sec, _, _, start_ms = key
    return Timestamp(micros=(start_ms + size_sec * 1000) * 1000)


class AccumulatorCoder(FastCoder):
    """Batch partials across the merging shuffle, as msgpack (``transforms.fold.encode_accumulator``).

    Beam's default for an accumulator pickles it, and pickling named the class in every one: the pickler checks
    the class and the unpickler imports and looks it up again, per partial. At 1M signals two workers shuffle
    about 90,000 user-day partials; pickling them took 4.0% of the workers' bundle samples in a profile, and
    this coder encodes one in about 40% of the time and decodes it in about half (benchmarks/README.md,
    change 40). Extractor states are encoded by Beam's ``FastPrimitivesCoder``, as before: they can be any
    Python value. Only ``MergeAccumulatorsFn`` uses this coder; a streaming job's state keeps the pickled form.
    """

    def _create_impl(self):
        extra = beam.coders.FastPrimitivesCoder().get_impl()
        extra_encode, extra_decode = extra.encode, extra.decode
        return coder_impl.CallbackCoderImpl(
            lambda acc: encode_accumulator(acc, extra_encode), lambda data: decode_accumulator(data, extra_decode)
        )

    def is_deterministic(self) -> bool:
        return False  # a set's values, and so its bytes, come in no fixed order: never a key

    def to_type_hint(self):
        return Accumulator


class MergeAccumulatorsFn(beam.CombineFn):
    """Merges the partial accumulators ``PreAggregateFn`` emits."""

    def get_accumulator_coder(self):
        return AccumulatorCoder()

    def create_accumulator(self):
        return Accumulator()

    def add_input(self, acc, partial):
        # The first partial is taken as it is: merging it into an empty
        # accumulator would copy every set for nothing.
        return partial if acc.events == 0 else merge([acc, partial])

    def merge_accumulators(self, accs):
        return merge(accs)

    def extract_output(self, acc):
        return acc


class SizedToEntityFeaturesFn(beam.DoFn):
    """``((window_sec, entity_type, entity_id, start_ms), acc)`` to ``EntityFeatures`` (batch).

    Features are ``WindowFeatures``, computed as the rules read them: a batch
    window is complete when it gets here, and the backtest writes no feature
    rows, so most windows need only the one feature their rules test first.
    """

    def process(self, element):
        yield _keyed_window_record(*element)


def _keyed_window_record(key, acc) -> EntityFeatures:
    """A batch window's record, from its ``(window_sec, entity_type, entity_id, start_ms)`` key and accumulator:
    ``SizedToEntityFeaturesFn`` makes it after the merging shuffle, ``PreAggregateFn`` for windows it holds whole."""
    window_sec, entity_type, entity_id, start_ms = key
    return _entity_features(entity_type, entity_id, window_sec, start_ms, acc, WindowFeatures(acc, window_sec))


def _entity_features(
    entity_type: str, entity_id: str, window_sec: int, start_ms: int, acc, features: Mapping[str, float]
) -> EntityFeatures:
    # Positionally, in EntityFeatures' field order: keywords cost a dict per window.
    return _new_entity_features(
        (
            entity_type,
            entity_id,
            window_sec,
            start_ms,
            start_ms + window_sec * 1000,
            features,
            list(acc.trace_ids or ()),
            acc.last_ms,
        )
    )


# tuple.__new__ straight from C, as parsing builds signals (transforms/accept.py): EntityFeatures._make is a Python
# function around it, a frame per window. It does not check the length: _entity_features passes every field.
_new_entity_features = functools.partial(tuple.__new__, EntityFeatures)
if EntityFeatures._fields != (
    "entity_type",
    "entity_id",
    "window_sec",
    "window_start_ms",
    "window_end_ms",
    "features",
    "trace_ids",
    "last_event_ms",
):
    raise ImportError(f"EntityFeatures' fields changed: update _entity_features ({EntityFeatures._fields})")


class ToEntityFeaturesFn(beam.DoFn):
    """Accumulator plus window to the ``EntityFeatures`` record rules read (streaming).

    Features are ``WindowFeatures``, computed as they are read, as in batch: a pane's rules read a few of
    them, and computing all of them first made a pane cost about twice as much (benchmarks/README.md,
    change 22). That holds because no runner changes a pane's accumulator after the pane fired: each pane's
    is made afresh (Beam's local runners merge into new accumulators; on Dataflow the SDK harness decodes
    them from the GroupByKey for every pane). A test records every pane's accumulator as it fires, with
    Beam's hot-key fan-out and without, and checks that none has changed when the run ends; a step that kept
    an accumulator across firings would break this. With ``every_feature`` (the job writes every pane as a
    feature row, ``--features_table``) they are all computed at once, which costs less than reading a few
    and then listing the rest.
    """

    def __init__(self, window_sec: int, every_feature: bool = False):
        self._window_sec = window_sec
        self._every_feature = every_feature

    def process(self, element, window=beam.DoFn.WindowParam):
        (entity_type, entity_id), acc = element
        start_ms = int(window.start.micros // 1000)
        window_sec = self._window_sec
        features = compute_features(acc, window_sec) if self._every_feature else WindowFeatures(acc, window_sec)
        yield _entity_features(entity_type, entity_id, window_sec, start_ms, acc, features)


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """How windows close. Batch uses the defaults; streaming adds early firings.

    Attributes:
      allowed_lateness_sec: how long after a window's end late signals still
        update it (each update re-fires the window's rules).
      early_firing_sec: in streaming, fire a speculative pane this often
        (processing time) before the window ends, so a decision need not wait
        an hour for the window to close. 0 turns early firings off.
    """

    allowed_lateness_sec: int = 0
    early_firing_sec: int = 0
    # Batch only: compute the same fixed windows by keying on each signal's
    # window start in the global window, and fold signals into partial
    # accumulators before the shuffle (PreAggregateFn). Beam's windowed
    # GroupByKey runs its general trigger machinery per key even in batch; this
    # avoids it and the per-key fan-out, and gives identical features when
    # nothing is late (tests/transforms/test_features.py).
    keyed_windows: bool = False
    # Batch only: each batch of signals reaching ComputeFeatures is all the signals of one span of this
    # many milliseconds of event time (transforms.dedupe: an hour, when not sharded). Windows that tile
    # the span are then complete in one batch and skip the merging shuffle. 0: no such promise.
    whole_batch_ms: int = 0
    # Streaming only: compute every feature of a pane when it fires (its features are written as a row),
    # rather than each as a rule reads it.
    every_feature: bool = False


class ComputeFeatures(beam.PTransform):
    """Signals to ``EntityFeatures`` for every (window size, entity type) the rules need.

    Returns a tuple of PCollections of ``EntityFeatures``, the branches the
    windows come out of: one with Beam windows, as in streaming (every size,
    flattened), two with keyed windows, as in batch (windows merged after the
    shuffle, and windows a batch held whole). Apply per-window work to each
    branch (``transforms.rules.ApplyRules`` takes the tuple) and flatten only
    what comes out small: the local runner materialises every input of a
    ``Flatten``, even one nothing reads. At 1M signals, a Flatten of the
    branches' features that nothing read peaked at 4,016 and 4,340 MiB
    against 2,159 and 2,285 MiB without it (benchmarks/README.md).
    ``beam.Flatten()`` makes one PCollection for callers that need it;
    Dataflow fuses that at no cost.

    Args:
      plan: maps window size in seconds to the entity types rules read at that
        size; one fixed-window branch per size, labelled ``Window{N}s`` so step
        names stay stable across rule changes that keep the same sizes.
      config: lateness and trigger settings.
    """

    def __init__(self, plan: dict[int, tuple[str, ...]], config: WindowConfig = WindowConfig()):
        super().__init__()
        if not plan:
            raise ValueError("ComputeFeatures needs at least one window size")
        self._plan = {size: tuple(sorted(types)) for size, types in sorted(plan.items())}
        self._config = config

    def _window_into(self, size: int) -> beam.WindowInto:
        """Fixed windows that fire at the watermark, early (if configured) and once per late signal.

        Panes accumulate, so every firing carries the whole window so far and
        rules always judge complete counts; decision ids are per window, so a
        re-fired window yields the same id and downstream de-duplication drops it.
        """
        cfg = self._config
        if cfg.early_firing_sec <= 0 and cfg.allowed_lateness_sec <= 0:
            # Same firing as AfterWatermark(), but Beam's default trigger keeps the
            # fast batch path (an explicit trigger costs ~3x in GroupByKey).
            return beam.WindowInto(beam_window.FixedWindows(size))
        early = beam_trigger.AfterProcessingTime(cfg.early_firing_sec) if cfg.early_firing_sec > 0 else None
        late = beam_trigger.AfterCount(1) if cfg.allowed_lateness_sec > 0 else None
        return beam.WindowInto(
            beam_window.FixedWindows(size),
            trigger=beam_trigger.AfterWatermark(early=early, late=late),
            accumulation_mode=beam_trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=cfg.allowed_lateness_sec,
        )

    def expand(self, signals):
        if self._config.keyed_windows:
            # Batch: every size in one pass per signal, merged after one shuffle.
            pre = signals | "PreAggregate" >> beam.ParDo(
                PreAggregateFn(self._plan, whole_batch_ms=self._config.whole_batch_ms, whole_as_features=True)
            ).with_outputs(PreAggregateFn.WHOLE, main="partials")
            merged = pre.partials | "Aggregate" >> beam.CombinePerKey(MergeAccumulatorsFn())
            # No Flatten here: whole windows stay fused with the fold that made them (see the docstring).
            return (
                merged | "ToFeatures" >> beam.ParDo(SizedToEntityFeaturesFn()).with_output_types(EntityFeatures),
                pre[PreAggregateFn.WHOLE],
            )
        branches = []
        for size, entity_types in self._plan.items():
            label = f"Window{size}s"
            keyed = (
                signals
                | f"{label}/Window" >> self._window_into(size)
                | f"{label}/KeyByEntity" >> beam.FlatMap(entity_keys, entity_types)
            )
            # A viral track, a big artist or a carrier NAT IP is one hot key: spread its pre-combining over
            # HOT_KEY_FANOUT workers (docs/scaling.md). Only without allowed lateness: Beam 2.77's fan-out
            # re-windows the hot keys with WindowInto(pcoll.windowing), which keeps the trigger but not the
            # allowed lateness (apache_beam/transforms/core.py, CombinePerKey's hot-key expansion and
            # WindowInto.__init__), so every late signal of an ip, track or artist was dropped there while
            # user and device windows counted it. Combiner lifting still pre-combines each bundle.
            combine = beam.CombinePerKey(EntityFeaturesFn())
            if self._config.allowed_lateness_sec <= 0:
                combine = combine.with_hot_key_fanout(hot_key_fanout)
            branches.append(
                keyed
                | f"{label}/Aggregate" >> combine
                | f"{label}/ToFeatures"
                >> beam.ParDo(ToEntityFeaturesFn(size, self._config.every_feature)).with_output_types(EntityFeatures)
                # Each record carries its own window bounds, so branches of different
                # sizes can be merged in the global window.
                | f"{label}/Rewindow" >> beam.WindowInto(beam_window.GlobalWindows())
            )
        if len(branches) == 1:
            return (branches[0],)
        return (branches | "AllWindows" >> beam.Flatten(),)
