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
import asyncio
import gc
import hashlib
import json
import os
import pathlib
import platform
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
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
REQUEST_TIMEOUT_SEC = 10.0  # a request with no answer by then is a failure


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


def start_api(port: int, tokens: pathlib.Path, log: pathlib.Path, workers: int = 1) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "service",
        f"--project={PROJECT}",
        f"--bigtable_instance={INSTANCE}",
        f"--tokens={tokens}",
        f"--port={port}",
        f"--workers={workers}",
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


def drive(requests, rate: float, duration_sec: float, port: int, connections: int, server_pid: int) -> dict:
    """Open-loop load at ``rate`` requests a second for ``duration_sec``, over ``connections`` keep-alive
    connections, from one asyncio loop (see ``_drive``), with the CPU time the server's process tree spent
    per answered request."""
    before = _tree_cpu_sec(server_pid)
    # The load generator's own collections would stall its loop (a full one took over 100 ms here) and be
    # charged to the server as latency: none during a run, one after.
    gc.disable()
    try:
        result = asyncio.run(_drive(requests, rate, duration_sec, port, connections))
    finally:
        gc.enable()
        gc.collect()
    answered = result["requests"] - result["errors"]
    cpu_ms = (_tree_cpu_sec(server_pid) - before) * 1000
    result["server_cpu_ms_per_request"] = cpu_ms / answered if answered else float("nan")
    return result


def _tree_cpu_sec(pid: int) -> float:
    """User and system CPU seconds of a process and its children (uvicorn's workers, when it has several)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def _drive(requests, rate: float, duration_sec: float, port: int, connections: int) -> dict:
    """Request *n* (the bytes ``requests(n)``) is due at ``start + n / rate`` and is sent then on a free
    connection, or as soon as one frees up. Its latency runs from when it was due, so time spent waiting for
    a connection (the server being slow) counts against the server.

    A request fails on a status other than 200, a broken connection or no answer within
    ``REQUEST_TIMEOUT_SEC``; its connection is then replaced (a connection that cannot be made is retried by
    the next request that draws it). Failures count in ``errors``, and their latencies, up to when they
    failed, in the ``*_all_ms`` percentiles beside the answered requests' own.

    One thread and raw HTTP/1.1 over asyncio streams: the threaded httpx client this replaced contended for
    the GIL on the same two cores as the server, and that showed up in the tail it measured.
    """
    loop = asyncio.get_running_loop()
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        free.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    failed: list[float] = []

    async def exchange(connection, payload: bytes) -> bool:
        reader, writer = connection
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(_content_length(head))
        return head.startswith(b"HTTP/1.1 200 ")

    async def one(due: float, payload: bytes) -> None:
        connection = await free.get()
        ok = False
        try:
            if connection is None:  # lost earlier and not yet made again
                connection = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_SEC)
            ok = await asyncio.wait_for(exchange(connection, payload), REQUEST_TIMEOUT_SEC)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if connection is not None:
                connection[1].close()
            connection = None
        (latencies if ok else failed).append(loop.time() - due)
        free.put_nowait(connection)

    total = int(rate * duration_sec)
    start = loop.time() + 0.1
    tasks = []
    for n in range(total):
        due = start + n / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due, requests(n))))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not free.empty():
        connection = free.get_nowait()
        if connection is not None:
            connection[1].close()

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else float("nan")

    every = latencies + failed
    return {
        "target_rps": rate,
        "achieved_rps": len(latencies) / elapsed,
        "requests": total,
        "errors": len(failed),
        "p50_ms": pct(latencies, 0.50),
        "p95_ms": pct(latencies, 0.95),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "p99_all_ms": pct(every, 0.99),
        "max_all_ms": max(every) * 1000 if every else float("nan"),
    }


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("a response without Content-Length")


def http_get(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def http_post_json(path: str, body: dict, headers: dict[str, str]) -> bytes:
    data = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def median_of(runs: list[dict]) -> dict:
    keys = ("achieved_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "p99_all_ms", "max_all_ms", "errors")
    keys += ("server_cpu_ms_per_request",)
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
    parser.add_argument("--server_workers", type=int, default=2, help="The API's worker processes (--workers).")
    # A gateway's pool. uvicorn's workers take connections as they accept them, unevenly (21 and 11 of 32
    # here), and a keep-alive connection stays with its worker: with 8 connections the p99 at 500/s was
    # 288 ms, with 64 it was 28 ms (medians of two runs of 15 s, before batched reads).
    parser.add_argument("--connections", type=int, default=64, help="Keep-alive connections the client keeps open.")
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
        api = start_api(port, tokens, work / "api.log", args.server_workers)
        try:

            def single(n):
                user = f"user{(n * 7919) % args.entities:07d}"
                return http_get(f"/v1/entities/user/{user}/mitigations", headers)

            def batch(n):
                users = [f"user{(n * 7919 + k * 104_729) % args.entities:07d}" for k in range(args.batch_size)]
                body = {"entities": [{"entity_type": "user", "entity_id": u} for u in users]}
                return http_post_json("/v1/mitigations:batchLookup", body, headers)

            drive(single, 50, 3, port, args.connections, api.pid)  # warm-up: connections, caches
            scenarios = [("single", single, rate) for rate in args.single_rates]
            scenarios += [(f"batch/{args.batch_size}", batch, args.batch_rate)]
            for name, fn, rate in scenarios:
                runs = [drive(fn, rate, args.duration_sec, port, args.connections, api.pid) for _ in range(args.runs)]
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
            "server": f"python -m service --workers {args.server_workers} (uvicorn), Bigtable emulator, loopback",
            "connections": args.connections,
        },
        "results": results,
    }
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'scenario':16} {'target/s':>9} {'achieved/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'server CPU ms/req':>18}"
    )
    for name, r in results.items():
        print(
            f"{name:16} {r['target_rps']:>9.0f} {r['achieved_rps']:>11.0f} {r['p50_ms']:>8.1f} "
            f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>7.0f} {r['server_cpu_ms_per_request']:>18.2f}"
        )
    print(f"(medians of {args.runs} runs of {args.duration_sec:.0f} s; written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
