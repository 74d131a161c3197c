"""Sink failures: BigQuery rejects every audit row (a migration the job does not know about); nothing is lost.

The audit table is re-created with an extra REQUIRED column, as a schema
migration run ahead of a job release would. BigQuery (the emulator behaves the
same) rejects each row. The job must keep running and publishing decisions,
keep writing the decisions table, and put every rejected audit row in the
dead-letter table with BigQuery's error and the row itself, ready to replay.
Outages (BigQuery or Pub/Sub unreachable for a while) are covered by the soak,
which also runs in this suite (``test_soak.py``).
"""

from __future__ import annotations

import signal
import subprocess
import time

import orjson
import pytest
from google.cloud import bigquery, pubsub_v1

from devtools.emulators import create_topic_with_subscription, local_streaming_command
from pipelines import provision
from pipelines.options import PROJECT_ROOT
from tests.integration.test_streaming_e2e import BackgroundTraffic, _pull_until_quiet, _wait_for_rows, traffic

DATASET = "sink_failures"


@pytest.fixture(scope="module")
def broken_audit_run(gcp_env, tmp_path_factory):
    project = gcp_env["project"]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    names = {n: create_topic_with_subscription(publisher, subscriber, project, f"sinkfail-{n}") for n in ("in", "out")}
    bq = provision.client_for(project, gcp_env["bigquery"].url)
    provision.provision(bq, DATASET)
    audit = bq.get_table(f"{project}.{DATASET}.audit")
    bq.delete_table(audit)
    migrated = bigquery.Table(
        audit.reference, schema=[*audit.schema, bigquery.SchemaField("reviewed_by", "STRING", "REQUIRED")]
    )
    bq.create_table(migrated)

    messages, malformed = traffic(int(time.time() * 1000))
    for future in [publisher.publish(names["in"][0], data, **attrs) for data, attrs in messages]:
        future.result(timeout=30)
    log_path = tmp_path_factory.mktemp("sinkfail") / "job.log"
    command = local_streaming_command(project, names["in"][1], names["out"][0], DATASET, "--early_firing_sec=2")
    with open(log_path, "wb") as log:
        job = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        with BackgroundTraffic(publisher, names["in"][0]):
            received = _pull_until_quiet(subscriber, names["out"][1], expected_rules=2)
            published = {orjson.loads(data)["decision_id"] for data, _ in received}
            dead = _wait_for_rows(
                bq,
                f"{DATASET}.dead_letters",
                lambda rows: len([r for r in rows if r["stage"] == "sink"]) >= len(published),
            )
            decision_rows = _wait_for_rows(bq, f"{DATASET}.decisions", lambda rows: len(rows) >= len(published))
            alive = job.poll() is None
            job.send_signal(signal.SIGTERM)
            exit_code = job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
        subscriber.close()
    return {
        "published": published,
        "dead": [r for r in dead if r["stage"] == "sink"],
        "decision_rows": decision_rows,
        "audit_rows": [dict(r) for r in bq.query(f"SELECT decision_id FROM `{DATASET}.audit`").result()],
        "alive": alive,
        "exit_code": exit_code,
        "log": log_path.read_text(errors="replace"),
    }


def test_rejected_audit_rows_are_dead_lettered_with_the_error_and_the_job_keeps_deciding(broken_audit_run, reliability):
    run = broken_audit_run
    assert len(run["published"]) == 2, "the job should still publish both decisions"
    rejected = {}
    for row in run["dead"]:
        payload = orjson.loads(row["raw_payload"])
        if row["reason"] == "bigquery_insert_error" and "reviewed_by" in row["detail"] and "audit" in row["source"]:
            rejected[payload["decision_id"]] = payload
    reliability.record(
        "sink failures",
        "audit rows rejected by the table dead-lettered with the error",
        len(run["published"]),
        len(set(rejected) & run["published"]),
        "audit table migrated with a REQUIRED column the job does not write",
    )
    reliability.record(
        "sink failures",
        "decisions still published and stored while audit rows fail",
        len(run["published"]),
        len({r["decision_id"] for r in run["decision_rows"]} & run["published"]),
    )
    assert set(rejected) == run["published"]
    assert all(p["status"] == "issued" and p["event_count"] > 0 for p in rejected.values())
    assert run["audit_rows"] == []
    assert {r["decision_id"] for r in run["decision_rows"]} == run["published"]
    assert run["alive"], run["log"][-3000:]
    assert run["exit_code"] == 0, run["log"][-3000:]
