"""Memory against the number of keys: peak RSS of the streaming graph as distinct users grow, beside a bare graph.

State must be released when windows close and timers fire, or a long-running
job's memory grows with every user it has ever seen. This runs the streaming
job's graph (``build_pipeline`` with ``streaming=True`` and the job's default
lateness, early firings and de-duplication horizons) on the local streaming
runner, with the input made on the fly: a ``TestStream`` of small "tick"
elements, each expanded into ``--per_tick`` signals by a generator step, so
the source holds nothing and all memory growth is the pipeline's state.

Each signal names a new user (and that user's device), except that every tick
starts with a new stream-farm bot's 45 plays, so its decision goes through the
safeguards' and the decisions' state too; IPs, tracks and artists come from
fixed pools. Traffic advances at a
constant ``--events_per_hour`` of event time, and after every tick the
watermark and the processing-time clock (a test clock) advance by the tick's
span, so hourly and daily windows close, allowed lateness runs out, and
de-duplication, cap and ladder timers fire as they would in real traffic
(the test clock is first brought to wall time: those timers are set from it).
At the end, a census of what the runner still holds per key tells state that
timers released from state nobody did (``runner_state``). With a constant
rate, the keys live at any moment are the same whatever the total, so peak
RSS should not grow with the number of distinct users on a runner that
collects closed windows (Beam's local runners do not: see ``runner_state``).
The default rate (100 signals an event-hour) keeps a daily window, the
longest the default pack uses, to 2,400 users, well under the smallest run:
a day's window rightly holds all of that day's users, and a faster rate
would measure that instead.

Every run is a fresh process (the local runner runs in it). Peak RSS is the
process's own maximum (``getrusage``) when the run ends, before the census,
whose bookkeeping would add to it; RSS sampled by the parent at each quarter
of the run shows whether it climbs or stays flat (the last quarter, and each
run's sampled ``peak_rss_mib`` in the results, include the census).

Run::

    python -m benchmarks.memory_keys --users 2500,10000,20000 --runs 2
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import tempfile
import time
import types

import apache_beam as beam

from benchmarks.common import median, print_table, run_measured, write_results

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
COUNTRIES = ("SE", "US", "GB", "DE", "BR", "IN", "JP", "FR")


BOT_PLAYS = 45  # stream_farm_exclude needs 40 plays in the hour; a few more


def tick_signals(tick: int, per_tick: int, tick_ms: int, bot_plays: int = BOT_PLAYS):
    """The signals of one tick: one stream-farm bot's plays, then ordinary users, each the i-th signal overall.

    The bot (a new one every tick) plays a track a minute from the tick's start, so its decision passes through
    the safeguards' state (caps, the action ladder) and the decisions' de-duplication, and the end-of-run census
    shows whether their timers released it too. Ordinary users' event times spread over the tick.
    """
    import orjson

    from schemas.avro import millis_to_rfc3339

    base = tick * per_tick
    tick_start_ms = T0_MS + tick * tick_ms
    for j in range(per_tick):
        i = base + j
        event_ms = tick_start_ms + j * tick_ms // per_tick
        if j < bot_plays:
            signal = {
                "event_id": f"ev{i:09d}",
                "event_time": millis_to_rfc3339(tick_start_ms + j * 60_000),
                "event_type": "stream",
                "user_id": f"bot{tick:06d}",
                "device_id": f"botdev{tick:06d}",
                "ip": f"10.250.{(tick >> 8) & 255}.{tick & 255}",
                "country": "SE",
                "track_id": f"tfarm{j % 7}",
                "artist_id": "afarm",
                "ms_played": 33_000,
            }
            yield orjson.dumps(signal)
            continue
        signal = {
            "event_id": f"ev{i:09d}",
            "event_time": millis_to_rfc3339(event_ms),
            "user_id": f"u{i:09d}",
            "device_id": f"d{i:09d}",
            "ip": f"10.{(i >> 16) % 4}.{(i >> 8) & 255}.{i & 255}",
            "country": COUNTRIES[i % len(COUNTRIES)],
        }
        if i % 10 == 9:
            signal |= {"event_type": "login", "success": i % 7 != 0}
        else:
            track = (i * 7919) % 5000
            signal |= {"event_type": "stream", "track_id": f"t{track:05d}", "artist_id": f"a{track // 10:04d}"}
            signal["ms_played"] = 30_000 + (i * 104_729) % 200_000
        yield orjson.dumps(signal)


def distinct_users(ticks: int, per_tick: int, bot_plays: int = BOT_PLAYS) -> int:
    return ticks * (per_tick - bot_plays + 1)


class _Tally(beam.DoFn):
    """Counts elements per bundle into a file (the local streaming runner's metrics undercount across bundles)."""

    def __init__(self, path: str, name: str):
        self._path, self._name = path, name
        self._n = 0

    def start_bundle(self):
        self._n = 0

    def process(self, element):
        self._n += 1

    def finish_bundle(self):
        if self._n:
            with open(self._path, "a") as handle:
                handle.write(f"{self._name} {self._n}\n")


def _ticks(users: int, per_tick: int, events_per_hour: int):
    """A test stream of ticks for at least ``users`` distinct users; watermark and test clock advance per tick."""
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms import window

    ticks = -(-users // (per_tick - BOT_PLAYS + 1))
    tick_ms = per_tick * 3_600_000 // events_per_hour
    if tick_ms % 3_600_000:
        # A tick's bot plays a track a minute from the tick's start; for its decision, all 45 must fall in one
        # hourly window of that tick.
        raise ValueError(f"a tick must span whole hours: per_tick / events_per_hour = {tick_ms / 3_600_000:g} h")
    # The test clock starts at 0, but processing-time timers are set from the wall clock (Timestamp.now(), as
    # Beam's own DeduplicatePerKey does, and as is right on a real runner), so first bring the clock to now:
    # otherwise no de-duplication timer would ever fire. Whole seconds: TestStream wants millisecond values.
    stream = TestStream().advance_processing_time(int(time.time()))
    for tick in range(ticks):
        stream = stream.add_elements([window.TimestampedValue(tick, (T0_MS + tick * tick_ms) / 1000)])
        stream = stream.advance_watermark_to((T0_MS + (tick + 1) * tick_ms) / 1000)
        stream = stream.advance_processing_time(tick_ms / 1000)
    # Let the last windows close and every timer fire before the run ends.
    stream = stream.advance_watermark_to((T0_MS + ticks * tick_ms + 3 * 86_400_000) / 1000)
    # 32 days of processing time: the action ladder remembers an enforced entity for up to 31.
    stream = stream.advance_processing_time(32 * 86_400).advance_watermark_to_infinity()
    return stream, ticks, tick_ms


def _bare_counts(payloads, config):
    """The framework's own floor: decode, key by user, and count per user in hourly windows fired as the job's are."""
    import orjson
    from apache_beam.transforms import trigger, window

    return (
        payloads
        | "Decode" >> beam.Map(lambda payload: (orjson.loads(payload)["user_id"], 1))
        | "Window"
        >> beam.WindowInto(
            window.FixedWindows(3600),
            trigger=trigger.AfterWatermark(
                early=trigger.AfterProcessingTime(config.early_firing_sec), late=trigger.AfterCount(1)
            ),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=config.allowed_lateness_sec,
        )
        | "CountPerUser" >> beam.combiners.Count.PerKey()
    )


def runner_state(result) -> dict | None:
    """What the local runner still holds per key once the run is over, by kind of state.

    At the end every window has closed and the watermark is at infinity, so any
    state left is state nobody released. Two kinds, told apart by their tags:

    - ``windowed``: a GroupByKey's per-window state under Beam's Python trigger
      driver (elements, pane indices, trigger bits). That driver never
      garbage-collects a window after its allowed lateness (its ``_output`` says
      ``TODO(robertwb): allowed lateness``); Dataflow runs its own.
    - ``user``: the state and timers of our stateful DoFns (de-duplication,
      caps, the action ladder). Timers clear it, so nothing should hold data.

    Per key, the runner also keeps the (possibly empty) state object itself: it
    never deletes a key once seen (``EvaluationContext._transform_keyed_states``).
    None where the runner keeps no such table (any runner but the local one).
    """
    keyed = getattr(getattr(result, "_evaluation_context", None), "_transform_keyed_states", None)
    if keyed is None:
        return None
    totals = {
        kind: {
            "steps": 0,
            "keys": 0,
            "keys_holding_data": 0,
            "cells_holding_data": 0,
            "elements": 0,
            "timers": 0,
            "retained_mib": 0.0,
        }
        for kind in ("windowed", "user")
    }
    seen: set[int] = set()  # shared, so an object two steps hold is counted once
    for states in keyed.values():
        per_key = [state for key, state in states.items() if key is not None and hasattr(state, "state")]
        if not per_key:
            continue
        # A step is a trigger driver's GroupByKey if any key has a tag of its own (it never empties a key: a
        # finished window leaves a tombstone); else it is a stateful DoFn, whose keys timers may have emptied.
        windowed = any(
            state.global_state or any(not tag.startswith("user/") for cells in state.state.values() for tag in cells)
            for state in per_key
        )
        t = totals["windowed" if windowed else "user"]
        t["steps"] += 1
        for state in per_key:
            tags = [(tag, values) for cells in state.state.values() for tag, values in cells.items()]
            held = [values for _, values in tags if values]
            t["keys"] += 1
            t["keys_holding_data"] += bool(held)
            t["cells_holding_data"] += len(held)
            t["elements"] += sum(len(values) for tag, values in tags if tag == "elements")
            t["timers"] += sum(len(timers) for timers in state.timers.values())
        t["retained_mib"] += _deep_size(states, seen) / 2**20
    for t in totals.values():
        t["retained_mib"] = round(t["retained_mib"], 1)
    return totals


_NOT_STATE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _deep_size(root, seen: set[int]) -> int:
    """Bytes of ``root`` and everything it reaches (containers, instance dicts and slots), each object once.

    What Python allocated for the objects, without the allocator's own overhead, so a lower bound on the RSS
    they take. Classes, modules and functions are shared code, not state, and are not followed.
    """
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_STATE):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            if hasattr(obj, "__dict__"):
                stack.append(obj.__dict__)
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return total


def run_child(users: int, per_tick: int, events_per_hour: int, bare: bool = False) -> dict:
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.pipeline import PipelineConfig, build_pipeline
    from transforms.rulepack import load_rule_pack

    stream, ticks, tick_ms = _ticks(users, per_tick, events_per_hour)
    # The streaming job's own defaults (pipelines/streaming.py): lateness 1 h, early panes every 10 s,
    # signal ids remembered 1 h, decision ids up to 2 days.
    config = PipelineConfig(streaming=True, allowed_lateness_sec=3600, early_firing_sec=10, signal_dedup_ttl_sec=3600)
    started = time.monotonic()
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"]))
    payloads = (
        pipeline | "Ticks" >> stream | "Generate" >> beam.FlatMap(lambda tick: tick_signals(tick, per_tick, tick_ms))
    )
    tally = tempfile.NamedTemporaryFile(prefix="memory_keys_", suffix=".tally", delete=False).name
    payloads | "CountSignals" >> beam.ParDo(_Tally(tally, "signals"))
    if bare:
        panes = _bare_counts(payloads, config)
    else:
        outputs = build_pipeline(payloads, load_rule_pack("rules/default.yaml"), source="bench", config=config)
        outputs.dead_letters | "CountDeadLetters" >> beam.ParDo(_Tally(tally, "dead_letters"))
        outputs.decisions | "CountDecisions" >> beam.ParDo(_Tally(tally, "decisions"))
        (panes,) = outputs.features  # streaming: one branch (ComputeFeatures)
    panes | "CountPanes" >> beam.ParDo(_Tally(tally, "panes"))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.monotonic() - started
    # The run's peak, before the census below allocates its own bookkeeping (the runner is in this process).
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # What is still alive once every window has closed and the watermark is at infinity, while the runner's
    # result (and with it the runner's state) is still referenced: per-key objects here are state not released.
    gc.collect()
    census = collections.Counter(type(o).__name__ for o in gc.get_objects())
    watched = ("InMemoryUnmergedState", "Accumulator", "Signal", "IntervalWindow")
    held = runner_state(result)
    del result
    counts = collections.Counter()
    with open(tally) as handle:
        for line in handle:
            name, n = line.split()
            counts[name] += int(n)
    os.unlink(tally)
    return {
        **counts,
        "users": distinct_users(ticks, per_tick),
        "event_hours": round(ticks * tick_ms / 3_600_000, 1),
        "pipeline_sec": round(seconds, 1),
        "peak_rss_mib_before_census": round(peak_mib, 1),
        "alive_after_run": {name: census[name] for name in watched},
        "runner_state_after_run": held,
    }


GRAPHS = ("bare", "full")


def _held_mib(figures: dict) -> float | None:
    """MiB of per-key state the runner still held after the run (``runner_state``), all kinds."""
    held = figures.get("runner_state_after_run")
    return round(sum(t["retained_mib"] for t in held.values()), 1) if held else None


def _summary(figs: list[dict]) -> dict:
    return {
        "peak_rss_mib": round(median(f["peak_rss_mib_before_census"] for f in figs), 1),
        "rss_quarters_mib": figs[len(figs) // 2]["rss_quarters_mib"],
        "held_after_run_mib": round(median(_held_mib(f) for f in figs), 1),
        "pipeline_sec": round(median(f["pipeline_sec"] for f in figs), 1),
        "runs": figs,
    }


def measure(user_counts: list[int], runs: int, per_tick: int, events_per_hour: int, timeout_sec: float) -> dict:
    """Each size, each run: the bare graph, then the full one (alternating, so drift hits both alike)."""
    results = []
    for users in user_counts:
        figs = {graph: [] for graph in GRAPHS}
        for run_no in range(runs):
            for graph in GRAPHS:
                argv = ["-m", "benchmarks.memory_keys", "--child", str(users), "--per_tick", str(per_tick)]
                argv += ["--events_per_hour", str(events_per_hour)] + (["--bare"] if graph == "bare" else [])
                f = run_measured(argv, timeout_sec, timeline=True)
                figs[graph].append(f)
                print(
                    f"  {users:>9,} users, {graph}, run {run_no + 1}: peak {f['peak_rss_mib_before_census']} MiB, "
                    f"quarters {f['rss_quarters_mib']}, {f['pipeline_sec']} s",
                    flush=True,
                )
        # Every tick holds one bot among new users, so the distinct users are a little more than asked for.
        actual = figs["full"][0]["users"]
        results.append({"users": actual, "asked": users, **{graph: _summary(figs[graph]) for graph in GRAPHS}})
    ordered = sorted(results, key=lambda r: r["users"])
    growth = None
    if len(ordered) >= 2:
        # The check is peak(1M) / peak(100k) <= 1.5: the largest size against the next one down; and
        # what each added user costs, from the smallest size to the largest.
        big, next_down, small = ordered[-1], ordered[-2], ordered[0]
        growth = {
            graph: {
                "users": [next_down["users"], big["users"]],
                "peak_ratio": round(big[graph]["peak_rss_mib"] / next_down[graph]["peak_rss_mib"], 3),
                "kib_per_added_user": _per_added_user(small, big, graph, "peak_rss_mib"),
                "held_kib_per_added_user": _per_added_user(small, big, graph, "held_after_run_mib"),
            }
            for graph in GRAPHS
        }
    return {
        "per_tick": per_tick,
        "events_per_hour": events_per_hour,
        "runs_per_size": runs,
        "results": results,
        "growth": growth,
    }


def _per_added_user(small: dict, big: dict, graph: str, figure: str) -> float:
    return round((big[graph][figure] - small[graph][figure]) * 1024 / (big["users"] - small["users"]), 1)


def report(payload: dict) -> None:
    rows = [
        [
            f"{r['users']:,}",
            graph,
            r[graph]["peak_rss_mib"],
            " / ".join(str(q) for q in r[graph]["rss_quarters_mib"]),
            r[graph]["held_after_run_mib"],
            r[graph]["pipeline_sec"],
        ]
        for r in payload["results"]
        for graph in GRAPHS
    ]
    print(f"\nMemory against distinct users (streaming graph, {payload['events_per_hour']:,} signals per event-hour)")
    headers = ["distinct users", "graph", "peak RSS MiB", "RSS at 25/50/75/100% MiB", "held after run MiB", "seconds"]
    print_table(headers, rows)
    for graph, g in (payload["growth"] or {}).items():
        small, big = g["users"]
        print(
            f"{graph}: peak RSS at {big:,} users / at {small:,}: {g['peak_ratio']} (keys x{big / small:g}); "
            f"{g['kib_per_added_user']} KiB of peak RSS per added user, "
            f"{g['held_kib_per_added_user']} KiB of state the runner still held after the run"
        )
    largest = max(payload["results"], key=lambda r: r["users"])
    held = largest["full"]["runs"][-1].get("runner_state_after_run")
    if held:
        print(f"state the local runner still held after the full graph's {largest['users']:,}-user run:")
        for kind, t in held.items():
            print(f"  {kind}: {t}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users",
        default="2500,10000,20000",
        help="Comma-separated distinct-user counts (the local runner slows as keys pile up: 10 ms a signal at 2,500 "
        "users, 27 at 20,000, where one run of the full graph takes about 10 minutes).",
    )
    parser.add_argument("--runs", type=int, default=2, help="Runs per size and graph; figures are medians.")
    parser.add_argument("--per_tick", type=int, default=500, help="Signals generated per test-stream tick.")
    parser.add_argument(
        "--events_per_hour",
        type=int,
        default=100,
        help="Signals per hour of event time: a daily window then holds 2,400 users, far fewer than any run has.",
    )
    parser.add_argument("--timeout_sec", type=float, default=3600)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.per_tick, args.events_per_hour, bare=args.bare)))
        return 0
    counts = [int(u) for u in args.users.split(",")]
    payload = measure(counts, args.runs, args.per_tick, args.events_per_hour, args.timeout_sec)
    report(payload)
    print(f"wrote {write_results('memory_keys', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
