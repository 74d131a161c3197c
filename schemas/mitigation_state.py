"""How an entity's active mitigations are laid out in Bigtable: shared by the pipeline (writer) and the API (reader).

Row key: ``{h}#{entity_type}#{entity_id}`` where ``h`` is the first four hex
digits of SHA-256 over ``{entity_type}#{entity_id}``. Bigtable stores rows in
key order and splits tablets by key range, so keys that start with a
sequential id (``user#1000001``, ``user#1000002``...) would send a burst of new
accounts to one tablet server. The hash prefix spreads them over 65,536 ranges;
a lookup recomputes it, so reads stay single-row gets.

One column family, ``m``. Each active mitigation is one column whose qualifier
is the decision id and whose value is the JSON below. The cell timestamp is the
mitigation's expiry, and the family's garbage-collection rule is a maximum age
of one second, so Bigtable deletes a cell once its expiry has passed. GC is
lazy, so readers also filter cells by timestamp >= now: an expired mitigation is
never served. Only enforce decisions are written (a shadow decision never
becomes active state).

A reversal deletes the column and, in the same row mutation, writes a
tombstone: column ``reversed:{decision_id}``, stamped ``REVERSAL_MEMORY`` (twenty years) ahead.
Readers never serve a decision with a tombstone. The delete alone was not
durable: the pipeline writing the same decision again (a retried bundle, a
restarted or replayed job, a write that reached Bigtable after the reversal)
brought the mitigation back, and so did the same id arriving in enforce mode
after a shadow decision of it was reversed. Decision ids are hex, so no
decision's column starts with ``reversed:``.

Timeline for one user: T0 a decision (expiry T0+7d) writes column ``d1``;
T1 a second rule's decision adds column ``d2``; T2 an operator reverses ``d1``,
deleting that column and writing ``reversed:d1``; T3 a replay writes ``d1``
again, which is not served; T0+7d ``d2`` stops being served and is collected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import typing

import orjson

TABLE_ID = "mitigations"
FAMILY = "m"
GC_MAX_AGE = dt.timedelta(seconds=1)
REVERSED_PREFIX = b"reversed:"
# How long a tombstone outlives its reversal: twice the longest ttl a rule may have (transforms.rulepack's ten
# years). A decision written again is stamped afresh, so it expires up to a ttl after it is written: any
# written again within ten years of the reversal expires before its tombstone. Reversals are operator
# actions: few cells.
REVERSAL_MEMORY = dt.timedelta(days=2 * 3650)
VALUE_FIELDS = (
    "decision_id",
    "entity_type",
    "entity_id",
    "action",
    "rule_id",
    "rule_version",
    "reason",
    "decided_at_ms",
    "expires_at_ms",
    "window_start_ms",
    "window_end_ms",
)


def row_key(entity_type: str, entity_id: str) -> bytes:
    """The row of one entity, with a hash prefix against hot-spotting on sequential ids."""
    natural = f"{entity_type}#{entity_id}"
    return f"{hashlib.sha256(natural.encode('utf-8')).hexdigest()[:4]}#{natural}".encode()


def cell_value(decision: typing.NamedTuple) -> bytes:
    """The JSON kept for one mitigation (a subset of the decision: what a caller needs to act and explain)."""
    return orjson.dumps({name: getattr(decision, name) for name in VALUE_FIELDS})


def tombstone_qualifier(decision_id: str) -> bytes:
    """The column that records a reversal of ``decision_id``."""
    return REVERSED_PREFIX + decision_id.encode("utf-8")


def cell_timestamp(expires_at_ms: int) -> dt.datetime:
    """Bigtable cell timestamps have millisecond granularity; the expiry is one."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=expires_at_ms)
