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


def _sink_records():
    from pipelines.streaming import feature_row
    from schemas import AUDIT_SCHEMA, DEAD_LETTER_SCHEMA, FEATURE_ROW_SCHEMA, DeadLetter
    from schemas.features import EntityFeatures
    from transforms.rules import RuleHit, to_audit_row

    dead = DeadLetter("parse", "invalid_json", "bad", b"\xff{oops", "sub", T0_MS)
    ef = EntityFeatures("user", "u1", 60, T0_MS, T0_MS + 60_000, {"events": 3.0, "streams": 2.0}, ["t1"], T0_MS + 1)
    return [
        (DECISION_SCHEMA, _decision()),
        (AUDIT_SCHEMA, to_audit_row(RuleHit(_decision(), "issued", "{}", 50, "default@1"))),
        (DEAD_LETTER_SCHEMA, dead),
        (FEATURE_ROW_SCHEMA, feature_row(ef)),
    ]


@pytest.mark.parametrize("schema, record", _sink_records(), ids=lambda x: x["name"] if isinstance(x, dict) else "")
def test_storage_write_rows_become_beam_rows_the_java_write_can_decode(schema, record):
    """--bigquery_write_method=STORAGE_WRITE_API: Beam turns each dict into a Row typed from the table schema
    (TIMESTAMP as Timestamp, BYTES as bytes) and encodes it with the RowCoder for the Java write. The reshuffle
    makes the runner encode it here; the insertAll form (RFC 3339 strings, base64) fails there."""
    from apache_beam.io.gcp.bigquery import StorageWriteToBigQuery
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.utils.timestamp import Timestamp

    from schemas import to_storage_write_row

    expected = {}
    for field in schema["fields"]:
        value = getattr(record, field["name"])
        if field["name"].endswith("_ms") and isinstance(value, int):
            value = Timestamp(micros=value * 1000)
        elif isinstance(value, dict):
            value = sorted(value.items())
        expected[field["name"]] = value

    def plain(row):
        out = row._asdict()
        for name, value in out.items():
            if isinstance(value, list) and value and hasattr(value[0], "_asdict"):
                out[name] = [(entry.key, entry.value) for entry in value]
        return out

    with TestPipeline() as p:
        rows = (
            p
            | beam.Create([record])
            | beam.Map(lambda r: to_storage_write_row(schema, r))
            | StorageWriteToBigQuery.ConvertToBeamRows(bigquery_schema(schema), False).with_output_types()
            | beam.Reshuffle()
            | beam.Map(plain)
        )
        assert_that(rows, equal_to([expected]))


@pytest.mark.parametrize(
    "ms, text",
    [
        (T0_MS, "2026-11-02T00:00:00.000Z"),
        (-30610224000000 + 999, "1000-01-01T00:00:00.999Z"),
        (-30641760000000, "0999-01-01T00:00:00.000Z"),  # glibc's %Y wrote "999-..."
        (-59011459200000, "0100-01-01T00:00:00.000Z"),
    ],
)
def test_millis_to_rfc3339_pads_the_year(ms, text):
    from schemas.avro import millis_to_rfc3339

    assert millis_to_rfc3339(ms) == text
