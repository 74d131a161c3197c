"""Latency of the Mitigation API's lookups on loopback, against the Bigtable emulator, at a fixed request rate.

Starts the Bigtable emulator, provisions the mitigations table as production
does, seeds ``--entities`` users with one or two active mitigations each
(written by the pipeline's own ``to_direct_row``), starts ``python -m service``
with uvicorn as an operator would, then drives it open-loop: request *i* is
due at ``start + i / rate``, whether or not earlier ones have answered, and its
latency is measured from when it was due (so a stalled server cannot hide
its queueing, the "coordinated omission" mistake). Two scenarios:

* single: ``GET /v1/entities/user/{id}/mitigations`` at each of ``--single_rates``;
* batch: ``POST /v1/mitigations:batchLookup`` with ``--batch_size`` entities at ``--batch_rate``.

Each scenario runs ``--runs`` times for ``--duration_sec``; the figures are the
medians over runs. The load generator shares the machine with the server and
the emulator, so these are conservative figures for a 2-core box. Results go to
``benchmarks/results/api_latency.json``.

Run (``make bench-api`` does)::

    python -m benchmarks.api_latency --duration_sec 20 --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import queue
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import httpx
from google.cloud import bigtable

from devtools.emulators import BigtableEmulator, free_port
from pipelines.options import PROJECT_ROOT
from pipelines.provision import provision_bigtable
from schemas import Decision
from schemas.mitigation_state import TABLE_ID
from transforms.state_store import to_direct_row

PROJECT = "bench-project"
INSTANCE = "bench-instance"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "api_latency.json"


def seed(entities: int, rng: random.Random) -> None:
    """Write each user's mitigations as the streaming job would, in batches."""
    table = bigtable.Client(project=PROJECT).instance(INSTANCE).table(TABLE_ID)
    now = int(time.time() * 1000)
    rows = []
    for n in range(entities):
        for k in range(1 + n % 2):
            decision = Decision(
                decision_id=hashlib.sha256(f"{n}-{k}".encode()).hexdigest()[:32],
                entity_type="user",
                entity_id=f"user{n:07d}",
                action=("exclude_streams", "suspend")[k],
                rule_id="stream_farm_exclude",
                rule_version=1,
                mode="enforce",
                reason="45 plays in an hour, 93% of them ending just past the 30 s royalty threshold.",
                evidence={"streams": 45.0},
                window_start_ms=now - 3_600_000,
                window_end_ms=now,
                decided_at_ms=now,
                expires_at_ms=now + rng.randrange(1, 30) * 86_400_000,
                trace_ids=[],
            )
            rows.append(to_direct_row(decision))
        if len(rows) >= 1000:
            _mutate(table, rows)
            rows = []
    if rows:
        _mutate(table, rows)


def _mutate(table, rows) -> None:
    failed = [status for status in table.mutate_rows(rows) if status.code != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} seed rows failed: {failed[0]}")


def start_api(port: int, tokens: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "service",
        f"--project={PROJECT}",
        f"--bigtable_instance={INSTANCE}",
        f"--tokens={tokens}",
        f"--port={port}",
        f"--rule_overrides={tokens.parent / 'rule_overrides.yaml'}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}; log {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the API did not answer within 60 s; log {log}")


def drive(make_request, rate: float, duration_sec: float, workers: int) -> dict:
    """Open-loop load: one request due every 1/rate s, taken by the next free worker thread.

    Latency is measured from when a request was due, so time spent waiting for
    a free worker (the server being slow) counts against the server.
    """
    due_queue: queue.Queue = queue.Queue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=10) as client:
            while (item := due_queue.get()) is not None:
                due, n = item
                try:
                    ok = make_request(client, n).status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                with lock:
                    if ok:
                        latencies.append(done - due)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    total = int(rate * duration_sec)
    start = time.perf_counter() + 0.1
    for n in range(total):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due_queue.put((due, n))
    for _ in threads:
        due_queue.put(None)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else float("nan")

    return {
        "target_rps": rate,
        "achieved_rps": len(latencies) / elapsed,
        "requests": total,
        "errors": errors[0],
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] * 1000 if ordered else float("nan"),
    }


def median_of(runs: list[dict]) -> dict:
    keys = ("achieved_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["target_rps"] = runs[0]["target_rps"]
    out["runs"] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=20_000, help="Users seeded with mitigations.")
    parser.add_argument(
        "--single_rates", type=float, nargs="+", default=[200, 500], help="Single lookups per second, one run each."
    )
    parser.add_argument("--batch_rate", type=float, default=100, help="Batch lookups per second.")
    parser.add_argument("--batch_size", type=int, default=20, help="Entities per batch lookup.")
    parser.add_argument("--duration_sec", type=float, default=20, help="Length of each run.")
    parser.add_argument("--runs", type=int, default=3, help="Runs per scenario; medians are reported.")
    parser.add_argument("--workers", type=int, default=8, help="Client threads (one keep-alive connection each).")
    parser.add_argument("--output", default=str(RESULTS), help="Where to write the JSON results.")
    args = parser.parse_args(argv)

    rng = random.Random(5)
    work = pathlib.Path(tempfile.mkdtemp(prefix="api-bench-"))
    token = secrets.token_urlsafe(24)
    tokens = work / "tokens.yaml"
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens.write_text(f"tokens:\n  - sha256: {digest}\n    actor: bench\n    scopes: [read]\n")
    headers = {"Authorization": f"Bearer {token}"}
    results: dict = {}
    with BigtableEmulator(work / "bigtable") as emulator:
        os.environ["BIGTABLE_EMULATOR_HOST"] = emulator.host
        provision_bigtable(PROJECT, INSTANCE)
        seed(args.entities, rng)
        port = free_port()
        api = start_api(port, tokens, work / "api.log")
        base = f"http://127.0.0.1:{port}"
        try:

            def single(client, n):
                user = f"user{(n * 7919) % args.entities:07d}"
                return client.get(f"{base}/v1/entities/user/{user}/mitigations", headers=headers)

            def batch(client, n):
                users = [f"user{(n * 7919 + k * 104_729) % args.entities:07d}" for k in range(args.batch_size)]
                body = {"entities": [{"entity_type": "user", "entity_id": u} for u in users]}
                return client.post(f"{base}/v1/mitigations:batchLookup", json=body, headers=headers)

            drive(single, 50, 3, args.workers)  # warm-up: connections, caches
            scenarios = [("single", single, rate) for rate in args.single_rates]
            scenarios += [(f"batch/{args.batch_size}", batch, args.batch_rate)]
            for name, fn, rate in scenarios:
                runs = [drive(fn, rate, args.duration_sec, args.workers) for _ in range(args.runs)]
                results[f"{name}@{rate:g}/s"] = median_of(runs)
        finally:
            api.terminate()
            api.wait(timeout=30)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": {
            "entities": args.entities,
            "batch_size": args.batch_size,
            "duration_sec": args.duration_sec,
            "runs": args.runs,
            "server": "python -m service (uvicorn, 1 worker) over the Bigtable emulator, loopback",
        },
        "results": results,
    }
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'scenario':16} {'target/s':>9} {'achieved/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        print(
            f"{name:16} {r['target_rps']:>9.0f} {r['achieved_rps']:>11.0f} {r['p50_ms']:>8.1f} "
            f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>7.0f}"
        )
    print(f"(medians of {args.runs} runs of {args.duration_sec:.0f} s; written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
