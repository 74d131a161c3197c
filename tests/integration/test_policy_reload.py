"""Swapping the rule file while the streaming job runs changes behaviour; a broken file keeps the last good pack."""

import signal
import subprocess
import time

import orjson
import pytest
from google.cloud import pubsub_v1

from devtools.emulators import create_topic_with_subscription, local_streaming_command
from pipelines import provision
from pipelines.options import PROJECT_ROOT
from tests.integration.test_streaming_e2e import BackgroundTraffic, _signal
from tests.transforms.test_rulepack import pack_text, rule

DATASET = "mitigation_reload"
PACK_A = pack_text(rule(id="hot_a", when="streams >= 3", min_events=3))
PACK_B = pack_text(rule(id="hot_b", when="streams >= 3", min_events=3))
BROKEN = PACK_B.replace("streams >= 3", "streams >=")


def plays(user: str, n: int = 3) -> list[bytes]:
    now = int(time.time() * 1000)
    hour_start = now - now % 3_600_000
    return [
        orjson.dumps(
            _signal(
                "stream",
                max(hour_start, now - 1000 * i),
                hash((user, i)) % 10**9,
                user_id=user,
                track_id="t1",
                artist_id="a1",
                ms_played=32_000,
            )
        )
        for i in range(n)
    ]


def wait_for_decision(subscriber, subscription, user, timeout_sec=45):
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=50, timeout=5)
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        for m in response.received_messages:
            d = orjson.loads(m.message.data)
            if d["entity_id"] == user:
                return d["rule_id"]
    return None


@pytest.fixture(scope="module")
def job(gcp_env, tmp_path_factory):
    project = gcp_env["project"]
    folder = tmp_path_factory.mktemp("reload")
    rules = folder / "rules.yaml"
    rules.write_text(PACK_A)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    names = {
        name: create_topic_with_subscription(publisher, subscriber, project, name)
        for name in ("signals-reload", "decisions-reload")
    }
    provision.provision(provision.client_for(project, gcp_env["bigquery"].url), DATASET)
    log_path = folder / "job.log"
    command = local_streaming_command(
        project,
        names["signals-reload"][1],
        names["decisions-reload"][0],
        DATASET,
        f"--rules={rules}",
        "--allowlist=",
        "--early_firing_sec=1",
        "--policy_reload_sec=1",
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    with BackgroundTraffic(publisher, names["signals-reload"][0]):
        yield {
            "rules": rules,
            "publish": lambda lines: [publisher.publish(names["signals-reload"][0], x).result() for x in lines],
            "decision_for": lambda user: wait_for_decision(subscriber, names["decisions-reload"][1], user),
            "log": log_path,
        }
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_swapping_the_rule_file_changes_behaviour_and_a_broken_file_keeps_the_last_good_pack(job):
    job["publish"](plays("reload-a"))
    assert job["decision_for"]("reload-a") == "hot_a"

    job["rules"].write_text(PACK_B)
    time.sleep(4)  # several reload intervals, with background traffic flowing through the rules
    job["publish"](plays("reload-b"))
    assert job["decision_for"]("reload-b") == "hot_b"

    job["rules"].write_text(BROKEN)
    time.sleep(4)
    job["publish"](plays("reload-c"))
    assert job["decision_for"]("reload-c") == "hot_b"
    assert "policy change rejected" in job["log"].read_text()
