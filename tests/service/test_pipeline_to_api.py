"""From signals to the API: the pipeline's own sinks write a stream farm's decision, the API serves and lifts it.

The real graph runs on a batch ``TestPipeline`` with the streaming job's sinks
(``WriteActiveMitigations`` to the Bigtable emulator, ``WriteRows`` to the
BigQuery emulator's decisions and audit tables). The API then returns the
farm's mitigation, and after an operator reverses it through the API the
lookup no longer does and the audit table holds the reversal with actor and reason.
"""

from __future__ import annotations

import time
import uuid

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import build_pipeline
from pipelines.streaming import WriteRows
from schemas import AUDIT_SCHEMA, DECISION_SCHEMA
from schemas.mitigation_state import TABLE_ID
from tests.kit import HOUR_MS, default_rule_version, payload
from tests.service.conftest import DATASET, INSTANCE, OPERATE_TOKEN, OPERATOR, READ_TOKEN, auth
from transforms.rulepack import load_rule_pack
from transforms.rules import decision_id
from transforms.state_store import WriteActiveMitigations


def test_a_farm_decided_by_the_pipeline_is_served_by_the_api_until_an_operator_reverses_it(backends, client):
    project, bq = backends["project"], backends["bq"]
    bot = f"bot-{uuid.uuid4().hex[:10]}"
    t0 = (int(time.time() * 1000) // HOUR_MS - 2) * HOUR_MS  # decided 1 h ago, expires in a week
    plays = [
        payload("stream", t0 + i * 75_000, user_id=bot, device_id=f"d{bot}", ms_played=32_000, track_id=f"t{i % 3}")
        for i in range(45)
    ]
    with TestPipeline(runner="FnApiRunner") as p:
        out = build_pipeline(p | beam.Create(plays), load_rule_pack(DEFAULT_RULES), source="test")
        _ = out.decisions | "State" >> WriteActiveMitigations(project, INSTANCE, TABLE_ID)
        _ = out.decisions | "Decisions" >> WriteRows(
            f"{project}:{DATASET}.decisions", DECISION_SCHEMA, "STREAMING_INSERTS"
        )
        _ = out.audit | "Audit" >> WriteRows(f"{project}:{DATASET}.audit", AUDIT_SCHEMA, "STREAMING_INSERTS")
    farm = decision_id(
        "stream_farm_exclude", default_rule_version("stream_farm_exclude"), "user", bot, t0, t0 + HOUR_MS
    )

    served = client.get(f"/v1/entities/user/{bot}/mitigations", headers=auth(READ_TOKEN))
    assert served.status_code == 200, served.text
    [mitigation] = served.json()["mitigations"]
    assert (mitigation["decision_id"], mitigation["action"]) == (farm, "exclude_streams")
    assert mitigation["reason"].startswith("45 plays in an hour")

    reason = "Appeal 4411: family account, plays verified"
    reversed_ = client.post(f"/v1/decisions/{farm}/reversal", json={"reason": reason}, headers=auth(OPERATE_TOKEN))
    assert reversed_.status_code == 200, reversed_.text
    after = client.get(f"/v1/entities/user/{bot}/mitigations", headers=auth(READ_TOKEN))
    assert after.json()["mitigations"] == []

    rows = [
        dict(r)
        for r in bq.query(
            f"SELECT status, actor, reason, reverses_decision_id FROM `{DATASET}.audit` WHERE entity_id = '{bot}'"
        ).result()
    ]
    assert {"status": "issued", "actor": None, "reverses_decision_id": None} == {
        k: v for k, v in next(r for r in rows if r["status"] == "issued").items() if k != "reason"
    }
    reversal = next(r for r in rows if r["status"] == "reversal")
    assert (reversal["actor"], reversal["reverses_decision_id"]) == (OPERATOR, farm)
    assert reason in reversal["reason"]
