"""Per-element CPU cost of each of our transforms, in process, without a runner.

Each stage's own function runs over the same simulated traffic as the batch
benchmark, timed with ``time.perf_counter`` around the whole loop, repeated
``--repeats`` times; the figure is the median. Stages and what one unit is:

* parse: a backtest's validation, ``ParseSignalBatchFn.process_batch`` on the
  lines in batches as ``ReadLineBlocks`` hands them over (per signal; outside a
  runner its metrics are not recorded); each pass starts with parsing's caches
  (ids, IPs, minutes) empty, as a worker new to the input would. Until the
  twenty-third session this row timed ``parse_signal`` line by line, the
  streaming job's path;
* dedupe: packing signals by event-time hour, then keeping the earliest copy
  of each event id in time order (per signal; the shuffle itself is the runner's);
* features/fold: ``PreAggregateFn`` folding each hour's signals as one
  batch, as an unsharded backtest does, into every entity window the default
  pack needs (per signal; about five windows each, a user's day being copied
  from the user's whole hour);
* features/compute: an accumulator to its ``EntityFeatures`` record (per entity
  window); a batch window's features are computed as rules read them
  (``WindowFeatures``), so their cost is in the rules row;
* rules: the default pack's conditions on one entity window, and the features
  they read (per window; each pass on fresh records, since a record keeps the
  features read from it);
* safeguards: allowlist and action ladder on one rule hit (per hit; caps are
  per-key state in Beam and are not run here).

Not in the sum: every feature of a window at once (``compute_features``, per
window), which the streaming job computes for each pane it writes as a row
and a batch rule hit for its evidence.

Per-window and per-hit costs are also given per signal (times windows or hits
per signal), so the rows add up to our code's CPU per signal. The last row is
a plain Python loop doing what the bare Beam pipeline does (decode, key,
count), for scale: the gap between it and the bare pipeline's rate in
``batch_throughput`` is Beam's own cost per element.

Run::

    python -m benchmarks.transform_costs --events 100000 --repeats 5

With ``--instructions`` the same stages are counted in machine instructions
instead of timed: the script runs itself under valgrind's callgrind, which
counts what each stage executes whatever else the machine is doing, so two
versions of the code compare exactly on a shared, noisy machine (with the
child's hash seed fixed, the same figure twice for the same code). It needs
valgrind, its ``callgrind.h`` and gcc; it runs about 50 times slower than
native, hence fewer ``--events``.
Results go to ``transform_instructions.json``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import IntervalWindow

from benchmarks.batch_throughput import _bare_key, ensure_input
from benchmarks.common import print_table, write_results
from pipelines.pipeline import PipelineConfig
from transforms import parse
from transforms.batch_gc import tune_gc_for_batch
from transforms.dedupe import BATCH_GROUP_MS, PackByHourFn, earliest_copies
from transforms.features import (
    PreAggregateFn,
    SizedToEntityFeaturesFn,
    ToEntityFeaturesFn,
    compute_features,
    merge,
)
from transforms.lines import LINES_PER_BATCH
from transforms.parse import ParseSignalBatchFn
from transforms.rulepack import load_rule_pack
from transforms.rules import ApplyRulesFn
from transforms.safeguards import EMPTY_ALLOWLIST, apply_allowlist, ladder_batch


def _timed(fn, repeats: int, setup=None) -> tuple[float, object]:
    """Median seconds of ``fn()`` over repeats, and its last result; ``setup()``, untimed, before each."""
    seconds, result = [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


# Callgrind's client requests, built into a tiny library the instruction-counting child loads with ctypes.
_CALLGRIND_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


class InstructionCounter:
    """Instructions ``fn()`` executes, read from the dump callgrind writes when asked (only under valgrind).

    Callgrind writes its n-th requested dump to ``<out_file>.<n>``; its ``totals:`` line is the count of
    instructions executed between ``cg_start`` and ``cg_stop``.
    """

    def __init__(self, work_dir: pathlib.Path, out_file: str):
        library = work_dir / "libcallgrind_requests.so"
        source = work_dir / "callgrind_requests.c"
        source.write_text(_CALLGRIND_C)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        self._lib = ctypes.CDLL(str(library))
        self._out_file = out_file
        self._dumps = 0

    def __call__(self, fn, setup=None) -> tuple[float, object]:
        if setup is not None:
            setup()
        gc.collect()
        self._lib.cg_start()
        result = fn()
        self._lib.cg_stop()
        self._dumps += 1
        for line in pathlib.Path(f"{self._out_file}.{self._dumps}").read_text().splitlines():
            if line.startswith("totals:"):
                return float(line.split()[1]), result
        raise RuntimeError(f"no totals in callgrind dump {self._out_file}.{self._dumps}")


def measure(events: int, repeats: int, meter=None) -> dict:
    """Each stage's cost: median µs over ``repeats``, or, given ``meter`` (an ``InstructionCounter``),
    instructions."""
    figure, scale = ("instructions", 1) if meter else ("us", 1e6)
    meter = meter or (lambda fn, setup=None: _timed(fn, repeats, setup))
    path, _ = ensure_input(events)
    lines = path.read_bytes().splitlines()[:events]
    pack = load_rule_pack("rules/default.yaml")
    # Batch workers run with the GC tuning PreAggregateFn applies; measure what they run.
    tune_gc_for_batch()

    # Each pass starts with parsing's caches empty, as a worker starting on this input would: a pass after
    # the first would otherwise find every id, IP and minute already accepted.
    validate = ParseSignalBatchFn("benchmark")
    blocks = [lines[i : i + LINES_PER_BATCH] for i in range(0, len(lines), LINES_PER_BATCH)]

    def parse_blocks():  # the input has no malformed lines: each batch yields its list of signals, nothing else
        return [signal for block in blocks for batch in validate.process_batch(block) for signal in batch]

    parse_sec, signals = meter(parse_blocks, setup=parse.clear_caches)

    def dedupe():  # what DeduplicateSignals does around its shuffle: pack by hour, keep the earliest copies
        packer = PackByHourFn()
        packer.start_bundle()
        groups = collections.defaultdict(list)
        for s in signals:
            for hour, pack in packer.process(s):
                groups[hour].append(pack)
        for wv in packer.finish_bundle():
            groups[wv.value[0]].append(wv.value[1])
        return [earliest_copies(groups[hour])[0] for hour in sorted(groups)]

    dedupe_sec, hours = meter(dedupe)
    unique = [s for hour in hours for s in hour]

    def fold():  # as an unsharded backtest folds: each hour one batch, its whole windows going out whole
        fn = PreAggregateFn(pack.feature_plan(), whole_batch_ms=BATCH_GROUP_MS)
        fn.start_bundle()
        out = []
        for hour in hours:
            out.extend(item.value if isinstance(item, TaggedOutput) else item for item in fn.process_batch(hour))
        out.extend(wv.value for wv in fn.finish_bundle())
        return out

    fold_sec, partials = meter(fold)
    # Windows as the shuffle would deliver them: one accumulator per key (partials of one key merged).
    merged = {}
    for key, acc in partials:
        merged.setdefault(key, []).append(acc)
    windows = [(key, merge(accs)) for key, accs in merged.items()]
    to_features = SizedToEntityFeaturesFn()
    compute_sec, features = meter(lambda: [f for w in windows for f in to_features.process(w)])
    all_features_sec, _ = meter(lambda: [compute_features(acc, key[0]) for key, acc in windows])

    source = PipelineConfig().policy_source(pack)
    rules_fn = ApplyRulesFn(source, "event")
    rules_fn.setup()
    # Fresh records for each pass: a batch window computes the features its rules read when they read
    # them (WindowFeatures), and keeps them, so a second pass over the same records would skip that work.
    fresh: list = []

    def fresh_records():
        fresh[:] = [f for w in windows for f in to_features.process(w)]

    rules_sec, hits = meter(lambda: [h for ef in fresh for h in rules_fn.process(ef)], setup=fresh_records)
    hits = [h for h in hits if not hasattr(h, "tag")]

    # A streaming pane as the job runs it: the record from the window's accumulator and its Beam window
    # (ToEntityFeaturesFn), then the rules on the processing-time clock; with --features_table (every_feature)
    # every feature at once first, as every pane was before change 22.
    stream_rules = ApplyRulesFn(source, PipelineConfig(streaming=True).decision_clock)
    stream_rules.setup()
    pane_inputs = [
        (((entity_type, entity_id), acc), window_sec, IntervalWindow(start_ms / 1000, start_ms / 1000 + window_sec))
        for (window_sec, entity_type, entity_id, start_ms), acc in windows
    ]
    sizes = {window_sec for _, window_sec, _ in pane_inputs}
    to_pane = {(size, every): ToEntityFeaturesFn(size, every) for size in sizes for every in (False, True)}

    def panes(every_feature: bool):
        return lambda: [
            hit
            for element, window_sec, window in pane_inputs
            for ef in to_pane[(window_sec, every_feature)].process(element, window)
            for hit in stream_rules.process(ef)
        ]

    pane_sec, _ = meter(panes(False))
    every_feature_pane_sec, _ = meter(panes(True))

    def safeguards():
        by_entity = collections.defaultdict(list)
        for h in hits:
            allowed = apply_allowlist(h, EMPTY_ALLOWLIST)
            by_entity[(allowed.decision.entity_type, allowed.decision.entity_id)].append(allowed)
        return [out for item in by_entity.items() for out in ladder_batch(item, 31 * 86400)]

    safeguards_sec, _ = meter(safeguards)

    def plain_loop():
        counts = collections.Counter()
        for line in lines:
            key, n = _bare_key(line)
            counts[key] += n
        return counts

    plain_sec, _ = meter(plain_loop)

    n = len(lines)
    n_windows, n_hits = len(windows), max(1, len(hits))

    def row(stage, unit, cost, units):
        return {
            "stage": stage,
            "unit": unit,
            "units": units,
            f"{figure}_per_unit": round(cost / units * scale, 2),
            f"{figure}_per_signal": round(cost / n * scale, 2),
        }

    stages = [
        row("parse", "signal", parse_sec, n),
        row("dedupe", "signal", dedupe_sec, n),
        row("features/fold", "signal", fold_sec, len(unique)),
        row("features/compute", "entity window", compute_sec, n_windows),
        row("rules", "entity window", rules_sec, n_windows),
        row("safeguards", "rule hit", safeguards_sec, n_hits),
    ]
    total = round(sum(s[f"{figure}_per_signal"] for s in stages), 2)
    return {
        "signals": n,
        "entity_windows": n_windows,
        "rule_hits": len(hits),
        "repeats": 1 if figure == "instructions" else repeats,
        "stages": stages,
        f"ours_{figure}_per_signal": total,
        f"plain_python_bare_loop_{figure}_per_signal": round(plain_sec / n * scale, 2),
        f"all_features_{figure}_per_window": round(all_features_sec / n_windows * scale, 2),
        f"pane_{figure}_per_window": round(pane_sec / n_windows * scale, 2),
        f"pane_every_feature_{figure}_per_window": round(every_feature_pane_sec / n_windows * scale, 2),
    }


def report(payload: dict) -> None:
    figure = "instructions" if "ours_instructions_per_signal" in payload else "us"
    rows = [
        [s["stage"], s["unit"], f"{s['units']:,}", s[f"{figure}_per_unit"], s[f"{figure}_per_signal"]]
        for s in payload["stages"]
    ]
    rows.append(["all of ours", "signal", f"{payload['signals']:,}", "", payload[f"ours_{figure}_per_signal"]])
    rows.append(["plain-Python bare loop", "signal", "", "", payload[f"plain_python_bare_loop_{figure}_per_signal"]])
    if figure == "us":
        print(f"\nPer-element CPU, in process (median of {payload['repeats']})")
    else:
        print("\nPer-element instructions, in process, counted by callgrind (exact; one run)")
    print_table(["stage", "unit", "units", f"{figure}/unit", f"{figure}/signal"], rows)
    all_features = payload.get(f"all_features_{figure}_per_window")
    if all_features is not None:  # results saved before the figure existed lack it
        print(f"every feature of a window at once (a feature row): {all_features} {figure} a window")
    pane, every = payload.get(f"pane_{figure}_per_window"), payload.get(f"pane_every_feature_{figure}_per_window")
    if pane is not None:  # results saved before change 22 lack it
        print(f"a streaming pane (record and rules): {pane} {figure} a window; with --features_table: {every}")


def count_instructions(events: int) -> dict:
    """Run this module's stages under callgrind in a child process and return its payload."""
    missing = [tool for tool in ("valgrind", "gcc") if shutil.which(tool) is None]
    if missing or not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        raise SystemExit(
            f"--instructions needs valgrind, its callgrind.h and gcc (missing: {missing or ['callgrind.h']}); "
            "on Debian: apt-get install valgrind gcc"
        )
    ensure_input(events)  # generate the input natively, not under valgrind
    with tempfile.TemporaryDirectory(prefix="callgrind-") as work:
        out_file = os.path.join(work, "callgrind.out")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_file}",
            sys.executable,
            "-m",
            "benchmarks.transform_costs",
            "--events",
            str(events),
            "--child-instructions",
            work,
        ]
        # A fixed hash seed: set iteration order, and with it the count, is then the same run after run.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(
            command, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if done.returncode:
            raise SystemExit(f"the callgrind run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(pathlib.Path(work, "payload.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="Signals to time (from the 100k input).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per stage; figures are medians.")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="Count instructions under callgrind instead of timing (exact; use about 20000 --events).",
    )
    parser.add_argument("--child-instructions", help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args(argv)
    if args.child_instructions:
        work = pathlib.Path(args.child_instructions)
        payload = measure(args.events, 1, InstructionCounter(work, str(work / "callgrind.out")))
        (work / "payload.json").write_text(json.dumps(payload))
        return 0
    if args.instructions:
        payload = count_instructions(args.events)
        report(payload)
        print(f"wrote {write_results('transform_instructions', payload)}")
        return 0
    payload = measure(args.events, args.repeats)
    report(payload)
    print(f"wrote {write_results('transform_costs', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
