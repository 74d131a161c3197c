"""The benchmark harness measures what it says: inputs valid, counts complete, bookkeeping consistent.

The figures themselves come from ``make bench`` (machines are noisy, so no
timing is asserted here); these keep the harness from rotting between runs.
"""

import http.server
import math
import os
import socket
import threading
import time

import orjson
import pytest

from benchmarks import api_latency, batch_throughput, hot_keys, memory_keys, streaming_latency, transform_costs
from transforms.distinct import DISTINCT_CAP
from transforms.parse import parse_signal


@pytest.mark.parametrize("reader", ["text", "blocks"])
def test_bare_pipeline_counts_every_signal(tmp_path, reader):
    lines = [
        orjson.dumps(
            {
                "event_id": f"e{i}",
                "event_type": "signup",
                "user_id": f"u{i % 7}",
                "event_time": f"2026-11-02T{i % 24:02d}:00:00Z",
            }
        )
        for i in range(500)
    ]
    source = tmp_path / "signals.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    figures = batch_throughput.run_bare(str(source), "backtest_local.yaml", str(tmp_path / "out"), reader)
    assert figures["events"] == 500
    counts = (tmp_path / "out" / "counts").read_text().splitlines()
    assert len(counts) == len({(i % 7, i % 24) for i in range(500)})  # one row per (user, hour)


def test_memory_benchmark_signals_are_valid_and_each_names_a_new_user_but_the_bots():
    per_tick, tick_ms = 200, 3_600_000
    signals = [parse_signal(p).signal for tick in range(3) for p in memory_keys.tick_signals(tick, per_tick, tick_ms)]
    assert len(signals) == 600
    assert len({s.user_id for s in signals}) == memory_keys.distinct_users(3, per_tick) == 3 * (200 - 45 + 1)
    for tick in range(3):
        in_tick = signals[tick * per_tick : (tick + 1) * per_tick]
        start = memory_keys.T0_MS + tick * tick_ms
        assert all(start <= s.event_time_ms < start + tick_ms for s in in_tick)
        bot = in_tick[: memory_keys.BOT_PLAYS]
        assert len({s.user_id for s in bot}) == 1 and {s.event_type for s in bot} == {"stream"}
        # the bot's plays fit in one hourly window, which is what stream_farm_exclude counts
        assert len({s.event_time_ms // 3_600_000 for s in bot}) == 1
    assert {s.event_type for s in signals} == {"stream", "login"}


def test_streaming_traffic_keeps_sequence_numbers_and_caps_bot_plays():
    traffic = streaming_latency.Traffic(seed=1, bot_every_sec=5, bots_until_sec=10)
    now = 1_767_225_600.0
    for step in range(700):  # 70 s at 30 signals a second
        for body, bot, seq in traffic.batch(now + step / 10, step / 10, 3, 0.1):
            traffic.sent.append(now)
            assert len(traffic.sent) == seq and parse_signal(body).signal.event_id == f"{traffic.id_prefix}-{seq}"
            if bot is not None:
                traffic.bot_sends.setdefault(bot, []).append((now, seq))
    assert sorted(traffic.bot_sends) == ["bot0000", "bot0001", "bot0002"]
    assert all(len(sends) == streaming_latency.BOT_PLAYS for sends in traffic.bot_sends.values())


def test_warm_up_and_measured_traffic_never_share_an_event_id():
    # Both go to the full job, whose de-duplication drops a repeated event id: shared ids cost the first bots
    # their plays (and their decisions) in the streaming benchmark.
    warm = streaming_latency.Traffic(seed=6, bot_every_sec=1e9, bots_until_sec=0)
    measured = streaming_latency.Traffic(seed=5, bot_every_sec=1.0, bots_until_sec=10)
    now = 1_767_225_600.0
    warm_ids = {parse_signal(warm._signal(now, event_type="signup", user_id="w")).signal.event_id for _ in range(50)}
    measured_ids = {parse_signal(body).signal.event_id for body, _, _ in measured.batch(now, 0.0, 50, 10.0)}
    assert len(warm_ids) == 50 and len(measured_ids) == 50 and not warm_ids & measured_ids


def test_achieved_rate_is_messages_up_to_the_last_canary_over_its_delay():
    traffic = streaming_latency.Traffic(seed=1, bot_every_sec=1e9, bots_until_sec=0)
    traffic.canaries = {"canary-0": (100.0, 50), "canary-1": (101.0, 350)}
    assert streaming_latency._achieved(traffic, {"canary-0": 100.5, "canary-1": 103.5}, first=100.0) == 100.0
    assert streaming_latency._achieved(traffic, {}, first=100.0) == 0.0


def test_transform_costs_cover_every_stage():
    payload = transform_costs.measure(events=3000, repeats=1)
    stages = {s["stage"]: s for s in payload["stages"]}
    assert list(stages) == ["parse", "dedupe", "features/fold", "features/compute", "rules", "safeguards"]
    assert stages["parse"]["units"] == payload["signals"] == 3000
    assert all(s["us_per_unit"] > 0 for s in stages.values())
    assert payload["entity_windows"] > payload["signals"] / 10


def test_hot_key_benchmark_folds_windows_past_the_distinct_cap():
    for kind in ("viral", "artist"):
        run = hot_keys.measure(kind, plays=45_000, repeats=1)
        assert run["true_distinct_users"] > DISTINCT_CAP  # past the cap, or it measures nothing
        assert abs(run["distinct_users"] / run["true_distinct_users"] - 1) < 0.05
        assert run["encoded_bytes"] < 20_000 and run["fold_us_per_signal"] > 0


def test_memory_benchmark_streaming_graph_leaves_no_user_state_or_timers_behind():
    # Our stateful steps (de-duplication of signals and decisions, caps, the action ladder) must be emptied by
    # their timers by the end of the run, which needs the benchmark's test clock to reach the wall clock that
    # sets them and to run past the ladder's memory.
    figures = memory_keys.run_child(300, per_tick=100, events_per_hour=100)
    assert figures["signals"] == 600 and figures["users"] == memory_keys.distinct_users(6, 100) >= 300
    assert figures["decisions"] >= 6  # every tick's bot is caught, so the safeguards hold state for it
    held = figures["runner_state_after_run"]
    assert held["user"]["steps"] >= 4 and held["user"]["keys"] > 600  # a key per signal id, and per decision
    assert held["user"]["cells_holding_data"] == held["user"]["timers"] == 0
    assert held["windowed"]["steps"] >= 3  # the 10-minute, hourly and daily windows' groupings are counted apart


def test_memory_benchmark_bare_graph_counts_every_user_once():
    figures = memory_keys.run_child(300, per_tick=100, events_per_hour=100, bare=True)
    assert figures["signals"] == 600
    assert figures["panes"] == figures["users"]  # one on-time pane per user-hour: each user's signals are in one


def test_benchmark_input_is_generated_afresh_when_the_simulator_changes(tmp_path, monkeypatch):
    simulator = tmp_path / "pipelines" / "simulate.py"
    simulator.parent.mkdir()
    simulator.write_bytes((batch_throughput.PROJECT_ROOT / "pipelines" / "simulate.py").read_bytes())
    monkeypatch.setattr(batch_throughput, "PROJECT_ROOT", tmp_path)
    before = batch_throughput.input_path(100_000)
    assert batch_throughput.input_path(100_000) == before and before.name.startswith("signals_100000_")
    simulator.write_bytes(simulator.read_bytes() + b"\n# a new signal field\n")
    assert batch_throughput.input_path(100_000) != before


class _Answers(http.server.BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1: /ok answers 200, /bad 503, /slow 200 after 50 ms."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(0.05)
        body = b'{"ok": true}'
        self.send_response(503 if self.path == "/bad" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_api_load_generator_counts_errors_and_charges_queueing_to_the_server(answering_port):
    """Open loop: 20 requests due over 0.2 s on one connection to a server taking 50 ms each cannot all be
    on time; latency runs from when each was due, so the last waited at least 20 x 50 ms - 0.2 s, not 50 ms.
    (Lower bounds only: a slow machine makes them larger.)"""
    mixed = api_latency.drive(
        lambda n: api_latency.http_get("/ok" if n % 2 else "/bad", {}), 200, 0.5, answering_port, 4, os.getpid()
    )
    assert (mixed["requests"], mixed["errors"]) == (100, 50)

    slow = api_latency.drive(lambda n: api_latency.http_get("/slow", {}), 100, 0.2, answering_port, 1, os.getpid())
    assert (slow["requests"], slow["errors"]) == (20, 0)
    assert slow["max_ms"] > 700 and slow["achieved_rps"] < 25


def test_the_api_load_generator_fails_requests_nobody_answers_and_goes_on(monkeypatch):
    """A server that takes connections and never answers: every request fails at the timeout (counted, with
    its latency in the *_all figures), lost connections are made again, and the run ends."""
    monkeypatch.setattr(api_latency, "REQUEST_TIMEOUT_SEC", 0.3)
    silent = socket.create_server(("127.0.0.1", 0))  # never accepts: the kernel's backlog takes connections
    try:
        result = api_latency.drive(
            lambda n: api_latency.http_get("/", {}), 20, 0.25, silent.getsockname()[1], 2, os.getpid()
        )
    finally:
        silent.close()
    assert (result["requests"], result["errors"], result["achieved_rps"]) == (5, 5, 0)
    assert result["max_all_ms"] >= 300 and math.isnan(result["p99_ms"])
    assert math.isnan(result["server_cpu_ms_per_request"])  # nothing answered: no cost per answer
