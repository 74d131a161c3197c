"""Test kit: build valid signals and feature windows quickly, the same way for every test.

New transforms get tested like the built-in ones: make payloads with
``payload``/``signal``, drive event time with ``TestStream``, and assert on the
returned PCollections.
"""

from __future__ import annotations

import pickle

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from hypothesis import strategies as st

from schemas.avro import millis_to_rfc3339
from transforms.distinct import HyperLogLog
from transforms.features import Accumulator, add_signal, compute_features
from transforms.parse import InvalidSignal, parse_signal

T0_MS = 1_793_577_600_000  # 2026-11-02T00:00:00Z, an hour boundary
HOUR_MS = 3_600_000

_DEFAULTS = {
    "stream": {"track_id": "t1", "artist_id": "a1", "ms_played": 200_000},
    "login": {"success": True},
    "signup": {},
    "playlist_add": {"playlist_id": "pl1", "track_id": "t1", "artist_id": "a1"},
    "payment": {"amount_cents": 999, "currency": "USD", "card_fingerprint": "card1", "success": True},
}
_counter = [0]


def payload_dict(event_type: str = "stream", t_ms: int = T0_MS, **fields) -> dict:
    """A valid signal dict of ``event_type`` at ``t_ms``; ``fields`` override defaults."""
    _counter[0] += 1
    out = {
        "event_id": f"e{_counter[0]}",
        "event_type": event_type,
        "event_time": millis_to_rfc3339(t_ms),
        "user_id": "u1",
    }
    out.update(_DEFAULTS[event_type])
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def payload(event_type: str = "stream", t_ms: int = T0_MS, **fields) -> bytes:
    return orjson.dumps(payload_dict(event_type, t_ms, **fields))


def signal(event_type: str = "stream", t_ms: int = T0_MS, **fields):
    return parse_signal(payload(event_type, t_ms, **fields)).signal


def parse_answer(parse, raw: bytes, **kwargs) -> tuple:
    """What a parser makes of a payload: the signal, each value with its type (True is not 1), and its unknown
    fields; or the rejection's reason and detail. Compares ``parse_signal`` with ``parse_signal_checked``."""
    try:
        parsed = parse(raw, **kwargs)
    except InvalidSignal as err:
        return ("dead letter", err.reason, err.detail)
    return signal_answer(parsed)


def signal_answer(parsed) -> tuple:
    """``parse_answer``'s form of a parsed signal, for a ``ParsedSignal`` got some other way."""
    return ("signal", [(type(v), v) for v in parsed.signal], parsed.unknown_fields)


def features_of(signals, window_sec: int = 3600) -> dict[str, float]:
    acc = Accumulator()
    for s in signals:
        add_signal(acc, s)
    return compute_features(acc, window_sec)


def assert_mergeable(extractor, signals, cut: int) -> None:
    """An extractor's merge must equal one pass: Beam combines partial states in any split. Its merge and its
    copy must leave no part of one state in another that ``add`` would go on changing."""

    def fold(items):
        state = extractor.create()
        for s in items:
            if s.event_type in extractor.event_types:
                state = extractor.add(state, s)
        return state

    whole = extractor.value(fold(signals), 3600)
    right = fold(signals[cut:])
    state = extractor.merge(fold(signals[:cut]), right)
    merged = extractor.value(state, 3600)
    assert merged == whole, f"{extractor.name}: merge gives {merged}, one pass gives {whole}"
    # The merged state must not change when the right half goes on folding (add may update in place).
    before = pickle.dumps(state)  # states are pickled between workers anyway
    for s in signals:
        if s.event_type in extractor.event_types:
            right = extractor.add(right, s)
    assert pickle.dumps(state) == before, f"{extractor.name}: merge kept its second state, which add then changed"
    # A copy (a backtest copies a user's hour into the user's day; a merge adopts a state it lacks) has its
    # original's value and shares nothing with it that add or merge changes, in either direction. Each half is
    # copied before the other half folds on, so the fold adds what the copied state has not seen.
    for seen, unseen in ((signals[:cut], signals[cut:]), (signals[cut:], signals[:cut])):
        for folded_into in ("original", "copy"):
            original = fold(seen)
            copied = extractor.copy(original)
            assert extractor.value(copied, 3600) == extractor.value(original, 3600), (
                f"{extractor.name}: a copy's value differs from its original's"
            )
            other = copied if folded_into == "original" else original
            kept = pickle.dumps(other)
            target = original if folded_into == "original" else copied
            for s in unseen:
                if s.event_type in extractor.event_types:
                    target = extractor.add(target, s)
            extractor.merge(target, fold(unseen))
            assert pickle.dumps(other) == kept, (
                f"{extractor.name}: copy shares a part of its original that add or merge changed "
                f"(folding into the {folded_into})"
            )


def streaming_options() -> PipelineOptions:
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options


def hourly_stream(batches: list[list[bytes]]) -> TestStream:
    """A TestStream delivering one batch of payloads per hour from T0, the watermark following."""
    stream = TestStream(coder=beam.coders.BytesCoder())
    for hour, lines in enumerate(batches):
        at = (T0_MS + hour * HOUR_MS) / 1000
        stream = stream.advance_watermark_to(at).add_elements([TimestampedValue(x, at) for x in lines])
    return stream.advance_watermark_to_infinity()


def default_rule_version(rule_id: str) -> int:
    """A default-pack rule's version, which its decisions' ids hash: tests follow the pack when it is bumped."""
    from pipelines.options import DEFAULT_RULES
    from transforms.rulepack import load_rule_pack

    return {r.id: r.version for r in load_rule_pack(DEFAULT_RULES).rules}[rule_id]


def plain_state(state: list) -> list:
    """An accumulator's state with sketches as their registers, extractors' too (a sketch compares by identity)."""

    def plain(v):
        if v.__class__ is HyperLogLog:
            return bytes(v.registers)
        return {name: plain(x) for name, x in v.items()} if isinstance(v, dict) else v

    return [plain(v) for v in state]


# Signals of every kind, with ids from small pools so that windows see repeats, and with a cap of 2 (the
# property tests' second cap) every distinct-value field can become a sketch.
_one_of = st.sampled_from
rich_signals = st.lists(
    st.builds(
        lambda kind, minute, ids, ms, ok, cents, agent, past_end: signal(
            kind,
            T0_MS + minute * 60_000,
            user_id=ids[0],
            device_id=ids[1],
            ip=ids[2],
            country=ids[3],
            trace_id=ids[4],
            user_agent=agent,
            **{
                "stream": {
                    "track_id": ids[5],
                    "artist_id": ids[6],
                    "ms_played": ms,
                    "track_duration_ms": None if past_end is None else max(1, ms + past_end),
                },
                "login": {"success": ok},
                "signup": {},
                "playlist_add": {"track_id": ids[5], "artist_id": ids[6], "playlist_id": ids[7]},
                "payment": {"success": ok, "amount_cents": cents, "card_fingerprint": ids[7]},
            }[kind],
        ),
        _one_of(["stream", "login", "signup", "playlist_add", "payment"]),
        st.integers(0, 59 * 24),
        st.tuples(
            # Three or more of each, so that with a cap of 2 every distinct-value field can become a sketch.
            _one_of(["u1", "u2", "u3"]),
            _one_of([None, "d1", "d2", "d3"]),
            _one_of([None, "10.0.0.1", "10.0.0.2", "2001:db8::1"]),
            _one_of([None, "SE", "US", "NO"]),
            st.one_of(st.none(), st.integers(0, 30).map(lambda n: f"tr{n:02d}")),
            _one_of(["t1", "t2", "t3"]),
            _one_of(["a1", "a2", "a3"]),
            _one_of(["x1", "x2", "x3"]),
        ),
        st.integers(0, 60_000),
        st.booleans(),
        st.integers(0, 500),
        _one_of([None, "Mozilla/5.0", "python-requests/2.31"]),
        st.none() | st.integers(-5_000, 60_000),  # the track's length past the play, when known
    ),
    max_size=60,
)
