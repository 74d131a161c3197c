"""Test kit: build valid signals and feature windows quickly, the same way for every test.

New transforms get tested like the built-in ones: make payloads with
``payload``/``signal``, drive event time with ``TestStream``, and assert on the
returned PCollections.
"""

from __future__ import annotations

import orjson

from schemas.avro import millis_to_rfc3339
from transforms.features import Accumulator, add_signal, compute_features
from transforms.parse import parse_signal

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


def features_of(signals, window_sec: int = 3600) -> dict[str, float]:
    acc = Accumulator()
    for s in signals:
        add_signal(acc, s)
    return compute_features(acc, window_sec)
