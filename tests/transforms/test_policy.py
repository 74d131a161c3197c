"""The policy source: valid changes take effect, broken ones are rejected and the last good policy stays."""

import time

import pytest

from tests.transforms.test_rulepack import pack_text, rule
from transforms.policy import Policy, PolicySource
from transforms.rulepack import parse_rule_pack

A = pack_text(rule(id="rule_a", when="streams >= 3"))
B = pack_text(rule(id="rule_b", when="streams >= 5"))


def source_for(tmp_path, text, reload_sec=0.01, allowlist=None):
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    allow_path = None
    if allowlist is not None:
        allow_path = tmp_path / "allow.yaml"
        allow_path.write_text(allowlist)
    initial = Policy(parse_rule_pack(text, str(rules)))
    return rules, allow_path, PolicySource(initial, str(rules), str(allow_path) if allow_path else None, reload_sec)


def ids(source):
    return [r.id for r in source.current().pack.rules]


def test_a_valid_change_takes_effect_after_the_interval(tmp_path):
    rules, _, source = source_for(tmp_path, A)
    assert ids(source) == ["rule_a"]
    rules.write_text(B)
    time.sleep(0.05)
    assert ids(source) == ["rule_b"]


def test_a_broken_file_is_rejected_and_the_last_good_policy_stays(tmp_path):
    rules, _, source = source_for(tmp_path, A)
    rules.write_text(B)
    time.sleep(0.05)
    assert ids(source) == ["rule_b"]
    rules.write_text(B.replace("streams >= 5", "streams >= "))  # syntax error
    time.sleep(0.05)
    assert ids(source) == ["rule_b"]
    rules.unlink()  # unreadable
    time.sleep(0.05)
    assert ids(source) == ["rule_b"]


@pytest.mark.parametrize(
    "broken",
    [
        "[" * 5000 + "]" * 5000,  # PyYAML's RecursionError
        pack_text(rule(id="rule_b", when="streams >= 5", expires="9999-12-31")),  # OverflowError past the last day
    ],
    ids=["nested", "last-day"],
)
def test_a_file_that_once_raised_out_of_the_loader_is_rejected_and_the_job_goes_on(tmp_path, broken):
    rules, _, source = source_for(tmp_path, A)
    rules.write_text(broken)
    time.sleep(0.05)
    assert ids(source) == ["rule_a"]


def test_a_pack_needing_features_the_job_does_not_compute_is_rejected(tmp_path):
    rules, _, source = source_for(tmp_path, A)
    rules.write_text(pack_text(rule(id="rule_c", when="logins >= 3", entity="ip", window="10m", action="challenge")))
    time.sleep(0.05)
    assert ids(source) == ["rule_a"]


def test_the_allowlist_reloads_with_the_rules(tmp_path):
    entry = "allowlist:\n  - {entity: user, id: %s, reason: r, owner: o}\n"
    _, allow, source = source_for(tmp_path, A, allowlist=entry % "vip1")
    # The start-up policy had no allowlist; the first look at the files brings it in.
    assert source.current().allowlist.entries[0].id == "vip1"
    allow.write_text(entry % "vip2")
    time.sleep(0.05)
    assert source.current().allowlist.entries[0].id == "vip2"


def test_reload_of_zero_never_reads_the_files(tmp_path):
    rules, _, source = source_for(tmp_path, A, reload_sec=0)
    rules.write_text(B)
    time.sleep(0.02)
    assert ids(source) == ["rule_a"]


def test_the_rejections_remembered_to_log_each_once_are_bounded(tmp_path, monkeypatch):
    # A storage outage's read errors can each carry a request id, so every reload would add one.
    from transforms import policy

    monkeypatch.setattr(PolicySource, "_rejected_digests", set())
    _, _, source = source_for(tmp_path, A)
    for n in range(policy._MAX_REJECTED + 5):
        source._reject(f"cannot read the policy files: request {n}", digest=f"read-error:request {n}")
    assert 0 < len(PolicySource._rejected_digests) <= policy._MAX_REJECTED
    assert ids(source) == ["rule_a"]
