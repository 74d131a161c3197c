"""Active mitigations in Bigtable, against the Bigtable emulator: provisioning, then the real graph writing.

The traffic is placed in the hour before last, so the decisions (stamped at
their window's end in batch, 7-day TTL) expire in the future, as live ones do.
Past-expiry cells would be served by nothing (readers filter by timestamp) but
would also make the read-back depend on when the emulator's GC runs.
"""

import time
import uuid

import apache_beam as beam
import orjson
import yaml
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import bigtable
from google.cloud.bigtable.column_family import MaxAgeGCRule
from google.cloud.bigtable.data import BigtableDataClient

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import build_pipeline
from pipelines.provision import provision_bigtable
from schemas.mitigation_state import FAMILY, GC_MAX_AGE, TABLE_ID, VALUE_FIELDS, row_key
from tests.kit import HOUR_MS, default_rule_version
from tests.pipelines.test_pipeline import farm_and_fan
from tests.transforms.test_rulepack import rule
from transforms.rulepack import parse_rule_pack
from transforms.rules import decision_id
from transforms.state_store import METRICS_NAMESPACE, WriteActiveMitigations

INSTANCE = "test-instance"
WEEK_MS = 7 * 86_400_000
# The same farm as tests/pipelines/test_pipeline.py also trips this rule on its device, in shadow.
SHADOW_RULE = rule(id="device_loop_shadow", entity="device", mode="shadow", reason="{streams:.0f} plays on a device.")


def shadow_and_default_pack():
    with open(DEFAULT_RULES) as f:
        raw = yaml.safe_load(f)
    raw["rules"].append(SHADOW_RULE)
    return parse_rule_pack(yaml.safe_dump(raw, sort_keys=False), "default+shadow.yaml")


def test_provisioning_is_idempotent_and_sets_the_max_age_gc_rule(gcp_env):
    table_id = f"mitigations-{uuid.uuid4().hex[:8]}"
    assert provision_bigtable(gcp_env["project"], INSTANCE, table_id) is True
    assert provision_bigtable(gcp_env["project"], INSTANCE, table_id) is False
    table = bigtable.Client(project=gcp_env["project"], admin=True).instance(INSTANCE).table(table_id)
    families = table.list_column_families()
    assert list(families) == [FAMILY]
    assert families[FAMILY].gc_rule.to_pb() == MaxAgeGCRule(GC_MAX_AGE).to_pb()


def test_the_pipeline_writes_enforced_mitigations_and_not_shadow_ones(gcp_env):
    project = gcp_env["project"]
    provision_bigtable(project, INSTANCE)
    t0 = (int(time.time() * 1000) // HOUR_MS - 2) * HOUR_MS
    farm_id = decision_id(
        "stream_farm_exclude", default_rule_version("stream_farm_exclude"), "user", "bot1", t0, t0 + HOUR_MS
    )
    shadow_id = decision_id("device_loop_shadow", 1, "device", "dbot", t0, t0 + HOUR_MS)

    p = TestPipeline(runner="FnApiRunner")
    outputs = build_pipeline(p | beam.Create(farm_and_fan(t0)), shadow_and_default_pack(), source="test")
    # The shadow decision must exist for "no row" below to mean it was filtered.
    assert_that(
        outputs.decisions | beam.Map(lambda d: (d.decision_id, d.mode)),
        equal_to([(farm_id, "enforce"), (shadow_id, "shadow")]),
    )
    _ = outputs.decisions | WriteActiveMitigations(project, INSTANCE, TABLE_ID)
    result = p.run()
    result.wait_until_finish()

    written = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name("rows_written"))
    assert [c.committed for c in written["counters"]] == [1]
    with BigtableDataClient(project=project) as client:
        table = client.get_table(INSTANCE, TABLE_ID)
        row = table.read_row(row_key("user", "bot1"))
        assert row is not None
        [cell] = row.cells
        assert (cell.family, cell.qualifier) == (FAMILY, farm_id.encode())
        assert cell.timestamp_micros == (t0 + HOUR_MS + WEEK_MS) * 1000
        value = orjson.loads(cell.value)
        assert tuple(value) == VALUE_FIELDS
        assert value == {
            "decision_id": farm_id,
            "entity_type": "user",
            "entity_id": "bot1",
            "action": "exclude_streams",
            "rule_id": "stream_farm_exclude",
            "rule_version": default_rule_version("stream_farm_exclude"),
            "reason": value["reason"],
            "decided_at_ms": t0 + HOUR_MS,
            "expires_at_ms": t0 + HOUR_MS + WEEK_MS,
            "window_start_ms": t0,
            "window_end_ms": t0 + HOUR_MS,
        }
        assert value["reason"].startswith("45 plays in an hour")
        assert table.read_row(row_key("device", "dbot")) is None  # shadow: never state
        assert table.read_row(row_key("user", "fan1")) is None  # no decision at all
