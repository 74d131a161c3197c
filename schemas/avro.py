"""Turn the Avro schemas in this folder into the record types and table schemas.

The ``.avsc`` files are the single source of truth for every record the
pipeline reads or writes. From each one we derive:

* a ``typing.NamedTuple`` used inside the pipeline (registered with Beam's
  ``RowCoder`` so records cross worker boundaries compactly and typed);
* the BigQuery table schema (``bigquery_schema``);
* the JSON form used on Pub/Sub and in ``.jsonl`` files (``to_json_dict``) and
  the BigQuery insert forms (``to_bigquery_row`` for streaming inserts,
  ``to_storage_write_row`` for the Storage Write API).

Deriving rather than hand-copying means a field added to the ``.avsc`` shows up
everywhere at once, and ``tests/schemas`` checks the derivations.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import pathlib
import typing
from collections.abc import Mapping, Sequence

import apache_beam as beam
import fastavro
from apache_beam.utils.timestamp import Timestamp

_HERE = pathlib.Path(__file__).parent


def load_avro(filename: str) -> dict:
    """Load and validate one ``.avsc`` file from this folder.

    Returns the raw JSON (keeping our ``x-`` annotations, which fastavro's parsed
    form drops); ``fastavro.parse_schema`` is still run so a broken schema fails
    at import, not when the first record is written.
    """
    raw = json.loads((_HERE / filename).read_text())
    fastavro.parse_schema(raw)
    return raw


def _unwrap(avro_type) -> tuple[object, bool]:
    """Return (inner type, nullable) for ``["null", T]`` unions."""
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        if len(non_null) != 1:
            raise ValueError(f"only [null, T] unions are supported, got {avro_type}")
        return non_null[0], True
    return avro_type, False


def _python_type(avro_type) -> type:
    inner, nullable = _unwrap(avro_type)
    if isinstance(inner, dict):
        kind = inner["type"]
        if kind == "enum":
            py = str
        elif kind == "map":
            py = Mapping[str, _python_type(inner["values"])]
        elif kind == "array":
            py = Sequence[_python_type(inner["items"])]
        else:
            py = _python_type(kind)
    else:
        py = {"string": str, "long": int, "int": int, "double": float, "boolean": bool, "bytes": bytes}[inner]
    # typing.Optional, not "X | None": Beam's schema inference understands the former.
    return typing.Optional[py] if nullable else py  # noqa: UP045


def namedtuple_from_avro(schema: dict) -> type:
    """Build the pipeline's record type for ``schema`` and register its coder."""
    fields = [(f["name"], _python_type(f["type"])) for f in schema["fields"]]
    record_type = typing.NamedTuple(schema["name"], fields)
    record_type.__module__ = "schemas"
    record_type.__doc__ = schema.get("doc", "")
    # Trailing optional fields default to None so producers only name what they have.
    trailing_optional = 0
    for field in reversed(schema["fields"]):
        if not _unwrap(field["type"])[1]:
            break
        trailing_optional += 1
    record_type.__new__.__defaults__ = (None,) * trailing_optional
    beam.coders.registry.register_coder(record_type, beam.coders.RowCoder)
    return record_type


def _is_timestamp(avro_type) -> bool:
    inner, _ = _unwrap(avro_type)
    return isinstance(inner, dict) and inner.get("logicalType") == "timestamp-millis"


def _bq_field(field: dict) -> dict:
    inner, nullable = _unwrap(field["type"])
    mode = "NULLABLE" if nullable else "REQUIRED"
    out = {"name": field["name"], "mode": mode}
    if field.get("doc"):
        out["description"] = field["doc"][:1024]
    kind = inner["type"] if isinstance(inner, dict) else inner
    if _is_timestamp(field["type"]):
        out["type"] = "TIMESTAMP"
    elif kind == "map":
        out.update(
            type="RECORD",
            mode="REPEATED",
            fields=[
                {"name": "key", "type": "STRING", "mode": "REQUIRED"},
                {"name": "value", "type": _bq_scalar(inner["values"]), "mode": "NULLABLE"},
            ],
        )
    elif kind == "array":
        out.update(type=_bq_scalar(inner["items"]), mode="REPEATED")
    else:
        out["type"] = _bq_scalar(kind)
    return out


def _bq_scalar(kind: str) -> str:
    return {
        "string": "STRING",
        "enum": "STRING",
        "long": "INT64",
        "int": "INT64",
        "double": "FLOAT64",
        "boolean": "BOOL",
        "bytes": "BYTES",
    }[kind]


def bigquery_schema(schema: dict) -> dict:
    """The BigQuery table schema, in the ``{"fields": [...]}`` form Beam takes."""
    return {"fields": [_bq_field(f) for f in schema["fields"]]}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def datetime_to_millis(stamp: dt.datetime) -> int:
    """Aware datetime to epoch milliseconds, exactly (``timestamp() * 1000`` is 1 ms low about 1 time in 160)."""
    return (stamp - _EPOCH) // dt.timedelta(milliseconds=1)


def millis_to_rfc3339(ms: int) -> str:
    """Epoch milliseconds to RFC 3339 in UTC with millisecond precision."""
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    # Not strftime("%Y"): glibc writes years before 1000 without their leading zeros ("999-06-01").
    return (
        f"{stamp.year:04d}-{stamp.month:02d}-{stamp.day:02d}T{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}."
        f"{ms % 1000:03d}Z"
    )


def to_json_dict(schema: dict, record: typing.NamedTuple) -> dict:
    """JSON-ready dict: timestamps as RFC 3339, bytes as base64, maps as objects."""
    out = {}
    for field in schema["fields"]:
        value = getattr(record, field["name"])
        if value is None:
            out[field["name"]] = None
        elif _is_timestamp(field["type"]):
            out[field["name"]] = millis_to_rfc3339(value)
        elif isinstance(value, bytes):
            out[field["name"]] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, Mapping):
            out[field["name"]] = dict(value)
        elif isinstance(value, (list, tuple)):
            out[field["name"]] = list(value)
        else:
            out[field["name"]] = value
    return out


def to_bigquery_row(schema: dict, record: typing.NamedTuple) -> dict:
    """Row for BigQuery streaming inserts: like JSON, but maps become key/value records."""
    row = to_json_dict(schema, record)
    for field in schema["fields"]:
        inner, _ = _unwrap(field["type"])
        if isinstance(inner, dict) and inner["type"] == "map" and row[field["name"]] is not None:
            row[field["name"]] = [{"key": k, "value": v} for k, v in sorted(row[field["name"]].items())]
    return row


def to_storage_write_row(schema: dict, record: typing.NamedTuple) -> dict:
    """Row for the BigQuery Storage Write API: maps become key/value records, as for streaming inserts, but
    values keep their types. Beam turns these dicts into schema'd Rows for the Java write, typed from the
    table schema (TIMESTAMP is a Beam ``Timestamp``, BYTES is ``bytes``), so the insertAll form's RFC 3339
    strings and base64 cannot be encoded there."""
    row = {}
    for field in schema["fields"]:
        name = field["name"]
        value = getattr(record, name)
        inner, _ = _unwrap(field["type"])
        if value is None:
            row[name] = None
        elif _is_timestamp(field["type"]):
            row[name] = Timestamp(micros=value * 1000)
        elif isinstance(inner, dict) and inner["type"] == "map":
            row[name] = [{"key": k, "value": v} for k, v in sorted(value.items())]
        elif isinstance(value, (list, tuple)):
            row[name] = list(value)
        else:
            row[name] = value
    return row
