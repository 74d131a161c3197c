"""Operators' rule pauses: a paused rule keeps running in shadow (audited as rule_paused); bad files fail by name."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.pipeline import build_pipeline
from schemas.features import EntityFeatures
from tests.kit import T0_MS, payload
from tests.transforms.test_rulepack import pack_text, rule
from transforms.features import Accumulator, compute_features
from transforms.policy import Policy, PolicySource
from transforms.rulepack import RulePackError, parse_rule_overrides, parse_rule_pack, paused_rules
from transforms.rules import ISSUED, RULE_PAUSED, ApplyRulesFn

PACK = parse_rule_pack(pack_text(rule(when="streams >= 3"), rule(id="other_rule", when="streams >= 3")), "p.yaml")
PAUSE = """
paused:
  - rule: many_plays
    actor: alice@example.com
    reason: "Incident 77: misfiring on a partner's test accounts"
    paused_at: "2026-11-29T02:00:00Z"
"""


def plays(user):
    return [payload("stream", T0_MS + i * 60_000, user_id=user, track_id=f"t{i}") for i in range(4)]


def test_a_paused_rule_runs_in_shadow_and_the_others_still_enforce():
    pack = paused_rules(PACK, parse_rule_overrides(PAUSE, "o.yaml", PACK.rule_ids))
    with TestPipeline() as p:
        out = build_pipeline(p | beam.Create(plays("u1")), pack)
        assert_that(
            out.audit | beam.Map(lambda a: (a.rule_id, a.status, a.mode)),
            equal_to([("many_plays", RULE_PAUSED, "shadow"), ("other_rule", ISSUED, "enforce")]),
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("paused: [{rule: no_such_rule, actor: a, reason: r}]", "'paused entry #1': field 'rule': unknown rule id"),
        ("paused: [{rule: many_plays, reason: r}]", "'paused entry #1': field 'actor': is required"),
        ("paused: [{rule: many_plays, actor: a, reason: r, until: x}]", "field 'until': unknown field"),
        ("paused: {rule: many_plays}", "must be a mapping with a 'paused' list"),
        ("paused: [", "not valid YAML"),
    ],
)
def test_a_bad_overrides_file_names_file_entry_and_field(text, message):
    with pytest.raises(RulePackError, match="o.yaml") as err:
        parse_rule_overrides(text, "o.yaml", PACK.rule_ids)
    assert message in str(err.value)


def test_an_empty_overrides_file_pauses_nothing():
    assert parse_rule_overrides("", "o.yaml", PACK.rule_ids) == frozenset()
    assert paused_rules(PACK, frozenset()) is PACK


def test_a_pause_written_while_the_job_runs_is_picked_up_and_a_resume_lifts_it(tmp_path):
    rules, overrides = tmp_path / "rules.yaml", tmp_path / "overrides.yaml"
    rules.write_text(pack_text(rule(when="streams >= 3"), rule(id="other_rule", when="streams >= 3")))
    overrides.write_text("paused: []\n")
    source = PolicySource(Policy(PACK), rules_path=str(rules), reload_sec=0.001, overrides_path=str(overrides))
    assert not any(r.paused for r in source.current().pack.rules)
    overrides.write_text(PAUSE)
    source._next_check = 0
    assert {r.id for r in source.current().pack.rules if r.paused} == {"many_plays"}
    overrides.write_text("paused: [{rule: nope, actor: a, reason: r}]\n")  # a bad file keeps the last good policy
    source._next_check = 0
    assert {r.id for r in source.current().pack.rules if r.paused} == {"many_plays"}
    overrides.write_text("paused: []\n")
    source._next_check = 0
    assert not any(r.paused for r in source.current().pack.rules)


def test_a_running_rules_step_applies_a_pause_and_a_resume_without_a_restart(tmp_path):
    # The pause changes the overrides file only, so the rules file (and its digest) stay the same: the step
    # must still recompile. A Dataflow worker keeps one DoFn instance for hours; a pause must not wait for a new one.
    rules, overrides = tmp_path / "rules.yaml", tmp_path / "overrides.yaml"
    rules.write_text(pack_text(rule(when="streams >= 3")))
    overrides.write_text("paused: []\n")
    initial = parse_rule_pack(rules.read_text(), str(rules))
    source = PolicySource(Policy(initial), rules_path=str(rules), reload_sec=0.001, overrides_path=str(overrides))
    fn = ApplyRulesFn(source, "event")
    fn.setup()
    acc = Accumulator()
    acc.events = acc.streams = 4
    window = EntityFeatures("user", "u1", 3600, T0_MS, T0_MS + 3_600_000, compute_features(acc, 3600), [], T0_MS)

    def outcome():
        source._next_check = 0
        return [(h.status, h.decision.mode) for h in fn.process(window)]

    assert outcome() == [(ISSUED, "enforce")]
    overrides.write_text(PAUSE)
    assert outcome() == [(RULE_PAUSED, "shadow")]
    overrides.write_text("paused: []\n")
    assert outcome() == [(ISSUED, "enforce")]
