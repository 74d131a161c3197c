"""Rule packs fail at load time, naming file, rule and field; conditions stay sandboxed."""

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.options import DEFAULT_RULES, PROJECT_ROOT
from transforms.rulepack import (
    CompiledRule,
    RuleEvaluationError,
    RulePackError,
    first_test,
    load_rule_pack,
    parse_rule_pack,
)

GOOD_RULE = {
    "id": "many_plays",
    "version": 1,
    "owner": "royalties-integrity",
    "description": "Too many plays.",
    "entity": "user",
    "window": "1h",
    "when": "streams >= 40 and near_threshold_share >= 0.6",
    "action": "exclude_streams",
    "reason": "{streams:.0f} plays.",
}


def pack_text(*rules: dict) -> str:
    import yaml

    return yaml.safe_dump({"pack": "test", "version": 1, "rules": list(rules)}, sort_keys=False)


def rule(**changes) -> dict:
    out = dict(GOOD_RULE)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def test_default_pack_loads():
    pack = load_rule_pack(DEFAULT_RULES)
    assert pack.name == "default" and len(pack.rules) >= 5
    assert pack.feature_plan()[3600]  # hourly features are planned


def test_a_good_rule_compiles_and_evaluates():
    pack = parse_rule_pack(pack_text(rule()), "p.yaml")
    compiled = CompiledRule(pack.rules[0])
    assert compiled.matches({"streams": 40.0, "near_threshold_share": 0.6})
    assert not compiled.matches({"streams": 39.0, "near_threshold_share": 0.9})
    assert pack.rules[0].features == ("streams", "near_threshold_share")


# (change to the rule, field named, words in the problem)
BAD_RULES = [
    # features and conditions
    ({"when": "stream_count >= 40"}, "when", "unknown feature 'stream_count'"),
    ({"when": "streams >= "}, "when", "syntax error"),
    ({"when": "streams >= 40 and"}, "when", "syntax error"),
    ({"when": "streams"}, "when", "true/false"),
    ({"when": "streams >= 1 and streams"}, "when", "true/false"),
    ({"when": "1 > 0"}, "when", "reads no feature"),
    ({"when": "streams.__class__ == 1"}, "when", "'Attribute' is not allowed"),
    ({"when": "__import__('os').system('id') == 0"}, "when", "may be called"),
    ({"when": "open('/etc/passwd') == 1"}, "when", "may be called"),
    ({"when": "streams == 'x'"}, "when", "only numbers"),
    ({"when": "[streams][0] > 1"}, "when", "not allowed"),
    ({"when": "(lambda: 1)() > 0"}, "when", "may be called"),
    ({"when": "streams / distinct_tracks > 3"}, "when", "all-zero window"),
    # and/or stop early on zeros, so each part is checked on its own: a division behind a false first test,
    # a guard that does not cover the divisor, a call with the wrong arguments
    ({"when": "streams >= 40 and logins / payments >= 1"}, "when", "'logins / payments' fails on an all-zero"),
    ({"when": "streams > 0 and streams / distinct_ips > 1"}, "when", "'streams / distinct_ips' fails"),
    ({"when": "streams >= 40 or max(streams) > 1"}, "when", "'max(streams)' fails on an all-zero window"),
    ({"when": "not streams >= 0 and min() > 1"}, "when", "'min()' fails"),
    # actions and entities
    ({"action": "ban"}, "action", "unknown action 'ban'"),
    ({"entity": "track", "action": "suspend"}, "action", "never auto-enforced"),
    ({"entity": "artist", "action": "exclude_streams"}, "action", "never auto-enforced"),
    ({"action": "block_ip"}, "action", "only to ip"),
    ({"entity": "playlist"}, "entity", "unknown entity type"),
    ({"mode": "maybe"}, "mode", "unknown mode"),
    # metadata
    ({"owner": None}, "owner", "is required"),
    ({"owner": "  "}, "owner", "non-empty text"),
    ({"description": None}, "description", "is required"),
    ({"version": 0}, "version", "integer >= 1"),
    ({"version": "one"}, "version", "integer >= 1"),
    ({"id": "Bad Id"}, "id", "a-z"),
    ({"window": "1 fortnight"}, "window", "not a duration"),
    ({"window": "7m"}, "window", "divide a day"),
    ({"window": "30s"}, "window", "1m..7d"),
    ({"ttl": "-1h"}, "ttl", "not a duration"),
    ({"ttl": "3651d"}, "ttl", "at most 3650d"),  # its decisions' expiry must be a timestamp sinks can write
    ({"ttl": "3000000d"}, "ttl", "at most 3650d"),
    ({"min_events": 0}, "min_events", "integer >= 1"),
    ({"whne": "streams > 1"}, "whne", "unknown field"),
    # reason templates
    ({"reason": "{streams.__class__}"}, "reason", "placeholder"),
    ({"reason": "{nope}"}, "reason", "placeholder"),
    ({"reason": "{streams!r}"}, "reason", "format spec"),
    ({"reason": "{streams:q}"}, "reason", "cannot be rendered"),
    ({"reason": "{"}, "reason", "bad placeholder"),
    ({"reason": "{streams:>50000000}"}, "reason", "renders to 50000000 characters"),
    ({"reason": "{streams:.600f} plays"}, "reason", "a reason may have 500"),
    ({"reason": "x" * 501}, "reason", "renders to 501 characters"),
    # dates
    ({"expires": "9999-12-31"}, "expires", "before 9999-12-31"),
]


@pytest.mark.parametrize("changes, field, problem", BAD_RULES)
def test_bad_rules_fail_at_load_naming_file_rule_and_field(changes, field, problem):
    with pytest.raises(RulePackError) as info:
        parse_rule_pack(pack_text(rule(**changes)), "rules/team.yaml")
    message = str(info.value)
    assert message.startswith("rules/team.yaml: rule ")
    assert f"field '{field}'" in message
    assert problem in message


@pytest.mark.parametrize(
    "version, label",
    [
        ("'2026.10'", "test@2026.10"),
        ("2026.11.28", "test@2026.11.28"),
        ("3", "test@3"),
        ("2026-11-28", "test@2026-11-28"),  # a YAML date prints as typed
    ],
)
def test_a_pack_version_is_kept_as_written(version, label):
    text = pack_text(rule()).replace("version: 1\n", f"version: {version}\n", 1)
    assert parse_rule_pack(text, "p.yaml").label == label


@pytest.mark.parametrize(
    "when",
    [
        # a YAML 'when: |' block with a comment: squeezing the whitespace would comment out the rest
        "(streams >= 40          # plenty of plays\n and near_threshold_share >= 0.6)\n",
        "streams >= 40 \\\n and near_threshold_share >= 0.6",  # a backslash line break
    ],
)
def test_a_multi_line_condition_runs_as_it_was_checked(when):
    loaded = parse_rule_pack(pack_text(rule(when=when)), "p.yaml").rules[0]
    assert loaded.when == "streams >= 40 and near_threshold_share >= 0.6"
    compiled = CompiledRule(loaded)
    assert compiled.matches({"streams": 40.0, "near_threshold_share": 0.6})
    assert not compiled.matches({"streams": 40.0, "near_threshold_share": 0.5})


def test_a_reason_made_long_by_its_values_is_cut_to_the_limit():
    from transforms.rulepack import MAX_REASON_CHARS, render_reason

    long = render_reason("{entity_id} played {streams:.0f}", {"streams": 1.0}, "user", "u" * 1000, 3600)
    assert len(long) == MAX_REASON_CHARS and long.endswith("\u2026")
    assert render_reason("{entity_id} played {streams:.0f}", {"streams": 1.0}, "user", "u1", 3600) == "u1 played 1"


def test_duplicate_rule_ids_are_rejected():
    with pytest.raises(RulePackError, match=r"p.yaml: rule 'many_plays': field 'id': duplicate rule id"):
        parse_rule_pack(pack_text(rule(), rule()), "p.yaml")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("rules: [", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("pack: x\nversion: 1\nrules: []\n", "non-empty list"),
        ("version: 1\nrules: [{}]\n", "'pack'"),
        ("pack: x\nrules: [{}]\n", "'version'"),
        ("pack: x\nversion: 1\nextra: 1\nrules: [{}]\n", "unknown top-level field 'extra'"),
        # YAML reads this as the number 2026.1: the audit rows would name a version nobody wrote
        ("pack: x\nversion: 2026.10\nrules: [{}]\n", "got 2026.1: quote it"),
        # a key given twice: YAML keeps the last, silently dropping the first rules list or condition
        ("pack: x\nversion: 1\nrules: [{}]\nrules: [{}]\n", "duplicate key 'rules'"),
        ("[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),  # PyYAML recurses: RecursionError
        (pack_text(rule()).replace("  when:", "  when: streams >= 1\n  when:"), "duplicate key 'when'"),
    ],
)
def test_bad_pack_documents(text, problem):
    with pytest.raises(RulePackError, match=problem):
        parse_rule_pack(text, "p.yaml")


def test_missing_file_is_named():
    with pytest.raises(RulePackError, match="nope.yaml: cannot be read"):
        load_rule_pack("nope.yaml")


def test_validate_command_exit_status(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(pack_text(rule(when="stream_count > 1"))))
    run = [sys.executable, "-m", "pipelines.rules", "validate"]
    ok = subprocess.run([*run, DEFAULT_RULES], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([*run, str(bad)], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert f"{bad}: rule 'many_plays': field 'when': unknown feature 'stream_count'" in failed.stderr


# --- The first-test shortcut gives simpleeval's answer ---------------------------------------------------------
_NAMES = ("streams", "logins", "near_threshold_share", "distinct_users")
_OPS = ("<", "<=", ">", ">=", "==", "!=")
_numbers = st.one_of(st.integers(-3, 50), st.sampled_from([0.5, 0.6, 1.5, -0.0, 40.0]))
_tests = st.builds(lambda n, o, v: f"{n} {o} {v!r}", st.sampled_from(_NAMES), st.sampled_from(_OPS), _numbers)
_terms = st.one_of(
    st.sampled_from(_NAMES),
    _numbers.map(repr),
    st.builds(lambda a, b: f"{a} / {b}", st.sampled_from(_NAMES), st.sampled_from(_NAMES)),  # may divide by zero
    st.builds(lambda a, b: f"max({a}, {b}) - abs({a})", st.sampled_from(_NAMES), st.sampled_from(_NAMES)),
)
_other_tests = st.builds(lambda a, o, b: f"{a} {o} {b}", _terms, st.sampled_from(_OPS), _terms)  # no shortcut
_leaves = st.one_of(_tests, _other_tests, st.builds(lambda a, b: f"{a} < {b} < 100", _terms, _terms))
_conditions = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + " and ".join(xs) + ")"),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + " or ".join(xs) + ")"),
        inner.map(lambda x: f"not ({x})"),
    ),
    max_leaves=6,
)
_MISSING = "<missing>"  # the feature is left out of the window: simpleeval raises NameNotDefined
_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0.0, 1.0, 40.0, 0.6]),
    st.sampled_from([True, None, "40", _MISSING]),  # not numbers, or absent: the shortcut must step aside
)


@st.composite
def _cases(draw):
    """A condition and a window's values; half the conditions start with a shortcut test, its value near the number.

    The shortcut decides a condition only when its first test is false, and a wrong shortcut shows only where
    simpleeval would say true or raise, so the first test's value is drawn equal to, or just either side of,
    its number, and the rest of the condition is often absent (the first test is then the whole answer).
    """
    values = draw(st.lists(_values, min_size=len(_NAMES), max_size=len(_NAMES)))
    if draw(st.booleans()):
        return draw(_conditions), values
    name, op, number = draw(st.sampled_from(_NAMES)), draw(st.sampled_from(_OPS)), draw(_numbers)
    rest = draw(st.one_of(st.none(), _conditions))
    near = st.sampled_from([number, number - 1, number + 1, number - 0.5, number + 0.5, float(number)])
    values[_NAMES.index(name)] = draw(st.one_of(near, near, near, _values))
    return f"{name} {op} {number!r}" + (f" and ({rest})" if rest else ""), values


def _simpleeval_alone(when: str, features: dict):
    """The condition's answer from simpleeval alone, or the error it raised: the shortcut's reference."""
    from simpleeval import SimpleEval

    try:
        return SimpleEval(functions={"min": min, "max": max, "abs": abs}, names=features).eval(when)
    except Exception as err:
        return type(err)


def _check_against_simpleeval(when: str, values: list) -> None:
    import dataclasses

    compiled = CompiledRule(dataclasses.replace(_BASE_RULE, when=when))
    features = {name: value for name, value in zip(_NAMES, values, strict=True) if value != _MISSING}
    expected = _simpleeval_alone(when, features)
    try:
        got = compiled.matches(features)
    except RuleEvaluationError as err:
        if err.__cause__ is None:  # simpleeval said true; the hit then failed the finite-number check
            assert expected is True and "not finite numbers" in str(err), (when, features, expected)
        else:  # simpleeval raised, and the same error was wrapped
            assert isinstance(expected, type) and isinstance(err.__cause__, expected), (when, features, expected)
        return
    assert got is expected, (when, features, expected)


_BASE_RULE = parse_rule_pack(pack_text(rule()), "p.yaml").rules[0]


@settings(max_examples=500, deadline=None)
@given(case=_cases())
def test_the_first_test_shortcut_answers_as_simpleeval_does(case):
    _check_against_simpleeval(*case)


# Every operator on both sides of its number, alone and followed by a true test; then the cases the shortcut must
# leave to simpleeval: a non-number, a missing feature, an error after a true first test, an 'or'.
_PINNED = [
    (f"streams {op} 40" + rest, [value, 2.0, 0.0, 1.0])
    for op in _OPS
    for value in (39.0, 40.0, 41.0, 40)
    for rest in ("", " and logins > 1")
] + [
    ("streams >= 40 and logins > 1", ["40", 2.0, 0.0, 0.0]),
    ("streams >= 40 and logins > 1", [None, 2.0, 0.0, 0.0]),
    ("streams >= 40 and logins > 1", [_MISSING, 2.0, 0.0, 0.0]),
    ("streams >= 40 and logins / distinct_users > 1", [41, 2.0, 0.0, 0.0]),  # ZeroDivisionError
    ("streams < 40 or logins > 1", [50.0, 2.0, 0.0, 0.0]),
]


@pytest.mark.parametrize(("when", "values"), _PINNED)
def test_the_first_test_shortcut_on_pinned_cases(when, values):
    _check_against_simpleeval(when, values)


def test_the_first_test_is_found_only_where_it_decides():
    import ast

    def first(when):
        found = first_test(ast.parse(when, mode="eval").body)
        return found and (found[0], found[1].__name__, found[2])

    assert first("streams >= 40 and logins > 2") == ("streams", "ge", 40)
    assert first("(logins < 3 and streams > 1) and signups == 0") == ("logins", "lt", 3)
    assert first("streams >= 40") == ("streams", "ge", 40)
    assert [first(f"streams {op} 1.5") for op in _OPS] == [
        ("streams", name, 1.5) for name in ("lt", "le", "gt", "ge", "eq", "ne")
    ]
    # An 'or', a 'not', a chain, a constant on the left, arithmetic, a negative number, an operator conditions
    # may not use: the first value decides nothing alone, or is not one the shortcut reads.
    for when in (
        "streams >= 40 or logins > 2",
        "not streams >= 40",
        "1 < streams < 9",
        "40 <= streams",
        "streams + 1 >= 40 and logins > 2",
        "streams >= -1 and logins > 2",
        "streams is 40 and logins > 2",
        "streams in 40 and logins > 2",
    ):
        assert first(when) is None, when


def test_every_default_rule_gets_the_shortcut():
    # The answers are the same without it (the tests above), so only this shows the shortcut is wired in.
    for rule_ in load_rule_pack(DEFAULT_RULES).rules:
        guard = CompiledRule(rule_)._guard
        assert guard is not None and guard[0] == rule_.features[0], rule_.id
