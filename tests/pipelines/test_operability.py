"""Operability: JSON logs without raw IPs, metrics in the local summary, trace context on decisions."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from pipelines.logs import JsonFormatter, mask_ips
from pipelines.options import PROJECT_ROOT


def test_log_lines_are_single_json_objects_with_stable_keys_and_no_raw_ips():
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "blocked 203.0.113.7 and 2001:db8::1 for %s", ("r1",), None
    )
    record.rule_id, record.decision_id, record.trace_id = "credential_stuffing_block", "d1", "t1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert set(out) == {"severity", "message", "logger", "time", "rule_id", "decision_id", "trace_id"}
    assert out["severity"] == "WARNING" and out["rule_id"] == "credential_stuffing_block"
    assert "203.0.113.7" not in line and "2001:db8::1" not in line
    assert out["message"] == "blocked <ip> and <ip> for r1"


@pytest.mark.parametrize(
    "text",
    [
        "from 2001:db8::5:1.2.3.4.",  # an IPv6 address written with its last 32 bits as IPv4
        "from 2001:db8:1:2:3:4:1.2.3.4.",
        "from ::ffff:1.2.3.4.",
        "from 1.2.3.4.",
        "from 2001:db8::1.",
    ],
)
def test_every_address_is_masked_whole(text):
    assert mask_ips(text) == "from <ip>."


def test_an_exceptions_text_stays_in_the_line_with_its_addresses_masked():
    try:
        raise ValueError("cannot reach 203.0.113.7")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "lift failed", (), sys.exc_info())
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: cannot reach <ip>" in out["message"] and "203.0.113.7" not in out["message"]


def test_ip_masking_leaves_ids_and_times_alone():
    assert (
        mask_ips("user u000012 at 2026-11-02T10:00:00Z ver 1.2.3") == "user u000012 at 2026-11-02T10:00:00Z ver 1.2.3"
    )


def test_decision_publish_carries_trace_context_only_when_opentelemetry_is_configured():
    script = textwrap.dedent(
        """
        import sys
        from tests.schemas.test_schemas import _decision
        from pipelines.streaming import decision_message
        if sys.argv[1] == "sdk":
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            trace.set_tracer_provider(TracerProvider())
        print(decision_message(_decision()).attributes.get("traceparent", "none"))
        """
    )
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", script, mode], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for mode in ("none", "sdk")
    }
    assert runs["none"] == "none"
    version, trace_id, span_id, flags = runs["sdk"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled


def test_setup_logging_leaves_one_json_handler_whatever_was_there():
    """A handler left in place would print lines unmasked, and not as JSON."""
    from pipelines.logs import setup_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        root.addHandler(logging.StreamHandler())
        setup_logging()
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_every_context_key_reaches_the_line_masked():
    from pipelines.logs import CONTEXT_KEYS

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    for key in CONTEXT_KEYS:
        setattr(record, key, f"{key} 203.0.113.7")
    out = json.loads(JsonFormatter().format(record))
    assert {key: out[key] for key in CONTEXT_KEYS} == {key: f"{key} <ip>" for key in CONTEXT_KEYS}
    assert "entity_type" in CONTEXT_KEYS
