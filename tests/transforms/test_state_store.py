"""Active mitigations as Bigtable mutations: encoding without a pipeline, the enforce-only filter in one.

The write itself is exercised against the Bigtable emulator in tests/integration/test_state_store.py.
"""

import datetime as dt

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.mitigation_state import FAMILY, VALUE_FIELDS, cell_value, row_key
from tests.kit import T0_MS
from tests.schemas.test_schemas import _decision
from transforms.state_store import ActiveMitigationRows, is_active_mitigation, to_direct_row


def _mutations(row):
    # The same protobuf view Beam's cross-language writer reads (DirectRow has no public accessor).
    return list(row._get_mutation_pbs())


def test_a_decision_becomes_one_cell_in_its_entitys_row():
    d = _decision()
    row = to_direct_row(d)
    assert row.row_key == row_key("user", "u1")
    (mutation,) = _mutations(row)
    cell = mutation.set_cell
    assert (cell.family_name, cell.column_qualifier) == (FAMILY, b"d1")
    assert cell.value == cell_value(d)
    assert cell.timestamp_micros == d.expires_at_ms * 1000


def test_the_cell_value_is_the_shared_json_subset():
    d = _decision()
    value = orjson.loads(_mutations(to_direct_row(d))[0].set_cell.value)
    assert tuple(value) == VALUE_FIELDS
    assert value["expires_at_ms"] == T0_MS + 7_200_000 and value["rule_version"] == 2


def test_the_cell_timestamp_is_the_expiry_to_the_millisecond():
    """Bigtable keeps milliseconds; an expiry that is not a whole second must survive the round trip."""
    d = _decision()._replace(expires_at_ms=T0_MS + 1_234)
    micros = _mutations(to_direct_row(d))[0].set_cell.timestamp_micros
    expected = dt.datetime(2026, 11, 2, 0, 0, 1, 234_000, tzinfo=dt.UTC)
    assert dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros) == expected


def test_same_decision_gives_the_same_cell_so_retries_overwrite():
    a, b = _mutations(to_direct_row(_decision()))[0], _mutations(to_direct_row(_decision()))[0]
    assert a == b


def test_to_direct_row_does_not_filter():
    """Filtering is the composite's job; the encoder writes whatever it is given."""
    shadow = _decision()._replace(mode="shadow")
    assert _mutations(to_direct_row(shadow))[0].set_cell.column_qualifier == b"d1"


@pytest.mark.parametrize(
    "changes, active",
    [
        # becomes state
        ({}, True),
        ({"reverses_decision_id": ""}, True),
        # never state
        ({"mode": "shadow"}, False),
        ({"reverses_decision_id": "d0"}, False),  # a reversal is enforce-mode but lifts, not adds
        ({"mode": "shadow", "reverses_decision_id": "d0"}, False),
    ],
)
def test_only_enforce_non_reversal_decisions_are_active(changes, active):
    assert is_active_mitigation(_decision()._replace(**changes)) is active


def test_the_composite_keeps_only_active_mitigations():
    enforce = _decision()
    shadow = _decision()._replace(decision_id="d2", entity_id="u2", mode="shadow")
    reversal = _decision()._replace(decision_id="d3", reverses_decision_id="d1")
    other = _decision()._replace(decision_id="d4", entity_type="device", entity_id="dev1")
    with TestPipeline() as p:
        rows = p | beam.Create([enforce, shadow, reversal, other]) | ActiveMitigationRows()
        assert_that(
            rows | beam.Map(lambda r: (r.row_key, _mutations(r)[0].set_cell.column_qualifier)),
            equal_to([(row_key("user", "u1"), b"d1"), (row_key("device", "dev1"), b"d4")]),
        )
