"""Reversing a decision against the real emulators: compensating decision out, original kept, state lifted."""

import subprocess
import sys
import time

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, bigtable, pubsub_v1

from devtools.emulators import create_topic_with_subscription
from pipelines import provision
from pipelines.options import PROJECT_ROOT
from schemas import DECISION_SCHEMA, to_bigquery_row
from schemas.mitigation_state import TABLE_ID, row_key
from service.store import MitigationStore
from tests.schemas.test_schemas import _decision
from tests.service.conftest import lookup
from transforms.state_store import to_direct_row

DATASET = "mitigation_reverse"
INSTANCE = "reverse-instance"


@pytest.fixture(scope="module")
def env(gcp_env):
    project = gcp_env["project"]
    bq = bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=gcp_env["bigquery"].url),
    )
    provision.provision(bq, DATASET)
    original = _decision()._replace(decision_id="orig-1", entity_id="u77")
    assert bq.insert_rows_json(f"{project}.{DATASET}.decisions", [to_bigquery_row(DECISION_SCHEMA, original)]) == []
    provision.provision_bigtable(project, INSTANCE)
    table = bigtable.Client(project=project).instance(INSTANCE).table(TABLE_ID)
    assert [s.code for s in table.mutate_rows([to_direct_row(original)])] == [0]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic, sub = create_topic_with_subscription(publisher, subscriber, project, "decisions-rev")
    args = [
        f"--project={project}",
        f"--decisions_table={project}:{DATASET}.decisions",
        f"--audit_table={project}:{DATASET}.audit",
        f"--decisions_topic={topic}",
        f"--bigtable_instance={INSTANCE}",
    ]
    return {"bq": bq, "project": project, "args": args, "subscriber": subscriber, "sub": sub, "table": table}


def _state_columns(env) -> list[bytes]:
    row = env["table"].read_row(row_key("user", "u77"))
    return [] if row is None else [q for cells in row.cells.values() for q in cells]


def _reverse(env, decision_id, *extra):
    command = [sys.executable, "-m", "pipelines.reverse", "--decision_id", decision_id, "--actor", "alice@example.com"]
    command += ["--reason", "Appeal 4411 upheld", *env["args"], *extra]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_reversal_is_published_audited_and_the_original_kept(env):
    assert _state_columns(env) == [b"orig-1"]
    done = _reverse(env, "orig-1")
    assert done.returncode == 0, done.stderr
    response = env["subscriber"].pull(subscription=env["sub"], max_messages=10, timeout=10)
    [message] = [m.message for m in response.received_messages]
    assert message.attributes["reverses_decision_id"] == "orig-1"
    audit = [dict(r) for r in env["bq"].query(f"SELECT * FROM `{DATASET}.audit`").result()]
    assert [(a["status"], a["actor"], a["reverses_decision_id"]) for a in audit] == [
        ("reversal", "alice@example.com", "orig-1")
    ]
    assert "Appeal 4411 upheld" in audit[0]["reason"]
    ids = sorted(r["decision_id"] for r in env["bq"].query(f"SELECT decision_id FROM `{DATASET}.decisions`").result())
    assert "orig-1" in ids and len(ids) == 2  # the original row stays; the reversal is added
    assert _state_columns(env) == [b"reversed:orig-1"]  # lifted from the state store, for good (a tombstone)
    # The job writes it again (a replay stamps a fresh expiry): not served, while another decision still is.
    now_ms = int(time.time() * 1000)
    replayed = _decision()._replace(decision_id="orig-1", entity_id="u77", expires_at_ms=now_ms + 3_600_000)
    other = replayed._replace(decision_id="other-1")
    assert [s.code for s in env["table"].mutate_rows([to_direct_row(replayed), to_direct_row(other)])] == [0, 0]
    served = lookup(MitigationStore(env["project"], INSTANCE), [("user", "u77")], now_ms)[("user", "u77")]
    assert [m["decision_id"] for m in served] == ["other-1"]


def test_reversing_twice_or_an_unknown_decision_is_refused(env):
    _reverse(env, "orig-1")  # done already if the test above ran; either way it is reversed now
    again = _reverse(env, "orig-1")
    assert again.returncode == 2 and "already reversed" in again.stderr
    unknown = _reverse(env, "no-such-decision")
    assert unknown.returncode == 2 and "is not in" in unknown.stderr


def test_running_the_command_again_lifts_what_a_failed_lift_left_active(env):
    """The first run publishes and audits the reversal but cannot lift (a table that is not there stands in for
    a Bigtable outage); running it again is refused as already reversed, and still lifts, as the API does."""
    original = _decision()._replace(decision_id="orig-2", entity_id="u78")
    decisions = f"{env['project']}.{DATASET}.decisions"
    assert env["bq"].insert_rows_json(decisions, [to_bigquery_row(DECISION_SCHEMA, original)]) == []
    assert [s.code for s in env["table"].mutate_rows([to_direct_row(original)])] == [0]

    def columns():
        row = env["table"].read_row(row_key("user", "u78"))
        return [] if row is None else [q for cells in row.cells.values() for q in cells]

    failed = _reverse(env, "orig-2", "--bigtable_table=no_such_table")
    assert failed.returncode == 1 and "still active in Bigtable" in failed.stderr, failed.stderr
    assert columns() == [b"orig-2"]
    again = _reverse(env, "orig-2")
    assert again.returncode == 2 and "already reversed" in again.stderr
    assert "lifted orig-2" in again.stdout and columns() == [b"reversed:orig-2"]


def test_of_a_shadow_and_an_enforce_decision_with_one_id_the_enforcement_is_found(env):
    """A rule paused (or in shadow) early in a window and enforcing later publishes one decision id in both
    modes; the decisions table holds both rows, and a reversal must reverse the enforcement."""
    from pipelines.reverse import find_decision

    table = f"{env['project']}:{DATASET}.decisions"
    shadow = _decision()._replace(decision_id="twice-1", entity_id="u79", mode="shadow")
    enforce = shadow._replace(mode="enforce", decided_at_ms=shadow.decided_at_ms + 600_000)
    for row in (shadow, enforce):  # as they were written: a LIMIT 1 alone found the shadow row
        assert env["bq"].insert_rows_json(table.replace(":", "."), [to_bigquery_row(DECISION_SCHEMA, row)]) == []
    assert find_decision(env["bq"], table, "twice-1") == enforce
