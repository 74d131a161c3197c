"""``python -m service`` served by uvicorn: real HTTP, a body streamed in chunks, JSON logs without IPs."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines.options import PROJECT_ROOT
from tests.service.conftest import INSTANCE, READ_TOKEN, auth, mitigation, put_cell


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=[1, 2], ids=["one process", "two worker processes"])
def server(settings, backends, request):
    port = _free_port()
    command = [sys.executable, "-m", "service", "--project", settings.project, "--bigtable_instance", INSTANCE]
    command += ["--workers", str(request.param)]
    command += ["--tokens", settings.tokens_path, "--allowlist", settings.allowlist_path, "--port", str(port)]
    command += ["--rule_overrides", settings.rule_overrides_path]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.communicate()[1][-2000:]}")
            time.sleep(0.2)
    yield {"port": port, "process": process, "workers": request.param}
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


def _request(port, method, path, body=None, headers=None, encode_chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=encode_chunked)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_served_over_http_with_a_streamed_body_limit_and_masked_logs(server, backends):
    port = server["port"]
    address = f"203.0.113.{10 + server['workers']}"  # one per run: the Bigtable table is the session's
    ip = mitigation("ip", address, expires_in_sec=600, action="block_ip")
    put_cell(backends["table"], ip)

    assert _request(port, "GET", "/healthz") == (200, b'{"status":"ok"}')
    status, body = _request(port, "GET", f"/v1/entities/ip/{address}/mitigations", headers=auth(READ_TOKEN))
    assert status == 200 and [m["decision_id"] for m in json.loads(body)["mitigations"]] == [ip.decision_id]

    def pieces():  # 80 chunks of 1 KiB with no Content-Length: the limit has to count as they arrive
        for _ in range(80):
            yield b" " * 1024

    headers = {**auth(READ_TOKEN), "Content-Type": "application/json"}
    status, body = _request(port, "POST", "/v1/mitigations:batchLookup", pieces(), headers, encode_chunked=True)
    assert status == 413 and json.loads(body) == {"error": "request body over 65536 bytes"}

    server["process"].terminate()
    logs = server["process"].communicate(timeout=30)[1]
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(
        entry["message"].startswith("GET /v1/entities/{entity_type}/{entity_id}/mitigations 200") for entry in lines
    )
    assert address not in logs and "127.0.0.1" not in logs


@pytest.mark.parametrize("workers", [1, 2])
def test_serving_without_credentials_is_an_error_naming_them_not_a_worker_traceback(settings, tmp_path, workers):
    """Outside the emulator the store's clients need Google credentials. The command finds out before any
    worker starts: exit 2 and one error line, where uvicorn's supervisor would stop with status 0."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "missing-adc.json")
    command = [sys.executable, "-m", "service", "--project", settings.project, "--bigtable_instance", INSTANCE]
    command += ["--tokens", settings.tokens_path, "--allowlist", settings.allowlist_path, "--port", str(_free_port())]
    command += ["--rule_overrides", settings.rule_overrides_path, "--workers", str(workers)]
    done = subprocess.run(command, check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: no Google credentials for Bigtable") and "missing-adc.json" in done.stderr


def test_a_policy_path_naming_no_object_is_an_error_at_start(settings):
    command = [sys.executable, "-m", "service", "--project", settings.project, "--bigtable_instance", INSTANCE]
    command += ["--tokens", settings.tokens_path, "--allowlist", "gs://policy-bucket/", "--port", str(_free_port())]
    command += ["--rule_overrides", settings.rule_overrides_path]
    done = subprocess.run(command, check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "error: gs://policy-bucket/ is not a gs://BUCKET/OBJECT path\n"


def test_policy_files_in_cloud_storage_without_credentials_are_an_error_at_start(settings, tmp_path):
    """Bigtable answers (its emulator needs no credentials) but Cloud Storage, holding the policy files, has no
    credentials: exit 2 at start, not a 503 on the first operator call."""
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "missing-adc.json")
    command = [sys.executable, "-m", "service", "--project", settings.project, "--bigtable_instance", INSTANCE]
    command += ["--tokens", settings.tokens_path, "--allowlist", "gs://policy-bucket/allowlist.yaml"]
    command += ["--rule_overrides", settings.rule_overrides_path, "--port", str(_free_port())]
    done = subprocess.run(command, check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]  # after the Bigtable client's warning that it uses the emulator
    assert last.startswith("error: no Google credentials for Cloud Storage") and "missing-adc.json" in last
