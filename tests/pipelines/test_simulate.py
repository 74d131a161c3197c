"""The traffic generator is deterministic and labels every scenario."""

import random

import orjson

from pipelines import simulate
from tests.kit import HOUR_MS, T0_MS, features_of
from transforms.parse import InvalidSignal, parse_signal


def test_same_seed_same_bytes_different_seed_different_bytes():
    a, _ = simulate.simulate(seed=3, hours=2, scale=0.05)
    b, _ = simulate.simulate(seed=3, hours=2, scale=0.05)
    c, _ = simulate.simulate(seed=4, hours=2, scale=0.05)
    assert a == b
    assert a != c


def test_every_scenario_is_labelled():
    _, labels = simulate.simulate(seed=3, hours=24, scale=0.05)
    scenarios = {lb.scenario for lb in labels}
    assert scenarios == {s.name for s in simulate.default_scenarios()}
    kinds = {lb.kind for lb in labels}
    assert kinds == {"attack", "lookalike", "legit"}


def test_generated_signals_are_valid_except_the_injected_malformed_ones():
    lines, _ = simulate.simulate(seed=3, hours=3, scale=0.05, malformed=7)
    bad = 0
    for line in lines:
        try:
            parse_signal(line)
        except InvalidSignal:
            bad += 1
    assert bad == 7
    times = [orjson.loads(x)["event_time"] for x in lines if x not in simulate.MALFORMED_SAMPLES]
    assert times == sorted(times)


def test_an_attack_labels_first_seen_is_its_entitys_first_signal():
    """Time to first decision is measured from it (pipelines.evaluate)."""
    lines, labels = simulate.simulate(seed=3, hours=24, scale=0.05, malformed=0)
    field = {"user": "user_id", "device": "device_id", "ip": "ip", "track": "track_id", "artist": "artist_id"}
    first: dict[tuple[str, str], str] = {}
    for line in lines:
        signal = orjson.loads(line)
        for etype, name in field.items():
            if name in signal:
                key = (etype, signal[name])
                first[key] = min(first.get(key, signal["event_time"]), signal["event_time"])
    attacks = [lb for lb in labels if lb.kind == "attack"]
    assert attacks
    for lb in attacks:
        assert lb.first_seen == first[(lb.entity_type, lb.entity_id)], lb


def test_every_attack_scenario_shows_up_in_a_short_run():
    """Attack start hours scale to --hours, so a three-hour run still has every attack."""
    _, labels = simulate.simulate(seed=3, hours=3, scale=0.05)
    present = {lb.scenario for lb in labels if lb.kind == "attack" and lb.first_seen}  # first_seen: it has signals
    assert present == {s.name for s in simulate.default_scenarios() if s.kind == "attack"}


def test_streams_carry_their_tracks_catalogue_length():
    lines, _ = simulate.simulate(seed=3, hours=2, scale=0.05, malformed=0)
    world = simulate.World(start_ms=0, hours=1, rng=random.Random(3))  # the catalogue depends on the seed only
    streams = [orjson.loads(x) for x in lines if b'"stream"' in x]
    assert streams and all(s["track_duration_ms"] == world.track_length_ms[s["track_id"]] for s in streams)


def test_the_farm_past_a_minute_shows_only_in_cut_off_plays():
    """Its accounts' hours look like a listener's to every feature but the cut-off share."""
    world = simulate.World(start_ms=T0_MS, hours=3, rng=random.Random(5))
    farm = simulate.StreamFarmPastAMinute(accounts=2, devices=1)
    by_hour: dict[tuple[str, int], list] = {}
    for event in farm.generate(world):
        s = parse_signal(orjson.dumps(event)).signal
        by_hour.setdefault((s.user_id, (s.event_time_ms - T0_MS) // HOUR_MS), []).append(s)
    assert len(by_hour) == 6 and {lb.entity_type for lb in farm.labels()} == {"user"}
    for signals in by_hour.values():
        f = features_of(signals)
        assert f["paid_streams"] >= 40 and f["cut_paid_share"] == 1.0
        assert f["near_threshold_share"] == f["short_paid_share"] == f["skip_share"] == 0.0
