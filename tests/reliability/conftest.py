"""The reliability report: every reliability test records how many cases it tried and how many were handled.

A test computes ``handled`` from what the pipeline actually produced (dead
letters with a reason, decision ids on the output, rows in a table), records it
with ``reliability.record(...)`` and then asserts ``handled == tried``. At the
end of the session the figures are printed as a table and written to
``out/reliability.json``, so a CI log shows for each category what was tried
and what held, including on failure.
"""

from __future__ import annotations

import collections
import json
import pathlib

import pytest

REPORT_PATH = pathlib.Path(__file__).resolve().parents[2] / "out" / "reliability.json"


class ReliabilityReport:
    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = collections.OrderedDict()

    def record(self, category: str, case: str, tried: int, handled: int, detail: str = "") -> None:
        """One line of the report: ``case`` within ``category``; ``handled`` must come from observed output."""
        self.rows[(category, case)] = {
            "category": category,
            "case": case,
            "tried": int(tried),
            "handled": int(handled),
            "detail": detail,
        }


_REPORT = ReliabilityReport()


@pytest.fixture(scope="session")
def reliability() -> ReliabilityReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter):
    if not _REPORT.rows:
        return
    rows = list(_REPORT.rows.values())
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps(rows, indent=2) + "\n")
    terminalreporter.section("reliability: cases tried / handled correctly")
    width = max(len(f"{r['category']}: {r['case']}") for r in rows)
    for r in rows:
        mark = "ok" if r["tried"] == r["handled"] else "FAILED"
        label = f"{r['category']}: {r['case']}"
        line = f"{label:<{width}}  {r['handled']:>7,} / {r['tried']:<7,} {mark}"
        if r["detail"]:
            line += f"  ({r['detail']})"
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written to {REPORT_PATH}")
