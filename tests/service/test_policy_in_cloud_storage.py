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
import http.client
import http.server
import json
import os
import pathlib
import socket
import tempfile
import threading
import time
import urllib.parse

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


@pytest.fixture(autouse=True)
def _lock_files_in_this_tests_folder(tmp_path, monkeypatch):
    """Lock files for gs:// paths go in a private folder of the host's temp directory (one per path, kept, as
    flock files must be): here, pytest's folder for the test, so runs do not leave them in /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


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


def object_name(path: str) -> str:
    """The object's name in BUCKET of a ``gs://BUCKET/...`` path."""
    return path[len(f"gs://{BUCKET}/") :]


def stored(bucket, path: str) -> str | None:
    """The object's text as Cloud Storage holds it, read with the storage client (None: no object)."""
    blob = bucket.get_blob(object_name(path))
    return None if blob is None else blob.download_as_text()


def leftovers(bucket, path: str) -> list[str]:
    """Staged objects left beside the file."""
    folder = object_name(path).rpartition("/")[0]
    return [b.name for b in bucket.list_blobs(prefix=f"{folder}/") if b.name.endswith(".tmp")]


def allowlist_a_device(settings, prefix: str):
    """POST an allowlist entry for a new device id through a fresh app over ``settings``: (id, answer)."""
    entity_id, _, added = list_then_allowlist_a_device(settings, prefix)
    return entity_id, added


def list_then_allowlist_a_device(settings, prefix: str):
    """GET the allowlist, then POST an entry for a new device id, through a fresh app: (id, listed, added)."""
    entity_id = unique(prefix)
    entry = {"entity": "device", "id": entity_id, "reason": "QA lab device", "owner": "qa"}
    with TestClient(create_app(settings)) as client:
        listed = client.get("/v1/allowlist", headers=READ)
        return entity_id, listed, client.post("/v1/allowlist", json=entry, headers=OPERATE)


def audit_statuses(bq, entity_id: str) -> dict[str, dict]:
    query = f"SELECT decision_id, status, reverses_decision_id FROM `{DATASET}.audit` WHERE entity_id = @id"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", entity_id)])
    return {r["status"]: dict(r) for r in bq.query(query, job_config=config).result()}


class StorageProxy:
    """A proxy in front of the Cloud Storage emulator, which ignores ``ifGenerationMatch``: on a copy it applies
    the condition to the destination as Cloud Storage does (412 when the object's generation differs), and it
    can make what a network does to a copy happen on cue. The API's storage client is the real one, talking
    HTTP. ``on_first_copy``:

    * ``"edit"``: another host writes the destination just before the first copy arrives;
    * ``"lose_answer"``: the first copy is made, and the connection closes before its answer;
    * ``"lose_answer_then_fail"``: that, and from then on every request gets a 503.

    With ``refuse_uploads``, every upload gets a 403, as for an account that may read but not create objects.
    """

    OTHER_HOST_TEXT = "allowlist: []  # written by another host\n"

    def __init__(self, upstream: str, bucket, on_first_copy: str | None = None, refuse_uploads: bool = False):
        target = urllib.parse.urlparse(upstream)
        self.copies = 0
        proxy, failing = self, threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, body: bytes, headers=()) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if failing.is_set():
                    return self._answer(503, b'{"error": {"code": 503, "message": "unavailable"}}')
                url = urllib.parse.urlparse(self.path)
                if refuse_uploads and url.path.startswith("/upload/"):
                    return self._answer(403, b'{"error": {"code": 403, "message": "no storage.objects.create"}}')
                first_copy = False
                if "/copyTo/" in url.path:
                    proxy.copies += 1
                    first_copy = proxy.copies == 1
                    destination = urllib.parse.unquote(url.path.split("/copyTo/b/")[1].split("/o/", 1)[1])
                    if first_copy and on_first_copy == "edit":
                        bucket.blob(destination).upload_from_string(StorageProxy.OTHER_HOST_TEXT)
                    wanted = urllib.parse.parse_qs(url.query).get("ifGenerationMatch")
                    if wanted is not None:
                        current = bucket.get_blob(destination)
                        if (0 if current is None else int(current.generation)) != int(wanted[0]):
                            message = {
                                "error": {
                                    "code": 412,
                                    "message": "At least one of the pre-conditions you specified did not hold.",
                                }
                            }
                            return self._answer(412, json.dumps(message).encode())
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if first_copy and on_first_copy in ("lose_answer", "lose_answer_then_fail"):
                    if on_first_copy == "lose_answer_then_fail":
                        failing.set()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                return self._answer(answer.status, data, answer.getheaders())

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxied(gcp_env, bucket, monkeypatch):
    """Start a StorageProxy in the given mode and point the API's storage client at it."""
    proxies = []

    def start(on_first_copy: str | None = None, refuse_uploads: bool = False) -> StorageProxy:
        proxy = StorageProxy(gcp_env["storage"].url, bucket, on_first_copy, refuse_uploads)
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


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


def test_a_bucket_that_cannot_be_written_is_a_503_and_nothing_is_audited(gcs_settings, bucket, backends, proxied):
    """The new object is staged before the audit row: an audited change must have happened."""
    proxied(refuse_uploads=True)
    before = stored(bucket, gcs_settings.allowlist_path)
    entity_id, added = allowlist_a_device(gcs_settings, "dev-read-only")
    assert added.status_code == 503
    assert added.json() == {"error": "the policy file cannot be written; nothing was changed"}
    assert audit_statuses(backends["bq"], entity_id) == {}
    assert stored(bucket, gcs_settings.allowlist_path) == before


def test_an_edit_from_another_host_is_not_overwritten_and_the_change_is_audited_as_not_made(
    gcs_settings, bucket, backends, proxied
):
    """Another host changes the allowlist between this change's read and its copy: the copy's generation
    condition refuses it, so the other host's edit stays, and the audited change is recorded as not made."""
    proxy = proxied("edit")
    entity_id, added = allowlist_a_device(gcs_settings, "dev-raced")

    assert added.status_code == 503
    assert added.json() == {"error": "the policy file cannot be written; nothing was changed"}
    assert stored(bucket, gcs_settings.allowlist_path) == StorageProxy.OTHER_HOST_TEXT
    rows = audit_statuses(backends["bq"], entity_id)
    assert set(rows) == {"operator_allowlist_add", "operator_change_failed"}
    assert rows["operator_change_failed"]["reverses_decision_id"] == rows["operator_allowlist_add"]["decision_id"]
    assert proxy.copies >= 1 and leftovers(bucket, gcs_settings.allowlist_path) == []


def test_a_copy_made_whose_answer_was_lost_counts_as_made(gcs_settings, bucket, backends, proxied):
    """The client retries a copy whose answer never came; the retry's generation condition then fails, since
    the first attempt changed the object. The object holds the change, so the API says it was made."""
    proxy = proxied("lose_answer")
    entity_id, added = allowlist_a_device(gcs_settings, "dev-lost-answer")

    assert proxy.copies == 2  # the lost answer, then the retry refused by its condition
    assert added.status_code == 201, added.text
    assert entity_id in stored(bucket, gcs_settings.allowlist_path)
    assert set(audit_statuses(backends["bq"], entity_id)) == {"operator_allowlist_add"}
    assert leftovers(bucket, gcs_settings.allowlist_path) == []


def test_a_copy_whose_outcome_cannot_be_read_back_is_a_503_that_says_so(
    gcs_settings, bucket, backends, proxied, monkeypatch
):
    monkeypatch.setattr(policy_files, "GCS_DEADLINE_SEC", 1.0)
    proxied("lose_answer_then_fail")
    entity_id, added = allowlist_a_device(gcs_settings, "dev-unknown")

    assert added.status_code == 503
    assert added.json() == {"error": "the change could not be confirmed; read the policy file before trying again"}
    assert entity_id in stored(bucket, gcs_settings.allowlist_path)  # made, in fact
    assert set(audit_statuses(backends["bq"], entity_id)) == {"operator_allowlist_add"}  # not recorded as not made


def test_a_missing_bucket_is_a_503_not_an_empty_allowlist_and_nothing_is_audited(gcs_settings, backends):
    """A mistyped bucket reads as an error, where reading it as a missing file (no entries) would list an empty
    allowlist."""
    nowhere = dataclasses.replace(gcs_settings, allowlist_path="gs://no-such-policy-bucket/allowlist.yaml")
    entity_id, listed, added = list_then_allowlist_a_device(nowhere, "dev-no-bucket")
    for answer in (listed, added):
        assert answer.status_code == 503
        assert answer.json() == {"error": "the policy file cannot be read; try again"}
    assert audit_statuses(backends["bq"], entity_id) == {}


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_policy_file_that_is_not_utf8_is_a_409_and_left_alone(where, settings, gcs_settings, bucket):
    latin1 = "allowlist: []\n# Café\n".encode("latin-1")
    if where == "local":
        chosen = settings
        pathlib.Path(settings.allowlist_path).write_bytes(latin1)
    else:
        chosen = gcs_settings
        bucket.blob(object_name(gcs_settings.allowlist_path)).upload_from_string(latin1)
    _, listed, added = list_then_allowlist_a_device(chosen, "dev-not-text")
    for answer in (listed, added):
        assert answer.status_code == 409
        assert answer.json() == {"error": "the policy file needs fixing by hand first: it is not UTF-8 text"}
    if where == "local":
        assert pathlib.Path(settings.allowlist_path).read_bytes() == latin1
    else:
        assert bucket.get_blob(object_name(gcs_settings.allowlist_path)).download_as_bytes() == latin1


def test_a_storage_that_stops_answering_is_a_503_within_the_deadline(gcs_settings, silent_port, monkeypatch):
    """The storage client's defaults retry for minutes, holding a worker thread (and, for a change, the lock)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setattr(policy_files, "GCS_DEADLINE_SEC", 0.5)
    with TestClient(create_app(gcs_settings)) as client:
        started = time.monotonic()
        listed = client.get("/v1/allowlist", headers=READ)
        elapsed = time.monotonic() - started
        paused = client.post("/v1/rules/stream_farm_exclude/pause", json={"reason": "Incident"}, headers=OPERATE)
    assert listed.status_code == 503
    assert listed.json() == {"error": "the policy file cannot be read; try again"}
    assert elapsed < 6, elapsed  # about the deadline (0.5 s), where the client's default retries for minutes
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


@pytest.mark.parametrize("made_by_someone", ["open directory", "symlink"])
def test_the_lock_directory_must_be_private(made_by_someone, tmp_path, monkeypatch):
    """Lock files for gs:// paths live in a directory of this user's that only it can use: in a shared temp
    directory, anyone could otherwise make or hold a lock file of a predictable name first."""
    locks = tmp_path / f"mitigation-api-locks-{os.getuid()}"  # tmp_path is the temp directory (the fixture above)
    if made_by_someone == "open directory":
        locks.mkdir(mode=0o777)
        locks.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        locks.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PolicyPathError, match="only it can use"):
        GcsPolicyFile(f"gs://{BUCKET}/allowlist.yaml", None)
    if locks.is_symlink():
        locks.unlink()  # made afresh, private
    else:
        locks.chmod(0o700)
    assert GcsPolicyFile(f"gs://{BUCKET}/allowlist.yaml", None).lock.path.parent == locks
