"""Hostile input through the whole batch pipeline: every line is a signal or a dead letter, none decides."""

import json
import random

import apache_beam as beam
import orjson
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import build_pipeline
from tests.kit import T0_MS, payload_dict
from transforms.rulepack import load_rule_pack

PACK = load_rule_pack(DEFAULT_RULES)


def hostile_corpus(n: int, seed: int = 3) -> list[bytes]:
    """Broken encodings, shapes, types and values, in a fixed mix; each line breaks the contract."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        d = payload_dict("login", T0_MS, event_id=f"h{i}", user_id=f"victim{i % 50}", ip="203.0.113.9", success=False)
        kind = i % 12
        if kind == 0:
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))) + b"\xff"
        elif kind == 1:
            line = b"[" * 3000 + b"]" * 3000
        elif kind == 2:
            line = orjson.dumps({**d, "user_id": "x" * 100_000})
        elif kind == 3:
            line = json.dumps({**d, "success": float("nan")}).encode()
        elif kind == 4:
            line = orjson.dumps({**d, "event_time": "9999-12-31T23:59:59Z"})
        elif kind == 5:
            line = orjson.dumps({**d, "ip": "1.2.3.4.5"})
        elif kind == 6:
            line = orjson.dumps({**d, "user_id": "<script>alert(1)</script>"})
        elif kind == 7:
            line = orjson.dumps({**d, "event_type": None})
        elif kind == 8:
            line = b"\x00" * 40
        elif kind == 9:
            line = json.dumps({**d, "success": 10**30}).encode()
        elif kind == 10:
            line = orjson.dumps({**d, "event_id": "a'; DROP TABLE audit;--"})
        else:
            line = orjson.dumps([d])
        lines.append(line)
    return lines


def test_every_hostile_line_is_dead_lettered_and_none_produces_a_decision():
    hostile = hostile_corpus(1200)
    with TestPipeline(runner="FnApiRunner") as p:
        out = build_pipeline(p | beam.Create(hostile), PACK)
        assert_that(out.signals | "NoSignal" >> beam.combiners.Count.Globally(), equal_to([0]), label="NoSignals")
        assert_that(out.decisions | "NoDecision" >> beam.combiners.Count.Globally(), equal_to([0]), label="NoDecisions")
        assert_that(
            out.dead_letters | "Raw" >> beam.Map(lambda d: d.raw_payload),
            equal_to(hostile),
            label="EveryLineKeptRaw",
        )
        assert_that(
            out.dead_letters | "Reasoned" >> beam.Map(lambda d: bool(d.reason and d.detail)) | beam.Distinct(),
            equal_to([True]),
            label="EveryReasonGiven",
        )
