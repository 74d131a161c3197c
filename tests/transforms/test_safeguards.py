"""Safeguards that protect legitimate users: allowlists, caps, the action ladder, shadow and expired rules."""

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines.pipeline import PipelineConfig, build_pipeline
from schemas import Decision
from tests.kit import HOUR_MS, T0_MS, payload
from tests.transforms.test_rulepack import pack_text, rule
from transforms.rulepack import parse_rule_pack
from transforms.rules import ISSUED, RULE_EXPIRED, RuleHit
from transforms.safeguards import (
    COOLDOWN,
    SUPERSEDED,
    AllowlistError,
    ladder_step,
    parse_allowlist,
)

DAY_MS = 24 * HOUR_MS


def hit(action="exclude_streams", at_ms=T0_MS, ttl_ms=7 * DAY_MS, entity="u1", mode="enforce", status=ISSUED):
    d = Decision(
        decision_id=f"{action}-{at_ms}",
        entity_type="user",
        entity_id=entity,
        action=action,
        rule_id="r",
        rule_version=1,
        mode=mode,
        reason="x",
        evidence={},
        window_start_ms=at_ms - HOUR_MS,
        window_end_ms=at_ms,
        decided_at_ms=at_ms,
        expires_at_ms=at_ms + ttl_ms,
        trace_ids=[],
    )
    return RuleHit(d, status, "{}", 1, "p@1")


# --- the action ladder -------------------------------------------------------------------
def test_severity_rises_but_never_drops_inside_a_ttl_and_repeats_are_not_reissued():
    memory = 31 * 86400
    active = {}
    first, active = ladder_step(active, hit("exclude_streams", T0_MS), memory)
    repeat, active = ladder_step(active, hit("exclude_streams", T0_MS + HOUR_MS), memory)
    stronger, active = ladder_step(active, hit("suspend", T0_MS + DAY_MS, ttl_ms=30 * DAY_MS), memory)
    weaker, active = ladder_step(active, hit("throttle", T0_MS + 2 * DAY_MS), memory)
    assert (first.status, repeat.status, stronger.status, weaker.status) == (ISSUED, COOLDOWN, ISSUED, SUPERSEDED)
    assert "suspend is active until" in weaker.safeguard_note


def test_the_decision_in_force_passes_unchanged_when_its_window_fires_again():
    # Streaming: every pane of a window re-evaluates its rules and reaches the ladder; the repeats are
    # dropped after it. The decision in force must not turn into a cooldown of itself.
    memory = 31 * 86400
    first, active = ladder_step({}, hit("exclude_streams", T0_MS), memory)
    again, active = ladder_step(active, first, memory)  # the same decision id, from the next pane
    other, _ = ladder_step(active, hit("exclude_streams", T0_MS + HOUR_MS), memory)  # another window's
    assert (first.status, again.status, other.status) == (ISSUED, ISSUED, COOLDOWN)
    assert again is first


def test_state_written_before_decision_ids_were_kept_still_reads():
    # A Dataflow --update keeps each entity's state: {action: expires_at_ms} from the earlier code.
    old_state = {"exclude_streams": T0_MS + 7 * DAY_MS}
    weaker, _ = ladder_step(old_state, hit("flag_for_review", T0_MS + HOUR_MS), 86400)
    same, _ = ladder_step(old_state, hit("exclude_streams", T0_MS + HOUR_MS), 86400)
    stronger, active = ladder_step(old_state, hit("suspend", T0_MS + HOUR_MS), 86400)
    assert (weaker.status, same.status, stronger.status) == (SUPERSEDED, COOLDOWN, ISSUED)
    assert active["exclude_streams"] == T0_MS + 7 * DAY_MS


def test_after_the_ttl_the_same_action_may_be_issued_again():
    active = {}
    _, active = ladder_step(active, hit("throttle", T0_MS, ttl_ms=HOUR_MS), 86400)
    again, _ = ladder_step(active, hit("throttle", T0_MS + 2 * HOUR_MS, ttl_ms=HOUR_MS), 86400)
    assert again.status == ISSUED


def test_memory_of_zero_turns_the_ladder_off():
    active = {}
    for n in range(3):
        out, active = ladder_step(active, hit("exclude_streams", T0_MS + n * HOUR_MS), 0)
        assert out.status == ISSUED
    assert active == {}


def test_shadow_hits_do_not_enter_the_ladder():
    out, active = ladder_step({}, hit(mode="shadow"), 86400)
    assert out.status == ISSUED and active == {}


# --- allowlists ------------------------------------------------------------------------------
ALLOW = parse_allowlist(
    """
allowlist:
  - {entity: user, id: vip1, reason: verified artist account, owner: artist-relations}
  - {entity: user, id_prefix: "qa-", reason: test accounts, owner: qa}
  - {entity: ip, cidr: 10.100.0.0/16, reason: university NAT, owner: ts, rules: [ip_rule]}
  - {entity: ip, cidr: "2001:db8::/32", reason: lab, owner: ts}
  - {entity: device, id: d1, reason: until fixed, owner: ts, expires: 2026-11-01}
  - {entity: user, id: "007", reason: all-digit id, owner: ts}
  - {entity: ip, id: "2001:0DB9:0:0::1:7", reason: written long, owner: ts}
  - {entity: ip, id: "::ffff:192.0.2.9", reason: written mapped, owner: ts}
""",
    "allow.yaml",
)


@pytest.mark.parametrize(
    "entity_type, entity_id, rule_id, matched",
    [
        ("user", "vip1", "any", True),
        ("user", "vip2", "any", False),
        ("user", "qa-loadtest-7", "any", True),
        ("user", "xqa-7", "any", False),
        ("ip", "10.100.3.4", "ip_rule", True),
        ("ip", "10.100.3.4", "other_rule", False),  # entry limited to ip_rule
        ("ip", "10.101.3.4", "ip_rule", False),
        ("ip", "2001:db8::1", "any", True),
        ("device", "d1", "any", False),  # expired on 2026-11-01, before T0
        ("device", "vip1", "any", False),  # ids match per entity type
        ("user", "007", "any", True),
        ("user", "7", "any", False),
        # ip entries' ids in the form parsing gives ip entities: compressed, IPv4-mapped as IPv4
        ("ip", "2001:db9::1:7", "any", True),
        ("ip", "192.0.2.9", "any", True),
        # an id kept from before parsing unmapped IPv4-mapped addresses is still in its network
        ("ip", "::ffff:a64:304", "ip_rule", True),
    ],
)
def test_allowlist_matching(entity_type, entity_id, rule_id, matched):
    assert (ALLOW.match(entity_type, entity_id, rule_id, T0_MS) is not None) is matched


@pytest.mark.parametrize(
    "entry, field, problem",
    [
        ("{entity: user, reason: r, owner: o}", "id", "exactly one of"),
        ("{entity: user, id: a, id_prefix: bb, reason: r, owner: o}", "id_prefix", "exactly one of"),
        ("{entity: user, cidr: 10.0.0.0/8, reason: r, owner: o}", "cidr", "only to ip"),
        ("{entity: ip, cidr: 10.0.0.0/33, reason: r, owner: o}", "cidr", "not an IP network"),
        ("{entity: user, id_prefix: q, reason: r, owner: o}", "id_prefix", "at least 3"),
        ("{entity: song, id: a, reason: r, owner: o}", "entity", "must be one of"),
        ("{entity: user, id: a, owner: o}", "reason", "is required"),
        ("{entity: user, id: a, reason: r}", "owner", "is required"),
        ("{entity: user, id: a, reason: r, owner: o, expires: soon}", "expires", "a date"),
        ("{entity: user, id: a, reason: r, owner: o, rules: [nope]}", "rules", "unknown rule ids"),
        ("{entity: user, id: a, reason: r, owner: o, colour: red}", "colour", "unknown field"),
        # YAML reads these as the numbers 7 and 750 (sexagesimal): the entry would protect someone else
        ("{entity: user, id: 007, reason: r, owner: o}", "id", "must be text, got 7: quote it"),
        ("{entity: user, id_prefix: 12:30, reason: r, owner: o}", "id_prefix", "must be text, got 750"),
        ("{entity: ip, id: 10.0.0.256, reason: r, owner: o}", "id", "not an IPv4 or IPv6 address"),
        ("{entity: ip, cidr: 0.0.0.0/0, reason: r, owner: o}", "cidr", "0.0.0.0/0 covers too much"),
        ("{entity: ip, cidr: 10.0.0.0/7, reason: r, owner: o}", "cidr", "covers too much"),
        ("{entity: ip, cidr: '2000::/3', reason: r, owner: o}", "cidr", "covers too much"),
        ("{entity: user, id: a, reason: r, owner: o, expires: 9999-12-31}", "expires", "before 9999-12-31"),
    ],
)
def test_bad_allowlist_entries_name_file_entry_and_field(entry, field, problem):
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(f"allowlist:\n  - {entry}\n", "allow.yaml", known_rules={"ip_rule"})
    assert str(info.value).startswith("allow.yaml: entry #1: field ")
    assert f"'{field}'" in str(info.value) and problem in str(info.value)


def test_an_allowlist_entry_with_a_key_given_twice_is_refused_with_its_line():
    # YAML keeps the last: the entry would protect b while its author meant a.
    with pytest.raises(AllowlistError, match=r"(?s)allow.yaml: not valid YAML: duplicate key 'id'.*line 2"):
        parse_allowlist("allowlist:\n  - {entity: user, id: a, id: b, reason: r, owner: o}\n", "allow.yaml")


# --- in the pipeline -------------------------------------------------------------------------
def plays(user, n=3, start=T0_MS, device=None):
    return [payload("stream", start + i * 60_000, user_id=user, device_id=device, ms_played=32_000) for i in range(n)]


def run_batch(pack_yaml, lines, **config):
    pack = parse_rule_pack(pack_yaml, "p.yaml")
    p = TestPipeline()
    out = build_pipeline(p | beam.Create(lines), pack, config=PipelineConfig(**config))
    return p, out


def test_allowlisted_entity_gets_a_suppressed_audit_row_and_no_decision():
    p, out = run_batch(pack_text(rule(when="streams >= 3")), plays("vip1") + plays("fan2"), allowlist=ALLOW)
    with p:
        assert_that(out.decisions | "D" >> beam.Map(lambda d: d.entity_id), equal_to(["fan2"]), label="Decisions")
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.entity_id, a.status, a.mode, (a.safeguard_note or "")[:11])),
            equal_to([("vip1", "suppressed_allowlist", "shadow", "allowlisted"), ("fan2", "issued", "enforce", "")]),
            label="Audit",
        )


def test_a_shadow_rule_produces_only_shadow_decisions():
    p, out = run_batch(pack_text(rule(when="streams >= 3", mode="shadow")), plays("u1") + plays("u2"))
    with p:
        assert_that(out.decisions | beam.Map(lambda d: d.mode), equal_to(["shadow", "shadow"]))


def test_an_expired_rule_stops_enforcing():
    p, out = run_batch(pack_text(rule(when="streams >= 3", expires="2026-11-01")), plays("u1"))
    with p:
        assert_that(out.decisions, equal_to([]), label="NoDecision")
        assert_that(out.audit | beam.Map(lambda a: (a.status, a.mode)), equal_to([(RULE_EXPIRED, "shadow")]))


def test_a_misfiring_rule_trips_its_cap_within_the_window():
    users = [f"u{n:03d}" for n in range(60)]
    lines = [line for u in users for line in plays(u)]
    p, out = run_batch(pack_text(rule(when="streams >= 1", max_entities_per_window=10)), lines)
    with p:
        assert_that(out.decisions | "Count" >> beam.combiners.Count.Globally(), equal_to([10]), label="TenEnforced")
        statuses = out.audit | "S" >> beam.Map(lambda a: a.status) | beam.combiners.Count.PerElement()
        assert_that(statuses, equal_to([("issued", 10), ("capped", 50), ("rule_tripped", 1)]), label="Statuses")


@pytest.mark.parametrize("order", ["as_generated", "reversed"])
def test_batch_caps_give_the_same_places_whatever_the_input_order(order):
    """A backtest fills a cap in entity-id order, so which entities are enforced never depends on
    file order or worker count (the streaming job fills it in arrival order)."""
    users = [f"u{n:03d}" for n in range(40)]
    lines = [line for u in users for line in plays(u)]
    if order == "reversed":
        lines.reverse()
    p, out = run_batch(pack_text(rule(when="streams >= 1", max_entities_per_window=10)), lines)
    with p:
        assert_that(out.decisions | beam.Map(lambda d: d.entity_id), equal_to(users[:10]))


def test_the_global_cap_bounds_all_rules_together():
    users = [f"u{n:03d}" for n in range(30)]
    pack = pack_text(rule(when="streams >= 1"), rule(id="other_rule", when="streams >= 2"))
    p, out = run_batch(
        pack, [line for u in users for line in plays(u)], global_cap_per_window=12, action_memory_max_sec=0
    )
    with p:
        # Both rules hit the same 30 users; together they may enforce against 12 distinct entities.
        entities = out.decisions | beam.Map(lambda d: d.entity_id) | beam.Distinct() | beam.combiners.Count.Globally()
        assert_that(entities, equal_to([12]))


def _streaming(windows):
    """TestStream with one batch of payloads per hour, the watermark moving hour by hour."""
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = TestStream()
    for hour, lines in enumerate(windows):
        at = (T0_MS + hour * HOUR_MS) / 1000
        stream = stream.advance_watermark_to(at).add_elements([TimestampedValue(x, at) for x in lines])
    return options, stream.advance_watermark_to_infinity()


def test_streaming_cap_trips_inside_the_window():
    options, stream = _streaming([[line for n in range(8) for line in plays(f"u{n:02d}")]])
    pack = parse_rule_pack(pack_text(rule(when="streams >= 3", max_entities_per_window=5)), "p.yaml")
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, pack, config=PipelineConfig(streaming=True))
        assert_that(
            out.audit | beam.Map(lambda a: a.status),
            equal_to(["issued"] * 5 + ["capped"] * 3 + ["rule_tripped"]),
        )


def test_streaming_ladder_holds_a_repeat_in_the_next_window():
    options, stream = _streaming([plays("u1"), plays("u1", start=T0_MS + HOUR_MS)])
    pack = parse_rule_pack(pack_text(rule(when="streams >= 3")), "p.yaml")
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, pack, config=PipelineConfig(streaming=True))
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.window_start_ms - T0_MS, a.status)),
            equal_to([(0, "issued"), (HOUR_MS, COOLDOWN)]),
            label="Audit",
        )
        assert_that(out.decisions | "D" >> beam.Map(lambda d: d.window_start_ms - T0_MS), equal_to([0]), label="Once")


# Two rules hitting one entity in one pane: a backtest takes them strongest first (challenge superseded by
# block); streaming takes hits as they reach the ladder, in any order after the shuffles, unless held.
TWO_RUNGS = pack_text(
    rule(id="weak_challenge", when="streams >= 3", action="challenge"),
    rule(id="strong_suspend", when="streams >= 3", action="suspend"),
)


def _one_pane_through_the_ladder(hold_sec):
    import time

    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = (
        TestStream()
        .advance_watermark_to(T0_MS / 1000)
        .add_elements([TimestampedValue(x, T0_MS / 1000) for x in plays("u1")])
        .advance_watermark_to((T0_MS + HOUR_MS) / 1000 + 60)  # the window fires: both rules hit u1
        # Processing-time timers are set from the wall clock; TestStream's clock starts at 0. The hold ends here.
        .advance_processing_time(int(time.time()) + 60)
        .advance_watermark_to_infinity()
    )
    pack = parse_rule_pack(TWO_RUNGS, "p.yaml")
    config = PipelineConfig(streaming=True, ladder_hold_sec=hold_sec)
    return options, stream, pack, config


def test_streaming_ladder_with_a_hold_takes_one_panes_hits_strongest_first_as_a_backtest_does():
    options, stream, pack, config = _one_pane_through_the_ladder(hold_sec=2)
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, pack, config=config)
        assert_that(
            out.audit | "A" >> beam.Map(lambda a: (a.rule_id, a.status)),
            equal_to([("strong_suspend", ISSUED), ("weak_challenge", SUPERSEDED)]),
            label="Audit",
        )
        assert_that(out.decisions | "D" >> beam.Map(lambda d: d.action), equal_to(["suspend"]), label="D")
    p, out = run_batch(TWO_RUNGS, plays("u1"))
    with p:  # the backtest's outcome, for comparison
        assert_that(
            out.audit | beam.Map(lambda a: (a.rule_id, a.status)),
            equal_to([("strong_suspend", ISSUED), ("weak_challenge", SUPERSEDED)]),
        )


def test_streaming_ladder_without_a_hold_takes_hits_as_they_arrive():
    """The weaker rule comes first in the pack, so its hit reaches the ladder first on this runner: both are
    issued. This is what the hold above changes (and shows the test above can fail)."""
    options, stream, pack, config = _one_pane_through_the_ladder(hold_sec=0)
    with TestPipeline(options=options) as p:
        out = build_pipeline(p | stream, pack, config=config)
        assert_that(out.decisions | beam.Map(lambda d: d.action), equal_to(["challenge", "suspend"]), label="D")


def test_held_hits_are_taken_in_the_backtests_order_whatever_their_arrival_order():
    """LadderFn alone: hits of one entity arrive weakest first, and from two moments, within one hold."""
    import time

    from transforms.safeguards import LadderFn

    def keyed(h):
        return (f"user:{h.decision.entity_id}", h)

    arrivals = [
        hit("throttle", at_ms=T0_MS + HOUR_MS),  # later moment: after both earlier ones
        hit("exclude_streams", at_ms=T0_MS),
        hit("suspend", at_ms=T0_MS),  # same moment, stronger: taken before exclude_streams
    ]
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = TestStream()
    for h in arrivals:  # one element at a time, so they arrive in this order
        stream = stream.add_elements([keyed(h)])
    stream = stream.advance_processing_time(int(time.time()) + 60).advance_watermark_to_infinity()
    with TestPipeline(options=options) as p:
        out = p | stream | beam.ParDo(LadderFn(31 * 86400, hold_sec=5))
        assert_that(
            out | beam.Map(lambda h: (h.decision.action, h.status)),
            equal_to([("suspend", ISSUED), ("exclude_streams", SUPERSEDED), ("throttle", SUPERSEDED)]),
        )
