"""Backtest: run the mitigation transforms in batch over a file of historical signals.

Reads one JSON signal per line, runs exactly the transforms the streaming job
runs (``pipelines.pipeline.build_pipeline``), and writes ``decisions.jsonl``,
``audit.jsonl``, ``dead_letter.jsonl`` and ``summary.json`` into
``--output_dir``. Decisions are stamped with their window's end (event time),
so the output does not depend on when the backtest runs.

Run locally (runner named in runner_configs/backtest_local.yaml)::

    python -m pipelines.backtest --input signals.jsonl --output_dir out/

Run on Dataflow over files in Cloud Storage::

    python -m pipelines.backtest --input gs://BUCKET/signals/*.jsonl --output_dir gs://BUCKET/backtest/ \\
        --runner_config runner_configs/dataflow_backtest.yaml --project PROJECT --region REGION
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import logging
import sys
import time

import apache_beam as beam
import orjson
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.logs import setup_logging
from pipelines.options import OptionsError, RuleOptions, load_policy, print_help, reject_unknown, runner_config_args
from pipelines.pipeline import PipelineConfig, build_pipeline
from schemas import AUDIT_SCHEMA, DEAD_LETTER_SCHEMA, DECISION_SCHEMA, to_json_dict
from schemas.avro import datetime_to_millis, millis_to_rfc3339
from transforms.lines import ReadLineBlocks
from transforms.malloc import fix_mmap_threshold, mmap_threshold_for_children
from transforms.rulepack import RulePackError
from transforms.safeguards import AllowlistError

_LOGGER = logging.getLogger(__name__)

OUTPUT_FILES = ("decisions.jsonl", "audit.jsonl", "dead_letter.jsonl")


class BacktestOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", help="Signals to replay: a .jsonl or .avro path or glob (local or gs://).")
        parser.add_argument(
            "--output_dir", help="Folder for decisions.jsonl, audit.jsonl, dead_letter.jsonl, summary.json."
        )
        parser.add_argument(
            "--dedupe_shards_per_hour",
            type=int,
            default=1,
            help="Split each event-time hour's de-duplication group this many ways by event id. One group "
            "is held by one worker: about 2 KB a signal unsharded, where the hour's 10-minute and 1-hour "
            "windows are built in memory too, and about 1 KB sharded. Raise it when an hour holds more "
            "than a few hundred thousand signals.",
        )
        parser.add_argument(
            "--mmap_threshold",
            choices=("fixed", "moving"),
            default="fixed",
            help="glibc's mmap threshold in this process and the local runner's worker processes: fixed at "
            "1 MiB (at 1M signals, about a fifth less peak memory for about 4%% more CPU) or moving, glibc's "
            "default, unless an earlier backtest in this process fixed it (transforms/malloc.py). Thresholds "
            "set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES) stand.",
        )


def validate(options: BacktestOptions) -> None:
    if not options.input:
        raise OptionsError("--input is required: a .jsonl file of signals")
    if not options.output_dir:
        raise OptionsError("--output_dir is required")
    if options.dedupe_shards_per_hour < 1:
        raise OptionsError(f"--dedupe_shards_per_hour must be at least 1, got {options.dedupe_shards_per_hour}")
    if not FileSystems.match([options.input])[0].metadata_list:
        raise OptionsError(f"--input {options.input} matches no file")


def avro_record_to_payload(record: dict) -> bytes:
    """An Avro signal record (schemas/signal_v1.avsc) as the JSON wire payload.

    Never raises: whatever cannot be converted is left for parsing to reject
    (for example a missing event time becomes a ``missing_field`` dead letter).
    """
    out = {k: v for k, v in record.items() if v is not None and k != "event_time_ms"}
    stamp = record.get("event_time_ms")
    if isinstance(stamp, dt.datetime):  # fastavro decodes timestamp-millis to datetime
        stamp = datetime_to_millis(stamp)
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        try:  # parsing judges the time: out of its years it is event_time_out_of_range, as in a .jsonl file
            out["event_time"] = millis_to_rfc3339(stamp)
        except (ValueError, OverflowError, OSError):  # past what a date can hold: parsing names the field
            out["event_time"] = stamp
    return orjson.dumps(out, default=str)


def _jsonl(schema):
    return lambda record: orjson.dumps(to_json_dict(schema, record)).decode()


def write_jsonl(pcoll, path: str, schema, label: str):
    return pcoll | label >> (beam.Map(_jsonl(schema)) | beam.io.WriteToText(path, shard_name_template="", num_shards=1))


def run(argv: list[str], runner_config: str = "backtest_local.yaml") -> dict:
    """Build and run the backtest; returns the summary (also written to summary.json)."""
    flags = runner_config_args(runner_config) + argv
    reject_unknown(flags)
    options = PipelineOptions(flags)
    bt = options.view_as(BacktestOptions)
    validate(bt)
    pack, allowlist = load_policy(options)
    rule_opts = options.view_as(RuleOptions)
    out = bt.output_dir.rstrip("/")
    FileSystems.mkdirs(out) if not FileSystems.exists(out) else None

    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    if bt.input.endswith(".avro"):
        # Typed records still go through the one validation path, as their wire form.
        lines = (
            pipeline
            | "ReadSignalsAvro" >> beam.io.ReadFromAvro(bt.input)
            | "AvroToPayload" >> beam.Map(avro_record_to_payload)
        )
    else:
        lines = pipeline | "ReadSignals" >> ReadLineBlocks(bt.input)
    config = PipelineConfig(
        streaming=False,
        dedupe_shards_per_hour=bt.dedupe_shards_per_hour,
        allowlist=allowlist,
        global_cap_per_window=rule_opts.global_cap_per_window,
        action_memory_max_sec=rule_opts.action_memory_max_sec,
    )
    outputs = build_pipeline(lines, pack, source=bt.input, config=config)
    write_jsonl(outputs.decisions, f"{out}/decisions.jsonl", DECISION_SCHEMA, "WriteDecisions")
    write_jsonl(outputs.audit, f"{out}/audit.jsonl", AUDIT_SCHEMA, "WriteAudit")
    write_jsonl(outputs.dead_letters, f"{out}/dead_letter.jsonl", DEAD_LETTER_SCHEMA, "WriteDeadLetters")
    children = contextlib.nullcontext()
    if bt.mmap_threshold == "fixed":  # the runner's process, then its local workers (transforms.malloc)
        fix_mmap_threshold()
        children = mmap_threshold_for_children()
    with children:
        result = pipeline.run()
        result.wait_until_finish()
    summary = summarize(out, result, pack.label, time.monotonic() - started)
    with FileSystems.create(f"{out}/summary.json") as handle:
        handle.write(json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def _counters(result, namespace: str) -> dict[str, int]:
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception:  # a runner without metrics support: the summary falls back to files
        _LOGGER.warning("runner returned no metrics; counts come from output files only")
        return {}
    totals: dict[str, int] = collections.Counter()
    for counter in query["counters"]:
        totals[counter.key.metric.name] += counter.committed or 0
    return dict(totals)


def all_metrics(result) -> dict[str, object]:
    """Every counter (committed value) and distribution (count, min, mean, max) the run reported."""
    try:
        query = result.metrics().query()
    except Exception:  # a runner without metrics support
        return {}
    out: dict[str, object] = {}
    for counter in query["counters"]:
        key = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
        out[key] = out.get(key, 0) + (counter.committed or 0)
    for dist in query["distributions"]:
        value = dist.committed
        if value is not None and value.count:
            out[f"{dist.key.metric.namespace}/{dist.key.metric.name}"] = {
                "count": value.count,
                "min": value.min,
                "mean": round(value.mean, 1),
                "max": value.max,
            }
    return dict(sorted(out.items()))


def _read_jsonl(path: str):
    with FileSystems.open(path) as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)


def summarize(out: str, result, pack_label: str, seconds: float) -> dict:
    """Counts per rule, action, mode and dead-letter reason, from the written files."""
    decisions = list(_read_jsonl(f"{out}/decisions.jsonl"))
    audit = list(_read_jsonl(f"{out}/audit.jsonl"))
    dead = list(_read_jsonl(f"{out}/dead_letter.jsonl"))
    signals = _counters(result, "signals")
    read = sum(v for k, v in signals.items() if k.startswith("read_"))
    by_rule: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for d in decisions:
        by_rule[d["rule_id"]][f"{d['action']}/{d['mode']}"] += 1
    return {
        "rule_pack": pack_label,
        "signals_valid": read,
        "signals_by_type": {k[len("read_") :]: v for k, v in sorted(signals.items()) if k.startswith("read_")},
        "unknown_fields_ignored": signals.get("unknown_fields", 0),
        "dead_lettered": len(dead),
        "dead_letters_by_reason": dict(collections.Counter(f"{d['stage']}:{d['reason']}" for d in dead)),
        "events_read": read + sum(1 for d in dead if d["stage"] == "parse"),
        "decisions": len(decisions),
        "decisions_enforce": sum(1 for d in decisions if d["mode"] == "enforce"),
        "decisions_shadow": sum(1 for d in decisions if d["mode"] == "shadow"),
        "decisions_by_rule": {rule: dict(counts) for rule, counts in sorted(by_rule.items())},
        "decisions_by_action": dict(collections.Counter(d["action"] for d in decisions)),
        "audit_rows": len(audit),
        "audit_by_status": dict(collections.Counter(a["status"] for a in audit)),
        "entities_enforced": len({(d["entity_type"], d["entity_id"]) for d in decisions if d["mode"] == "enforce"}),
        "wall_seconds": round(seconds, 2),
        "metrics": all_metrics(result),
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.WARNING)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runner_config", default="backtest_local.yaml")
    parser.add_argument("-h", "--help", action="store_true")
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if known.help:
        print_help("python -m pipelines.backtest", BacktestOptions, RuleOptions)
        return 0
    try:
        summary = run(rest, known.runner_config)
    except (OptionsError, RulePackError, AllowlistError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
