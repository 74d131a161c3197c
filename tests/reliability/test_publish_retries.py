"""Pub/Sub publish failures are retried: decisions published while Pub/Sub is unreachable all arrive once it is back.

The job's own publishing path (``decision_message`` then Beam's
``WriteToPubSub``) runs while a loopback proxy in front of the emulator refuses
and resets connections; the proxy comes back after a few seconds. The Pub/Sub
client's retries must carry every decision through, with no error surfacing
from the write step. A subscriber talking to the emulator directly then checks
that each decision arrived, with its attributes.
"""

from __future__ import annotations

import collections
import threading
import time

import apache_beam as beam
import orjson
from apache_beam.io.gcp.pubsub import PubsubMessage, WriteToPubSub
from apache_beam.testing.test_pipeline import TestPipeline
from google.cloud import pubsub_v1

from devtools.emulators import create_topic_with_subscription
from devtools.faultproxy import FaultProxy
from pipelines.streaming import decision_message
from schemas import Decision

OUTAGE_SEC = 8
DECISIONS = 250  # more than one publish buffer of Beam's writer (100)


def _decision(n: int) -> Decision:
    return Decision(
        decision_id=f"retry{n:04d}",
        entity_type="user",
        entity_id=f"u{n}",
        action="exclude_streams",
        rule_id="stream_farm_exclude",
        rule_version=1,
        mode="enforce",
        reason="test",
        evidence={"streams": 45.0},
        window_start_ms=1_793_577_600_000,
        window_end_ms=1_793_581_200_000,
        decided_at_ms=1_793_581_200_000,
        expires_at_ms=1_794_186_000_000,
        trace_ids=[],
    )


def test_decisions_published_during_a_pubsub_outage_all_arrive(gcp_env, monkeypatch, reliability):
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic, subscription = create_topic_with_subscription(publisher, subscriber, gcp_env["project"], "retry-decisions")
    proxy = FaultProxy("127.0.0.1", gcp_env["pubsub"].port)
    # The write step's own client reaches Pub/Sub through the proxy, which is down when it starts.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.host)
    threading.Timer(OUTAGE_SEC, proxy.up).start()
    started = time.monotonic()
    try:
        with TestPipeline(runner="FnApiRunner") as p:
            _ = (
                p
                | beam.Create([_decision(n) for n in range(DECISIONS)])
                | beam.Map(decision_message).with_output_types(PubsubMessage)
                | WriteToPubSub(topic, with_attributes=True)
            )
        took = time.monotonic() - started
    finally:
        proxy.stop()

    received = collections.Counter()
    attributes_ok = 0
    deadline = time.monotonic() + 60
    while sum(received.values()) < DECISIONS and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=10)
        for m in response.received_messages:
            d = orjson.loads(m.message.data)
            received[d["decision_id"]] += 1
            attributes_ok += m.message.attributes["decision_id"] == d["decision_id"]
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
    subscriber.close()

    reliability.record(
        "sink failures",
        "decisions published through a Pub/Sub outage arrive",
        DECISIONS,
        len(received),
        f"Pub/Sub unreachable for the first {OUTAGE_SEC} s; the write finished after {took:.0f} s; "
        f"{sum(received.values()) - len(received)} repeated by the client's retries",
    )
    assert took >= OUTAGE_SEC, "the write finished before Pub/Sub came back: the outage was not exercised"
    assert len(received) == DECISIONS
    assert attributes_ok == sum(received.values())
