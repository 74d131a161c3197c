"""Batch throughput: the full backtest against a bare Beam pipeline on the same input, runner and workers.

The bare pipeline is the framework's limit for this job's shape: read the
same lines, decode the JSON, key each signal by (user, hour) and count per key
with a combiner, then write the counts. Anything the full pipeline costs
beyond it is ours: validation, de-duplication, features for five entity
windows per signal, rules, safeguards and three output files.

Input is the attack simulator's traffic (``pipelines.simulate``, seed 11, no
malformed lines), scaled to each size. Every run is a fresh process
(``benchmarks.common.run_measured``); the pipelines alternate so drifts in the
machine's speed hit both. Reported per size: events/s from the pipeline's own
time (build to finish, imports excluded) and from process wall time, and the
process tree's peak RSS; medians over runs. The headline is the ratio of
full to bare events/s.

The backtest reads its file in blocks (``transforms.lines.ReadLineBlocks``),
not one runner element per line as ``ReadFromText`` does. A bare pipeline
could do the same, so a third pipeline, ``bare_blocks``, is the bare one
reading that way, and ``full_over_bare_blocks`` is the ratio against it:
the part of the gap that reading does not explain.

Run (``make bench`` does, with the other benchmarks)::

    python -m benchmarks.batch_throughput --sizes 100000,1000000 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import pathlib
import subprocess
import sys
import time

from benchmarks.common import WORK_DIR, median, print_table, run_measured, write_results
from pipelines.options import PROJECT_ROOT

# pipelines.simulate at --scale 1 --malformed 0 --seed 11 (70,970 before the simulator's second stream farm, whose
# input the thirteenth session's figures at 1,099,379 signals used).
SIGNALS_PER_SCALE = 78_371
DEFAULT_RUNNER_CONFIG = "backtest_local_parallel.yaml"
# bare: the framework's limit (ReadFromText); full: the backtest; bare_blocks: bare reading as the backtest does.
KINDS = ("bare", "full", "bare_blocks")


def input_path(events: int) -> pathlib.Path:
    """Where the input of about ``events`` signals is kept: named after the simulator's source as well as the
    size, so a changed simulator (a new signal field, say) generates afresh rather than a benchmark measuring
    the old traffic."""
    simulator = hashlib.sha256((PROJECT_ROOT / "pipelines" / "simulate.py").read_bytes()).hexdigest()[:12]
    return WORK_DIR / f"signals_{events}_{simulator}.jsonl"


def ensure_input(events: int) -> tuple[pathlib.Path, int]:
    """Simulated traffic of about ``events`` signals (generated once, then reused); returns path and line count."""
    path = input_path(events)
    if not path.exists():
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        scale = events / SIGNALS_PER_SCALE
        cmd = [sys.executable, "-m", "pipelines.simulate", "--seed", "11", "--scale", f"{scale:.4f}"]
        cmd += ["--malformed", "0", "--output", str(path), "--labels", str(path.with_suffix(".labels.jsonl"))]
        subprocess.run(cmd, check=True, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    with path.open("rb") as handle:
        lines = sum(1 for _ in handle)
    return path, lines


# --- child processes -------------------------------------------------------------------------------------------


def _bare_key(line: bytes):
    import orjson

    obj = orjson.loads(line)
    millis = int(dt.datetime.fromisoformat(obj["event_time"]).timestamp() * 1000)
    return (obj["user_id"], millis - millis % 3_600_000), 1


def run_bare(input_path: str, runner_config: str, output_dir: str, reader: str = "text") -> dict:
    """The bare pipeline; ``reader`` "text" reads with Beam's ``ReadFromText`` (the framework's limit, as the
    issue defines it), "blocks" with the backtest's own ``ReadLineBlocks``, to show how much of the full
    pipeline's gain from reading in blocks (change 18) a bare pipeline would get too."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.combiners import CountCombineFn

    from pipelines.options import runner_config_args
    from transforms.lines import ReadLineBlocks

    if reader == "text":
        read = beam.io.ReadFromText(input_path, coder=beam.coders.BytesCoder())
    elif reader == "blocks":
        read = ReadLineBlocks(input_path)
    else:
        raise ValueError(f"reader must be text or blocks, got {reader!r}")
    started = time.monotonic()
    with beam.Pipeline(options=PipelineOptions(runner_config_args(runner_config))) as pipeline:
        (
            pipeline
            | "Read" >> read
            | "ParseAndKey" >> beam.Map(_bare_key)
            | "CountPerWindow" >> beam.CombinePerKey(CountCombineFn())
            | "Format" >> beam.MapTuple(lambda key, n: f"{key[0]},{key[1]},{n}")
            | "Write" >> beam.io.WriteToText(f"{output_dir}/counts", shard_name_template="", num_shards=1)
        )
    seconds = time.monotonic() - started
    with open(f"{output_dir}/counts") as handle:
        counted = sum(int(line.rsplit(",", 1)[1]) for line in handle)
    return {"pipeline_sec": round(seconds, 2), "events": counted}


def run_full(input_path: str, runner_config: str, output_dir: str) -> dict:
    from pipelines.backtest import run

    started = time.monotonic()
    summary = run(["--input", input_path, "--output_dir", output_dir], runner_config)
    return {
        "pipeline_sec": round(time.monotonic() - started, 2),
        "events": summary["signals_valid"],
        "decisions": summary["decisions"],
    }


# --- the benchmark ---------------------------------------------------------------------------------------------


def measure(sizes: list[int], runs: int, runner_config: str, timeout_sec: float) -> dict:
    results = []
    for size in sizes:
        path, lines = ensure_input(size)
        per_run: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for run_no in range(runs):
            for kind in KINDS:
                out = WORK_DIR / f"out_{kind}_{size}"
                argv = ["-m", "benchmarks.batch_throughput", "--child", kind, "--input", str(path)]
                argv += ["--runner_config", runner_config, "--output_dir", str(out)]
                figures = run_measured(argv, timeout_sec)
                if figures["events"] != lines:
                    raise RuntimeError(f"{kind} counted {figures['events']} of {lines} signals")
                figures["events_per_sec"] = round(lines / figures["pipeline_sec"])
                figures["events_per_wall_sec"] = round(lines / figures["wall_sec"])
                per_run[kind].append(figures)
                print(f"  {size:>9,} {kind} run {run_no + 1}: {json.dumps(figures)}", flush=True)
        summary = {"events": lines}
        for kind, figs in per_run.items():
            summary[kind] = {
                "events_per_sec": round(median(f["events_per_sec"] for f in figs)),
                "pipeline_sec": median(f["pipeline_sec"] for f in figs),
                "wall_sec": median(f["wall_sec"] for f in figs),
                "peak_rss_mib": median(f["peak_rss_mib"] for f in figs),
            }
        summary["full_over_bare"] = round(summary["full"]["events_per_sec"] / summary["bare"]["events_per_sec"], 3)
        paired = [
            f["events_per_sec"] / b["events_per_sec"] for f, b in zip(per_run["full"], per_run["bare"], strict=True)
        ]
        summary["full_over_bare_per_run"] = [round(r, 3) for r in paired]
        summary["full_over_bare_blocks"] = round(
            summary["full"]["events_per_sec"] / summary["bare_blocks"]["events_per_sec"], 3
        )
        summary["runs"] = per_run
        results.append(summary)
    return {"runner_config": runner_config, "runs_per_size": runs, "sizes": results}


def report(payload: dict) -> None:
    rows = []
    for s in payload["sizes"]:
        for kind in KINDS:
            k = s[kind]
            rows.append(
                [
                    f"{s['events']:,}",
                    kind,
                    f"{k['events_per_sec']:,}",
                    k["pipeline_sec"],
                    k["wall_sec"],
                    k["peak_rss_mib"],
                ]
            )
        rows.append([f"{s['events']:,}", "full/bare", s["full_over_bare"], "", "", ""])
        rows.append([f"{s['events']:,}", "full/bare_blocks", s["full_over_bare_blocks"], "", "", ""])
    print(f"\nBatch throughput ({payload['runner_config']}, median of {payload['runs_per_size']} runs)")
    print_table(["events", "pipeline", "events/s", "pipeline s", "wall s", "peak RSS MiB"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="Comma-separated input sizes (signals).")
    parser.add_argument("--runs", type=int, default=3, help="Runs per pipeline and size; figures are medians.")
    parser.add_argument("--runner_config", default=DEFAULT_RUNNER_CONFIG, help="Runner config for both pipelines.")
    parser.add_argument("--timeout_sec", type=float, default=900, help="Give up on a run after this long.")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        pathlib.Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.child == "full":
            figures = run_full(args.input, args.runner_config, args.output_dir)
        else:
            reader = "blocks" if args.child == "bare_blocks" else "text"
            figures = run_bare(args.input, args.runner_config, args.output_dir, reader)
        print(json.dumps(figures))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    payload = measure(sizes, args.runs, args.runner_config, args.timeout_sec)
    report(payload)
    print(f"wrote {write_results('batch_throughput', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
