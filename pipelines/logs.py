"""Structured logs: one JSON object per line, with stable keys Cloud Logging understands.

Keys: ``severity``, ``message``, ``logger``, ``time``, and when a log call
passes them in ``extra``: ``rule_id``, ``entity_type``, ``decision_id``,
``trace_id``. IP addresses in messages are masked: operators need rule ids,
decision ids and trace ids to investigate, and can look a decision up to see
the IP it targets. A raw IP in a log line would be personal data copied into a
system with different retention. Decisions and audit rows may carry IPs; logs
may not.

Entry points call ``setup_logging()``. Nothing logs per element on the hot
path.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re

CONTEXT_KEYS = ("rule_id", "entity_type", "decision_id", "trace_id")
# Digit lookarounds, not \b: "ip_203.0.113.9" has no word boundary before the 2.
_IPV4 = re.compile(r"(?<!\d)(?:\d{1,3}\.){3}\d{1,3}(?!\d)")
# Runs of hex digits, colons and dots with two or more colons; only an IPv6 address inside one is masked
# (times like 10:00:00 are not).
_IPV6_CANDIDATE = re.compile(r"(?<![0-9A-Fa-f:.])[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")


def _mask_v6(match: re.Match) -> str:
    """Mask the address in a run, which may start with a label's tail ("ip:", "id:") and end with a full stop."""
    text = match.group(0)
    core = text.rstrip(".")
    for start in [0] + [i + 1 for i, char in enumerate(core) if char == ":"]:
        if len(core) - start > 45:  # longer than any IPv6 address (with an embedded IPv4)
            continue
        try:
            ipaddress.IPv6Address(core[start:])
        except ValueError:
            continue
        return text[:start] + "<ip>" + text[len(core) :]
    return text


def mask_ips(text: str) -> str:
    # IPv6 first: an address ending in dotted IPv4 (2001:db8::5:1.2.3.4) lost only its IPv4 part the other way.
    return _IPV4.sub("<ip>", _IPV6_CANDIDATE.sub(_mask_v6, text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        out = {
            "severity": record.levelname,
            "message": mask_ips(message),
            "logger": record.name,
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = mask_ips(str(value))
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: int = logging.INFO) -> None:
    """Replace the root handlers with one JSON-lines handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python warnings become JSON log lines too. Off then on: captureWarnings(True) is a no-op when it was
    # already on, even if something (a test harness, a library) has since replaced warnings.showwarning.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    # Beam's type-hint conversions are noise at INFO.
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
