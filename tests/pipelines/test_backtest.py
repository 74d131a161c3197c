"""The backtest command contract, run for real over generated traffic on the local runner."""

import datetime as dt
import gzip
import json
import random
import re
import subprocess
import sys

import orjson
import pytest

from pipelines import backtest, evaluate, simulate
from pipelines.options import PROJECT_ROOT
from transforms.parse import InvalidSignal, parse_signal


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traffic")
    lines, labels = simulate.simulate(seed=11, hours=24, scale=0.3, malformed=10)
    simulate.write_jsonl(str(folder / "signals.jsonl"), lines)
    simulate.write_jsonl(str(folder / "labels.jsonl"), [orjson.dumps(lb._asdict()) for lb in labels])
    return folder, len(lines)


@pytest.fixture(scope="module")
def backtest_run(traffic, tmp_path_factory):
    """The documented command line, as other checks call it."""
    folder, _ = traffic
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.backtest",
            "--input",
            str(folder / "signals.jsonl"),
            "--output_dir",
            str(out),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _lines(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_writes_the_four_outputs(backtest_run):
    for name in ("decisions.jsonl", "audit.jsonl", "dead_letter.jsonl", "summary.json"):
        assert (backtest_run / name).exists(), name


def test_every_line_is_read_and_accounted_for(traffic, backtest_run):
    _, line_count = traffic
    summary = json.loads((backtest_run / "summary.json").read_text())
    assert summary["events_read"] == line_count
    assert summary["signals_valid"] + summary["dead_lettered"] == line_count
    assert summary["dead_lettered"] == 10
    dead = _lines(backtest_run / "dead_letter.jsonl")
    assert all(d["reason"] and d["detail"] and d["raw_payload"] for d in dead)


def test_attacks_are_caught_and_legitimate_traffic_is_not_enforced(traffic, backtest_run):
    folder, _ = traffic
    scores = evaluate.score(_lines(backtest_run / "decisions.jsonl"), _lines(folder / "labels.jsonl"))
    assert scores["enforced_non_attack"] == []
    for name, entry in scores["scenarios"].items():
        if entry["kind"] == "attack":
            assert entry["enforced"] == entry["entities"], name


def test_audit_has_a_row_for_every_decision(backtest_run):
    decisions = {d["decision_id"] for d in _lines(backtest_run / "decisions.jsonl")}
    audit = {a["decision_id"] for a in _lines(backtest_run / "audit.jsonl")}
    assert decisions and decisions <= audit


def test_rerunning_gives_identical_decisions_whatever_the_file_order_and_grouping(traffic, backtest_run, tmp_path):
    folder, _ = traffic
    lines = (folder / "signals.jsonl").read_bytes().splitlines()
    random.Random(5).shuffle(lines)
    (tmp_path / "shuffled.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    # Lines in another order, and de-duplication groups split three ways by event id, change nothing.
    backtest.run(["--input", str(tmp_path / "shuffled.jsonl"), "--output_dir", str(out), "--dedupe_shards_per_hour=3"])
    for name in ("decisions.jsonl", "audit.jsonl"):
        again = sorted((out / name).read_bytes().splitlines())
        first = sorted((backtest_run / name).read_bytes().splitlines())
        assert again and again == first, name


def test_a_glob_of_plain_gzip_and_crlf_files_reads_as_the_one_file(traffic, backtest_run, tmp_path):
    folder, line_count = traffic
    lines = (folder / "signals.jsonl").read_bytes().splitlines()
    third = len(lines) // 3
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_bytes(b"\n".join(lines[:third]) + b"\n")
    (parts / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[third : 2 * third]) + b"\n"))
    (parts / "c.jsonl").write_bytes(b"\r\n".join(lines[2 * third :]))  # Windows line ends, no final newline
    out = tmp_path / "out"
    summary = backtest.run(["--input", str(parts / "*.jsonl*"), "--output_dir", str(out)])
    assert summary["events_read"] == line_count and summary["dead_lettered"] == 10
    for name in ("decisions.jsonl", "audit.jsonl", "dead_letter.jsonl"):
        again = sorted(_without_failed_at((out / name).read_bytes().splitlines()))
        first = sorted(_without_failed_at((backtest_run / name).read_bytes().splitlines()))
        assert again and again == first, name


def test_avro_records_give_the_decisions_their_json_lines_give(traffic, backtest_run, tmp_path):
    # Avro arrives one record at a time (no batches), through the same validation as the JSON lines.
    folder, line_count = traffic
    lines = (folder / "signals.jsonl").read_bytes().splitlines()
    written = simulate.write_avro(str(tmp_path / "signals.avro"), lines)
    assert written == line_count - 10  # the malformed lines cannot be typed
    out = tmp_path / "out"
    summary = backtest.run(["--input", str(tmp_path / "signals.avro"), "--output_dir", str(out)])
    assert summary["signals_valid"] == written and summary["dead_lettered"] == 0
    # Counted record by record here, and batch by batch from the JSON lines: the same counts.
    first = json.loads((backtest_run / "summary.json").read_text())
    assert summary["signals_by_type"] == first["signals_by_type"]
    assert summary["metrics"]["latency/event_lag_ms"]["count"] == written
    for name in ("decisions.jsonl", "audit.jsonl"):
        again = sorted((out / name).read_bytes().splitlines())
        first = sorted((backtest_run / name).read_bytes().splitlines())
        assert again and again == first, name


@pytest.mark.parametrize(
    "stamp, reason",
    [
        (-1, "event_time_out_of_range"),  # 1969: as the same time in a .jsonl line
        (dt.datetime(1999, 12, 31, 23, 59, tzinfo=dt.UTC), "event_time_out_of_range"),  # as fastavro decodes it
        (-30641760000000, "event_time_out_of_range"),  # year 999: it was written "999-01-01..." (invalid_value)
        (10**17, "wrong_type"),  # past year 9999: no RFC 3339 form; the field is still named
        (None, "missing_field"),
    ],
)
def test_an_avro_record_with_a_time_out_of_range_gets_the_reason_a_json_line_gets(stamp, reason):
    payload = backtest.avro_record_to_payload(
        {"event_id": "e1", "event_type": "login", "user_id": "u1", "success": True, "event_time_ms": stamp}
    )
    with pytest.raises(InvalidSignal) as info:
        parse_signal(payload)
    assert info.value.reason == reason and "'event_time'" in info.value.detail


def _without_failed_at(rows: list[bytes]) -> list[bytes]:
    """Dead letters carry when they failed and which input they came from; the rest must match byte for byte."""
    out = []
    for row in rows:
        record = orjson.loads(row)
        record.pop("failed_at_ms", None)
        record.pop("source", None)
        out.append(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output_dir", "x"], "--input is required"),
        (["--input", "/nonexistent/*.jsonl", "--output_dir", "x"], "matches no file"),
        (["--input", "x", "--output_dir", "x", "--dedupe_shards_per_hour=0"], "must be at least 1"),
    ],
)
def test_bad_options_fail_before_running(args, message, capsys):
    assert backtest.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_bad_rule_pack_fails_at_start_naming_the_rule(traffic, tmp_path, capsys):
    folder, _ = traffic
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (PROJECT_ROOT / "rules" / "default.yaml").read_text().replace("streams >= 40 and", "stremas >= 40 and")
    )
    code = backtest.main(
        ["--input", str(folder / "signals.jsonl"), "--rules", str(bad), "--output_dir", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}: rule 'stream_farm_exclude': field 'when': unknown feature 'stremas'" in err


def test_the_summary_reports_beam_metrics(backtest_run):
    metrics = json.loads((backtest_run / "summary.json").read_text())["metrics"]
    assert metrics["signals/read_stream"] > 0 and metrics["signals/read_login"] > 0
    assert sum(v for k, v in metrics.items() if k.startswith("dead_letters/")) == 10
    assert any(k.startswith("decisions/") and k.endswith(".enforce") for k in metrics)
    assert metrics["safeguards/cooldown"] > 0  # the stream farm's hourly repeats
    assert metrics["latency/decision_latency_ms"]["count"] > 0
    assert metrics["latency/event_lag_ms"]["count"] == metrics["signals/read_stream"] + sum(
        v for k, v in metrics.items() if k.startswith("signals/read_") and k != "signals/read_stream"
    )


def test_a_bad_allowlist_fails_at_start_naming_the_file(traffic, tmp_path, capsys):
    folder, _ = traffic
    bad = tmp_path / "allow.yaml"
    bad.write_text("allowlist:\n  - entity: user\n    id: u1\n    reason: x\n    owner: y\n    colour: blue\n")
    code = backtest.main(
        ["--input", str(folder / "signals.jsonl"), "--allowlist", str(bad), "--output_dir", str(tmp_path / "o")]
    )
    assert code == 2 and str(bad) in capsys.readouterr().err


def test_the_backtest_applies_the_allowlist_it_is_given(traffic, backtest_run, tmp_path):
    """A stream-farm account the default run enforces against, allowlisted: suppressed, never enforced."""
    folder, _ = traffic
    enforced = {d["entity_id"] for d in _lines(backtest_run / "decisions.jsonl") if d["mode"] == "enforce"}
    bots = sorted(
        lb["entity_id"]
        for lb in _lines(folder / "labels.jsonl")
        if lb["scenario"] == "stream_farm" and lb["entity_type"] == "user" and lb["entity_id"] in enforced
    )
    assert bots, "the default run enforces against the farm's accounts"
    allow = tmp_path / "allow.yaml"
    entry = f"  - entity: user\n    id: '{bots[0]}'\n    reason: a test account\n    owner: tests\n"
    allow.write_text("allowlist:\n" + entry)
    out = tmp_path / "out"
    backtest.run(["--input", str(folder / "signals.jsonl"), "--allowlist", str(allow), "--output_dir", str(out)])
    decisions = [d for d in _lines(out / "decisions.jsonl") if d["entity_id"] == bots[0]]
    assert all(d["mode"] == "shadow" for d in decisions), decisions  # a suppressed hit is audited, not published
    statuses = {a["status"] for a in _lines(out / "audit.jsonl") if a["entity_id"] == bots[0]}
    assert "suppressed_allowlist" in statuses


def test_the_demo_prints_its_verdict_and_exits_by_it(tmp_path, capsys):
    from pipelines import demo

    assert demo.main(["--output_dir", str(tmp_path), "--hours", "24", "--scale", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "No enforce decision against legitimate users or look-alikes." in out
    assert re.search(r"stream_farm\s+attack\s+[1-9]\d*/\d+\n", out), out  # the farm is caught
    summary = json.loads((tmp_path / "summary.json").read_text())
    scores = {"scenarios": {}, "enforced_non_attack": [{"entity_id": "joe"}]}
    assert "ENFORCED AGAINST NON-ATTACK ENTITIES" in demo.render(summary, scores, str(tmp_path))


def test_the_summarys_counts_are_the_output_files_counts(traffic, backtest_run):
    folder, _ = traffic
    summary = json.loads((backtest_run / "summary.json").read_text())
    decisions = _lines(backtest_run / "decisions.jsonl")
    enforce = [d for d in decisions if d["mode"] == "enforce"]
    assert summary["decisions"] == len(decisions)
    assert (summary["decisions_enforce"], summary["decisions_shadow"]) == (len(enforce), len(decisions) - len(enforce))
    assert summary["entities_enforced"] == len({(d["entity_type"], d["entity_id"]) for d in enforce})
    assert summary["audit_rows"] == len(_lines(backtest_run / "audit.jsonl"))
    dead = _lines(backtest_run / "dead_letter.jsonl")
    assert dead and {d["source"] for d in dead} == {str(folder / "signals.jsonl")}  # each names its input
