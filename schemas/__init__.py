"""Record types for signals, decisions, audit rows, dead letters and feature rows.

Each type is derived from its ``.avsc`` file (see ``schemas/avro.py``); the
Avro schema, the Python record, the JSON form and the BigQuery table schema
therefore never drift apart.
"""

from schemas.avro import (
    bigquery_schema,
    load_avro,
    namedtuple_from_avro,
    to_bigquery_row,
    to_json_dict,
    to_storage_write_row,
)

SIGNAL_SCHEMA = load_avro("signal_v1.avsc")
DECISION_SCHEMA = load_avro("decision_v1.avsc")
AUDIT_SCHEMA = load_avro("audit_v1.avsc")
DEAD_LETTER_SCHEMA = load_avro("dead_letter_v1.avsc")
FEATURE_ROW_SCHEMA = load_avro("feature_row_v1.avsc")

Signal = namedtuple_from_avro(SIGNAL_SCHEMA)
Decision = namedtuple_from_avro(DECISION_SCHEMA)
AuditRow = namedtuple_from_avro(AUDIT_SCHEMA)
DeadLetter = namedtuple_from_avro(DEAD_LETTER_SCHEMA)
FeatureRow = namedtuple_from_avro(FEATURE_ROW_SCHEMA)


def _symbols(schema: dict, field_name: str) -> tuple[str, ...]:
    for field in schema["fields"]:
        if field["name"] == field_name:
            return tuple(field["type"]["symbols"])
    raise KeyError(field_name)


EVENT_TYPES: tuple[str, ...] = _symbols(SIGNAL_SCHEMA, "event_type")
ENTITY_TYPES: tuple[str, ...] = _symbols(DECISION_SCHEMA, "entity_type")
# Mildest first; the order is the severity ladder.
ACTIONS: tuple[str, ...] = _symbols(DECISION_SCHEMA, "action")
MODES: tuple[str, ...] = _symbols(DECISION_SCHEMA, "mode")

# Fields that become mandatory for particular event types, from x-required-for.
REQUIRED_FOR: dict[str, tuple[str, ...]] = {
    event_type: tuple(f["name"] for f in SIGNAL_SCHEMA["fields"] if event_type in f.get("x-required-for", ()))
    for event_type in EVENT_TYPES
}

__all__ = [
    "ACTIONS",
    "AUDIT_SCHEMA",
    "AuditRow",
    "DEAD_LETTER_SCHEMA",
    "DECISION_SCHEMA",
    "DeadLetter",
    "Decision",
    "ENTITY_TYPES",
    "EVENT_TYPES",
    "FEATURE_ROW_SCHEMA",
    "FeatureRow",
    "MODES",
    "REQUIRED_FOR",
    "SIGNAL_SCHEMA",
    "Signal",
    "bigquery_schema",
    "to_bigquery_row",
    "to_storage_write_row",
    "to_json_dict",
]
