"""The Mitigation API end to end against the emulators: lookups, reversal, allowlist, rule pauses, hardening."""

import dataclasses
import datetime as dt
import fcntl
import itertools
import json
import logging
import os
import pathlib
import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient
from google.cloud import bigquery, pubsub_v1

from pipelines.reverse import reverse
from schemas import DECISION_SCHEMA, to_bigquery_row
from service.app import create_app
from tests.service.conftest import (
    DATASET,
    OPERATE_TOKEN,
    OPERATOR,
    READ_TOKEN,
    audit_rows,
    auth,
    mitigation,
    put_cell,
    unique,
)
from transforms.rulepack import load_rule_pack, parse_rule_overrides
from transforms.safeguards import parse_allowlist
from transforms.state_store import to_direct_row

READ, OPERATE = auth(READ_TOKEN), auth(OPERATE_TOKEN)
IP_HOSTS = itertools.count(0x7000 + os.getpid() % 0x1000)
KNOWN_RULES = {r.id for r in load_rule_pack("rules/default.yaml").rules}


def _ids(body: dict) -> list[str]:
    return [m["decision_id"] for m in body["mitigations"]]


# --- lookups ------------------------------------------------------------------------------------
def test_single_lookup_serves_active_mitigations_only(client, backends):
    user = unique("u")
    active = mitigation("user", user, expires_in_sec=3600)
    expired = mitigation("user", user, expires_in_sec=-1)
    neighbour = mitigation("user", unique("u"), expires_in_sec=3600)
    for decision in (active, expired, neighbour):
        put_cell(backends["table"], decision)

    response = client.get(f"/v1/entities/user/{user}/mitigations", headers=READ)

    assert response.status_code == 200
    body = response.json()
    assert (body["entity_type"], body["entity_id"], _ids(body)) == ("user", user, [active.decision_id])
    [served] = body["mitigations"]
    assert served == {
        "decision_id": active.decision_id,
        "entity_type": "user",
        "entity_id": user,
        "action": active.action,
        "rule_id": active.rule_id,
        "rule_version": active.rule_version,
        "reason": active.reason,
        "decided_at_ms": active.decided_at_ms,
        "expires_at_ms": active.expires_at_ms,
        "window_start_ms": active.window_start_ms,
        "window_end_ms": active.window_end_ms,
    }


def test_an_id_with_a_slash_and_an_ip_are_looked_up(client, backends):
    odd, ip = mitigation("user", "sso:acme/u=1", expires_in_sec=60), mitigation("ip", "2001:db8::7", expires_in_sec=60)
    put_cell(backends["table"], odd)
    put_cell(backends["table"], ip)
    assert _ids(client.get("/v1/entities/user/sso:acme%2Fu=1/mitigations", headers=READ).json()) == [odd.decision_id]
    assert _ids(client.get("/v1/entities/ip/2001:db8::7/mitigations", headers=READ).json()) == [ip.decision_id]


@pytest.mark.parametrize("spelling", ["2001:DB8::{h}", "2001:db8:0:0:0:0:0:{h}", "2001:0db8:0000::{h}"])
def test_an_ip_is_looked_up_in_any_spelling_and_named_as_the_pipeline_stores_it(client, backends, spelling):
    # A gateway printing 2001:DB8::7abc must not be told nothing is active against 2001:db8::7abc.
    host = f"{next(IP_HOSTS):x}"
    ip = mitigation("ip", f"2001:db8::{host}", expires_in_sec=60)
    put_cell(backends["table"], ip)
    written = spelling.format(h=host.upper() if "DB8" in spelling else host)
    single = client.get(f"/v1/entities/ip/{written}/mitigations", headers=READ).json()
    assert (single["entity_id"], _ids(single)) == (ip.entity_id, [ip.decision_id])
    wanted = {"entities": [{"entity_type": "ip", "entity_id": written}]}
    batch = client.post("/v1/mitigations:batchLookup", json=wanted, headers=READ).json()
    assert [(r["entity_id"], _ids(r)) for r in batch["results"]] == [(ip.entity_id, [ip.decision_id])]


def test_an_ipv4_client_through_a_dual_stack_gateway_is_its_ipv4_address(client, backends):
    ip = mitigation("ip", "192.0.2.77", expires_in_sec=60)
    put_cell(backends["table"], ip)
    body = client.get("/v1/entities/ip/::ffff:192.0.2.77/mitigations", headers=READ).json()
    assert (body["entity_id"], _ids(body)) == ("192.0.2.77", [ip.decision_id])


def test_an_ip_entity_that_is_not_an_address_is_422_not_an_empty_answer(client):
    assert client.get("/v1/entities/ip/not-an-ip/mitigations", headers=READ).status_code == 422
    bad = {"entities": [{"entity_type": "ip", "entity_id": "10.0.0.256"}]}
    assert client.post("/v1/mitigations:batchLookup", json=bad, headers=READ).status_code == 422


def test_batch_lookup_answers_each_entity_in_request_order(client, backends):
    a, b, quiet = unique("u"), unique("d"), unique("u")
    a_active, a_expired = mitigation("user", a, expires_in_sec=600), mitigation("user", a, expires_in_sec=-5)
    b_active = mitigation("device", b, expires_in_sec=600, action="throttle")
    for decision in (a_active, a_expired, b_active):
        put_cell(backends["table"], decision)
    entities = [
        {"entity_type": "device", "entity_id": b},
        {"entity_type": "user", "entity_id": quiet},
        {"entity_type": "user", "entity_id": a},
        {"entity_type": "device", "entity_id": a},  # same id, other type: nothing of user a's
    ]

    response = client.post("/v1/mitigations:batchLookup", json={"entities": entities}, headers=READ)

    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["entity_type"], r["entity_id"]) for r in results] == [
        (e["entity_type"], e["entity_id"]) for e in entities
    ]
    assert [_ids(r) for r in results] == [[b_active.decision_id], [], [a_active.decision_id], []]


# --- validation and limits --------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/v1/entities/account/u1/mitigations",  # not an entity type
        "/v1/entities/user/" + "a" * 129 + "/mitigations",  # too long
        "/v1/entities/user/%3Cscript%3Ealert(1)%3C%2Fscript%3E/mitigations",  # markup
        "/v1/entities/user/-leading-dash/mitigations",
        "/v1/entities/user/a%20b/mitigations",
    ],
)
def test_bad_path_parameters_are_422_without_echoing_input(client, path):
    response = client.get(path, headers=READ)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid request"
    assert "script" not in response.text and "aaaa" not in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"entities": []},
        {"entities": [{"entity_type": "user", "entity_id": f"u{i}"} for i in range(101)]},
        {"entities": [{"entity_type": "tenant", "entity_id": "u1"}]},
        {"entities": [{"entity_type": "user", "entity_id": "<b>"}]},
        {"entities": [{"entity_type": "user", "entity_id": "u1", "extra": 1}]},
        {"entities": "user:u1"},
    ],
    ids=["empty", "101", "bad-type", "markup", "extra-field", "not-a-list"],
)
def test_bad_batch_bodies_are_422(client, body):
    assert client.post("/v1/mitigations:batchLookup", json=body, headers=READ).status_code == 422


def test_100_entities_are_allowed(client):
    body = {"entities": [{"entity_type": "user", "entity_id": f"u{i}"} for i in range(100)]}
    response = client.post("/v1/mitigations:batchLookup", json=body, headers=READ)
    assert response.status_code == 200 and len(response.json()["results"]) == 100


def test_an_oversized_body_is_413_declared_or_chunked(client):
    big = b'{"entities": [' + b" " * (64 * 1024) + b"]}"
    declared = client.post(
        "/v1/mitigations:batchLookup", content=big, headers={**READ, "content-type": "application/json"}
    )
    assert declared.status_code == 413

    def chunks():  # no Content-Length: the limit must count the bytes as they arrive
        for _ in range(80):
            yield b" " * 1024

    chunked = client.post(
        "/v1/mitigations:batchLookup", content=chunks(), headers={**READ, "content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert chunked.json() == {"error": "request body over 65536 bytes"}


@pytest.mark.parametrize(
    "reason",
    [
        "",
        "   ",
        "x" * 501,
        "two\nlines",
        None,
        "\x9b31m red",
        "\x01",
        "a\x85b",
        "a\u2028b",
        "\u200b",
        "Appeal \u202egnp.exe",
    ],
)
def test_a_reversal_needs_a_sensible_reason(client, reason):
    body = {} if reason is None else {"reason": reason}
    assert client.post("/v1/decisions/d1/reversal", json=body, headers=OPERATE).status_code == 422


def test_a_store_that_stops_answering_is_a_503_within_the_deadline(settings, silent_port, monkeypatch):
    # The client library's defaults wait up to 600 s, holding a server thread per waiting request.
    from service.store import DEADLINE_SEC

    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", f"127.0.0.1:{silent_port}")
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.get("/v1/entities/user/u-silent/mitigations", headers=READ)
        took = time.monotonic() - started
    assert response.status_code == 503
    assert response.json() == {"error": "the mitigation store is unavailable; try again"}
    assert took < DEADLINE_SEC + 10, took  # a 600 s wait would be caught here; the margin is for a slow machine


def test_an_internal_error_is_a_bare_500_and_logged(backends, settings, caplog):
    broken = dataclasses.replace(settings, decisions_table=f"{backends['project']}:no_such_dataset.decisions")
    with TestClient(create_app(broken)) as client, caplog.at_level(logging.ERROR, logger="service.app"):
        response = client.post("/v1/decisions/d1/reversal", json={"reason": "Appeal 1"}, headers=OPERATE)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
    assert any(r.exc_info for r in caplog.records if r.name == "service.app")


# --- reversal ------------------------------------------------------------------------------------
def _seed_decision(backends, decision) -> None:
    """The decision as the streaming job writes it to the decisions table."""
    table = f"{backends['project']}.{DATASET}.decisions"
    assert backends["bq"].insert_rows_json(table, [to_bigquery_row(DECISION_SCHEMA, decision)]) == []


def _published_reversals(backends, decision_id: str, wait_sec: float = 10) -> list[dict]:
    """Reversals of decision_id on the decisions topic (the subscription is shared, so others are acked and skipped)."""
    subscriber, subscription = backends["subscriber"], backends["subscription"]
    found, deadline = [], time.monotonic() + wait_sec
    while not found and time.monotonic() < deadline:
        pulled = subscriber.pull(subscription=subscription, max_messages=100, timeout=wait_sec)
        if pulled.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in pulled.received_messages])
        found += [
            json.loads(m.message.data)
            for m in pulled.received_messages
            if m.message.attributes.get("reverses_decision_id") == decision_id
        ]
    return found


def test_reversal_end_to_end(client, backends):
    bq = backends["bq"]
    user = unique("u")
    original = mitigation("user", user, expires_in_sec=3600)
    sibling = mitigation("user", user, expires_in_sec=3600, rule_id="other")
    _seed_decision(backends, original)
    put_cell(backends["table"], original)
    put_cell(backends["table"], sibling)
    lookup = f"/v1/entities/user/{user}/mitigations"
    assert set(_ids(client.get(lookup, headers=READ).json())) == {original.decision_id, sibling.decision_id}

    response = client.post(
        f"/v1/decisions/{original.decision_id}/reversal", json={"reason": " Appeal 4411 upheld "}, headers=OPERATE
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision_id"] == original.decision_id and body["actor"] == OPERATOR
    assert body["reason"] == "Appeal 4411 upheld"
    assert _ids(client.get(lookup, headers=READ).json()) == [sibling.decision_id]
    [audit] = audit_rows(bq, body["reversal_decision_id"])
    assert (audit["status"], audit["actor"], audit["reverses_decision_id"]) == (
        "reversal",
        OPERATOR,
        original.decision_id,
    )
    assert "Appeal 4411 upheld" in audit["reason"]
    [published] = _published_reversals(backends, original.decision_id)
    assert (published["decision_id"], published["actor"]) == (body["reversal_decision_id"], OPERATOR)

    again = client.post(f"/v1/decisions/{original.decision_id}/reversal", json={"reason": "again"}, headers=OPERATE)
    assert again.status_code == 409 and "already reversed" in again.json()["error"]

    # The job writes the same decision again (a retried bundle, a replay): the reversal holds.
    assert [s.code for s in backends["table"].mutate_rows([to_direct_row(original)])] == [0]
    assert _ids(client.get(lookup, headers=READ).json()) == [sibling.decision_id]


def test_a_shadow_decision_reversed_is_not_served_when_it_comes_in_enforce_mode(client, backends):
    """One id comes once per mode (a rule promoted or resumed mid-window): the reversal covers both."""
    user = unique("u")
    enforce = mitigation("user", user, expires_in_sec=3600)
    _seed_decision(backends, enforce._replace(mode="shadow"))

    response = client.post(
        f"/v1/decisions/{enforce.decision_id}/reversal", json={"reason": "Appeal 5"}, headers=OPERATE
    )
    assert response.status_code == 200, response.text
    assert [s.code for s in backends["table"].mutate_rows([to_direct_row(enforce)])] == [0]  # the job, later

    assert _ids(client.get(f"/v1/entities/user/{user}/mitigations", headers=READ).json()) == []


def _reversal_through_a_broken_app(backends, broken_settings, reason):
    """An active decision, and its reversal asked of an app whose settings break one step: (original, lookup
    path, reversal path, the response)."""
    original = mitigation("user", unique("u"), expires_in_sec=3600)
    _seed_decision(backends, original)
    put_cell(backends["table"], original)
    lookup = f"/v1/entities/user/{original.entity_id}/mitigations"
    path = f"/v1/decisions/{original.decision_id}/reversal"
    with TestClient(create_app(broken_settings)) as broken:
        return original, lookup, path, broken.post(path, json={"reason": reason}, headers=OPERATE)


def test_a_reversal_that_cannot_be_audited_is_a_503_and_a_retry_completes_it(backends, settings, client):
    """The audit row marks the reversal made, and it is published only after it: a failed audit insert leaves
    nothing a consumer acted on and the mitigation active, and calling again makes the reversal, once."""
    unaudited = dataclasses.replace(settings, audit_table=f"{backends['project']}:{DATASET}.no_such_table")
    original, lookup, path, failed = _reversal_through_a_broken_app(backends, unaudited, "Appeal 6")

    assert failed.status_code == 503 and "nothing was published" in failed.json()["error"]
    assert _ids(client.get(lookup, headers=READ).json()) == [original.decision_id]
    assert _published_reversals(backends, original.decision_id, wait_sec=2) == []
    retried = client.post(path, json={"reason": "Appeal 6"}, headers=OPERATE)
    assert retried.status_code == 200, retried.text
    assert _ids(client.get(lookup, headers=READ).json()) == []
    assert [row["status"] for row in audit_rows(backends["bq"], retried.json()["reversal_decision_id"])] == ["reversal"]
    assert len(_published_reversals(backends, original.decision_id)) == 1


def test_a_reversal_that_cannot_be_published_is_a_503_and_a_retry_delivers_it(backends, settings, client):
    """Recorded but not published: the mitigation stays active, and calling again (refused: already reversed)
    publishes the recorded reversal and lifts the mitigation."""
    unpublished = dataclasses.replace(settings, decisions_topic=f"projects/{backends['project']}/topics/no-such-topic")
    original, lookup, path, failed = _reversal_through_a_broken_app(backends, unpublished, "Appeal 7")

    assert failed.status_code == 503 and "recorded but not yet published" in failed.json()["error"]
    assert _ids(client.get(lookup, headers=READ).json()) == [original.decision_id]
    retried = client.post(path, json={"reason": "Appeal 7, again"}, headers=OPERATE)
    assert retried.status_code == 409 and "already reversed" in retried.json()["error"]
    [published] = _published_reversals(backends, original.decision_id)
    assert "Appeal 7" in published["reason"] and "again" not in published["reason"]  # the recorded reversal
    assert _ids(client.get(lookup, headers=READ).json()) == []


def test_reversing_an_unknown_decision_is_404(client):
    response = client.post(f"/v1/decisions/{unique('missing')}/reversal", json={"reason": "Appeal 9"}, headers=OPERATE)
    assert response.status_code == 404 and response.json() == {"error": "no such decision"}


# --- allowlist -----------------------------------------------------------------------------------
def _allowlist(settings):
    text = open(settings.allowlist_path).read()
    parse_allowlist(text, "allowlist", KNOWN_RULES)  # still what the streaming job accepts
    return yaml.safe_load(text)["allowlist"], text


def test_allowlist_add_list_and_expire_are_audited(client, settings, backends):
    before, _ = _allowlist(settings)
    entry = {
        "entity": "user",
        "id": "partner-loadtest-7",
        "reason": "Partner load test, ticket 88",
        "owner": "trust-safety",
        "rules": ["stream_farm_exclude"],
    }

    added = client.post("/v1/allowlist", json=entry, headers=OPERATE)

    assert added.status_code == 201, added.text
    change = added.json()
    assert change["entry"]["index"] == len(before) and change["entry"]["active"]
    after, text = _allowlist(settings)
    assert after[:-1] == before
    assert after[-1] == {k: entry[k] for k in ("entity", "id", "reason", "owner", "rules")}
    assert text.startswith("# Entities that no enforce decision may target.")  # the header comment survives
    [audit] = audit_rows(backends["bq"], change["audit_id"])
    assert (audit["status"], audit["actor"], audit["reason"]) == ("operator_allowlist_add", OPERATOR, entry["reason"])
    assert (audit["entity_type"], audit["entity_id"], audit["rule_pack"]) == ("user", "partner-loadtest-7", "operator")

    listed = client.get("/v1/allowlist", headers=READ)
    assert listed.headers["ETag"] == f'"{listed.json()["version"]}"' and listed.json()["version"] == change["version"]
    assert listed.json()["entries"][-1]["id"] == "partner-loadtest-7"

    index = change["entry"]["index"]
    version = {**OPERATE, "If-Match": listed.headers["ETag"]}
    blind = client.post(f"/v1/allowlist/{index}/expire", json={"reason": "Load test over"}, headers=OPERATE)
    assert blind.status_code == 422 and "if-match" in blind.text  # an index names an entry in one version only
    expired = client.post(f"/v1/allowlist/{index}/expire", json={"reason": "Load test over"}, headers=version)

    assert expired.status_code == 200, expired.text
    today = dt.datetime.now(tz=dt.UTC).date()
    assert expired.json()["entry"]["expires"] == today.isoformat()
    after, _ = _allowlist(settings)
    assert after[index]["expires"] == today and after[:index] == before
    [audit] = audit_rows(backends["bq"], expired.json()["audit_id"])
    assert (audit["status"], audit["actor"], audit["reason"]) == (
        "operator_allowlist_expire",
        OPERATOR,
        "Load test over",
    )

    again = client.post(f"/v1/allowlist/{index}/expire", json={"reason": "twice"}, headers={**OPERATE, "If-Match": "*"})
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("entry", "status"),
    [
        ({"entity": "user", "reason": "r", "owner": "o"}, 422),  # no selector
        ({"entity": "user", "id": "a", "id_prefix": "abc", "reason": "r", "owner": "o"}, 422),  # two selectors
        ({"entity": "user", "cidr": "10.0.0.0/8", "reason": "r", "owner": "o"}, 422),  # cidr on a user
        ({"entity": "ip", "cidr": "10.0.0.0/99", "reason": "r", "owner": "o"}, 422),
        ({"entity": "user", "id": "a", "rules": ["no_such_rule"], "reason": "r", "owner": "o"}, 422),
        ({"entity": "user", "id": "a", "reason": "r"}, 422),  # no owner
        ({"entity": "user", "id": "a", "reason": "r", "owner": "o", "expires": "2001-01-01"}, 422),
        ({"entity": "user", "id": "a", "reason": "r", "owner": "o", "note": "x"}, 422),
    ],
)
def test_a_bad_allowlist_entry_changes_nothing(client, settings, entry, status):
    before = open(settings.allowlist_path).read()
    response = client.post("/v1/allowlist", json=entry, headers=OPERATE)
    assert response.status_code == status, response.text
    assert open(settings.allowlist_path).read() == before


def test_a_stale_version_or_index_is_refused(client, settings):
    before = open(settings.allowlist_path).read()
    reason = {"reason": "cleanup"}
    stale = client.post("/v1/allowlist/0/expire", json=reason, headers={**OPERATE, "If-Match": '"' + "0" * 64 + '"'})
    assert stale.status_code == 412
    assert client.post("/v1/allowlist/99/expire", json=reason, headers={**OPERATE, "If-Match": "*"}).status_code == 404
    assert open(settings.allowlist_path).read() == before


# --- rule pause and resume ---------------------------------------------------------------------
def test_pause_and_resume_a_rule_are_audited_and_the_file_stays_valid(client, settings, backends):
    rule = "stream_farm_exclude"
    paused = client.post(f"/v1/rules/{rule}/pause", json={"reason": "Incident 77"}, headers=OPERATE)

    assert paused.status_code == 200, paused.text
    text = open(settings.rule_overrides_path).read()
    assert parse_rule_overrides(text, "overrides", KNOWN_RULES) == {rule}
    [entry] = yaml.safe_load(text)["paused"]
    assert (entry["rule"], entry["actor"], entry["reason"]) == (rule, OPERATOR, "Incident 77")
    dt.datetime.fromisoformat(entry["paused_at"])  # RFC 3339
    [audit] = audit_rows(backends["bq"], paused.json()["audit_id"])
    assert (audit["status"], audit["actor"], audit["reason"]) == ("operator_rule_pause", OPERATOR, "Incident 77")
    assert (audit["entity_type"], audit["entity_id"], audit["rule_id"]) == ("rule", rule, rule)
    listed = client.get("/v1/rules/paused", headers=READ).json()["paused"]
    assert [(p["rule"], p["actor"]) for p in listed] == [(rule, OPERATOR)]
    assert client.post(f"/v1/rules/{rule}/pause", json={"reason": "again"}, headers=OPERATE).status_code == 409

    resumed = client.post(f"/v1/rules/{rule}/resume", json={"reason": "Fixed in v2"}, headers=OPERATE)

    assert resumed.status_code == 200, resumed.text
    text = open(settings.rule_overrides_path).read()
    assert parse_rule_overrides(text, "overrides", KNOWN_RULES) == frozenset()
    [audit] = audit_rows(backends["bq"], resumed.json()["audit_id"])
    assert (audit["status"], audit["actor"], audit["reason"]) == ("operator_rule_resume", OPERATOR, "Fixed in v2")
    assert client.get("/v1/rules/paused", headers=READ).json() == {"paused": []}
    assert client.post(f"/v1/rules/{rule}/resume", json={"reason": "again"}, headers=OPERATE).status_code == 409


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_an_unknown_rule_is_404_and_a_malformed_id_422(client, settings, action):
    assert client.post(f"/v1/rules/no_such_rule/{action}", json={"reason": "x"}, headers=OPERATE).status_code == 404
    assert client.post(f"/v1/rules/Bad-Rule/{action}", json={"reason": "x"}, headers=OPERATE).status_code == 422
    assert not os.path.exists(settings.rule_overrides_path)


def test_a_decision_reversed_elsewhere_is_409_and_its_mitigation_is_lifted(client, backends, settings):
    """The CLI (pipelines.reverse) does not touch Bigtable; the API's 409 still lifts the stale mitigation."""
    user = unique("u")
    original = mitigation("user", user, expires_in_sec=3600)
    _seed_decision(backends, original)
    put_cell(backends["table"], original)
    reverse(
        backends["bq"],
        pubsub_v1.PublisherClient(),
        decision_id=original.decision_id,
        reason="Appeal 12",
        actor="bob@example.com",
        decisions_table=settings.decisions_table,
        audit_table=settings.audit_table,
        decisions_topic=settings.decisions_topic,
    )

    response = client.post(
        f"/v1/decisions/{original.decision_id}/reversal", json={"reason": "Appeal 12"}, headers=OPERATE
    )

    assert response.status_code == 409 and "already reversed" in response.json()["error"]
    assert _ids(client.get(f"/v1/entities/user/{user}/mitigations", headers=READ).json()) == []


@pytest.mark.parametrize("text", ["paused: 5\n", "paused: {rule: stream_farm_exclude}\n"])
def test_a_malformed_overrides_file_is_a_409_to_fix_by_hand_not_a_500(client, settings, text):
    with open(settings.rule_overrides_path, "w") as handle:
        handle.write(text)
    assert client.get("/v1/rules/paused", headers=READ).status_code == 409
    paused = client.post("/v1/rules/stream_farm_exclude/pause", json={"reason": "Incident 4"}, headers=OPERATE)
    assert paused.status_code == 409
    assert open(settings.rule_overrides_path).read() == text


def test_a_pause_time_written_by_hand_without_a_zone_is_shown_as_utc(client, settings, monkeypatch):
    # YAML reads an unquoted timestamp without a zone as UTC; the server's own zone must not shift it.
    with open(settings.rule_overrides_path, "w") as handle:
        handle.write("paused:\n  - {rule: stream_farm_exclude, actor: a, reason: r, paused_at: 2026-01-01 10:00:00}\n")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        [entry] = client.get("/v1/rules/paused", headers=READ).json()["paused"]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert entry["paused_at"] == "2026-01-01T10:00:00Z"


def test_without_the_audit_table_an_operator_write_changes_nothing(backends, settings):
    broken = dataclasses.replace(settings, audit_table=f"{backends['project']}:{DATASET}.no_such_table")
    before = open(settings.allowlist_path).read()
    entry = {"entity": "device", "id": "dev-lab-1", "reason": "QA lab device", "owner": "qa"}
    with TestClient(create_app(broken)) as client:
        added = client.post("/v1/allowlist", json=entry, headers=OPERATE)
        paused = client.post("/v1/rules/stream_farm_exclude/pause", json={"reason": "Incident 3"}, headers=OPERATE)
    assert (added.status_code, paused.status_code) == (503, 503)
    assert added.json() == {"error": "the audit table is unavailable; nothing was changed"}
    assert open(settings.allowlist_path).read() == before
    assert not os.path.exists(settings.rule_overrides_path)


def test_a_policy_file_that_cannot_be_written_is_a_503_and_nothing_is_audited(backends, settings):
    """The new file is written beside the old before the audit row: an audited change must have happened."""
    entity_id = unique("dev-nowhere")
    nowhere = dataclasses.replace(settings, allowlist_path=str(settings.allowlist_path) + ".d/missing/allowlist.yaml")
    entry = {"entity": "device", "id": entity_id, "reason": "QA lab device", "owner": "qa"}
    with TestClient(create_app(nowhere)) as client:
        added = client.post("/v1/allowlist", json=entry, headers=OPERATE)
    assert added.status_code == 503
    assert added.json() == {"error": "the policy file cannot be written; nothing was changed"}
    query = f"SELECT COUNT(*) AS n FROM `{DATASET}.audit` WHERE entity_id = @id"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", entity_id)])
    assert next(iter(backends["bq"].query(query, job_config=config).result()))["n"] == 0


def test_a_policy_change_waits_for_another_process_changing_the_same_file(client, settings):
    """python -m service --workers N runs several processes over one allowlist: a change must wait while
    another holds the file's lock (an flock, which another open of the lock file stands in for here), or
    two changes could both pass If-Match against one version and one be lost after being audited."""
    target = pathlib.Path(settings.allowlist_path)
    held = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    entry = {"entity": "device", "id": unique("dev-wait"), "reason": "QA lab device", "owner": "qa"}
    answer: dict = {}
    change = threading.Thread(target=lambda: answer.update(r=client.post("/v1/allowlist", json=entry, headers=OPERATE)))
    try:
        change.start()
        change.join(2.0)
        assert change.is_alive() and entry["id"] not in target.read_text()  # waiting on the other holder
    finally:
        os.close(held)
    change.join(60)
    assert answer["r"].status_code == 201, answer["r"].text
    assert entry["id"] in target.read_text()


def test_a_file_that_cannot_be_replaced_after_its_audit_is_a_503_and_audited_as_not_made(
    backends, settings, client, monkeypatch
):
    """A policy file bind-mounted on its own refuses the rename (EBUSY) after the audit row is written: a second
    row records that the change did not happen, and the file is unchanged."""
    import errno

    import service.app as app_module

    def refuse(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy", str(dst))

    entity_id = unique("dev-mounted")
    before = open(settings.allowlist_path).read()
    monkeypatch.setattr(app_module.os, "replace", refuse)
    entry = {"entity": "device", "id": entity_id, "reason": "QA lab device", "owner": "qa"}
    added = client.post("/v1/allowlist", json=entry, headers=OPERATE)
    monkeypatch.undo()

    assert added.status_code == 503
    assert added.json() == {"error": "the policy file cannot be written; nothing was changed"}
    assert open(settings.allowlist_path).read() == before
    assert not [p for p in os.listdir(os.path.dirname(settings.allowlist_path)) if p.endswith(".tmp")]
    query = f"SELECT decision_id, status, reverses_decision_id FROM `{DATASET}.audit` WHERE entity_id = @id"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", entity_id)])
    rows = {r["status"]: dict(r) for r in backends["bq"].query(query, job_config=config).result()}
    assert set(rows) == {"operator_allowlist_add", "operator_change_failed"}
    assert rows["operator_change_failed"]["reverses_decision_id"] == rows["operator_allowlist_add"]["decision_id"]


def test_an_unreachable_bigquery_is_a_503_within_the_deadline(settings, silent_port, monkeypatch):
    """The BigQuery client's defaults wait ten minutes and more, holding a worker thread (and a file's lock)."""
    from service.app import BIGQUERY_DEADLINE_SEC

    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", f"http://127.0.0.1:{silent_port}")
    entry = {"entity": "device", "id": "dev-lab-9", "reason": "QA lab device", "owner": "qa"}
    before = open(settings.allowlist_path).read()
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        reversal = client.post("/v1/decisions/d-any/reversal", json={"reason": "Appeal 8"}, headers=OPERATE)
        took_reversal, started = time.monotonic() - started, time.monotonic()
        added = client.post("/v1/allowlist", json=entry, headers=OPERATE)
        took_add = time.monotonic() - started
    assert (reversal.status_code, added.status_code) == (503, 503), (reversal.text, added.text)
    assert max(took_reversal, took_add) < BIGQUERY_DEADLINE_SEC + 10, (took_reversal, took_add)
    assert open(settings.allowlist_path).read() == before
