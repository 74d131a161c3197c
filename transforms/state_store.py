"""Keep each entity's active mitigations in Bigtable, so an enforcement service can ask "what applies now?".

The decisions topic tells subscribers what changed; a service that starts,
restarts or missed messages also needs the current state, by entity, in one
read. The layout (row key, family, qualifier, value, cell timestamp) lives in
``schemas.mitigation_state`` and is shared with the API that reads it.

Only active mitigations are written:

* enforce-mode decisions: a shadow decision is what a rule *would* have done and
  never becomes state anyone acts on;
* not reversals: a reversal (``pipelines.reverse``) carries ``mode=enforce``
  and the original's expiry, so writing it would add an active-looking column
  instead of lifting one. The API (or ``pipelines.reverse``) lifts the original
  with ``lift_row``: its column deleted and a tombstone written, so writing the
  same decision again here never brings it back.

Retries are idempotent: the cell timestamp is the decision's expiry (never the
server's clock) and the qualifier is the deterministic decision id, so a
retried bundle overwrites the same cell instead of adding a version. (In
streaming, decisions are stamped with the wall clock; if the same decision id
is ever issued again with a later expiry, it adds a newer version of the
column, which is the one readers take.) Timeline for one user (7-day TTL)::

    T0      decision d1 (exclude_streams, enforce): column m:d1, timestamp T0+7d
    T0+1s   the bundle is retried after a failed flush: the same cell is overwritten
    T0+1h   shadow decision d2 (a new rule under evaluation): not written
    T0+2d   an operator reverses d1: the reversal decision is not written; the
            API deletes column m:d1 and writes the tombstone m:reversed:d1
    T0+3d   the job is replayed and writes m:d1 again: readers skip it (tombstone)
    T0+7d   (had d1 not been reversed) readers stop serving it (timestamp <=
            now); the 1 s max-age GC rule lets Bigtable collect it later

Writing uses Beam's pure-Python ``WriteToBigTable`` (``use_cross_language=False``):
the cross-language write needs Beam's Java expansion service at graph
construction. A failed flush fails the bundle, which the runner retries; the
idempotent cells make that safe.
"""

from __future__ import annotations

import apache_beam as beam
import orjson
from apache_beam.io.gcp.bigtableio import WriteToBigTable
from apache_beam.metrics import Metrics
from google.cloud.bigtable.row import DirectRow

from schemas import Decision
from schemas.mitigation_state import (
    FAMILY,
    REVERSAL_MEMORY,
    TABLE_ID,
    cell_timestamp,
    cell_value,
    row_key,
    tombstone_qualifier,
)

METRICS_NAMESPACE = "state_store"


def is_active_mitigation(decision: Decision) -> bool:
    """True for decisions that become state an enforcement service acts on (see the module docstring)."""
    return decision.mode == "enforce" and not decision.reverses_decision_id


def to_direct_row(decision: Decision) -> DirectRow:
    """One mutation: set the decision's column in its entity's row, stamped with its expiry.

    It does not filter: callers decide which decisions are state (``is_active_mitigation``).
    """
    row = DirectRow(row_key(decision.entity_type, decision.entity_id))
    row.set_cell(
        FAMILY,
        decision.decision_id.encode("utf-8"),
        cell_value(decision),
        timestamp=cell_timestamp(decision.expires_at_ms),
    )
    return row


def lift_row(entity_type: str, entity_id: str, decision_id: str, now_ms: int) -> DirectRow:
    """The mutation that lifts one mitigation (a reversal), atomic in its row: delete its column, every version,
    and write its tombstone, so the decision written again is not served (``schemas.mitigation_state``)."""
    row = DirectRow(row_key(entity_type, entity_id))
    row.delete_cell(FAMILY, decision_id.encode("utf-8"))
    remember_until_ms = now_ms + int(REVERSAL_MEMORY.total_seconds() * 1000)
    tombstone = orjson.dumps({"decision_id": decision_id, "reversed_at_ms": now_ms})
    row.set_cell(FAMILY, tombstone_qualifier(decision_id), tombstone, timestamp=cell_timestamp(remember_until_ms))
    return row


def _counted_row(decision: Decision) -> DirectRow:
    # Fused with the write, so on Dataflow the committed count only includes bundles whose flush succeeded.
    Metrics.counter(METRICS_NAMESPACE, "rows_written").inc()
    return to_direct_row(decision)


class ActiveMitigationRows(beam.PTransform):
    """Decisions to ``DirectRow`` mutations for the active ones only: the write without the I/O, so it is testable."""

    def expand(self, decisions):
        return (
            decisions
            | "ActiveOnly" >> beam.Filter(is_active_mitigation)
            | "ToDirectRow" >> beam.Map(_counted_row).with_output_types(DirectRow)
        )


class WriteActiveMitigations(beam.PTransform):
    """Decisions in, one Bigtable cell per active mitigation out (see the module docstring).

    Args:
      project_id: GCP project of the Bigtable instance.
      instance_id: Bigtable instance; it must exist (``pipelines.provision`` creates only the table).
      table_id: table created by ``pipelines.provision --bigtable_instance``.
    """

    def __init__(self, project_id: str, instance_id: str, table_id: str = TABLE_ID):
        super().__init__()
        self._project_id, self._instance_id, self._table_id = project_id, instance_id, table_id

    def expand(self, decisions):
        return (
            decisions
            | "ToRows" >> ActiveMitigationRows()
            | "Write" >> WriteToBigTable(self._project_id, self._instance_id, self._table_id, use_cross_language=False)
        )
