"""Reverse a decision, for example after a successful appeal.

Looks the original up in the decisions table, then writes a compensating
decision: same entity, action and rule, ``reverses_decision_id`` set to the
original's id, with the operator (``--actor``) and ``--reason``. It goes to
the same places as every decision: the decisions topic (with the attribute
``reverses_decision_id``, so enforcement services lift the action), the
decisions table and the audit table (status ``reversal``). The original rows
are never changed or deleted.

The decisions row and the audit row are written first; the audit row marks
the reversal made, and only then is it published. The reversal's id is
derived from the original's, so running the command again is the same
reversal: refused (exit 2) when the audit table already holds it, but it
then publishes the recorded reversal again (consumers de-duplicate by id)
and lifts the mitigation, which completes a reversal whose publishing or
lift failed the first time (exit 1, with a message saying to run it again).

Run against production::

    python -m pipelines.reverse --decision_id 0123abcd... --actor alice@example.com \\
        --reason "Appeal 4411: family account, plays verified" --project PROJECT \\
        --decisions_table PROJECT:mitigation.decisions --audit_table PROJECT:mitigation.audit \\
        --decisions_topic projects/PROJECT/topics/decisions --bigtable_instance INSTANCE

``--bigtable_instance`` is required: without it the mitigation would stay active in the job's state store,
which enforcement services read, while the command reported success. Pass ``--bigtable_instance ''`` only for
a job that runs without a state store.

Against the emulators, set PUBSUB_EMULATOR_HOST and BIGQUERY_EMULATOR_HOST first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
import time

from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery, bigtable, pubsub_v1
from google.cloud.bigquery.retry import DEFAULT_RETRY

from pipelines.provision import client_for
from pipelines.streaming import decision_message
from schemas import AUDIT_SCHEMA, DECISION_SCHEMA, AuditRow, Decision, to_bigquery_row
from schemas.avro import datetime_to_millis
from schemas.mitigation_state import TABLE_ID
from transforms.rules import RuleHit, to_audit_row
from transforms.state_store import lift_row

REVERSAL = "reversal"
# Every BigQuery call and the publish give up after this long, retries included: the client library's defaults
# wait ten minutes and more on an unreachable BigQuery, holding the caller (an API worker thread) as long.
DEADLINE_SEC = 30.0


def _retry(deadline_sec: float):
    return DEFAULT_RETRY.with_timeout(deadline_sec)


class ReversalError(RuntimeError):
    """The decision cannot be reversed (unknown, or already reversed)."""


class ReversalRefused(ReversalError):
    """A refusal, not a failure: the decision is already reversed, or is itself a reversal."""


class ReversalUndelivered(ReversalError):
    """The reversal is recorded (decisions and audit rows) but publishing it failed: ``redeliver`` publishes it."""


def reversal_id(decision_id: str) -> str:
    """The id of the reversal of ``decision_id``: derived, so a second attempt is the same reversal."""
    return hashlib.sha256(f"reversal\x1f{decision_id}".encode()).hexdigest()[:32]


def _table_id(spec: str) -> str:
    """PROJECT:DATASET.TABLE (Beam's form) to PROJECT.DATASET.TABLE (the client's)."""
    return spec.replace(":", ".", 1)


def _ms(value) -> int:
    if isinstance(value, dt.datetime):
        return datetime_to_millis(value)
    return int(value)


def find_decision(
    client: bigquery.Client, table: str, decision_id: str, deadline_sec: float = DEADLINE_SEC
) -> Decision:
    """The decision with this id; the enforce-mode row if there are several. One id is published once per
    mode: a rule paused, promoted from shadow, or allowlisted until mid-window gives the same window a
    shadow decision and later an enforce one, and it is the enforcement that gets reversed."""
    query = (
        f"SELECT * FROM `{_table_id(table)}` WHERE decision_id = @id "
        "ORDER BY CASE WHEN mode = 'enforce' THEN 0 ELSE 1 END, decided_at_ms DESC LIMIT 1"
    )
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", decision_id)])
    retry = _retry(deadline_sec)
    job = client.query(query, job_config=config, retry=retry, timeout=deadline_sec, job_retry=None)
    rows = [dict(r) for r in job.result(retry=retry, timeout=deadline_sec)]
    if not rows:
        raise ReversalError(f"decision {decision_id} is not in {table}")
    row = rows[0]
    return Decision(
        decision_id=row["decision_id"],
        entity_type=row["entity_type"],
        entity_id=row["entity_id"],
        action=row["action"],
        rule_id=row["rule_id"],
        rule_version=row["rule_version"],
        mode=row["mode"],
        reason=row["reason"],
        evidence={e["key"]: e["value"] for e in row.get("evidence") or []},
        window_start_ms=_ms(row["window_start_ms"]),
        window_end_ms=_ms(row["window_end_ms"]),
        decided_at_ms=_ms(row["decided_at_ms"]),
        expires_at_ms=_ms(row["expires_at_ms"]),
        trace_ids=list(row.get("trace_ids") or []),
        reverses_decision_id=row.get("reverses_decision_id"),
        actor=row.get("actor"),
    )


def reversal_of(original: Decision, reason: str, actor: str, now_ms: int) -> Decision:
    if original.reverses_decision_id:
        raise ReversalRefused(f"{original.decision_id} is itself a reversal")
    return original._replace(
        decision_id=reversal_id(original.decision_id),
        mode="enforce",
        reason=f"Reversal of {original.action} ({original.rule_id}): {reason}",
        evidence={},
        decided_at_ms=now_ms,
        trace_ids=[],
        reverses_decision_id=original.decision_id,
        actor=actor,
    )


def audit_row(reversal: Decision, original: Decision) -> AuditRow:
    note = f"reverses {original.decision_id} ({original.action} by {original.rule_id})"
    return to_audit_row(RuleHit(reversal, REVERSAL, "{}", 0, "manual", note))


def reverse(
    client: bigquery.Client,
    publisher: pubsub_v1.PublisherClient,
    *,
    decision_id: str,
    reason: str,
    actor: str,
    decisions_table: str,
    audit_table: str,
    decisions_topic: str,
    deadline_sec: float = DEADLINE_SEC,
) -> Decision:
    if not reason.strip() or not actor.strip():
        raise ReversalError("a reversal needs a reason and an actor")
    original = find_decision(client, decisions_table, decision_id, deadline_sec)
    reversal = reversal_of(original, reason.strip(), actor.strip(), int(time.time() * 1000))
    done = f"SELECT COUNT(*) AS n FROM `{_table_id(audit_table)}` WHERE decision_id = @id AND status = 'reversal'"
    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", reversal.decision_id)]
    )
    retry = _retry(deadline_sec)
    job = client.query(done, job_config=config, retry=retry, timeout=deadline_sec, job_retry=None)
    if next(iter(job.result(retry=retry, timeout=deadline_sec)))["n"]:
        raise ReversalRefused(f"{decision_id} is already reversed (reversal {reversal.decision_id})")
    # The record first, the audit row last of it (it marks the reversal made), then the topic. A failure before
    # the audit row leaves nothing a consumer acted on, and calling again makes the reversal; a failure to
    # publish leaves a recorded reversal, which calling again (refused: already reversed) publishes with
    # ``redeliver``. Publishing first left a reversal consumers had acted on with no audit row when the audit
    # insert failed.
    for table, rows in (
        (decisions_table, [to_bigquery_row(DECISION_SCHEMA, reversal)]),
        (audit_table, [to_bigquery_row(AUDIT_SCHEMA, audit_row(reversal, original))]),
    ):
        errors = client.insert_rows_json(
            _table_id(table), rows, row_ids=[reversal.decision_id], retry=retry, timeout=deadline_sec
        )
        if errors:
            raise ReversalError(f"{table} rejected the reversal row: {errors}")
    _publish(publisher, decisions_topic, reversal, deadline_sec)
    return reversal


def redeliver(
    client: bigquery.Client,
    publisher: pubsub_v1.PublisherClient,
    *,
    decision_id: str,
    decisions_table: str,
    decisions_topic: str,
    deadline_sec: float = DEADLINE_SEC,
) -> Decision:
    """Publish the recorded reversal of ``decision_id`` again, as it was recorded (consumers de-duplicate by
    id): what completes a reversal whose publishing failed."""
    recorded = find_decision(client, decisions_table, reversal_id(decision_id), deadline_sec)
    _publish(publisher, decisions_topic, recorded, deadline_sec)
    return recorded


def _publish(publisher: pubsub_v1.PublisherClient, topic: str, reversal: Decision, deadline_sec: float) -> None:
    """Publish a recorded reversal; any client or transport failure is ``ReversalUndelivered``."""
    message = decision_message(reversal)
    try:
        publisher.publish(topic, message.data, **message.attributes).result(timeout=deadline_sec)
    except Exception as err:
        raise ReversalUndelivered(f"recorded, but publishing failed: {type(err).__name__}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decision_id", required=True, help="The decision to reverse.")
    parser.add_argument("--reason", required=True, help="Why (appeal number, finding); stored in the audit table.")
    parser.add_argument("--actor", required=True, help="Who is reversing it; stored in the audit table.")
    parser.add_argument("--project", required=True, help="GCP project of the tables.")
    parser.add_argument("--decisions_table", required=True, help="PROJECT:DATASET.TABLE of decisions.")
    parser.add_argument("--audit_table", required=True, help="PROJECT:DATASET.TABLE of audit rows.")
    parser.add_argument("--decisions_topic", required=True, help="projects/P/topics/T decisions are published to.")
    parser.add_argument(
        "--bigtable_instance",
        required=True,
        help="Bigtable instance of the job's active mitigations (its --bigtable_instance): the reversed one is "
        "lifted there, for good. '' only for a job that runs without a state store.",
    )
    parser.add_argument("--bigtable_table", default=TABLE_ID, help="Bigtable table of active mitigations.")
    args = parser.parse_args(argv)
    client = client_for(args.project)
    try:
        reversal = reverse(
            client,
            pubsub_v1.PublisherClient(),
            decision_id=args.decision_id,
            reason=args.reason,
            actor=args.actor,
            decisions_table=args.decisions_table,
            audit_table=args.audit_table,
            decisions_topic=args.decisions_topic,
        )
    except ReversalRefused as err:
        print(f"error: {err}", file=sys.stderr)
        # Already reversed: publish it again and lift it, so running the command again completes a reversal
        # whose publishing or lift failed the first time (the Mitigation API does the same). A reversal itself
        # is never a mitigation to lift.
        original = find_decision(client, args.decisions_table, args.decision_id)
        if original.reverses_decision_id:
            return 2
        try:
            redeliver(
                client,
                pubsub_v1.PublisherClient(),
                decision_id=args.decision_id,
                decisions_table=args.decisions_table,
                decisions_topic=args.decisions_topic,
            )
        except (ReversalError, api_exceptions.GoogleAPIError) as publish_err:  # not published, or not found
            print(f"error: the reversal is still not published: {publish_err}", file=sys.stderr)
            return 1
        print(f"published the recorded reversal of {args.decision_id} again")
        if args.bigtable_instance and not _lift(args, original.entity_type, original.entity_id):
            return 1
        return 2
    except ReversalUndelivered as err:
        print(f"error: {err}", file=sys.stderr)
        print("the reversal is recorded; run the same command again to publish it and lift it", file=sys.stderr)
        return 1
    except ReversalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"reversed {args.decision_id}: reversal {reversal.decision_id} published and audited")
    if args.bigtable_instance and not _lift(args, reversal.entity_type, reversal.entity_id):
        return 1
    return 0


def _lift(args, entity_type: str, entity_id: str) -> bool:
    """Lift the mitigation in the job's state store (its column deleted, its tombstone written); False (and a
    message) if that failed."""
    table = bigtable.Client(project=args.project).instance(args.bigtable_instance).table(args.bigtable_table)
    try:
        [status] = table.mutate_rows([lift_row(entity_type, entity_id, args.decision_id, int(time.time() * 1000))])
    except Exception as err:  # the client raises for a missing table or an outage, as well as returning a status
        status_message = f"{type(err).__name__}: {err}"
    else:
        status_message = None if status.code == 0 else status.message
    if status_message is not None:
        print(f"error: the mitigation is still active in Bigtable: {status_message}", file=sys.stderr)
        print("run the same command again to lift it", file=sys.stderr)
        return False
    print(f"lifted {args.decision_id} from {args.bigtable_instance}/{args.bigtable_table}")
    return True


if __name__ == "__main__":
    sys.exit(main())
