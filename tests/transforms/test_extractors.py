"""The feature-extractor extension point, with its example ``scripted_client_share``."""

import dataclasses

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.options import DEFAULT_RULES
from pipelines.pipeline import PipelineConfig, build_pipeline
from tests.kit import T0_MS, assert_mergeable, features_of, hourly_stream, payload, signal, streaming_options
from transforms.extractors import EXTRACTORS, FeatureExtractor, register
from transforms.features import FEATURES
from transforms.rulepack import load_rule_pack

SCRIPTED = EXTRACTORS["scripted_client_share"]


def logins(n, scripted, ip="203.0.113.9", agent="python-requests/2.31"):
    return [
        signal(
            "login",
            T0_MS + i * 1000,
            user_id=f"v{i}",
            ip=ip,
            success=False,
            user_agent=agent if i < scripted else "StreamApp/8.9",
        )
        for i in range(n)
    ]


def test_the_extractor_is_a_feature_rules_can_use():
    assert "scripted_client_share" in FEATURES
    assert features_of(logins(10, 8))["scripted_client_share"] == 0.8
    assert features_of([signal("stream")])["scripted_client_share"] == 0.0  # no logins, no division by zero


@pytest.mark.parametrize(
    "agent, scripted",
    [
        ("python-requests/2.31", True),
        ("curl/8.4.0", True),
        ("Go-http-client/1.1", True),
        ("Apache-HttpClient/4.5.13 (Java/17.0.2)", True),  # Java's most used client: its name comes first
        ("StreamApp/8.9 (iOS 17)", False),
        ("Mozilla/5.0", False),
    ],
)
def test_which_clients_count_as_scripted(agent, scripted):
    assert features_of(logins(1, 1, agent=agent))["scripted_client_share"] == float(scripted)


@pytest.mark.parametrize(
    "agent",
    [
        "StreamApp/8.9.2 (Android 14) okhttp/4.12.0",  # our app names its HTTP library after itself
        "Mozilla/5.0 (X11) Java/17",
        "curlew/1.0",  # a name that starts like a library's
    ],
)
def test_only_an_agent_that_starts_with_a_librarys_name_counts_as_scripted(agent):
    assert features_of(logins(1, 1, agent=agent))["scripted_client_share"] == 0.0


def test_sign_ups_do_not_dilute_the_scripted_share():
    signups = [signal("signup", T0_MS + i, user_id=f"n{i}", ip="203.0.113.9") for i in range(10)]
    assert features_of(logins(10, 10) + signups)["scripted_client_share"] == 1.0


@pytest.mark.parametrize(
    "name, event_types, message",
    [("abc-def", ("login",), "snake_case"), ("fine_name", ("logon",), "unknown event types")],
)
def test_a_bad_extractor_fails_at_registration(name, event_types, message):
    bad = FeatureExtractor(name, "d", event_types, list, lambda s, x: s, lambda a, b: a, lambda s, w: 0.0)
    with pytest.raises(ValueError, match=message):
        register(bad)


@pytest.mark.parametrize("cut", [0, 3, 7, 12])
def test_the_extractor_merges_like_one_pass(cut):
    assert_mergeable(SCRIPTED, logins(12, 5), cut)


def account_logins():
    """Three accounts fail (one of them twice, then succeeds), two succeed."""
    outcomes = [("a", False), ("a", False), ("a", True), ("b", False), ("c", False), ("d", True), ("e", True)]
    return [signal("login", T0_MS + i * 1000, user_id=u, success=ok) for i, (u, ok) in enumerate(outcomes)]


def test_login_account_counts_count_accounts_not_attempts_or_everyone_seen():
    signals = [*account_logins(), signal("stream", user_id="listener")]
    features = features_of(signals)
    assert (features["login_accounts"], features["failed_login_accounts"]) == (5.0, 3.0)
    assert features["distinct_users"] == 6.0  # the listener too: why the stuffing rules no longer read it


@pytest.mark.parametrize("name", ["login_accounts", "failed_login_accounts"])
@pytest.mark.parametrize("cut", [0, 2, 4, 7])
def test_the_login_account_extractors_merge_like_one_pass(name, cut):
    assert_mergeable(EXTRACTORS[name], account_logins(), cut)


def test_the_login_account_counts_are_estimated_past_the_distinct_cap_and_their_ratio_holds():
    """Past DISTINCT_CAP accounts a state becomes a sketch. When the counts saturated at the cap instead, an IP
    with 9,000 accounts logging in and 4,500 failing read as 4,096 failed of 4,096: a ratio of 1.0."""
    from transforms.distinct import DISTINCT_CAP, HyperLogLog

    signals = [signal("login", user_id=f"v{i}", success=i % 2 == 1) for i in range(9_000)]
    states = {}
    for name in ("login_accounts", "failed_login_accounts"):
        extractor = EXTRACTORS[name]
        state = extractor.create()
        for s in signals:
            state = extractor.add(state, s)
        assert state.__class__ is HyperLogLog
        states[name] = extractor.value(state, 600)
        assert_mergeable(extractor, signals, 4_000)  # sets of 2,000 accounts merged into a sketch of 7,000
        assert_mergeable(extractor, signals, 5_000)  # login_accounts: a sketch of 5,000 copied, then folded on
        assert_mergeable(extractor, signals, 0)
    assert abs(states["login_accounts"] / 9_000 - 1) < 0.05
    assert abs(states["failed_login_accounts"] / 4_500 - 1) < 0.05
    assert 0.45 < states["failed_login_accounts"] / states["login_accounts"] < 0.55
    assert DISTINCT_CAP < 4_500


def test_the_kit_refuses_a_merge_that_returns_its_second_state():
    """A merge that hands back ``b`` when ``a`` is empty shares the state of the accumulator ``b`` came from."""
    lazy = dataclasses.replace(SCRIPTED, merge=lambda a, b: b if a == [0, 0] else SCRIPTED.merge(a, b))
    assert_mergeable(lazy, logins(12, 5), 3)  # a non-empty first half: a new list, as it should be
    with pytest.raises(AssertionError, match="kept its second state"):
        assert_mergeable(lazy, logins(12, 5), 0)


def test_the_kit_refuses_a_copy_that_shares_its_state():
    """``copy_accumulator`` copies every extractor state by its ``copy``; one that hands back the same list
    would count the hour's later signals in the day's partial too."""
    assert_mergeable(dataclasses.replace(SCRIPTED, copy=lambda state: [*state]), logins(12, 5), 3)
    with pytest.raises(AssertionError, match="copy shares"):
        assert_mergeable(dataclasses.replace(SCRIPTED, copy=lambda state: state), logins(12, 5), 3)


@pytest.mark.parametrize("name", ["login_accounts", "failed_login_accounts"])
def test_the_kit_refuses_a_distinct_state_copy_that_shares_it(name):
    """Folding the signals a state has already seen changes no set or sketch: the check folds the other half."""
    sharing = dataclasses.replace(EXTRACTORS[name], copy=lambda state: state)
    with pytest.raises(AssertionError, match="copy shares"):
        assert_mergeable(sharing, account_logins(), 3)


def test_an_extractor_without_a_copy_is_deep_copied():
    nested = FeatureExtractor("nested_lists", "d", ("login",), lambda: [[0]], lambda a, s: a, lambda a, b: a, len)
    state = nested.create()
    copied = nested.copy(state)
    assert copied == state and copied[0] is not state[0]


def test_registering_a_clash_or_a_bad_name_fails_at_import():
    with pytest.raises(ValueError, match="registered twice"):
        register(SCRIPTED)
    with pytest.raises(ValueError, match="snake_case"):
        register(FeatureExtractor("Bad Name", "x.", ("login",), list, lambda a, s: a, lambda a, b: a, lambda a, w: 0.0))


def test_the_default_rule_using_it_fires_in_a_streaming_run():
    pack = load_rule_pack(DEFAULT_RULES)
    scripted = [
        payload("login", T0_MS + i * 1000, user_id=f"v{i}", ip="203.0.113.9", success=True, user_agent="curl/8.4")
        for i in range(25)
    ]
    app = [
        payload("login", T0_MS + i * 1000, user_id=f"s{i}", ip="198.51.100.4", success=True, user_agent="StreamApp/8.9")
        for i in range(25)
    ]
    with TestPipeline(options=streaming_options()) as p:
        out = build_pipeline(p | hourly_stream([scripted + app]), pack, config=PipelineConfig(streaming=True))
        assert_that(
            out.decisions | beam.Map(lambda d: (d.rule_id, d.entity_id, d.action)),
            equal_to([("scripted_login_review", "203.0.113.9", "flag_for_review")]),
        )
