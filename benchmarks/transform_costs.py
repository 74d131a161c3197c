"""Per-element CPU cost of each of our transforms, in process, without a runner.

Each stage's own function runs over the same simulated traffic as the batch
benchmark, timed with ``time.perf_counter`` around the whole loop, repeated
``--repeats`` times; the figure is the median. Stages and what one unit is:

* parse: ``parse_signal`` on one raw line (per signal);
* dedupe: packing signals by event-time hour, then keeping the earliest copy
  of each event id in time order (per signal; the shuffle itself is the runner's);
* features/fold: ``PreAggregateFn`` folding one signal into every entity
  window the default pack needs (per signal; about five accumulators each);
* features/compute: an accumulator to its named features (per entity window);
* rules: the default pack's conditions on one entity window (per window);
* safeguards: allowlist and action ladder on one rule hit (per hit; caps are
  per-key state in Beam and are not run here).

Per-window and per-hit costs are also given per signal (times windows or hits
per signal), so the rows add up to our code's CPU per signal. The last row is
a plain Python loop doing what the bare Beam pipeline does (decode, key,
count), for scale: the gap between it and the bare pipeline's rate in
``batch_throughput`` is Beam's own cost per element.

Run::

    python -m benchmarks.transform_costs --events 100000 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time

from benchmarks.batch_throughput import _bare_key, ensure_input
from benchmarks.common import print_table, write_results
from pipelines.pipeline import PipelineConfig
from transforms.dedupe import PackByHourFn, earliest_copies
from transforms.features import PreAggregateFn, SizedToEntityFeaturesFn, merge, tune_gc_for_batch
from transforms.parse import parse_signal
from transforms.rulepack import load_rule_pack
from transforms.rules import ApplyRulesFn
from transforms.safeguards import EMPTY_ALLOWLIST, apply_allowlist, ladder_batch


def _timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over repeats, and its last result."""
    seconds, result = [], None
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def measure(events: int, repeats: int) -> dict:
    path, _ = ensure_input(events)
    lines = path.read_bytes().splitlines()[:events]
    pack = load_rule_pack("rules/default.yaml")
    # Batch workers run with the GC tuning PreAggregateFn applies; measure what they run.
    tune_gc_for_batch()

    parse_sec, signals = _timed(lambda: [parse_signal(line).signal for line in lines], repeats)

    def dedupe():  # what DeduplicateSignals does around its shuffle: pack by hour, keep the earliest copies
        packer = PackByHourFn()
        packer.start_bundle()
        groups = collections.defaultdict(list)
        for s in signals:
            for hour, pack in packer.process(s):
                groups[hour].append(pack)
        for wv in packer.finish_bundle():
            groups[wv.value[0]].append(wv.value[1])
        return [s for hour in sorted(groups) for s in earliest_copies(groups[hour])[0]]

    dedupe_sec, unique = _timed(dedupe, repeats)

    def fold():
        fn = PreAggregateFn(pack.feature_plan())
        fn.start_bundle()
        out = []
        out.extend(fn.process_batch(unique))
        out.extend(wv.value for wv in fn.finish_bundle())
        return out

    fold_sec, partials = _timed(fold, repeats)
    # Windows as the shuffle would deliver them: one accumulator per key (partials of one key merged).
    merged = {}
    for key, acc in partials:
        merged.setdefault(key, []).append(acc)
    windows = [(key, merge(accs)) for key, accs in merged.items()]
    to_features = SizedToEntityFeaturesFn()
    compute_sec, features = _timed(lambda: [f for w in windows for f in to_features.process(w)], repeats)

    source = PipelineConfig().policy_source(pack)
    rules_fn = ApplyRulesFn(source, "event")
    rules_fn.setup()
    rules_sec, hits = _timed(lambda: [h for ef in features for h in rules_fn.process(ef)], repeats)
    hits = [h for h in hits if not hasattr(h, "tag")]

    def safeguards():
        by_entity = collections.defaultdict(list)
        for h in hits:
            allowed = apply_allowlist(h, EMPTY_ALLOWLIST)
            by_entity[(allowed.decision.entity_type, allowed.decision.entity_id)].append(allowed)
        return [out for item in by_entity.items() for out in ladder_batch(item, 31 * 86400)]

    safeguards_sec, _ = _timed(safeguards, repeats)

    def plain_loop():
        counts = collections.Counter()
        for line in lines:
            key, n = _bare_key(line)
            counts[key] += n
        return counts

    plain_sec, _ = _timed(plain_loop, repeats)

    n = len(lines)
    n_windows, n_hits = len(windows), max(1, len(hits))

    def row(stage, unit, seconds, units):
        per_unit = seconds / units * 1e6
        return {
            "stage": stage,
            "unit": unit,
            "units": units,
            "us_per_unit": round(per_unit, 2),
            "us_per_signal": round(seconds / n * 1e6, 2),
        }

    stages = [
        row("parse", "signal", parse_sec, n),
        row("dedupe", "signal", dedupe_sec, n),
        row("features/fold", "signal", fold_sec, len(unique)),
        row("features/compute", "entity window", compute_sec, n_windows),
        row("rules", "entity window", rules_sec, n_windows),
        row("safeguards", "rule hit", safeguards_sec, n_hits),
    ]
    total = round(sum(s["us_per_signal"] for s in stages), 2)
    return {
        "signals": n,
        "entity_windows": n_windows,
        "rule_hits": len(hits),
        "repeats": repeats,
        "stages": stages,
        "ours_us_per_signal": total,
        "plain_python_bare_loop_us_per_signal": round(plain_sec / n * 1e6, 2),
    }


def report(payload: dict) -> None:
    rows = [[s["stage"], s["unit"], f"{s['units']:,}", s["us_per_unit"], s["us_per_signal"]] for s in payload["stages"]]
    rows.append(["all of ours", "signal", f"{payload['signals']:,}", "", payload["ours_us_per_signal"]])
    rows.append(["plain-Python bare loop", "signal", "", "", payload["plain_python_bare_loop_us_per_signal"]])
    print(f"\nPer-element CPU, in process (median of {payload['repeats']})")
    print_table(["stage", "unit", "units", "us/unit", "us/signal"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="Signals to time (from the 100k input).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per stage; figures are medians.")
    args = parser.parse_args(argv)
    payload = measure(args.events, args.repeats)
    report(payload)
    print(f"wrote {write_results('transform_costs', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
