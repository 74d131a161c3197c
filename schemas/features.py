"""In-pipeline record for one entity's features in one window (never stored as a table)."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence

import apache_beam as beam


class EntityFeatures(typing.NamedTuple):
    """Every feature of one entity in one window, ready for the rules."""

    entity_type: str
    entity_id: str
    window_sec: int
    window_start_ms: int
    window_end_ms: int
    features: Mapping[str, float]
    trace_ids: Sequence[str]
    last_event_ms: int


beam.coders.registry.register_coder(EntityFeatures, beam.coders.RowCoder)
