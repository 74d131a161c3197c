"""Read and lift active mitigations in Bigtable, in the layout of ``schemas/mitigation_state.py``.

The streaming job writes one column per enforce decision, with the decision's
expiry as the cell timestamp. Garbage collection removes expired cells only
eventually, so every read here filters by timestamp: a cell is served while its
expiry is still ahead (``expires_at_ms > now``), the same test the action
ladder uses for "active". A reversal deletes the column and leaves a tombstone
(``reversed:{decision_id}``), and a decision with a tombstone is never served,
whatever writes it again.
"""

from __future__ import annotations

import logging
import time
import typing

import orjson
from google.api_core import exceptions as api_exceptions
from google.cloud import bigtable
from google.cloud.bigtable.data import BigtableDataClient, ReadRowsQuery, row_filters
from google.cloud.bigtable.table import DEFAULT_RETRY

from schemas.mitigation_state import FAMILY, REVERSED_PREFIX, TABLE_ID, VALUE_FIELDS, cell_timestamp, row_key
from transforms.state_store import lift_row

_LOGGER = logging.getLogger(__name__)

Entity = tuple[str, str]

# The client library retries a read for up to 600 s by default (its legacy Table.read_rows cannot be told
# otherwise, so reads go through its data client, which takes an operation timeout): an enforcement gateway
# waiting that long is worse than a fast 503 it can act on, and every waiting request holds one of the
# server's worker threads. A call that has not succeeded in this many seconds, retries included, is given up.
DEADLINE_SEC = 5.0
_WRITE_RETRY = DEFAULT_RETRY.with_timeout(DEADLINE_SEC)  # the legacy mutate_rows takes its deadline from here


class StoreUnavailable(RuntimeError):
    """Bigtable did not answer in time, or refused: the API answers 503."""


class MitigationStore:
    """Active mitigations per entity. The Bigtable client is made here, but connects on first use."""

    def __init__(self, project: str, instance: str, table_id: str = TABLE_ID):
        self._client = bigtable.Client(project=project)
        self._table = self._client.instance(instance).table(table_id)
        self._reads = BigtableDataClient(project=project).get_table(instance, table_id)

    def lookup(self, entities: typing.Sequence[Entity], now_ms: int) -> dict[Entity, list[dict]]:
        """Every entity's active mitigations, newest expiry last, in one ``ReadRows`` call.

        Args:
            entities: (entity_type, entity_id) pairs; duplicates are read once.
            now_ms: the moment of the read. Cells whose expiry is not after it are filtered out by the server.

        Returns:
            A list (possibly empty) for each requested entity. A cell that does not parse is skipped and logged
            by decision id: a bad write must not hide an entity's other mitigations.
        """
        by_key = {row_key(t, i): (t, i) for t, i in entities}
        found: dict[Entity, list[dict]] = {entity: [] for entity in by_key.values()}
        if not by_key:
            return found
        # Start is inclusive and in milliseconds: now + 1 ms serves cells that expire strictly after now.
        active = row_filters.RowFilterChain(
            filters=[
                row_filters.FamilyNameRegexFilter(FAMILY),
                row_filters.TimestampRangeFilter(start=cell_timestamp(now_ms + 1)),
                row_filters.CellsColumnLimitFilter(1),
            ]
        )
        query = ReadRowsQuery(row_keys=list(by_key), row_filter=active)
        try:
            rows = self._reads.read_rows(query, operation_timeout=DEADLINE_SEC, attempt_timeout=DEADLINE_SEC)
        except api_exceptions.GoogleAPIError as err:  # DeadlineExceeded, RetryError, ServiceUnavailable, ...
            raise StoreUnavailable(f"read failed: {type(err).__name__}: {err}") from err
        for row in rows:
            entity = by_key.get(row.row_key)
            if entity is None:
                continue
            cells = row.get_cells(family=FAMILY)  # one per column: the filter keeps the newest
            reversed_ids = {
                c.qualifier[len(REVERSED_PREFIX) :] for c in cells if c.qualifier.startswith(REVERSED_PREFIX)
            }
            for cell in cells:
                if cell.qualifier.startswith(REVERSED_PREFIX) or cell.qualifier in reversed_ids:
                    continue
                value = _parse_cell(cell.qualifier, cell.value, entity)
                if value is not None:
                    found[entity].append(value)
        for values in found.values():
            values.sort(key=lambda v: (v["expires_at_ms"], v["decision_id"]))
        return found

    def remove(self, entity_type: str, entity_id: str, decision_id: str) -> None:
        """Lift one mitigation for good: delete its column (every version) and write its tombstone. Lifting a
        missing column is not an error, and its tombstone still stops the decision being served later."""
        row = lift_row(entity_type, entity_id, decision_id, int(time.time() * 1000))
        try:
            [status] = self._table.mutate_rows([row], retry=_WRITE_RETRY, timeout=DEADLINE_SEC)
        except api_exceptions.GoogleAPIError as err:
            raise StoreUnavailable(f"lifting {decision_id} failed: {type(err).__name__}: {err}") from err
        if status.code != 0:
            raise StoreUnavailable(f"Bigtable refused to lift {decision_id}: {status.message}")


def _parse_cell(qualifier: bytes, raw: bytes, entity: Entity) -> dict | None:
    decision_id = qualifier.decode("utf-8", errors="replace")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(_well_typed(name, value.get(name)) for name in VALUE_FIELDS):
        _LOGGER.warning("skipped an unreadable mitigation cell", extra={"decision_id": decision_id})
        return None
    if (value["entity_type"], value["entity_id"]) != entity or value["decision_id"] != decision_id:
        # A row holds one entity's columns; anything else is a writer bug, never served as this entity's.
        _LOGGER.warning("skipped a mitigation cell filed under another entity", extra={"decision_id": decision_id})
        return None
    return {name: value[name] for name in VALUE_FIELDS}


def _well_typed(name: str, value) -> bool:
    if name.endswith("_ms") or name == "rule_version":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)
