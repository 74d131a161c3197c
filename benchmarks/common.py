"""What every benchmark shares: the machine's description, medians, child processes measured for wall time and
peak memory, and the results files.

Each measured run is a fresh Python process, so one run's heap, caches and
threads never flatter the next, and peak RSS is the whole process tree's (the
multi-process runner forks workers): sampled every 50 ms with psutil and
summed over the tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time

import psutil

from pipelines.options import PROJECT_ROOT

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
WORK_DIR = PROJECT_ROOT / "out" / "bench"


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import apache_beam

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "beam": apache_beam.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


class TreeMemorySampler:
    """Peak resident memory of a process and all its descendants, summed, sampled in a thread."""

    def __init__(self, pid: int, interval_sec: float = 0.05):
        self._root = psutil.Process(pid)
        self._interval = interval_sec
        self._stop = threading.Event()
        self.peak_bytes = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        started = time.monotonic()
        while not self._stop.is_set():
            rss = self._sample()
            self.peak_bytes = max(self.peak_bytes, rss)
            self.timeline.append((time.monotonic() - started, rss))
            self._stop.wait(self._interval)

    def quarters_mib(self) -> list[float]:
        """RSS at 25, 50, 75 and 100% of the run (the last sample at or before each point)."""
        if not self.timeline:
            return []
        end = self.timeline[-1][0]
        out = []
        for q in (0.25, 0.5, 0.75, 1.0):
            rss = [b for t, b in self.timeline if t <= end * q and b] or [self.timeline[-1][1]]
            out.append(round(rss[-1] / 2**20))
        return out

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(argv: list[str], timeout_sec: float, env: dict | None = None, timeline: bool = False) -> dict:
    """Run ``python argv...`` as a child; returns wall seconds, peak tree RSS in MiB (and with ``timeline``,
    RSS at each quarter of the run) merged with every JSON object line the child printed (its own figures)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})},
        cwd=PROJECT_ROOT,
    )
    with TreeMemorySampler(proc.pid) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout_sec)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"{' '.join(argv)} did not finish in {timeout_sec} s:\n{err[-2000:]}") from None
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    figures = {}
    for line in out.splitlines():
        if line.startswith("{"):
            figures.update(json.loads(line))
    result = {"wall_sec": round(wall, 2), "peak_rss_mib": round(sampler.peak_bytes / 2**20, 1), **figures}
    if timeline:
        result["rss_quarters_mib"] = sampler.quarters_mib()
    return result


def write_results(name: str, payload: dict) -> pathlib.Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, sort_keys=False) + "\n")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
