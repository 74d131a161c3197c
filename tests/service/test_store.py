"""MitigationStore against the Bigtable emulator: what is served, what is not, and removal."""

import asyncio
import gc
import logging
import time

import pytest

from schemas.mitigation_state import FAMILY, cell_timestamp, row_key
from service.store import MitigationStore
from tests.service.conftest import INSTANCE, lookup, mitigation, put_cell, unique
from transforms.state_store import to_direct_row


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_lookup_serves_active_cells_only_and_keeps_entities_apart(backends):
    table = backends["table"]
    user, other = unique("u"), unique("u")
    active = mitigation("user", user, expires_in_sec=3600)
    later = mitigation("user", user, expires_in_sec=7200, action="suspend")
    expired = mitigation("user", user, expires_in_sec=-60)
    theirs = mitigation("user", other, expires_in_sec=3600)
    for decision in (later, active, expired, theirs):
        put_cell(table, decision)
    store = MitigationStore(backends["project"], INSTANCE)

    found = lookup(store, [("user", user), ("device", user), ("user", unique("nobody"))], _now_ms())

    assert [m["decision_id"] for m in found[("user", user)]] == [active.decision_id, later.decision_id]
    assert found[("user", user)][1]["action"] == "suspend"
    assert found[("device", user)] == []  # same id, other entity type: another row
    assert len(found) == 3 and all(v == [] for k, v in found.items() if k[0] != "user" or k[1] != user)


def test_a_cell_is_served_until_its_expiry_and_not_at_it(backends):
    table = backends["table"]
    user = unique("u")
    decision = mitigation("user", user, expires_in_sec=3600)
    put_cell(table, decision)
    store = MitigationStore(backends["project"], INSTANCE)

    assert lookup(store, [("user", user)], decision.expires_at_ms - 1)[("user", user)]
    assert lookup(store, [("user", user)], decision.expires_at_ms)[("user", user)] == []


def test_remove_deletes_one_column(backends):
    table = backends["table"]
    user = unique("u")
    keep, lift = mitigation("user", user, expires_in_sec=3600), mitigation("user", user, expires_in_sec=3600)
    put_cell(table, keep)
    put_cell(table, lift)
    store = MitigationStore(backends["project"], INSTANCE)

    store.remove("user", user, lift.decision_id)
    store.remove("user", user, "never-existed")  # not an error

    assert [m["decision_id"] for m in lookup(store, [("user", user)], _now_ms())[("user", user)]] == [keep.decision_id]


def test_a_reversed_decision_written_again_is_never_served(backends):
    """A reversal must be durable: the pipeline writing the same decision again (a retried bundle, a replayed
    job, a write that reached Bigtable after the reversal) must not bring it back, nor may the same id arriving
    in enforce mode after its shadow decision was reversed."""
    table = backends["table"]
    user = unique("u")
    keep, lifted, shadow_first = (mitigation("user", user, expires_in_sec=3600) for _ in range(3))
    for decision in (keep, lifted):
        table.mutate_rows([to_direct_row(decision)])
    store = MitigationStore(backends["project"], INSTANCE)

    store.remove("user", user, lifted.decision_id)
    store.remove("user", user, shadow_first.decision_id)  # reversed while it was only a shadow decision
    statuses = table.mutate_rows([to_direct_row(lifted), to_direct_row(shadow_first)])  # the pipeline's writes

    assert [s.code for s in statuses] == [0, 0]
    assert [m["decision_id"] for m in lookup(store, [("user", user)], _now_ms())[("user", user)]] == [keep.decision_id]


def test_an_unreadable_cell_is_skipped_not_fatal(backends):
    table = backends["table"]
    user = unique("u")
    good = mitigation("user", user, expires_in_sec=3600)
    put_cell(table, good)
    row = table.direct_row(row_key("user", user))
    future = cell_timestamp(good.expires_at_ms)
    row.set_cell(FAMILY, b"garbage", b"{not json", timestamp=future)
    row.set_cell(FAMILY, b"wrong-types", b'{"decision_id": "wrong-types", "rule_version": "x"}', timestamp=future)
    row.commit()
    store = MitigationStore(backends["project"], INSTANCE)

    assert [m["decision_id"] for m in lookup(store, [("user", user)], _now_ms())[("user", user)]] == [good.decision_id]


def test_lifting_against_a_store_that_stops_answering_fails_within_the_deadline(silent_port, monkeypatch):
    from service.store import DEADLINE_SEC, StoreUnavailable

    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", f"127.0.0.1:{silent_port}")
    store = MitigationStore("test-project", "silent", "mitigations")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.remove("user", "u-silent", "d-silent")
    assert time.monotonic() - started < DEADLINE_SEC + 10


def test_lookups_waiting_together_share_one_read_and_each_is_answered_for_its_own_moment(backends):
    """Lookups that wait at once go out as one ReadRows; each still gets its own entities, as of its own now."""
    table = backends["table"]
    user, other = unique("u"), unique("u")
    mine, theirs = mitigation("user", user, expires_in_sec=3600), mitigation("user", other, expires_in_sec=3600)
    put_cell(table, mine)
    put_cell(table, theirs)
    store = MitigationStore(backends["project"], INSTANCE)
    now = _now_ms()

    async def together():
        try:
            return await asyncio.gather(
                store.lookup([("user", user)], mine.expires_at_ms - 1),
                store.lookup([("user", user)], mine.expires_at_ms),  # the same row, at its expiry
                store.lookup([("user", other), ("device", other)], now),
                store.lookup([("user", unique("nobody"))], now),
            )
        finally:
            await store.close()

    before, at_expiry, both, nobody = asyncio.run(together())

    assert (store.reads, store.lookups) == (1, 4)
    assert [m["decision_id"] for m in before[("user", user)]] == [mine.decision_id]
    assert at_expiry == {("user", user): []}
    assert [m["decision_id"] for m in both[("user", other)]] == [theirs.decision_id] and both[("device", other)] == []
    assert list(nobody.values()) == [[]]


def test_lookups_beyond_the_reads_in_flight_wait_and_share_the_next_read(silent_port, monkeypatch):
    """With MAX_READS_IN_FLIGHT reads out (here to a store that never answers), later lookups are gathered
    into one read sent when a slot frees; every lookup is told the store is unavailable within the deadline."""
    from service import store as store_module

    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", f"127.0.0.1:{silent_port}")
    monkeypatch.setattr(store_module, "DEADLINE_SEC", 2.0)
    store = MitigationStore("test-project", "silent", "mitigations")
    waiting = store_module.MAX_READS_IN_FLIGHT + 3

    async def timed(n):
        started = time.monotonic()
        try:
            return await store.lookup([("user", f"u-{n}")], _now_ms())
        except store_module.StoreUnavailable as err:
            return err, time.monotonic() - started

    async def one_by_one():
        lookups = []
        for n in range(waiting):
            lookups.append(asyncio.ensure_future(timed(n)))
            await asyncio.sleep(0.01)  # each on a later turn of the loop, after the previous read went out
        try:
            return await asyncio.gather(*lookups)
        finally:
            await asyncio.sleep(store_module.DEADLINE_SEC)  # let the gathered read go out and fail too
            await store.close()

    answers = asyncio.run(one_by_one())

    assert all(isinstance(a, tuple) and isinstance(a[0], store_module.StoreUnavailable) for a in answers), answers
    # Each within its own deadline, from when it arrived: the gathered ones did not wait for the reads ahead
    # of them to fail first (they took twice the deadline before).
    assert max(elapsed for _, elapsed in answers) < 1.5 * store_module.DEADLINE_SEC, answers
    assert (store.reads, store.lookups) == (store_module.MAX_READS_IN_FLIGHT + 1, waiting)


def test_a_read_failing_after_all_its_lookups_gave_up_is_not_reported_as_unretrieved(silent_port, monkeypatch, caplog):
    from service import store as store_module

    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", f"127.0.0.1:{silent_port}")
    monkeypatch.setattr(store_module, "DEADLINE_SEC", 0.5)
    store = MitigationStore("test-project", "silent", "mitigations")

    async def give_up():
        lookups = [asyncio.ensure_future(store.lookup([("user", f"u-{n}")], _now_ms())) for n in range(3)]
        await asyncio.sleep(0.1)
        for lookup_ in lookups:
            lookup_.cancel()  # the callers go (a timeout of their own), then the shared read fails
        await asyncio.sleep(1.0)
        await store.close()
        gc.collect()  # asyncio reports an unretrieved failure when the future is collected

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(give_up())

    assert store.reads == 1
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
