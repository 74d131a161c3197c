"""The traffic generator is deterministic and labels every scenario."""

import orjson

from pipelines import simulate
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
