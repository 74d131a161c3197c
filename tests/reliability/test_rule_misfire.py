"""Rules under attack: a mistaken rule that fires on half of all users trips its cap in the first window.

The default pack plus one bad rule (``streams >= 1``, as if a threshold lost
its digits in review) over 1,000 users, half of whom stream. The cap of 25
entities per window must hold: at most 25 enforced, every other hit capped into
shadow, and one ``rule_tripped`` record that pages the rule's owner. Streaming
delivers the window in four slices with early firings, so the cap must hold
across panes, not only for one batch of hits.
"""

from __future__ import annotations

import collections
import json

import apache_beam as beam
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from tests.kit import HOUR_MS, T0_MS, payload, streaming_options
from transforms.rulepack import parse_rule_pack
from transforms.safeguards import CAPPED, RULE_TRIPPED

CAP = 25
USERS = 1000


def _pack_with_misfire():
    with open(DEFAULT_RULES) as f:
        doc = yaml.safe_load(f)
    doc["rules"].append(
        {
            "id": "misfire_all_streamers",
            "version": 1,
            "owner": "reliability-tests",
            "description": "A threshold that lost its digits: fires on anyone who played anything.",
            "entity": "user",
            "window": "1h",
            "when": "streams >= 1",
            "action": "exclude_streams",
            "reason": "{streams:.0f} plays.",
            "max_entities_per_window": CAP,
        }
    )
    return parse_rule_pack(yaml.safe_dump(doc, sort_keys=False), "default+misfire.yaml")


def _traffic() -> list[bytes]:
    """Half the users play three ordinary tracks; the other half only log in."""
    lines = []
    for n in range(USERS):
        at = T0_MS + (n * 3_571) % (HOUR_MS - 600_000)
        if n % 2:
            lines += [payload("stream", at + k * 200_000, user_id=f"l{n:04d}", track_id=f"t{k}") for k in range(3)]
        else:
            lines.append(payload("login", at, user_id=f"l{n:04d}", ip=f"198.51.{n % 250}.{n % 7 + 1}"))
    return lines


def _audit_rows(out, tmp_path, name):
    def keep(rows):
        (tmp_path / name).write_text(json.dumps(sorted(rows)))

    assert_that(out.audit | "Rows" >> beam.Map(lambda a: [a.rule_id, a.status, a.mode]), keep, label="KeepAudit")


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_a_rule_misfiring_on_half_the_users_is_capped_in_its_first_window(mode, tmp_path, reliability):
    pack, lines = _pack_with_misfire(), _traffic()
    if mode == "batch":
        p = TestPipeline(runner="FnApiRunner")
        source = p | beam.Create(lines)
        config = PipelineConfig()
    else:
        p = TestPipeline(options=streaming_options())
        stream = TestStream().advance_watermark_to(T0_MS / 1000)
        for k in range(4):
            part = lines[k::4]
            stream = stream.add_elements([TimestampedValue(x, T0_MS / 1000) for x in part]).advance_processing_time(60)
        source = p | stream.advance_watermark_to_infinity()
        config = PipelineConfig(streaming=True, early_firing_sec=30, allowed_lateness_sec=600)
    with p:
        out = build_pipeline(source, pack, config=config)
        _audit_rows(out, tmp_path, "audit.json")

    rows = [tuple(r) for r in json.loads((tmp_path / "audit.json").read_text()) if r[0] == "misfire_all_streamers"]
    statuses = collections.Counter(status for _, status, _ in rows)
    enforced = sum(1 for _, status, m in rows if status == "issued" and m == "enforce")
    hits = sum(n for status, n in statuses.items() if status != RULE_TRIPPED)
    assert hits == USERS // 2, f"the bad rule should hit every streamer once, got {statuses}"
    reliability.record(
        "rules under attack",
        f"hits past the cap held in shadow ({mode})",
        hits - CAP,
        statuses[CAPPED] if enforced <= CAP else 0,
        f"{enforced} enforced of {hits} hits, cap {CAP}",
    )
    reliability.record("rules under attack", f"cap tripped and reported once ({mode})", 1, statuses[RULE_TRIPPED])
    assert enforced == CAP
    assert statuses[CAPPED] == hits - CAP
    assert statuses[RULE_TRIPPED] == 1
