"""The production streaming job: Pub/Sub in, decisions to Pub/Sub, audit rows to BigQuery.

Reads signals from a subscription (with attributes, so a ``trace_id``
attribute and the publish time are available), runs the same graph as the
backtest (``pipelines.pipeline.build_pipeline`` in streaming mode), and:

* publishes each decision once, as JSON, with attributes ``action``,
  ``entity_type``, ``rule_id``, ``mode`` and ``decision_id``, so subscribers can
  filter (for example enforcement services that take only ``mode=enforce``);
* streams decision, audit and dead-letter rows (and, with ``--features_table``,
  every entity window's features) into BigQuery tables created
  beforehand by ``python -m pipelines.provision`` (the job writes with
  ``CREATE_NEVER``). Rows that BigQuery rejects are sent to the dead-letter
  table with the error, so no audit row vanishes silently;
* with ``--bigtable_instance``, keeps each entity's active (enforce-mode)
  mitigations in a Bigtable table (``transforms.state_store``), created
  beforehand by ``python -m pipelines.provision --bigtable_instance``. The
  project is ``--project``.

Early firings (``--early_firing_sec``) let a decision go out before its window
closes; the same decision id is published only once.

Run locally against the emulators (``make streaming-local`` does all of this)::

    PUBSUB_EMULATOR_HOST=127.0.0.1:8085 BIGQUERY_EMULATOR_HOST=http://127.0.0.1:9050 \\
    python -m pipelines.streaming --runner_config streaming_local.yaml \\
        --input_subscription projects/test-project/subscriptions/signals \\
        --decisions_topic projects/test-project/topics/decisions \\
        --audit_table test-project:mitigation.audit --decisions_table test-project:mitigation.decisions \\
        --dead_letter_table test-project:mitigation.dead_letters

Run on Dataflow::

    python -m pipelines.streaming --runner_config streaming_dataflow.yaml \\
        --project PROJECT --region REGION --temp_location gs://BUCKET/tmp \\
        --input_subscription projects/PROJECT/subscriptions/signals \\
        --decisions_topic projects/PROJECT/topics/decisions \\
        --audit_table PROJECT:mitigation.audit --decisions_table PROJECT:mitigation.decisions \\
        --dead_letter_table PROJECT:mitigation.dead_letters --rules gs://BUCKET/rules/default.yaml \\
        --allowlist gs://BUCKET/rules/allowlist.yaml
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
import typing
from collections.abc import Mapping

import apache_beam as beam
import orjson
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState
from opentelemetry import propagate as otel_propagate
from opentelemetry import trace as otel_trace

from pipelines.logs import setup_logging
from pipelines.options import (
    OptionsError,
    RuleOptions,
    load_policy,
    print_help,
    reject_unknown,
    require_finite,
    runner_config_args,
)
from pipelines.pipeline import PipelineConfig, build_pipeline
from schemas import (
    AUDIT_SCHEMA,
    DEAD_LETTER_SCHEMA,
    DECISION_SCHEMA,
    FEATURE_ROW_SCHEMA,
    DeadLetter,
    FeatureRow,
    bigquery_schema,
    to_bigquery_row,
    to_json_dict,
    to_storage_write_row,
)
from schemas.features import EntityFeatures
from schemas.mitigation_state import TABLE_ID as MITIGATIONS_TABLE_ID
from transforms.rulepack import RulePackError
from transforms.safeguards import AllowlistError
from transforms.state_store import WriteActiveMitigations

_LOGGER = logging.getLogger(__name__)

BQ_METHODS = ("STREAMING_INSERTS", "STORAGE_WRITE_API")
_SUBSCRIPTION_RE = re.compile(r"projects/[^/]+/subscriptions/[^/]+")
_TOPIC_RE = re.compile(r"projects/[^/]+/topics/[^/]+")
_TABLE_RE = re.compile(r"[A-Za-z0-9_.-]+[:.][A-Za-z0-9_]+\.[A-Za-z0-9_$-]+")
# Bigtable's own rules: an instance id is 6-33 characters, a lowercase letter first, no hyphen last;
# a table id is up to 50 characters of letters, digits, '_', '-' and '.', not starting with '-' or '.'.
_BIGTABLE_INSTANCE_RE = re.compile(r"[a-z][a-z0-9-]{4,31}[a-z0-9]")
_BIGTABLE_TABLE_RE = re.compile(r"[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,49}")
DECISION_ATTRIBUTES = ("action", "entity_type", "rule_id", "mode", "decision_id")


class StreamingOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input_subscription", help="Pub/Sub subscription to read signals from: projects/P/subscriptions/S."
        )
        parser.add_argument("--decisions_topic", help="Pub/Sub topic decisions are published to: projects/P/topics/T.")
        parser.add_argument("--audit_table", help="BigQuery table for audit rows: PROJECT:DATASET.TABLE.")
        parser.add_argument("--decisions_table", help="BigQuery table for decisions: PROJECT:DATASET.TABLE.")
        parser.add_argument(
            "--dead_letter_table", help="BigQuery table for rejected signals and rows: PROJECT:DATASET.TABLE."
        )
        parser.add_argument(
            "--features_table",
            default="",
            help="Optional BigQuery table for every entity window's features, one row per firing: "
            "PROJECT:DATASET.TABLE. Empty (default) writes none.",
        )
        parser.add_argument(
            "--bigtable_instance",
            default="",
            help="Optional Bigtable instance (in --project) to keep each entity's active enforce-mode mitigations "
            "in, for enforcement services to read. Empty (default) writes none.",
        )
        parser.add_argument(
            "--bigtable_table",
            default=MITIGATIONS_TABLE_ID,
            help="Bigtable table of active mitigations in --bigtable_instance, created by pipelines.provision.",
        )
        parser.add_argument(
            "--allowed_lateness_sec",
            type=int,
            default=3600,
            help="Seconds after a window's end that late signals still update it (and may re-fire its rules).",
        )
        parser.add_argument(
            "--early_firing_sec",
            type=int,
            # A decision waits up to one interval after the signal that earns it: 10 s keeps p99 decision
            # latency within the 15 s target (benchmarks/README.md). Only keys that received signals since the
            # last pane fire, so the cost of a shorter interval falls on busy keys (bots, NATs, hits).
            default=10,
            help="Fire speculative panes this often (processing-time seconds) before a window closes; 0 = only at "
            "the watermark.",
        )
        parser.add_argument(
            "--max_future_skew_sec",
            type=int,
            default=600,
            help="Dead-letter a signal whose event_time is more than this many seconds after its message's "
            "publish time (a producer clock running ahead); 0 = unchecked.",
        )
        parser.add_argument(
            "--signal_dedup_ttl_sec",
            type=int,
            default=3600,
            help="Seconds an event_id is remembered to drop redeliveries; 0 disables de-duplication.",
        )
        parser.add_argument(
            "--decision_dedup_max_ttl_sec",
            type=int,
            default=2 * 86400,
            help=(
                "Cap in seconds on remembering a published decision_id for its TTL; its window's length plus "
                "the allowed lateness is always kept."
            ),
        )
        parser.add_argument(
            "--ladder_hold_sec",
            type=float,
            # Two rules firing in one pane for one entity reach the ladder in any order after the shuffles
            # before it; held this long from the first, they are taken strongest first, as in a backtest
            # (transforms.safeguards.LadderFn). Adds up to this much to decision latency.
            default=2.0,
            help="Seconds an entity's rule hits wait at the action ladder so hits arriving together are taken "
            "strongest first, as a backtest takes them; 0 takes each as it arrives.",
        )
        parser.add_argument(
            "--policy_reload_sec",
            type=float,
            default=60,
            help="Re-read --rules and --allowlist this often (seconds) so changes apply without a redeploy; an "
            "invalid file is rejected and the last good policy stays. 0 keeps the start-up policy.",
        )
        parser.add_argument(
            "--bigquery_write_method",
            default="STREAMING_INSERTS",
            choices=BQ_METHODS,
            help="STREAMING_INSERTS (default, works with the emulator) or STORAGE_WRITE_API (production; needs "
            "Beam's Java expansion service).",
        )


def validate(opts: StreamingOptions) -> None:
    """Fail before the graph is built, naming the option."""
    checks = [
        ("input_subscription", _SUBSCRIPTION_RE, "projects/P/subscriptions/S"),
        ("decisions_topic", _TOPIC_RE, "projects/P/topics/T"),
        ("audit_table", _TABLE_RE, "PROJECT:DATASET.TABLE"),
        ("decisions_table", _TABLE_RE, "PROJECT:DATASET.TABLE"),
        ("dead_letter_table", _TABLE_RE, "PROJECT:DATASET.TABLE"),
    ]
    if opts.features_table and not _TABLE_RE.fullmatch(opts.features_table):
        raise OptionsError(f"--features_table {opts.features_table!r} is not of the form PROJECT:DATASET.TABLE")
    if opts.bigtable_instance:
        _validate_bigtable(opts)
    for name, pattern, form in checks:
        value = getattr(opts, name)
        if not value:
            raise OptionsError(f"--{name} is required ({form})")
        if not pattern.fullmatch(value):
            raise OptionsError(f"--{name} {value!r} is not of the form {form}")
    for name in (
        "allowed_lateness_sec",
        "early_firing_sec",
        "max_future_skew_sec",
        "signal_dedup_ttl_sec",
        "decision_dedup_max_ttl_sec",
        "ladder_hold_sec",
        "policy_reload_sec",
    ):
        if getattr(opts, name) < 0:
            raise OptionsError(f"--{name} must be >= 0")
    require_finite(opts, "ladder_hold_sec", "policy_reload_sec")
    if 0 < opts.signal_dedup_ttl_sec < opts.allowed_lateness_sec:
        _LOGGER.warning(
            "signal_dedup_ttl_sec < allowed_lateness_sec: a signal redelivered after its id is forgotten but "
            "within lateness would be counted twice"
        )


def validate_reload_paths(options: PipelineOptions) -> None:
    """On Dataflow, workers re-read the policy files every --policy_reload_sec: a path on the launching
    machine (the checkout's default allowlist, say) cannot be read there, and every reload would be rejected,
    so edits to a gs:// rule pack would never apply. Refuse it before submitting."""
    runner = options.view_as(StandardOptions).runner or ""
    if "Dataflow" not in runner or options.view_as(StreamingOptions).policy_reload_sec <= 0:
        return
    rule_opts = options.view_as(RuleOptions)
    for name in ("rules", "allowlist", "rule_overrides"):
        path = getattr(rule_opts, name)
        if path and not path.startswith("gs://"):
            raise OptionsError(
                f"--{name} {path} is not a gs:// path: Dataflow workers re-read the policy every "
                "--policy_reload_sec and cannot read the launching machine's files (give gs:// paths for "
                "--rules, --allowlist and --rule_overrides, an empty --allowlist= for none, or "
                "--policy_reload_sec=0 to keep the start-up policy)"
            )


def _validate_bigtable(opts: StreamingOptions) -> None:
    if not _BIGTABLE_INSTANCE_RE.fullmatch(opts.bigtable_instance):
        raise OptionsError(
            f"--bigtable_instance {opts.bigtable_instance!r} is not a Bigtable instance id "
            "(6-33 characters: lowercase letters, digits and '-', starting with a letter, not ending with '-')"
        )
    if not _BIGTABLE_TABLE_RE.fullmatch(opts.bigtable_table):
        raise OptionsError(
            f"--bigtable_table {opts.bigtable_table!r} is not a Bigtable table id "
            "(1-50 characters: letters, digits, '_', '-' and '.', not starting with '-' or '.')"
        )
    if not opts.view_as(GoogleCloudOptions).project:
        raise OptionsError("--bigtable_instance needs --project (the project of the Bigtable instance)")


def decision_message(decision) -> PubsubMessage:
    """A decision as a Pub/Sub message: JSON payload, filterable attributes.

    Where OpenTelemetry is configured (a tracer provider is installed), the
    publish gets a span carrying the decision's ids and contributing trace
    ids, and its W3C ``traceparent`` goes out as a message attribute, so a
    consumer's trace links back to the decision. Without a provider the
    no-op tracer adds nothing.
    """
    payload = orjson.dumps(to_json_dict(DECISION_SCHEMA, decision))
    attributes = {name: str(getattr(decision, name)) for name in DECISION_ATTRIBUTES}
    if decision.reverses_decision_id:
        attributes["reverses_decision_id"] = decision.reverses_decision_id
    span_attributes = {
        "decision.id": decision.decision_id,
        "decision.rule_id": decision.rule_id,
        "decision.signal_trace_ids": list(decision.trace_ids),
    }
    with otel_trace.get_tracer("streamguard").start_as_current_span("decision.publish", attributes=span_attributes):
        carrier: dict[str, str] = {}
        otel_propagate.inject(carrier)
    attributes.update(carrier)
    return PubsubMessage(data=payload, attributes=attributes)


def feature_row(ef: EntityFeatures) -> FeatureRow:
    """An entity window's features as a table row, stamped with when the pane fired."""
    return FeatureRow(
        entity_type=ef.entity_type,
        entity_id=ef.entity_id,
        window_sec=ef.window_sec,
        window_start_ms=ef.window_start_ms,
        window_end_ms=ef.window_end_ms,
        event_count=int(ef.features["events"]),
        features=dict(ef.features),
        last_event_ms=ef.last_event_ms,
        emitted_at_ms=int(time.time() * 1000),
    )


class TransientInsertError(RuntimeError):
    """BigQuery refused a whole insert for quota or rate: raised so the runner retries the bundle."""


# Beam 2.77 reports a whole insertAll request that failed by the HTTP reason phrase, and counts 'Forbidden' as
# permanent (RetryStrategy._NON_TRANSIENT_ERRORS). BigQuery answers quota and rate limits with 403 Forbidden
# ("Quota exceeded: ...", "Exceeded rate limits: ..."); those pass, and must not dead-letter every row of the
# request (nor drop them, when the dead-letter table is over the same project quota).
_TRANSIENT_REASONS = frozenset({"quotaExceeded", "rateLimitExceeded"})
_TRANSIENT_MESSAGE = re.compile(r"quota exceeded|exceeded rate limits|rate limit exceeded", re.IGNORECASE)


def _is_transient(error) -> bool:
    if not isinstance(error, Mapping):
        return False
    reason, message = str(error.get("reason", "")), str(error.get("message", ""))
    return reason in _TRANSIENT_REASONS or (reason == "Forbidden" and bool(_TRANSIENT_MESSAGE.search(message)))


def _retry_bundle(table, error) -> typing.NoReturn:
    """Fail the bundle for a quota or rate refusal: the runner retries it (on Dataflow streaming, until it
    succeeds), re-inserting with the same insert ids, instead of dead-lettering rows that were never wrong."""
    Metrics.counter("sinks", "bigquery_quota_retry").inc()
    raise TransientInsertError(f"{table}: BigQuery refused the insert for quota or rate; retrying: {error}")


def _failed_row_to_dead_letter(failed) -> DeadLetter:
    """``(table, row, errors)`` from WriteToBigQuery's streaming inserts to a dead-letter record."""
    table, row, *errors = failed
    flat = [e for entry in errors for e in (entry if isinstance(entry, list) else [entry])]
    transient = [e for e in flat if _is_transient(e)]
    if transient:
        _retry_bundle(table, transient[0])
    Metrics.counter("dead_letters", "bigquery_insert_error").inc()
    return DeadLetter(
        stage="sink",
        reason="bigquery_insert_error",
        detail=f"{table}: {orjson.dumps(errors, default=str).decode()[:2000]}",
        raw_payload=orjson.dumps(row, default=str),
        source=str(table),
        failed_at_ms=int(time.time() * 1000),
    )


def _storage_write_failure_to_dead_letter(table: str):
    """``{"error_message", "failed_row"}`` from WriteToBigQuery's Storage Write API to a dead-letter record.

    Never raises: the write runs in Java (cross-language), which retries quota and rate errors itself, and
    this step is not fused with it, so failing here would retry only this conversion, for ever. Its failed
    rows are rows the table refused (a value the column cannot hold, whose message may quote the value).
    """

    def convert(failed) -> DeadLetter:
        message = str(failed.get("error_message", ""))
        Metrics.counter("dead_letters", "bigquery_insert_error").inc()
        return DeadLetter(
            stage="sink",
            reason="bigquery_insert_error",
            detail=f"{table}: {message[:2000]}",
            raw_payload=orjson.dumps(failed.get("failed_row"), default=str),
            source=table,
            failed_at_ms=int(time.time() * 1000),
        )

    return convert


class WriteRows(beam.PTransform):
    """Records to one BigQuery table; returns the rejected rows as ``DeadLetter`` records.

    A streaming insert's quota or rate refusal is not a rejection: it fails the bundle so the runner retries
    it. The Storage Write API's Java write retries those itself.
    """

    def __init__(self, table: str, schema: dict, method: str):
        super().__init__()
        self._table, self._schema, self._method = table, schema, method

    def expand(self, records):
        schema = self._schema
        to_row = to_storage_write_row if self._method == "STORAGE_WRITE_API" else to_bigquery_row
        result = (
            records
            | "ToRow" >> beam.Map(lambda r: to_row(schema, r))
            | "Insert"
            >> WriteToBigQuery(
                self._table,
                schema=bigquery_schema(schema),
                method=self._method,
                create_disposition=BigQueryDisposition.CREATE_NEVER,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
                # Transient errors (the service being down) are retried; rows the table
                # rejects are returned below and dead-lettered rather than retried forever.
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
            )
        )
        if self._method == "STORAGE_WRITE_API":
            to_dead_letter = _storage_write_failure_to_dead_letter(self._table)
        else:
            to_dead_letter = _failed_row_to_dead_letter
        return result.failed_rows_with_errors | "RejectedToDeadLetter" >> beam.Map(to_dead_letter)


def build_streaming(pipeline: beam.Pipeline, opts: StreamingOptions, pack, allowlist) -> None:
    """Sources and sinks around ``build_pipeline`` (kept separate from ``main`` for the dry-run test)."""
    rule_opts = pipeline.options.view_as(RuleOptions)
    config = PipelineConfig(
        streaming=True,
        allowed_lateness_sec=opts.allowed_lateness_sec,
        early_firing_sec=opts.early_firing_sec,
        max_future_skew_sec=opts.max_future_skew_sec,
        signal_dedup_ttl_sec=opts.signal_dedup_ttl_sec,
        decision_dedup_max_ttl_sec=opts.decision_dedup_max_ttl_sec,
        allowlist=allowlist,
        global_cap_per_window=rule_opts.global_cap_per_window,
        action_memory_max_sec=rule_opts.action_memory_max_sec,
        ladder_hold_sec=opts.ladder_hold_sec,
        rules_path=rule_opts.rules,
        allowlist_path=rule_opts.allowlist or None,
        rule_overrides_path=rule_opts.rule_overrides or None,
        policy_reload_sec=opts.policy_reload_sec,
        feature_rows=bool(opts.features_table),
    )
    messages = pipeline | "ReadSignals" >> ReadFromPubSub(subscription=opts.input_subscription, with_attributes=True)
    outputs = build_pipeline(messages, pack, source=opts.input_subscription, config=config)
    _ = (
        outputs.decisions
        | "ToDecisionMessage" >> beam.Map(decision_message).with_output_types(PubsubMessage)
        | "PublishDecisions" >> WriteToPubSub(opts.decisions_topic, with_attributes=True)
    )
    method = opts.bigquery_write_method
    rejected = [
        outputs.decisions | "WriteDecisionRows" >> WriteRows(opts.decisions_table, DECISION_SCHEMA, method),
        outputs.audit | "WriteAuditRows" >> WriteRows(opts.audit_table, AUDIT_SCHEMA, method),
    ]
    if opts.features_table:
        (features,) = outputs.features  # streaming computes every window in one branch (ComputeFeatures)
        rows = features | "ToFeatureRow" >> beam.Map(feature_row).with_output_types(FeatureRow)
        rejected.append(rows | "WriteFeatureRows" >> WriteRows(opts.features_table, FEATURE_ROW_SCHEMA, method))
    if opts.bigtable_instance:
        project = pipeline.options.view_as(GoogleCloudOptions).project
        _ = outputs.decisions | "WriteActiveMitigations" >> WriteActiveMitigations(
            project, opts.bigtable_instance, opts.bigtable_table
        )
    dead_letters = [outputs.dead_letters, *rejected] | "WithRejectedRows" >> beam.Flatten()
    # Rows the dead-letter table itself rejects are logged by Beam and counted; there is nowhere further to send them.
    _ = dead_letters | "WriteDeadLetterRows" >> WriteRows(opts.dead_letter_table, DEAD_LETTER_SCHEMA, method)


def make_pipeline(argv: list[str], runner_config: str | None) -> tuple[beam.Pipeline, StreamingOptions]:
    args = (runner_config_args(runner_config) if runner_config else []) + argv
    reject_unknown(args)
    options = PipelineOptions(args)
    options.view_as(StandardOptions).streaming = True
    opts = options.view_as(StreamingOptions)
    validate(opts)
    validate_reload_paths(options)
    pack, allowlist = load_policy(options)
    pipeline = beam.Pipeline(options=options)
    build_streaming(pipeline, opts, pack, allowlist)
    return pipeline, opts


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.INFO)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runner_config", default=None, help="YAML file in runner_configs/ with runner options.")
    parser.add_argument("-h", "--help", action="store_true")
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if known.help:
        print_help("python -m pipelines.streaming", StreamingOptions, RuleOptions)
        return 0
    try:
        pipeline, _ = make_pipeline(rest, known.runner_config)
    except (OptionsError, RulePackError, AllowlistError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = pipeline.run()
    runner = pipeline.options.view_as(StandardOptions).runner or ""
    if "Dataflow" in runner:
        # Not wait_until_finish(): a streaming job never finishes, so the command (or a Flex Template
        # launcher) would wait until someone drains it.
        _LOGGER.info("submitted job %s; cancel or drain it with gcloud dataflow jobs cancel|drain", result.job_id())
        return 0
    return run_until_signalled(result)


def run_until_signalled(result) -> int:
    """Run a local streaming job until SIGTERM or Ctrl-C, then cancel it.

    The local runner's cancel stops its (daemon) worker threads without
    draining: in-flight panes are dropped, as with ``gcloud dataflow jobs
    cancel``. Nothing acknowledged is lost, because Pub/Sub redelivers what the
    job had read but not yet acknowledged.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if PipelineState.is_terminal(result.state):
            return 0 if result.state == PipelineState.DONE else 1
    result.cancel()
    _LOGGER.info("streaming job cancelled (state %s)", result.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
