"""Run the streaming job locally against the emulators, with simulated traffic, end to end.

Starts the Pub/Sub, BigQuery and Bigtable emulators on free loopback ports,
creates the topics and subscriptions, provisions the BigQuery tables and the
Bigtable table of active mitigations, starts ``pipelines.streaming`` exactly as
an operator would, publishes the last hours of simulated traffic (shifted to
end now, so the wall-clock watermark accepts it) at ``--rate`` signals per
second, prints decisions as a subscriber receives them, then row counts from
BigQuery. With ``--serve_api`` it then starts the Mitigation API over the same
emulators and prints curl commands that query a mitigated user, and keeps
everything up until Ctrl-C.

Run locally (``make streaming-local`` and ``make api-demo`` run this)::

    python -m devtools.streaming_local --rate 200 --scale 0.1 [--serve_api]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time

import orjson
from google.cloud import pubsub_v1

from devtools.emulators import (
    BigQueryEmulator,
    BigtableEmulator,
    PubSubEmulator,
    create_topic_with_subscription,
    free_port,
    local_streaming_command,
)
from devtools.fake_auth import FakeCredentials
from pipelines import provision, simulate
from pipelines.options import PROJECT_ROOT
from schemas.avro import millis_to_rfc3339

DATASET = "mitigation"
BIGTABLE_INSTANCE = "local-mitigation"


HOURS = 2


def recent_traffic(seed: int, scale: float) -> list[bytes]:
    """The last HOURS hours of simulated signals, ending now, so the wall-clock watermark accepts them
    (the job runs with allowed lateness covering them); at least one whole hourly window is inside."""
    now = int(time.time() * 1000)
    start = now - HOURS * 3_600_000
    lines, _ = simulate.simulate(seed=seed, hours=HOURS, scale=scale, start=millis_to_rfc3339(start - start % 1000))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200, help="Signals published per second.")
    parser.add_argument("--scale", type=float, default=0.1, help="Population multiplier for the simulator.")
    parser.add_argument("--seed", type=int, default=7, help="Simulator seed.")
    parser.add_argument(
        "--quiet_sec", type=float, default=30, help="Stop once no decision has arrived for this many seconds."
    )
    parser.add_argument("--max_listen_sec", type=float, default=300, help="Stop listening after this long regardless.")
    parser.add_argument("--workdir", default="out/streaming-local", help="Emulator data and logs.")
    parser.add_argument(
        "--serve_api", action="store_true", help="Then serve the Mitigation API over the emulators until Ctrl-C."
    )
    parser.add_argument("--api_port", type=int, default=0, help="Port for --serve_api (0: a free one).")
    args = parser.parse_args(argv)

    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    project = BigQueryEmulator.project
    with (
        PubSubEmulator(workdir / "pubsub") as ps,
        BigQueryEmulator(workdir / "bigquery") as bq,
        BigtableEmulator(workdir / "bigtable") as bt,
    ):
        creds = FakeCredentials(project).start()
        env = {
            **os.environ,
            **creds.environment(),
            "PUBSUB_EMULATOR_HOST": ps.host,
            "BIGQUERY_EMULATOR_HOST": bq.url,
            "BIGTABLE_EMULATOR_HOST": bt.host,
        }
        os.environ.update(env)
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        paths = {
            name: create_topic_with_subscription(publisher, subscriber, project, name)
            for name in ("signals", "decisions")
        }
        client = provision.client_for(project, bq.url)
        provision.provision(client, DATASET)
        provision.provision_bigtable(project, BIGTABLE_INSTANCE)
        print(
            f"Pub/Sub emulator on {ps.host}, BigQuery emulator on {bq.url}, Bigtable emulator on {bt.host}; "
            f"tables provisioned in {DATASET} and {BIGTABLE_INSTANCE}"
        )

        job_log = workdir / "streaming-job.log"
        (workdir / "allowlist.yaml").write_bytes((PROJECT_ROOT / "rules" / "allowlist.yaml").read_bytes())
        (workdir / "rule_overrides.yaml").write_text("paused: []\n")
        command = local_streaming_command(
            project,
            paths["signals"][1],
            paths["decisions"][0],
            DATASET,
            "--early_firing_sec=5",
            f"--allowed_lateness_sec={(HOURS + 1) * 3600}",
            f"--signal_dedup_ttl_sec={(HOURS + 1) * 3600}",
            f"--bigtable_instance={BIGTABLE_INSTANCE}",
            # The API edits these copies and the job re-reads them (--policy_reload_sec), as in production.
            f"--allowlist={workdir / 'allowlist.yaml'}",
            f"--rule_overrides={workdir / 'rule_overrides.yaml'}",
        )
        with open(job_log, "wb") as log:
            job = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            lines = recent_traffic(args.seed, args.scale)
            print(f"Publishing {len(lines)} signals at {args.rate:.0f}/s (job log: {job_log})")
            simulate.publish(lines, paths["signals"][0], args.rate)
            counts: collections.Counter = collections.Counter()
            enforced: list[tuple[str, str]] = []
            deadline = time.monotonic() + args.max_listen_sec
            last = time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - last < args.quiet_sec and job.poll() is None:
                response = subscriber.pull(subscription=paths["decisions"][1], max_messages=100, timeout=5)
                for m in response.received_messages:
                    d = orjson.loads(m.message.data)
                    counts[(d["rule_id"], d["action"], d["mode"])] += 1
                    if d["mode"] == "enforce":
                        enforced.append((d["entity_type"], d["entity_id"]))
                    entity = f"{d['entity_type']}:{d['entity_id']}"
                    print(f"  decision {d['action']:16} {entity:22} {d['rule_id']}: {d['reason']}")
                if response.received_messages:
                    last = time.monotonic()
                    subscriber.acknowledge(
                        subscription=paths["decisions"][1], ack_ids=[m.ack_id for m in response.received_messages]
                    )
                # The local runner's Pub/Sub read blocks while the input is idle; keep a trickle flowing.
                publisher.publish(paths["signals"][0], lines[0])
            print("\nDecisions by rule:")
            for (rule, action, mode), n in sorted(counts.items()):
                print(f"  {rule:32} {action}/{mode:8} {n}")
            for table in ("decisions", "audit", "dead_letters"):
                rows = list(client.query(f"SELECT COUNT(*) AS n FROM `{DATASET}.{table}`").result())
                print(f"BigQuery {DATASET}.{table}: {rows[0]['n']} rows")
            reasons = client.query(
                f"SELECT reason, COUNT(*) AS n FROM `{DATASET}.dead_letters` GROUP BY reason"
            ).result()
            print("Dead letters by reason:", {r["reason"]: r["n"] for r in reasons})
            if args.serve_api:
                serve_api(workdir, env, project, args.api_port, enforced)
        finally:
            if job.poll() is None:
                job.send_signal(signal.SIGTERM)
                job.wait(timeout=30)
            creds.stop()
    return 0


def serve_api(workdir: pathlib.Path, env: dict, project: str, port: int, enforced: list[tuple[str, str]]) -> None:
    """The Mitigation API over the same emulators, with a fresh operator token, until Ctrl-C."""
    token = secrets.token_urlsafe(18)
    tokens = workdir / "api-tokens.yaml"
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens.write_text(f"tokens:\n  - sha256: {digest}\n    actor: local-operator\n    scopes: [read, operate]\n")
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "service",
        f"--project={project}",
        f"--bigtable_instance={BIGTABLE_INSTANCE}",
        f"--tokens={tokens}",
        f"--dataset={DATASET}",
        f"--allowlist={workdir / 'allowlist.yaml'}",
        f"--rule_overrides={workdir / 'rule_overrides.yaml'}",
        f"--port={port}",
    ]
    with open(workdir / "api.log", "wb") as log:
        api = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    users = [i for t, i in enforced if t == "user"] or ["<a user id>"]
    print(f"\nMitigation API on {base} (log {workdir / 'api.log'}). Try:")
    print(f'  curl -s -H "Authorization: Bearer {token}" {base}/v1/entities/user/{users[0]}/mitigations')
    body = orjson.dumps({"entities": [{"entity_type": "user", "entity_id": u} for u in users[:3]]}).decode()
    print(f'  curl -s -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\')
    print(f"       -X POST {base}/v1/mitigations:batchLookup -d '{body}'")
    print(f"  curl -s {base}/openapi.json | head -c 300")
    print("Ctrl-C stops the API and the emulators.")
    try:
        api.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if api.poll() is None:
            api.terminate()
            api.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
