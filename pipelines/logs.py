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
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
# Candidates with two or more colons; only those that parse as IPv6 are masked (times like 10:00:00 do not).
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?![\w:])")


def _mask_v6(match: re.Match) -> str:
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return match.group(0)
    return "<ip>"


def mask_ips(text: str) -> str:
    return _IPV6_CANDIDATE.sub(_mask_v6, _IPV4.sub("<ip>", text))


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
    logging.captureWarnings(True)  # Python warnings become JSON log lines too
    # Beam's type-hint conversions are noise at INFO.
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
