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

import asyncio
import logging
import time
import typing

import orjson
from google.api_core import exceptions as api_exceptions
from google.cloud import bigtable
from google.cloud.bigtable.data import BigtableDataClientAsync, ReadRowsQuery, row_filters
from google.cloud.bigtable.table import DEFAULT_RETRY

from schemas.mitigation_state import FAMILY, REVERSED_PREFIX, TABLE_ID, VALUE_FIELDS, row_key
from transforms.state_store import lift_row

_LOGGER = logging.getLogger(__name__)

Entity = tuple[str, str]

# The client library retries a read for up to 600 s by default (its legacy Table.read_rows cannot be told
# otherwise, so reads go through its data client, which takes an operation timeout): an enforcement gateway
# waiting that long is worse than a fast 503 it can act on, and every waiting lift holds one of the server's
# worker threads. A call that has not succeeded in this many seconds, retries included, is given up.
DEADLINE_SEC = 5.0
_WRITE_RETRY = DEFAULT_RETRY.with_timeout(DEADLINE_SEC)  # the legacy mutate_rows takes its deadline from here


# The newest cell of each column of the mitigations family: what a lookup needs, whatever its moment.
_NEWEST_MITIGATION_CELLS = row_filters.RowFilterChain(
    filters=[row_filters.FamilyNameRegexFilter(FAMILY), row_filters.CellsColumnLimitFilter(1)]
)


# Reads in flight at once per store (per server process). A lookup arriving while this many are out waits
# for one of them to finish, gathered with the others waiting, and they share the next read. At 700 lookups
# a second on the benchmark's two cores, 2 gave a p99 of 33 ms where no limit gave 66 ms (one run each);
# 1 did as well as 2 there, but would hold every lookup behind a single slow read.
MAX_READS_IN_FLIGHT = 2


def _settle(future: asyncio.Future, task: asyncio.Task) -> None:
    if future.cancelled():
        return
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())
    else:
        future.set_result(task.result())


class StoreUnavailable(RuntimeError):
    """Bigtable did not answer in time, or refused: the API answers 503."""


class MitigationStore:
    """Active mitigations per entity.

    Lookups are async, on the serving event loop: the sync client ran each read in a worker thread and
    its own channel thread, and the async client took a lookup from 2.87 to 2.43 ms of server CPU
    (benchmarks/README.md, Mitigation API lookups). The async client belongs to the loop it was made in,
    so ``connect`` makes it there (the app's start-up does) and ``close`` ends it. Lifts are rare and stay
    on the sync client, which connects on first use.

    Lookups that wait at the same moment share one ``ReadRows`` call: a lookup joins the batch that is
    still being gathered, and the batch is read on the event loop's next turn. Idle, a lookup is read
    alone, with no added wait; under load, lookups that queued behind the loop go out together, and the
    client library's cost, most of a lookup's, is paid once per batch.
    """

    def __init__(self, project: str, instance: str, table_id: str = TABLE_ID):
        self._client = bigtable.Client(project=project)
        self._table = self._client.instance(instance).table(table_id)
        self._project, self._instance, self._table_id = project, instance, table_id
        self._data_client: BigtableDataClientAsync | None = None
        self._reads = None
        self._gathering: dict[bytes, None] | None = None  # row keys of the batch being gathered
        self._gathered: asyncio.Future | None = None  # its rows by key, once read
        self._sending = False  # the gathered batch's read is due on the loop's next turn
        self._in_flight = 0
        self.reads = self.lookups = 0  # ReadRows calls made, and lookups they answered

    def connect(self) -> None:
        """Make the async read client in the running event loop (call from it, before the first lookup)."""
        if self._data_client is None:
            self._data_client = BigtableDataClientAsync(project=self._project)
            self._reads = self._data_client.get_table(self._instance, self._table_id)

    async def close(self) -> None:
        if self._data_client is not None:
            await self._data_client.close()
            self._data_client = self._reads = None

    async def lookup(self, entities: typing.Sequence[Entity], now_ms: int) -> dict[Entity, list[dict]]:
        """Every entity's active mitigations, newest expiry last.

        Args:
            entities: (entity_type, entity_id) pairs; duplicates are read once.
            now_ms: the moment of the read: a mitigation is active if its expiry is after it.

        Returns:
            A list (possibly empty) for each requested entity. A cell that does not parse is skipped and logged
            by decision id: a bad write must not hide an entity's other mitigations.
        """
        by_key = {row_key(t, i): (t, i) for t, i in entities}
        found: dict[Entity, list[dict]] = {entity: [] for entity in by_key.values()}
        if not by_key:
            return found
        rows = await self._read(by_key)
        # A column's newest cell has its latest expiry (the cell timestamp), so if that one has passed, so has
        # every older one: the read keeps the newest per column and the test is made here, per lookup, so
        # lookups of different moments can share a read.
        active_from = (now_ms + 1) * 1000  # in µs, as cell timestamps are: expiring strictly after now_ms
        for key, entity in by_key.items():
            row = rows.get(key)
            if row is None:
                continue
            cells = [c for c in row.get_cells(family=FAMILY) if c.timestamp_micros >= active_from]
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

    async def _read(self, keys: typing.Iterable[bytes]) -> dict[bytes, typing.Any]:
        """The rows of ``keys`` (those that exist), read in the batch being gathered, or a new one."""
        if self._gathered is None:
            self.connect()
            self._gathering, self._gathered = {}, asyncio.get_running_loop().create_future()
            self._sending = False
            if self._in_flight < MAX_READS_IN_FLIGHT:
                self._send_soon()
        self._gathering.update(dict.fromkeys(keys))
        self.lookups += 1
        # The deadline runs from the lookup's arrival, not its read's start: a lookup gathered behind reads
        # in flight to a store that has stopped answering waited for them to give up first, then for its
        # own read, twice DEADLINE_SEC. shield: one caller giving up must not cancel the others' read.
        try:
            return await asyncio.wait_for(asyncio.shield(self._gathered), DEADLINE_SEC)
        except TimeoutError:
            raise StoreUnavailable(f"no answer within {DEADLINE_SEC:g} s") from None

    def _send_soon(self) -> None:
        self._sending = True
        asyncio.get_running_loop().call_soon(self._send_batch)

    def _send_batch(self) -> None:
        keys, done = list(self._gathering), self._gathered
        self._gathering = self._gathered = None
        # If every lookup waiting on it has given up, nobody reads its outcome: mark a failure seen, or asyncio
        # logs "Future exception was never retrieved" for it.
        done.add_done_callback(lambda future: future.cancelled() or future.exception())
        self.reads += 1
        self._in_flight += 1
        read = asyncio.ensure_future(self._read_rows(keys))
        read.add_done_callback(lambda task: self._read_done(done, task))

    def _read_done(self, done: asyncio.Future, task: asyncio.Task) -> None:
        self._in_flight -= 1
        _settle(done, task)
        if self._gathered is not None and not self._sending:  # a batch gathered while reads were in flight
            self._send_soon()

    async def _read_rows(self, keys: list[bytes]) -> dict[bytes, typing.Any]:
        try:
            rows = await self._reads.read_rows(
                ReadRowsQuery(row_keys=keys, row_filter=_NEWEST_MITIGATION_CELLS),
                operation_timeout=DEADLINE_SEC,
                attempt_timeout=DEADLINE_SEC,
            )
        except api_exceptions.GoogleAPIError as err:  # DeadlineExceeded, RetryError, ServiceUnavailable, ...
            raise StoreUnavailable(f"read failed: {type(err).__name__}: {err}") from err
        return {row.row_key: row for row in rows}

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
