"""Scoring, the report and the pack diff, on hand-made decisions and labels with known answers."""

import base64
import re

import pytest

from pipelines import evaluate


def label(etype, eid, scenario, kind, first_seen="2026-11-02T00:00:00.000Z"):
    return {"entity_type": etype, "entity_id": eid, "scenario": scenario, "kind": kind, "first_seen": first_seen}


def decision(etype, eid, rule, mode="enforce", decided="2026-11-02T01:00:00.000Z"):
    return {"entity_type": etype, "entity_id": eid, "rule_id": rule, "mode": mode, "decided_at_ms": decided}


LABELS = [
    label("user", "bot1", "farm", "attack"),
    label("user", "bot2", "farm", "attack"),
    label("user", "bot3", "farm", "attack"),
    label("user", "fan", "super_fan", "lookalike"),
    label("user", "joe", "organic", "legit"),
    label("ip", "1.2.3.4", "stuffing", "attack", first_seen="2026-11-02T00:30:00.000Z"),
]


def test_recall_precision_and_time_to_first_decision():
    decisions = [
        decision("user", "bot1", "farm_rule"),
        decision("user", "bot2", "farm_rule", decided="2026-11-02T02:00:00.000Z"),
        decision("user", "fan", "farm_rule"),  # a false positive of the same rule
        decision("user", "unknown", "farm_rule"),  # unlabelled counts against precision
        decision("user", "bot3", "farm_rule", mode="shadow"),  # shadow is not enforcement
        decision("ip", "1.2.3.4", "ip_rule", decided="2026-11-02T00:40:00.000Z"),
    ]
    scores = evaluate.score(decisions, LABELS)
    farm = scores["scenarios"]["farm"]
    assert (farm["enforced"], farm["entities"], farm["recall"]) == (2, 3, pytest.approx(0.6667))
    assert farm["precision"] == 0.5  # bot1, bot2 out of bot1, bot2, fan, unknown
    assert farm["minutes_to_first_decision"] == 60.0
    assert scores["scenarios"]["stuffing"]["minutes_to_first_decision"] == 10.0
    assert scores["scenarios"]["super_fan"]["enforced"] == 1
    assert scores["lookalikes_enforced"] == 1 and scores["legit_enforced"] == 0
    assert scores["rules"]["farm_rule"]["by_kind"] == {"attack": 2, "lookalike": 1, "unlabelled": 1}
    assert len(scores["enforced_non_attack"]) == 2


def test_gate_fails_on_low_figures_and_on_any_look_alike():
    scores = evaluate.score([decision("user", "bot1", "r"), decision("ip", "1.2.3.4", "r2")], LABELS)
    failures = evaluate.gate(scores, min_precision=0.95, min_recall=0.9)
    assert any("farm: recall" in f for f in failures)
    clean = evaluate.score(
        [decision("user", b, "r") for b in ("bot1", "bot2", "bot3")] + [decision("ip", "1.2.3.4", "r2")], LABELS
    )
    assert evaluate.gate(clean, 0.95, 0.9) == []
    assert evaluate.gate(evaluate.score([decision("user", "joe", "r")], LABELS), None, None)


def test_report_embeds_its_plots_and_names_every_rule(tmp_path):
    import orjson

    decisions = [
        decision("user", "bot1", "farm_rule"),
        decision("ip", "1.2.3.4", "ip_rule"),
        decision("user", "x", "quiet_rule", "shadow"),
    ]
    for name, rows in (("decisions.jsonl", decisions), ("labels.jsonl", LABELS)):
        (tmp_path / name).write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    evaluate.write_report(tmp_path / "decisions.jsonl", tmp_path / "labels.jsonl", tmp_path)
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    for rule in ("farm_rule", "ip_rule", "quiet_rule"):
        assert rule in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # readable offline


def test_diff_shows_entities_newly_hit_and_no_longer_hit():
    before = [decision("user", "a", "r1"), decision("user", "b", "r1")]
    after = [decision("user", "b", "r1"), decision("user", "c", "r2"), decision("user", "a", "r1", mode="shadow")]
    result = evaluate.diff(before, after)
    assert result["newly_enforced"] == [{"entity": "user:c", "rules": ["r2"]}]
    assert result["no_longer_enforced"] == [{"entity": "user:a", "rules": ["r1"]}]
    assert result["unchanged"] == 1


def test_time_to_first_decision_runs_from_the_scenarios_first_signal_to_its_first_decision():
    """Not from the latest entity's first signal, nor from an entity's latest decision."""
    labels = [
        label("user", "a", "farm", "attack", first_seen="2026-11-02T00:00:00.000Z"),
        label("user", "b", "farm", "attack", first_seen="2026-11-02T00:30:00.000Z"),
    ]
    decisions = [
        decision("user", "a", "r", decided="2026-11-02T02:00:00.000Z"),
        decision("user", "a", "r", decided="2026-11-02T01:00:00.000Z"),
        decision("user", "b", "r", decided="2026-11-02T03:00:00.000Z"),
    ]
    assert evaluate.score(decisions, labels)["scenarios"]["farm"]["minutes_to_first_decision"] == 60.0


def test_the_gate_thresholds_are_inclusive_and_an_attack_never_enforced_fails_precision():
    at_threshold = evaluate.score(
        [decision("user", "bot1", "r"), decision("user", "nobody", "r")], [label("user", "bot1", "farm", "attack")]
    )
    assert at_threshold["scenarios"]["farm"]["precision"] == 0.5
    assert [f for f in evaluate.gate(at_threshold, 0.5, 1.0) if "precision" in f] == []
    missed = evaluate.score([], [label("user", "bot1", "farm", "attack")])
    assert any("farm" in f and "precision" in f for f in evaluate.gate(missed, 0.9, None))


def test_enforcing_against_a_legitimate_user_is_counted():
    scores = evaluate.score([decision("user", "joe", "r")], LABELS)
    assert scores["legit_enforced"] == 1 and scores["lookalikes_enforced"] == 0


def test_per_rule_figures_count_entities_and_the_audit_statuses():
    decisions = [
        decision("user", "bot1", "farm_rule"),
        decision("user", "bot1", "farm_rule", decided="2026-11-02T02:00:00.000Z"),  # one entity, twice
        decision("user", "fan", "farm_rule"),
        decision("user", "bot2", "farm_rule", mode="shadow"),
    ]
    audit = [
        {"rule_id": "farm_rule", "status": "issued"},
        {"rule_id": "farm_rule", "status": "issued"},
        {"rule_id": "farm_rule", "status": "cooldown"},
    ]
    scores = evaluate.score(decisions, LABELS, audit)
    rule = scores["rules"]["farm_rule"]
    assert rule["enforced_entities"] == 2 and rule["precision"] == 0.5
    assert (rule["decisions"], rule["shadow_decisions"]) == (4, 1)
    assert scores["audit_status_by_rule"] == {"farm_rule": {"issued": 2, "cooldown": 1}}


def test_the_report_command_exits_1_naming_each_target_missed(tmp_path, capsys):
    import orjson

    farm = [label("user", f"bot{i}", "farm", "attack") for i in (1, 2, 3)]

    def run(decisions, *targets):
        for name, rows in (("decisions.jsonl", decisions), ("labels.jsonl", farm)):
            (tmp_path / name).write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
        code = evaluate.main(
            ["report", "--decisions", str(tmp_path / "decisions.jsonl"), "--labels", str(tmp_path / "labels.jsonl")]
            + ["--output_dir", str(tmp_path / "out"), *targets]
        )
        return code, capsys.readouterr().err

    one = [decision("user", "bot1", "r")]  # recall 1/3, precision 1.0
    assert run(one, "--min_recall", "0.3", "--min_precision", "0.99") == (0, "")
    code, err = run(one, "--min_recall", "0.99")
    assert code == 1 and "farm: recall" in err and "precision" not in err
    code, err = run([*one, decision("user", "nobody", "r")], "--min_precision", "0.99")  # precision 1/2
    assert code == 1 and "farm: precision 0.5 < 0.99" in err
