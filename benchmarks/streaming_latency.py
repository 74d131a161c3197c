"""Streaming decision latency through the Pub/Sub emulator, against a bare read-and-ack job at the same rate.

Starts the Pub/Sub and BigQuery emulators, then for each run measures two
jobs on the local streaming runner, one after the other, each fed
``--rate`` signals a second for ``--duration_sec``:

* **bare**: ``ReadFromPubSub`` then a filter that forwards only canary
  messages (one a second) to an output topic. Everything is read and
  acknowledged; a canary's delay from its publish to its forward is how far
  behind the reader is.
* **full**: ``pipelines.streaming`` with its production defaults (default rule
  pack, one-hour lateness and de-duplication, early panes every 10 s) writing
  to the emulators. Among ordinary listeners, a new stream-farm bot starts
  every ``--bot_every_sec``; each plays one track a second, just past the
  royalty threshold, so ``stream_farm_exclude`` fires on it about 40 s later.

Latency of a decision = its publish time on the decisions topic minus the
publish time of the last signal it counted (the bot's n-th, where n is the
decision's ``evidence.events``). Achieved rate of either job = signals
published up to the last one it is known to have consumed (the last canary,
or the last decision's last signal) divided by the time until that came out.
If a job keeps up, that is the offered rate; if it falls behind, it is what
it managed.

Run (``make bench`` runs it with the defaults)::

    python -m benchmarks.streaming_latency --rate 300 --duration_sec 60
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time
import uuid

from benchmarks.common import WORK_DIR, median, print_table, write_results
from pipelines.options import PROJECT_ROOT

BOT_PLAYS_PER_SEC = 1.0
BOT_PLAYS = 45  # stream_farm_exclude needs 40 in the hour; a few more, then the bot stops


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Listener(threading.Thread):
    """Messages on a subscription with their publish times (ms), acknowledged as they come."""

    def __init__(self, subscriber, subscription: str):
        super().__init__(daemon=True)
        self.subscriber, self.subscription = subscriber, subscription
        self.received: list[tuple[int, bytes]] = []  # (publish ms, data)
        self._stop = threading.Event()

    def run(self):
        from google.api_core.exceptions import GoogleAPICallError

        while not self._stop.is_set():
            try:
                response = self.subscriber.pull(subscription=self.subscription, max_messages=500, timeout=2)
            except GoogleAPICallError:
                time.sleep(0.2)
                continue
            for m in response.received_messages:
                published = m.message.publish_time
                millis = int(published.timestamp() * 1000)
                self.received.append((millis, m.message.data))
            if response.received_messages:
                self.subscriber.acknowledge(
                    subscription=self.subscription, ack_ids=[m.ack_id for m in response.received_messages]
                )

    def stop(self):
        self._stop.set()


class Traffic:
    """Ordinary listeners, bots that start every few seconds, and canaries; remembers what it sent when."""

    def __init__(self, seed: int, bot_every_sec: float, bots_until_sec: float):
        self.rng = random.Random(seed)
        # Event ids unique to this traffic: the full job's warm-up traffic and the measured traffic go to one job,
        # whose de-duplication would otherwise drop the measured signals that reuse a warm-up id (it dropped the
        # first four bots' plays, so they never earned a decision, until the ids had this prefix).
        self.id_prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.bot_every_sec = bot_every_sec
        self.bots_until_sec = bots_until_sec
        self.n = 0
        self.sent: list[float] = []  # publish-call wall time (s) of message i, i = its sequence number
        self.bot_sends: dict[str, list[tuple[float, int]]] = {}  # bot user -> [(wall time, seq)]
        self.canaries: dict[str, tuple[float, int]] = {}
        self._bot_owed: dict[str, float] = {}

    def _signal(self, now: float, **fields) -> bytes:
        import orjson

        from schemas.avro import millis_to_rfc3339

        self.n += 1
        body = {"event_id": f"{self.id_prefix}-{self.n}", "event_time": millis_to_rfc3339(int(now * 1000)), **fields}
        return orjson.dumps(body)

    def batch(self, now: float, elapsed: float, count: int, tick: float) -> list[tuple[bytes, str | None, int]]:
        """``count`` messages as (payload, bot name or None, sequence number)."""
        out: list[tuple[bytes, str | None, int]] = []
        # Start bots on schedule; each plays BOT_PLAYS_PER_SEC until it has played BOT_PLAYS.
        started = int(min(elapsed, self.bots_until_sec) // self.bot_every_sec) + 1
        for b in range(started):
            self._bot_owed.setdefault(f"bot{b:04d}", 0.0)
        for bot in list(self._bot_owed):
            if len(self.bot_sends.get(bot, ())) >= BOT_PLAYS:
                continue
            self._bot_owed[bot] += BOT_PLAYS_PER_SEC * tick
            while self._bot_owed[bot] >= 1 and len(out) < count:
                self._bot_owed[bot] -= 1
                b = int(bot[3:])
                out.append(
                    (
                        self._signal(
                            now,
                            event_type="stream",
                            user_id=f"benchbot-{b}",
                            device_id=f"benchbotdev-{b}",
                            ip=f"10.250.{b // 250}.{b % 250}",
                            track_id=f"tfarm{b % 7}",
                            artist_id="afarm",
                            ms_played=33_000,
                            country="SE",
                        ),
                        bot,
                        self.n,
                    )
                )
        while len(out) < count:
            u = self.rng.randrange(50_000)
            who = {"user_id": f"u{u}", "device_id": f"d{u}", "ip": f"10.{u % 200}.{u % 250}.{u % 199}", "country": "US"}
            if self.rng.random() < 0.1:
                body = self._signal(now, event_type="login", success=True, **who)
            else:
                t = self.rng.randrange(20_000)
                play = {
                    "track_id": f"t{t}",
                    "artist_id": f"a{t // 20}",
                    "ms_played": self.rng.randrange(20_000, 240_000),
                }
                body = self._signal(now, event_type="stream", **play, **who)
            out.append((body, None, self.n))
        return out


def _canary(traffic: Traffic, now: float, malformed: bool) -> bytes:
    """A canary: a valid sign-up (the bare job forwards it) or a non-JSON line (the full job dead-letters it,
    stamping when it parsed it)."""
    name = f"canary-{len(traffic.canaries)}"
    traffic.canaries[name] = (now, traffic.n + 1)
    if malformed:
        traffic.n += 1
        return f"{name} is not JSON".encode()
    return traffic._signal(now, event_type="signup", user_id=name, device_id=name)


def _pace(publisher, topic: str, traffic: Traffic, rate: float, duration_sec: float, malformed_canaries: bool):
    """Publish at ``rate`` for ``duration_sec`` with a canary every second; returns the wall time it began.

    Message sequence numbers are ``traffic.n`` at creation: ``traffic.sent[seq - 1]`` is when it went out."""
    tick = 0.1
    owed, started = 0.0, time.monotonic()
    first_wall = time.time()
    next_canary = 0.0
    futures = []
    while (elapsed := time.monotonic() - started) < duration_sec:
        owed += rate * tick
        count, owed = int(owed), owed - int(owed)
        now = time.time()
        if elapsed >= next_canary and count:
            next_canary += 1.0
            count -= 1
            futures.append(publisher.publish(topic, _canary(traffic, now, malformed_canaries)))
            traffic.sent.append(now)
        for body, bot, seq in traffic.batch(now, elapsed, count, tick):
            futures.append(publisher.publish(topic, body))
            if bot is not None:
                traffic.bot_sends.setdefault(bot, []).append((now, seq))
            traffic.sent.append(now)
        time.sleep(max(0.0, tick - (time.monotonic() - started - elapsed)))
    for f in futures:
        f.result(timeout=120)
    return first_wall


# --- the bare job (a child process) ------------------------------------------------------------------------------


def run_bare_job(subscription: str, out_topic: str) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import runner_config_args

    options = PipelineOptions(runner_config_args("streaming_local.yaml"))
    with beam.Pipeline(options=options) as pipeline:
        (
            pipeline
            | "Read" >> beam.io.ReadFromPubSub(subscription=subscription)
            | "Canaries" >> beam.Filter(lambda data: b'"canary-' in data)
            | "Forward" >> beam.io.WriteToPubSub(out_topic)
        )


# --- one measured run --------------------------------------------------------------------------------------------


def _start(command: list[str], log_path: pathlib.Path, env: dict) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(publisher, topic: str, traffic: Traffic, timeout_sec: float, predicate) -> None:
    """Warm-up: publish a trickle until the job shows it is reading (its start-up is not what we measure)."""
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        now = time.time()
        name = f"canary-warmup-{int(now * 1000)}"
        publisher.publish(topic, traffic._signal(now, event_type="signup", user_id=name, device_id=name)).result()
        time.sleep(1)
        if predicate():
            return
    raise RuntimeError("the job did not start reading within the warm-up time")


def measure_bare(args, project: str, workdir: pathlib.Path) -> dict:
    from google.cloud import pubsub_v1

    from devtools.emulators import create_topic_with_subscription, stop_job

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:6]
    topic, sub = create_topic_with_subscription(publisher, subscriber, project, f"bench-in-{suffix}")
    out_topic, out_sub = create_topic_with_subscription(publisher, subscriber, project, f"bench-out-{suffix}")
    listener = Listener(subscriber, out_sub)
    listener.start()
    cmd = [sys.executable, "-m", "benchmarks.streaming_latency", "--child_bare", sub, "--child_out", out_topic]
    job = _start(cmd, workdir / f"bare-{suffix}.log", dict(os.environ))
    traffic = Traffic(args.seed, bot_every_sec=1e9, bots_until_sec=0)
    try:
        _wait_ready(publisher, topic, traffic, 180, lambda: bool(listener.received))
        listener.received.clear()
        traffic = Traffic(args.seed, bot_every_sec=1e9, bots_until_sec=0)
        first = _pace(publisher, topic, traffic, args.rate, args.duration_sec, malformed_canaries=False)
        deadline = time.monotonic() + args.drain_sec
        while time.monotonic() < deadline:
            seen = {json.loads(d)["user_id"] for _, d in listener.received}
            if all(name in seen for name in traffic.canaries):
                break
            time.sleep(1)
    finally:
        listener.stop()
        stop_job(job, timeout_sec=30)
    forwarded = {}
    for publish_ms, data in listener.received:
        name = json.loads(data)["user_id"]
        if name in traffic.canaries:
            forwarded[name] = publish_ms / 1000
    lags = [forwarded[name] - sent for name, (sent, _) in traffic.canaries.items() if name in forwarded]
    achieved = _achieved(traffic, forwarded, first)
    return {
        "published": len(traffic.sent),
        "canaries_sent": len(traffic.canaries),
        "canaries_forwarded": len(lags),
        "achieved_per_sec": round(min(achieved, len(traffic.sent) / args.duration_sec), 1),
        "lag_p50_sec": _round(_percentile(lags, 0.5)),
        "lag_p99_sec": _round(_percentile(lags, 0.99)),
    }


def measure_full(args, project: str, bigquery_url: str, workdir: pathlib.Path) -> dict:
    from google.cloud import pubsub_v1

    from devtools.emulators import create_topic_with_subscription, local_streaming_command, stop_job
    from pipelines import provision

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:6]
    dataset = f"bench_{suffix}"
    provision.provision(provision.client_for(project, bigquery_url), dataset)
    topic, sub = create_topic_with_subscription(publisher, subscriber, project, f"bench-signals-{suffix}")
    dec_topic, dec_sub = create_topic_with_subscription(publisher, subscriber, project, f"bench-decisions-{suffix}")
    listener = Listener(subscriber, dec_sub)
    listener.start()
    job = _start(
        local_streaming_command(project, sub, dec_topic, dataset), workdir / f"full-{suffix}.log", dict(os.environ)
    )
    # Warm-up: a bot of its own until its decision comes out, so the job is reading and has compiled its rules.
    warm = Traffic(args.seed + 1, bot_every_sec=1e9, bots_until_sec=0)
    try:
        deadline = time.monotonic() + 240
        n = 0
        while not listener.received and time.monotonic() < deadline:
            now = time.time()
            for _ in range(5):
                n += 1
                publisher.publish(
                    topic,
                    warm._signal(
                        now,
                        event_type="stream",
                        user_id="benchwarm",
                        ms_played=33_000,
                        device_id="benchwarmdev",
                        track_id="twarm",
                        artist_id="awarm",
                    ),
                )
            time.sleep(1)
        if not listener.received:
            raise RuntimeError(f"no warm-up decision within 240 s; job log {workdir}/full-{suffix}.log")
        listener.received.clear()
        traffic = Traffic(args.seed, bot_every_sec=args.bot_every_sec, bots_until_sec=args.duration_sec - 45)
        first = _pace(publisher, topic, traffic, args.rate, args.duration_sec, malformed_canaries=True)
        expected = {f"benchbot-{int(b[3:])}" for b in traffic.bot_sends if len(traffic.bot_sends[b]) >= 40}
        bq = provision.client_for(project, bigquery_url)
        parsed_at: dict[str, float] = {}
        deadline = time.monotonic() + args.drain_sec
        while time.monotonic() < deadline:
            got = {json.loads(d)["entity_id"] for _, d in listener.received}
            parsed_at = _canaries_parsed(bq, dataset)
            if expected <= got and len(parsed_at) >= len(traffic.canaries):
                break
            # Keep the runner's reads moving (its Pub/Sub source blocks when idle); not counted.
            now = time.time()
            publisher.publish(topic, warm._signal(now, event_type="signup", user_id="benchtail", device_id="tail"))
            time.sleep(2)
        latencies, measured = [], set()
        for publish_ms, data in listener.received:
            d = json.loads(data)
            if d["rule_id"] != "stream_farm_exclude" or not d["entity_id"].startswith("benchbot-"):
                continue
            sends = traffic.bot_sends.get(f"bot{int(d['entity_id'].split('-')[1]):04d}", [])
            n = int(float(d["evidence"]["events"]))
            if 0 < n <= len(sends):
                latencies.append(publish_ms / 1000 - sends[n - 1][0])
                measured.add(d["entity_id"])
        # Bots that earned a decision but have none measured: what the audit table says about them, and when
        # their plays went out (a bot without a decision would otherwise lower the percentiles unseen).
        missing = {}
        for bot in sorted(expected - measured):
            sends = traffic.bot_sends[f"bot{int(bot.split('-')[1]):04d}"]
            missing[bot] = {
                "plays": len(sends),
                "first_play_utc": time.strftime("%H:%M:%S", time.gmtime(sends[0][0])),
                "fortieth_play_utc": time.strftime("%H:%M:%S", time.gmtime(sends[39][0])),
                "audit": _audit_rows(bq, dataset, bot),
            }
    finally:
        listener.stop()
        stop_job(job, timeout_sec=30)
    lags = [parsed_at[name] - sent for name, (sent, _) in traffic.canaries.items() if name in parsed_at]
    achieved = _achieved(traffic, parsed_at, first)
    return {
        "published": len(traffic.sent),
        "bots_expected": len(expected),
        "decisions_measured": len(latencies),
        "canaries_sent": len(traffic.canaries),
        "canaries_parsed": len(lags),
        "achieved_per_sec": round(min(achieved, len(traffic.sent) / args.duration_sec), 1),
        "canary_lag_p50_sec": _round(_percentile(lags, 0.5)),
        "canary_lag_p99_sec": _round(_percentile(lags, 0.99)),
        "latency_p50_sec": _round(_percentile(latencies, 0.5)),
        "latency_p95_sec": _round(_percentile(latencies, 0.95)),
        "latency_p99_sec": _round(_percentile(latencies, 0.99)),
        "latency_max_sec": _round(max(latencies) if latencies else None),
        "bots_without_decision": missing,
    }


def _audit_rows(client, dataset: str, entity_id: str) -> list[dict]:
    """A user's audit rows (every rule hit, whatever became of it), oldest first."""
    rows = client.query(
        f"SELECT rule_id, status, mode, safeguard_note, event_count, window_start_ms, decided_at_ms "
        f"FROM `{dataset}.audit` WHERE entity_id = '{entity_id}' ORDER BY decided_at_ms"
    )
    # Times come back as datetimes; as text they go into the results' JSON.
    return [{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()} for row in rows.result()]


def _canaries_parsed(client, dataset: str) -> dict[str, float]:
    """Canary name -> when the job parsed it (the dead letter's failed_at), from the dead-letter table."""
    rows = client.query(f"SELECT raw_payload, failed_at_ms FROM `{dataset}.dead_letters` WHERE stage = 'parse'")
    out = {}
    for row in rows.result():
        text = bytes(row["raw_payload"]).decode("utf-8", "replace")
        if text.startswith("canary-"):
            out[text.split(" ", 1)[0]] = row["failed_at_ms"].timestamp()
    return out


def _achieved(traffic: Traffic, came_out: dict[str, float], first: float) -> float:
    """Messages published up to the latest canary that came out, over the time until it came out."""
    done = [(traffic.canaries[name][1], at) for name, at in came_out.items() if name in traffic.canaries]
    if not done:
        return 0.0
    seq, at = max(done)
    return seq / max(at - first, 1e-9)


def _round(value):
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300, help="Signals per second offered to each job.")
    parser.add_argument("--duration_sec", type=float, default=60, help="Seconds of steady publishing per job.")
    parser.add_argument("--runs", type=int, default=1, help="Runs of each job; figures are medians.")
    parser.add_argument("--bot_every_sec", type=float, default=1.0, help="A new stream-farm bot this often.")
    parser.add_argument("--drain_sec", type=float, default=240, help="Wait this long for outstanding output.")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--job_arg",
        action="append",
        default=[],
        help="Extra option for the full job (repeatable), e.g. "
        "--job_arg=--early_firing_sec=10; by default it runs with its production defaults.",
    )
    parser.add_argument("--child_bare", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_bare:
        run_bare_job(args.child_bare, args.child_out)
        return 0
    if args.duration_sec < 60:
        parser.error("--duration_sec must be at least 60 (bots need 40 s of plays to be decided)")

    from devtools.emulators import BigQueryEmulator, PubSubEmulator
    from devtools.fake_auth import FakeCredentials

    workdir = WORK_DIR / "streaming"
    workdir.mkdir(parents=True, exist_ok=True)
    project = BigQueryEmulator.project
    runs = []
    with PubSubEmulator(workdir / "pubsub") as ps, BigQueryEmulator(workdir / "bigquery") as bq:
        creds = FakeCredentials(project).start()
        try:
            os.environ.update(creds.environment(), PUBSUB_EMULATOR_HOST=ps.host, BIGQUERY_EMULATOR_HOST=bq.url)
            for run_no in range(args.runs):
                bare = measure_bare(args, project, workdir)
                print(f"  run {run_no + 1} bare: {json.dumps(bare)}", flush=True)
                full = measure_full(args, project, bq.url, workdir)
                print(f"  run {run_no + 1} full: {json.dumps(full)}", flush=True)
                runs.append({"bare": bare, "full": full})
        finally:
            creds.stop()
    summary = {
        "offered_per_sec": args.rate,
        "duration_sec": args.duration_sec,
        "bare_achieved_per_sec": median(r["bare"]["achieved_per_sec"] for r in runs),
        "full_achieved_per_sec": median(r["full"]["achieved_per_sec"] for r in runs),
        "latency_p50_sec": median(r["full"]["latency_p50_sec"] for r in runs),
        "latency_p95_sec": median(r["full"]["latency_p95_sec"] for r in runs),
        "latency_p99_sec": median(r["full"]["latency_p99_sec"] for r in runs),
        "bare_lag_p99_sec": median(r["bare"]["lag_p99_sec"] for r in runs),
    }
    summary["full_over_bare_rate"] = round(summary["full_achieved_per_sec"] / summary["bare_achieved_per_sec"], 3)
    payload = {"summary": summary, "runs": runs}
    print(
        f"\nStreaming through the Pub/Sub emulator at {args.rate:g}/s for {args.duration_sec:g} s "
        f"(median of {args.runs})"
    )
    rows = [
        [
            "bare read-and-ack",
            summary["bare_achieved_per_sec"],
            "",
            "",
            f"canary lag p99 {summary['bare_lag_p99_sec']}",
        ],
        [
            "full job",
            summary["full_achieved_per_sec"],
            summary["latency_p50_sec"],
            summary["latency_p95_sec"],
            summary["latency_p99_sec"],
        ],
    ]
    print_table(["job", "achieved/s", "p50 s", "p95 s", "p99 s"], rows)
    print(f"full/bare achieved rate: {summary['full_over_bare_rate']}")
    print(f"wrote {write_results(f'streaming_latency_{args.rate:g}', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
