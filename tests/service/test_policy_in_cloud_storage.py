"""Policy files in Cloud Storage: the API edits the ``gs://`` objects the Dataflow job re-reads.

Against the Cloud Storage emulator (``gcp-storage-emulator``), with the API's
other backends on their emulators as in ``test_api.py``. What the API wrote is
read back with the storage client, and through Beam's ``FileSystems`` as the
streaming job's policy reload reads it (``transforms.policy.PolicySource``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import os
import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient
from google.cloud import bigquery, storage

from pipelines.options import DEFAULT_ALLOWLIST, DEFAULT_RULES
from service import policy_files
from service.app import create_app
from service.policy_files import GcsPolicyFile, PolicyPathError, policy_file
from tests.service.conftest import DATASET, OPERATE_TOKEN, OPERATOR, READ_TOKEN, audit_rows, auth, unique
from transforms.policy import Policy, PolicySource
from transforms.rulepack import load_rule_pack, parse_rule_overrides
from transforms.safeguards import parse_allowlist

BUCKET = "mitigation-policy"
OPERATE = auth(OPERATE_TOKEN)
READ = auth(READ_TOKEN)
KNOWN_RULES = load_rule_pack(DEFAULT_RULES).rule_ids


@pytest.fixture(scope="session")
def bucket(gcp_env):
    client = storage.Client(project=gcp_env["project"])
    return client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)


@pytest.fixture
def gcs_settings(settings, bucket):
    """The API's settings with both policy files in Cloud Storage, under a folder of this test's own; the
    allowlist starts as the repository's default file, as a deployment would upload it."""
    folder = unique("policy")
    with open(DEFAULT_ALLOWLIST, encoding="utf-8") as handle:
        bucket.blob(f"{folder}/allowlist.yaml").upload_from_string(handle.read())
    return dataclasses.replace(
        settings,
        allowlist_path=f"gs://{BUCKET}/{folder}/allowlist.yaml",
        rule_overrides_path=f"gs://{BUCKET}/{folder}/rule_overrides.yaml",
    )


@pytest.fixture
def gcs_client(gcs_settings):
    with TestClient(create_app(gcs_settings)) as client:
        yield client


def stored(bucket, path: str) -> str | None:
    """The object's text as Cloud Storage holds it, read with the storage client (None: no object)."""
    blob = bucket.get_blob(path[len(f"gs://{BUCKET}/") :])
    return None if blob is None else blob.download_as_text()


def leftovers(bucket, path: str) -> list[str]:
    """Staged objects left beside the file."""
    folder = path[len(f"gs://{BUCKET}/") :].rpartition("/")[0]
    return [b.name for b in bucket.list_blobs(prefix=f"{folder}/") if b.name.endswith(".tmp")]


def test_allowlist_changes_are_made_to_the_object_and_audited(gcs_client, gcs_settings, bucket, backends):
    path = gcs_settings.allowlist_path
    before = yaml.safe_load(stored(bucket, path))["allowlist"]
    entry = {"entity": "ip", "cidr": "198.51.100.0/24", "reason": "Dormitory NAT, ticket 91", "owner": "trust-safety"}

    added = gcs_client.post("/v1/allowlist", json=entry, headers=OPERATE)

    assert added.status_code == 201, added.text
    text = stored(bucket, path)
    parse_allowlist(text, "allowlist", KNOWN_RULES)  # still what the streaming job accepts
    after = yaml.safe_load(text)["allowlist"]
    assert after[:-1] == before and after[-1] == entry
    assert text.startswith("# Entities that no enforce decision may target.")  # the header comment survives
    [audit] = audit_rows(backends["bq"], added.json()["audit_id"])
    assert (audit["status"], audit["actor"], audit["reason"]) == ("operator_allowlist_add", OPERATOR, entry["reason"])
    listed = gcs_client.get("/v1/allowlist", headers=READ)
    assert listed.status_code == 200 and listed.json()["version"] == added.json()["version"]
    assert listed.json()["entries"][-1]["cidr"] == "198.51.100.0/24"

    index = added.json()["entry"]["index"]
    expired = gcs_client.post(
        f"/v1/allowlist/{index}/expire",
        json={"reason": "Moved to its own range"},
        headers={**OPERATE, "If-Match": listed.headers["ETag"]},
    )

    assert expired.status_code == 200, expired.text
    assert yaml.safe_load(stored(bucket, path))["allowlist"][index]["expires"] == dt.datetime.now(tz=dt.UTC).date()
    assert leftovers(bucket, path) == []


def test_a_stale_version_is_refused_and_the_object_is_unchanged(gcs_client, gcs_settings, bucket):
    before = stored(bucket, gcs_settings.allowlist_path)
    stale = gcs_client.post(
        "/v1/allowlist/0/expire", json={"reason": "cleanup"}, headers={**OPERATE, "If-Match": '"' + "0" * 64 + '"'}
    )
    assert stale.status_code == 412
    assert stored(bucket, gcs_settings.allowlist_path) == before


def test_a_pause_made_through_the_api_reaches_the_jobs_policy_reload(gcs_client, gcs_settings, bucket, backends):
    """The production loop: the API writes the overrides object, and the streaming job's policy source, which
    reads ``gs://`` through Beam's FileSystems, picks the pause up at its next reload, and then the resume."""
    rule = "stream_farm_exclude"
    source = PolicySource(
        Policy(load_rule_pack(DEFAULT_RULES)),
        rules_path=DEFAULT_RULES,
        reload_sec=0.001,
        overrides_path=gcs_settings.rule_overrides_path,
    )

    def paused_in_the_job() -> set[str]:
        source._next_check = 0
        return {r.id for r in source.current().pack.rules if r.paused}

    assert stored(bucket, gcs_settings.rule_overrides_path) is None  # the first pause creates the object
    paused = gcs_client.post(f"/v1/rules/{rule}/pause", json={"reason": "Incident 81"}, headers=OPERATE)

    assert paused.status_code == 200, paused.text
    assert parse_rule_overrides(stored(bucket, gcs_settings.rule_overrides_path), "o", KNOWN_RULES) == {rule}
    assert paused_in_the_job() == {rule}
    [audit] = audit_rows(backends["bq"], paused.json()["audit_id"])
    assert (audit["status"], audit["entity_id"]) == ("operator_rule_pause", rule)

    resumed = gcs_client.post(f"/v1/rules/{rule}/resume", json={"reason": "Fixed"}, headers=OPERATE)

    assert resumed.status_code == 200, resumed.text
    assert paused_in_the_job() == set()
    assert gcs_client.get("/v1/rules/paused", headers=READ).json() == {"paused": []}
    assert leftovers(bucket, gcs_settings.rule_overrides_path) == []


def test_a_bucket_that_cannot_be_written_is_a_503_and_nothing_is_audited(gcs_settings, backends):
    """The new object is staged before the audit row: an audited change must have happened."""
    entity_id = unique("dev-no-bucket")
    nowhere = dataclasses.replace(gcs_settings, allowlist_path="gs://no-such-policy-bucket/allowlist.yaml")
    entry = {"entity": "device", "id": entity_id, "reason": "QA lab device", "owner": "qa"}
    with TestClient(create_app(nowhere)) as client:
        added = client.post("/v1/allowlist", json=entry, headers=OPERATE)
    assert added.status_code == 503
    assert added.json() == {"error": "the policy file cannot be written; nothing was changed"}
    query = f"SELECT COUNT(*) AS n FROM `{DATASET}.audit` WHERE entity_id = @id"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", entity_id)])
    assert next(iter(backends["bq"].query(query, job_config=config).result()))["n"] == 0


def test_a_storage_that_stops_answering_is_a_503_within_the_deadline(gcs_settings, silent_port, monkeypatch):
    """The storage client's defaults retry for minutes, holding a worker thread (and, for a change, the lock)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setattr(policy_files, "GCS_DEADLINE_SEC", 1.0)
    with TestClient(create_app(gcs_settings)) as client:
        started = time.monotonic()
        listed = client.get("/v1/allowlist", headers=READ)
        elapsed = time.monotonic() - started
        paused = client.post("/v1/rules/stream_farm_exclude/pause", json={"reason": "Incident"}, headers=OPERATE)
    assert listed.status_code == 503
    assert listed.json() == {"error": "the policy file cannot be read; try again"}
    assert elapsed < 30, elapsed  # bounded by the deadline and one attempt's timeout, not the client's minutes
    assert paused.status_code == 503


def test_a_change_waits_for_another_process_changing_the_same_object(gcs_client, gcs_settings, bucket):
    """``--workers N`` processes on one host share a gs:// file's lock, as they share a local file's."""
    path = gcs_settings.allowlist_path
    lock_path = policy_file(path).lock.path  # the same for every process on this host
    held = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    entry = {"entity": "device", "id": unique("dev-wait"), "reason": "QA lab device", "owner": "qa"}
    answer: dict = {}
    change = threading.Thread(
        target=lambda: answer.update(r=gcs_client.post("/v1/allowlist", json=entry, headers=OPERATE))
    )
    try:
        change.start()
        change.join(2.0)
        assert change.is_alive() and entry["id"] not in stored(bucket, path)  # waiting on the other holder
    finally:
        os.close(held)
    change.join(60)
    assert answer["r"].status_code == 201, answer["r"].text
    assert entry["id"] in stored(bucket, path)


@pytest.mark.parametrize("path", ["gs://", "gs://bucket", "gs://bucket/", "gs://bucket/folder/"])
def test_a_gs_path_without_an_object_is_refused(path):
    with pytest.raises(PolicyPathError, match="gs://BUCKET/OBJECT"):
        GcsPolicyFile(path, None)
