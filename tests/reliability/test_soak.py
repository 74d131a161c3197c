"""A short soak in the suite: the real streaming job through outages, bad input and redeliveries, reconciled.

``make soak`` runs the same code for ten minutes and also judges memory; this
one runs for a minute so CI exercises the fault injection and every
reconciliation check on each change.
"""

from __future__ import annotations

from devtools import soak

SHORT = ["--duration_sec=60", "--bq_outage_sec=12", "--pubsub_outage_sec=6", "--drain_sec=180", "--rate=15"]


def test_a_short_soak_with_outages_loses_nothing_and_forges_nothing(gcp_env, tmp_path, reliability):
    args = soak.parser().parse_args([*SHORT, f"--workdir={tmp_path}"])
    report = soak.run_soak(args, gcp_env["pubsub"].host, gcp_env["bigquery"].url, gcp_env["project"], tmp_path)
    soak.print_report(report)
    checks = {name: c for name, c in report["checks"].items() if name != "memory flat over the run"}
    for name, c in checks.items():
        reliability.record("soak (1 min, in CI)", name, c["tried"], c["handled"], c["detail"])
    assert len(report["faults"]) >= 4, report["faults"]  # both outages began and ended
    failed = {name: c for name, c in checks.items() if c["tried"] != c["handled"]}
    assert not failed, failed
