"""The .avsc files drive the record types, JSON form and BigQuery schemas."""

import json
import pathlib

import apache_beam as beam
import fastavro
import pytest

import schemas
from schemas import (
    ACTIONS,
    DECISION_SCHEMA,
    REQUIRED_FOR,
    SIGNAL_SCHEMA,
    Decision,
    Signal,
    bigquery_schema,
    to_bigquery_row,
    to_json_dict,
)
from tests.kit import T0_MS, signal


def test_record_fields_follow_the_avro_schema():
    avsc = json.loads((pathlib.Path(schemas.__file__).parent / "signal_v1.avsc").read_text())
    assert Signal._fields == tuple(f["name"] for f in avsc["fields"])


def test_per_type_requirements_match_the_contract():
    assert REQUIRED_FOR == {
        "stream": ("track_id", "artist_id", "ms_played"),
        "login": ("success",),
        "signup": (),
        "playlist_add": ("track_id", "playlist_id"),
        "payment": ("success", "amount_cents", "currency", "card_fingerprint"),
    }


def test_actions_are_ordered_mildest_first():
    assert ACTIONS == ("flag_for_review", "exclude_streams", "throttle", "challenge", "block_ip", "suspend")


def test_bigquery_schema_types_and_modes():
    fields = {f["name"]: f for f in bigquery_schema(DECISION_SCHEMA)["fields"]}
    assert fields["decision_id"]["type"] == "STRING" and fields["decision_id"]["mode"] == "REQUIRED"
    assert fields["decided_at_ms"]["type"] == "TIMESTAMP"
    assert fields["rule_version"]["type"] == "INT64"
    assert fields["trace_ids"] == {**fields["trace_ids"], "type": "STRING", "mode": "REPEATED"}
    assert fields["evidence"]["type"] == "RECORD" and fields["evidence"]["mode"] == "REPEATED"
    signal_fields = {f["name"]: f for f in bigquery_schema(SIGNAL_SCHEMA)["fields"]}
    assert signal_fields["ms_played"]["mode"] == "NULLABLE"
    assert signal_fields["success"]["type"] == "BOOL"


def _decision():
    return Decision(
        decision_id="d1",
        entity_type="user",
        entity_id="u1",
        action="exclude_streams",
        rule_id="r",
        rule_version=2,
        mode="enforce",
        reason="because",
        evidence={"streams": 50.0},
        window_start_ms=T0_MS,
        window_end_ms=T0_MS + 3_600_000,
        decided_at_ms=T0_MS + 3_600_000,
        expires_at_ms=T0_MS + 7_200_000,
        trace_ids=["a", "b"],
    )


def test_json_and_bigquery_forms():
    d = _decision()
    as_json = to_json_dict(DECISION_SCHEMA, d)
    assert as_json["window_start_ms"] == "2026-11-02T00:00:00.000Z"
    assert as_json["evidence"] == {"streams": 50.0}
    row = to_bigquery_row(DECISION_SCHEMA, d)
    assert row["evidence"] == [{"key": "streams", "value": 50.0}]


def test_records_validate_against_avro():
    """What the pipeline produces is writable as Avro with the same schema."""
    s = signal("payment")
    fastavro.validation.validate(s._asdict(), fastavro.parse_schema(SIGNAL_SCHEMA), raise_errors=True)
    d = _decision()._asdict()
    fastavro.validation.validate(d, fastavro.parse_schema(DECISION_SCHEMA), raise_errors=True)


@pytest.mark.parametrize("record", [signal("stream"), _decision()])
def test_records_round_trip_through_row_coder(record):
    coder = beam.coders.registry.get_coder(type(record))
    assert isinstance(coder, beam.coders.RowCoder)
    assert coder.decode(coder.encode(record)) == record
