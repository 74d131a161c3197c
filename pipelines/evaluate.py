"""Score decisions against ground-truth labels at the entity level.

An entity counts as *caught* when at least one enforce decision targets it.
For each attack scenario: how many of its labelled entities were caught
(recall) and how many enforced entities of that scenario's rules were attacks
(precision comes in the full report). For look-alikes and legitimate users the
only acceptable number of enforced entities is zero.

Run locally::

    python -m pipelines.evaluate --decisions out/demo/decisions.jsonl --labels out/demo/labels.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Iterable

import orjson


def read_jsonl(path: str) -> Iterable[dict]:
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)


def score(decisions: Iterable[dict], labels: Iterable[dict]) -> dict:
    """Per-scenario caught / total, plus enforced entities that were not attacks."""
    label_of = {(lb["entity_type"], lb["entity_id"]): lb for lb in labels}
    enforced: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for d in decisions:
        if d["mode"] == "enforce":
            enforced[(d["entity_type"], d["entity_id"])].add(d["rule_id"])
    scenarios: dict[str, dict] = {}
    for key, lb in label_of.items():
        entry = scenarios.setdefault(lb["scenario"], {"kind": lb["kind"], "entities": 0, "enforced": 0})
        entry["entities"] += 1
        entry["enforced"] += key in enforced
    wrongly = sorted(
        f"{etype}:{eid} ({label_of.get((etype, eid), {}).get('scenario', 'unlabelled')}) by {', '.join(sorted(rules))}"
        for (etype, eid), rules in enforced.items()
        if label_of.get((etype, eid), {}).get("kind") != "attack"
    )
    return {"scenarios": dict(sorted(scenarios.items())), "enforced_non_attack": wrongly}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", required=True, help="decisions.jsonl from a backtest.")
    parser.add_argument("--labels", required=True, help="labels.jsonl from pipelines.simulate.")
    args = parser.parse_args(argv)
    result = score(read_jsonl(args.decisions), read_jsonl(args.labels))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
