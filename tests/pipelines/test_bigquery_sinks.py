"""What the streaming job does with rows BigQuery refuses: a rejected row is dead-lettered with the error; a
quota or rate refusal fails the bundle so the runner retries it (no row was wrong).

The error shapes are those Beam 2.77's WriteToBigQuery emits: streaming inserts give ``(table, row, errors)``
with BigQuery's per-row errors, or, for a whole request the service refused, the HTTP reason phrase and the
exception's message for every row (``BigQueryWrapper._insert_all_rows``); the Storage Write API gives
``{"error_message", "failed_row"}``. A quota refusal cannot be provoked from the emulator, so these call the
conversion the sink runs on Beam's failed-rows output; ``tests/reliability/test_sink_failures.py`` runs a
rejection through the emulator end to end.
"""

import orjson
import pytest

from pipelines.streaming import TransientInsertError, _failed_row_to_dead_letter, _storage_write_failure_to_dead_letter

TABLE = "p:mitigation.audit"
ROW = {"decision_id": "d1", "rule_id": "r"}

QUOTA = "403 POST https://bigquery.googleapis.com/bigquery/v2/projects/p/datasets/mitigation/tables/audit/insertAll"


@pytest.mark.parametrize(
    "error",
    [
        {"reason": "Forbidden", "message": f"{QUOTA}: Quota exceeded: Your table exceeded quota for rows."},
        {"reason": "Forbidden", "message": f"{QUOTA}: Exceeded rate limits: too many api requests per user."},
        {"reason": "quotaExceeded", "message": "Quota exceeded"},
        {"reason": "rateLimitExceeded", "message": "Exceeded rate limits"},
    ],
)
def test_a_quota_or_rate_refusal_fails_the_bundle_instead_of_dead_lettering(error):
    with pytest.raises(TransientInsertError, match="quota or rate"):
        _failed_row_to_dead_letter((TABLE, ROW, [error]))


@pytest.mark.parametrize(
    "error",
    [
        {"reason": "invalid", "location": "reviewed_by", "message": "Missing required field: reviewed_by."},
        {"reason": "Forbidden", "message": f"{QUOTA}: Access Denied: Table p:mitigation.audit: Permission denied."},
    ],
)
def test_a_rejected_row_is_dead_lettered_with_the_error_and_the_row(error):
    dead = _failed_row_to_dead_letter((TABLE, ROW, [error]))
    assert (dead.stage, dead.reason, dead.source) == ("sink", "bigquery_insert_error", TABLE)
    assert error["message"] in dead.detail
    assert orjson.loads(dead.raw_payload) == ROW


@pytest.mark.parametrize(
    "message",
    [
        "Missing required field: reviewed_by.",
        # The Java write retries quota itself and is not fused with this step: raising here would retry only
        # the conversion, for ever. A failed row's message may quote the row's own text.
        "Column: detail (STRING) Value: Quota exceeded: Exceeded rate limits Reason: too long",
    ],
)
def test_storage_write_api_failures_are_dead_lettered_never_retried_here(message):
    convert = _storage_write_failure_to_dead_letter(TABLE)
    dead = convert({"error_message": message, "failed_row": ROW})
    assert (dead.reason, dead.source) == ("bigquery_insert_error", TABLE)
    assert message in dead.detail and orjson.loads(dead.raw_payload) == ROW
