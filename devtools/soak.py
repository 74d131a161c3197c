"""Soak the streaming job against the emulators with faults injected, then reconcile everything it was sent.

For ``--duration_sec`` (default 10 minutes) this publishes a steady stream of
signals at ``--rate`` per second with the wall clock as event time: ordinary
listeners, a new stream-farm bot and a new sign-up-burst device every minute,
a share of malformed messages (``--bad_share``) and a share of redeliveries of
messages sent up to a minute before (``--duplicate_share``). Part-way through,
the BigQuery emulator becomes unreachable for ``--bq_outage_sec`` and later the
job's Pub/Sub connection for ``--pubsub_outage_sec`` (a loopback proxy refuses
and resets connections; see ``devtools/faultproxy.py``). The job runs the soak
rule pack (``devtools/soak_rules.yaml``: one-minute windows, so windows close
and state is released many times in a run).

Then it keeps a tail of traffic flowing (the local runner only advances while
input arrives) until the last windows have closed, and reconciles:

* every valid signal published is counted exactly once in its user window in
  the job's features table (``--features_table``), whatever was redelivered
  and whatever the outages did;
* every malformed message published is in the dead-letter table;
* every decision on the topic has its audit row, and no decision id came twice;
* the job's resident memory is flat: the median of the last third of the run
  is within ``--max_rss_growth`` of the median of the middle third.

It prints a table, writes ``report.json`` in ``--workdir`` and exits non-zero
if any check fails. ``make soak`` runs it with the defaults; the test suite runs
a short one against the session's emulators.

Run locally::

    python -m devtools.soak --duration_sec 600 --rate 10
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid

import orjson
from google.api_core.exceptions import GoogleAPICallError
from google.cloud import pubsub_v1

from devtools.emulators import BigQueryEmulator, PubSubEmulator, create_topic_with_subscription, stop_job
from devtools.fake_auth import FakeCredentials
from devtools.faultproxy import FaultProxy
from pipelines import provision
from pipelines.options import PROJECT_ROOT
from schemas.avro import datetime_to_millis, millis_to_rfc3339

SOAK_RULES = PROJECT_ROOT / "devtools" / "soak_rules.yaml"
WINDOW_MS = 60_000
# The local runner runs one executor thread (a BigQuery insert retrying through an
# outage stalls the whole job) and its Pub/Sub watermark is the wall clock, not
# the backlog, so after a stall the backlog it catches up on is late. The rate
# leaves it headroom to catch up, and lateness covers the catch-up. Its monitor
# thread also scans every key's timers on each step, so throughput falls as keyed
# state grows; production defaults (an hour of each) would be too slow here.
ALLOWED_LATENESS_SEC = 300
DEDUP_TTL_SEC = 360  # >= allowed lateness and the oldest redelivery (60 s)


class Traffic:
    """Generates the soak's messages and remembers the ground truth for reconciliation."""

    def __init__(self, seed: int, bad_share: float, duplicate_share: float):
        self.rng = random.Random(seed)
        self.bad_share, self.duplicate_share = bad_share, duplicate_share
        self.run_id = uuid.uuid4().hex[:6]
        self.n = 0
        self.expected: collections.Counter = collections.Counter()  # (user, window_start_ms) -> distinct signals
        self.bad: list[bytes] = []
        self.recent: collections.deque = collections.deque()  # (published_at_ms, payload) of valid messages
        self.counts: collections.Counter = collections.Counter()

    def _signal(self, now_ms: int, **fields) -> bytes:
        self.n += 1
        sig = {
            "event_id": f"soak-{self.run_id}-{self.n}",
            "event_time": millis_to_rfc3339(now_ms),
            **fields,
        }
        return orjson.dumps(sig)

    def _valid(self, now_ms: int) -> bytes:
        minute = now_ms // WINDOW_MS
        roll = self.rng.random()
        if roll < 0.10:  # this minute's bot: plays just past the 30 s royalty threshold
            user = f"bot{minute}"
            fields = {"event_type": "stream", "track_id": f"t{self.n % 3}", "artist_id": "a1", "ms_played": 32_000}
            fields["device_id"] = f"dbot{minute}"
        elif roll < 0.13:  # this minute's sign-up burst device
            user, fields = f"new{self.n}", {"event_type": "signup", "device_id": f"dburst{minute}"}
        elif roll < 0.25:
            user = f"u{self.rng.randrange(300)}"
            fields = {"event_type": "login", "success": self.rng.random() < 0.9, "ip": f"198.51.100.{self.n % 200}"}
        else:
            user = f"u{self.rng.randrange(300)}"
            track = self.rng.randrange(500)
            fields = {"event_type": "stream", "track_id": f"t{track}", "artist_id": f"a{track % 40}"}
            fields["ms_played"] = self.rng.randrange(60_000, 240_000)
        user_id = f"soak-{self.run_id}-{user}"
        self.expected[(user_id, now_ms - now_ms % WINDOW_MS)] += 1
        self.counts["valid signals"] += 1
        return self._signal(now_ms, user_id=user_id, **fields)

    def _tail(self, now_ms: int) -> bytes:
        """Ordinary plays by users the reconciliation ignores: they only keep the runner's reads moving."""
        self.counts["tail signals (not reconciled)"] += 1
        user_id = f"soak-{self.run_id}-tail-{self.rng.randrange(50)}"
        return self._signal(
            now_ms, event_type="stream", user_id=user_id, track_id="t1", artist_id="a1", ms_played=200_000
        )

    def _malformed(self, now_ms: int) -> bytes:
        self.n += 1
        tag = f"soak-{self.run_id}-bad{self.n}"
        good = {"event_id": tag, "event_type": "stream", "event_time": millis_to_rfc3339(now_ms), "user_id": "x"}
        kind = self.n % 8
        payload = [
            f'{{"event_id": "{tag}", oops'.encode(),
            orjson.dumps(good)[:-1] + b',"x":"\xff"}',
            orjson.dumps({**good, "event_type": "admin"}),
            orjson.dumps({**good, "padding": "p" * 20_000}),
            orjson.dumps({**good, "track_id": "t1", "ms_played": 1000, "ip": "999.1.1.1"}),
            orjson.dumps({**good, "user_id": "'; DROP TABLE audit;--"}),
            orjson.dumps({**good, "event_time": "9999-01-01T00:00:00Z"}),
            orjson.dumps([good]),
        ][kind]
        self.bad.append(payload)
        self.counts["malformed"] += 1
        return payload

    def batch(self, now_ms: int, count: int, tail: bool = False) -> list[bytes]:
        if tail:
            return [self._tail(now_ms) for _ in range(count)]
        out = []
        while self.recent and now_ms - self.recent[0][0] > 60_000:
            self.recent.popleft()
        for _ in range(count):
            roll = self.rng.random()
            if roll < self.bad_share:
                out.append(self._malformed(now_ms))
            elif roll < self.bad_share + self.duplicate_share and self.recent:
                out.append(self.recent[self.rng.randrange(len(self.recent))][1])
                self.counts["redelivered"] += 1
            else:
                payload = self._valid(now_ms)
                self.recent.append((now_ms, payload))
                out.append(payload)
        return out


class RssSampler(threading.Thread):
    """Resident memory of the job process every few seconds (from /proc)."""

    def __init__(self, pid: int, every_sec: float = 5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every_sec
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def run(self):
        start = time.monotonic()
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.monotonic() - start, int(line.split()[1]) * 1024))

    def stop(self):
        self._stop.set()


class DecisionListener(threading.Thread):
    """Every message on the decisions subscription, as a downstream service sees them."""

    def __init__(self, subscriber, subscription: str):
        super().__init__(daemon=True)
        self.subscriber, self.subscription = subscriber, subscription
        self.received: list[dict] = []
        self._stop = threading.Event()

    def run(self):
        while not self._stop.is_set():
            try:
                response = self.subscriber.pull(subscription=self.subscription, max_messages=200, timeout=5)
            except GoogleAPICallError:  # keep listening through emulator hiccups; the next pull retries
                time.sleep(1)
                continue
            if response.received_messages:
                self.received += [orjson.loads(m.message.data) for m in response.received_messages]
                self.subscriber.acknowledge(
                    subscription=self.subscription, ack_ids=[m.ack_id for m in response.received_messages]
                )

    def stop(self):
        self._stop.set()


def _publish(publisher, topic: str, payloads: list[bytes]) -> None:
    for future in [publisher.publish(topic, p) for p in payloads]:
        future.result(timeout=120)


def _query(client, sql: str) -> list[dict]:
    return [dict(r) for r in client.query(sql).result()]


def reconcile(traffic: Traffic, client, dataset: str, decisions: list[dict]) -> dict:
    """Checks: {name: {"tried": n, "handled": m, "detail": str}} from what the tables and topic hold."""
    # Panes accumulate, so a window's largest event_count is all of it (re-tried inserts only repeat a row).
    feature_rows = _query(
        client,
        f"SELECT entity_id, window_start_ms, MAX(event_count) AS n FROM `{dataset}.features` "
        "WHERE entity_type = 'user' AND window_sec = 60 GROUP BY entity_id, window_start_ms",
    )
    counted = {
        (r["entity_id"], datetime_to_millis(r["window_start_ms"])): r["n"]
        for r in feature_rows
        if "-tail-" not in r["entity_id"]
    }
    rows = _query(client, f"SELECT decision_id, status FROM `{dataset}.audit`")
    unique = {(r["decision_id"], r["status"]) for r in rows}
    windows_right = sum(1 for key, n in traffic.expected.items() if counted.get(key) == n)
    wrong = [[*key, n, counted.get(key, 0)] for key, n in sorted(traffic.expected.items()) if counted.get(key) != n]
    extra_windows = sum(1 for key in counted if key not in traffic.expected)
    in_exact_windows = sum(n for key, n in traffic.expected.items() if counted.get(key) == n)
    by_minute: dict = collections.defaultdict(lambda: [0, 0])  # window start -> [published, counted]
    for key, n in traffic.expected.items():
        by_minute[key[1]][0] += n
        by_minute[key[1]][1] += counted.get(key, 0)

    dead = collections.Counter(
        bytes(r["raw_payload"])
        for r in _query(client, f"SELECT raw_payload FROM `{dataset}.dead_letters` WHERE stage = 'parse'")
    )
    bad_found = sum(min(dead[p], 1) for p in set(traffic.bad))
    bad_missing = [p.decode("utf-8", "replace")[:200] for p in sorted(set(traffic.bad)) if not dead[p]]

    ids = collections.Counter(d["decision_id"] for d in decisions)
    audited = {decision_id for decision_id, status in unique if status == "issued"}
    return {
        "every valid signal counted once in its window": {
            "tried": sum(traffic.expected.values()),
            "handled": in_exact_windows if not extra_windows else 0,
            "detail": f"{windows_right:,} of {len(traffic.expected):,} user windows exact, {extra_windows} unexpected",
            "examples": wrong[:20],  # [user, window_start_ms, published, counted]
            "by_window": {millis_to_rfc3339(k): v for k, v in sorted(by_minute.items())},
        },
        "every malformed message dead-lettered": {
            "tried": len(set(traffic.bad)),
            "handled": bad_found,
            "detail": f"{sum(dead.values()):,} parse dead letters in the table",
            "examples": bad_missing[:10],
        },
        "every published decision has its audit row": {
            "tried": len(ids),
            "handled": sum(1 for i in ids if i in audited),
            "detail": f"{len(audited):,} issued audit rows",
        },
        "no decision id published twice": {
            "tried": len(decisions),
            "handled": len(decisions) - sum(n - 1 for n in ids.values()),
            "detail": f"{len(ids):,} distinct decisions",
        },
        "audit rows written once despite retried inserts": {
            "tried": len(unique),
            "handled": len(unique) - (len(rows) - len(unique)),
            "detail": f"{len(rows) - len(unique)} duplicate rows",
        },
    }


def memory_check(samples: list[tuple[float, int]], max_growth: float) -> dict:
    rss = [b for _, b in samples]
    if len(rss) < 6:
        return {"tried": 1, "handled": 0, "detail": f"only {len(rss)} samples; run longer"}
    third = len(rss) // 3
    middle, last = statistics.median(rss[third : 2 * third]), statistics.median(rss[2 * third :])
    growth = last / middle
    return {
        "tried": 1,
        "handled": int(growth <= max_growth),
        "detail": f"median RSS {middle / 2**20:.0f} MiB (middle third) -> {last / 2**20:.0f} MiB (last third), "
        f"x{growth:.2f}, peak {max(rss) / 2**20:.0f} MiB",
    }


def run_soak(args, pubsub_host: str, bigquery_url: str, project: str, workdir: pathlib.Path) -> dict:
    """One soak against running emulators; returns the report (checks, counts, timings)."""
    bq_port = int(bigquery_url.rsplit(":", 1)[1])
    ps_port = int(pubsub_host.rsplit(":", 1)[1])
    bq_proxy, ps_proxy = FaultProxy("127.0.0.1", bq_port).up(), FaultProxy("127.0.0.1", ps_port).up()
    dataset = f"soak_{uuid.uuid4().hex[:8]}"
    client = provision.client_for(project, bigquery_url)
    provision.provision(client, dataset)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:6]
    signals_topic, signals_sub = create_topic_with_subscription(
        publisher, subscriber, project, f"soak-signals-{suffix}"
    )
    decisions_topic, decisions_sub = create_topic_with_subscription(
        publisher, subscriber, project, f"soak-decisions-{suffix}"
    )
    command = [
        sys.executable,
        "-m",
        "pipelines.streaming",
        "--runner_config=streaming_local.yaml",
        f"--project={project}",
        f"--input_subscription={signals_sub}",
        f"--decisions_topic={decisions_topic}",
        f"--audit_table={project}:{dataset}.audit",
        f"--decisions_table={project}:{dataset}.decisions",
        f"--dead_letter_table={project}:{dataset}.dead_letters",
        f"--features_table={project}:{dataset}.features",
        f"--rules={SOAK_RULES}",
        "--allowlist=",  # the default allowlist names the default pack's rules
        "--early_firing_sec=0",
        f"--allowed_lateness_sec={ALLOWED_LATENESS_SEC}",
        f"--signal_dedup_ttl_sec={DEDUP_TTL_SEC}",
    ]
    # The job reaches both services through the fault proxies; this process talks to them directly.
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": ps_proxy.host, "BIGQUERY_EMULATOR_HOST": f"http://{bq_proxy.host}"}
    traffic = Traffic(args.seed, args.bad_share, args.duplicate_share)
    job_log = workdir / "soak-job.log"
    listener = DecisionListener(subscriber, decisions_sub)
    events: list[str] = []
    tick = 0.5
    with open(job_log, "wb") as log:
        job = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = RssSampler(job.pid)
    sampler.start()
    listener.start()
    started = time.monotonic()
    faults = sorted(
        [(0.4 * args.duration_sec, "bigquery", bq_proxy, args.bq_outage_sec)]
        + [(0.7 * args.duration_sec, "pubsub", ps_proxy, args.pubsub_outage_sec)]
    )
    try:
        owed = 0.0
        while (elapsed := time.monotonic() - started) < args.duration_sec:
            for at, name, proxy, length in faults:
                if length > 0 and proxy.is_up and at <= elapsed < at + length and proxy.outages == 0:
                    proxy.down()
                    events.append(f"{elapsed:.0f}s: {name} unreachable for {length:.0f}s")
                elif not proxy.is_up and elapsed >= at + length:
                    proxy.up()
                    events.append(f"{elapsed:.0f}s: {name} back")
            if job.poll() is not None:
                raise RuntimeError(f"the job exited with {job.returncode} during the soak; log {job_log}")
            owed += args.rate * tick
            count, owed = int(owed), owed - int(owed)
            _publish(publisher, signals_topic, traffic.batch(int(time.time() * 1000), count))
            time.sleep(max(0.0, tick - (time.monotonic() - started - elapsed)))
        for _, _, proxy, _ in faults:
            proxy.up()
        # Drain: tail traffic (not reconciled) keeps the local runner's reads moving until the
        # last soak window has closed and its rows are in BigQuery, or drain_sec has passed.
        drain_until = time.monotonic() + args.drain_sec
        next_check = time.monotonic() + WINDOW_MS / 1000
        while time.monotonic() < drain_until and job.poll() is None:
            _publish(
                publisher, signals_topic, traffic.batch(int(time.time() * 1000), max(2, int(args.rate / 10)), True)
            )
            time.sleep(1)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 10
                checks = reconcile(traffic, client, dataset, list(listener.received))
                if all(c["tried"] == c["handled"] for c in checks.values()):
                    break
        events.append(f"drained {time.monotonic() - started - args.duration_sec:.0f}s after the last soak signal")
        still_running = job.poll() is None
    finally:
        sampler.stop()
        listener.stop()
        stop_job(job)
        bq_proxy.stop()
        ps_proxy.stop()
    checks = reconcile(traffic, client, dataset, list(listener.received))
    checks["the job kept running through every fault"] = {
        "tried": 1,
        "handled": int(still_running),
        "detail": "; ".join(events) or "no faults injected",
    }
    checks["memory flat over the run"] = memory_check(sampler.samples, args.max_rss_growth)
    return {
        "duration_sec": args.duration_sec,
        "rate_per_sec": args.rate,
        "published": dict(traffic.counts),
        "decisions_received": len(listener.received),
        "faults": events,
        "rss_samples": [[round(t, 1), b] for t, b in sampler.samples],
        "checks": checks,
        "job_log": str(job_log),
        "passed": all(c["tried"] == c["handled"] for c in checks.values()),
    }


def print_report(report: dict) -> None:
    rate = f"{report['duration_sec']:.0f} s at {report['rate_per_sec']:.0f} signals/s"
    print(f"Soak: {rate}; published {report['published']}")
    for event in report["faults"]:
        print(f"  fault {event}")
    width = max(len(name) for name in report["checks"])
    for name, c in report["checks"].items():
        mark = "ok" if c["tried"] == c["handled"] else "FAILED"
        print(f"  {name:<{width}}  {c['handled']:>7,} / {c['tried']:<7,} {mark}  ({c['detail']})")
    print("PASSED" if report["passed"] else f"FAILED (job log: {report['job_log']})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration_sec", type=float, default=600, help="How long to publish soak traffic.")
    p.add_argument("--rate", type=float, default=10, help="Messages published per second.")
    p.add_argument("--bad_share", type=float, default=0.05, help="Share of malformed messages.")
    p.add_argument("--duplicate_share", type=float, default=0.10, help="Share of redelivered messages.")
    p.add_argument("--bq_outage_sec", type=float, default=45, help="BigQuery unreachable this long (0: none).")
    p.add_argument("--pubsub_outage_sec", type=float, default=15, help="Job's Pub/Sub unreachable this long (0: none).")
    p.add_argument("--drain_sec", type=float, default=240, help="Longest wait for the last windows after traffic.")
    p.add_argument("--max_rss_growth", type=float, default=1.25, help="Allowed last/middle third RSS ratio.")
    p.add_argument("--seed", type=int, default=29, help="Traffic seed.")
    p.add_argument("--workdir", default="out/soak", help="Emulator data, job log and report.json.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    project = BigQueryEmulator.project
    with PubSubEmulator(workdir / "pubsub") as ps, BigQueryEmulator(workdir / "bigquery") as bq:
        creds = FakeCredentials(project).start()
        try:
            os.environ.update(creds.environment(), PUBSUB_EMULATOR_HOST=ps.host, BIGQUERY_EMULATOR_HOST=bq.url)
            report = run_soak(args, ps.host, bq.url, project, workdir)
        finally:
            creds.stop()
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
