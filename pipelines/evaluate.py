"""How good are the rules? Score backtest decisions against ground-truth labels, and diff rule packs.

``score`` works at the entity level: an entity is *enforced* when at least one
enforce decision targets it. For each attack scenario, recall is the share of
its labelled entities enforced, and precision is the share of attack entities
among everything enforced by the rules that caught the scenario. An
unlabelled entity counts against precision, which is the conservative choice.
Look-alikes and legitimate users must have zero enforced entities.

Time to first decision is measured in event time: from the first signal of
any entity in the scenario to the first enforce decision against one of its
entities. In a backtest, a decision is stamped at its window's end.

``python -m pipelines.evaluate report`` writes ``report.json`` and a
self-contained ``report.html`` with its plots embedded as PNG images.
``python -m pipelines.evaluate diff`` compares the decisions of two rule packs
on the same data, which is the "diff before you deploy" step.

Run locally::

    python -m pipelines.evaluate report --decisions out/eval/decisions.jsonl --audit out/eval/audit.jsonl \\
        --labels out/eval/labels.jsonl --output_dir out/eval
    python -m pipelines.evaluate diff --before out/a/decisions.jsonl --after out/b/decisions.jsonl
"""

from __future__ import annotations

import argparse
import base64
import collections
import html
import io
import json
import pathlib
import sys
from collections.abc import Iterable

import orjson

from transforms.parse import parse_rfc3339_ms


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    with open(path, "rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _enforced(decisions: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for d in decisions:
        if d["mode"] == "enforce":
            out[(d["entity_type"], d["entity_id"])].append(d)
    return out


def score(decisions: Iterable[dict], labels: Iterable[dict], audit: Iterable[dict] = ()) -> dict:
    """Per-scenario and per-rule quality figures (see module docstring)."""
    decisions = list(decisions)
    label_of = {(lb["entity_type"], lb["entity_id"]): lb for lb in labels}
    enforced = _enforced(decisions)
    rules_of = {key: {d["rule_id"] for d in ds} for key, ds in enforced.items()}

    def kind(key) -> str:
        return label_of.get(key, {}).get("kind", "unlabelled")

    by_scenario: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for key, lb in label_of.items():
        by_scenario[lb["scenario"]].append(key)

    scenarios = {}
    for name, keys in sorted(by_scenario.items()):
        scenario_kind = label_of[keys[0]]["kind"]
        caught = [k for k in keys if k in enforced]
        entry = {"kind": scenario_kind, "entities": len(keys), "enforced": len(caught)}
        if scenario_kind == "attack":
            catching_rules = set().union(*(rules_of[k] for k in caught)) if caught else set()
            by_those_rules = [k for k, rules in rules_of.items() if rules & catching_rules]
            true_pos = sum(1 for k in by_those_rules if kind(k) == "attack")
            starts = [parse_rfc3339_ms(label_of[k]["first_seen"]) for k in keys if label_of[k].get("first_seen")]
            firsts = [min(parse_rfc3339_ms(d["decided_at_ms"]) for d in enforced[k]) for k in caught]
            entry.update(
                recall=_ratio(len(caught), len(keys)),
                precision=_ratio(true_pos, len(by_those_rules)),
                rules=sorted(catching_rules),
                minutes_to_first_decision=round((min(firsts) - min(starts)) / 60_000, 1) if firsts and starts else None,
            )
        scenarios[name] = entry

    rules: dict[str, dict] = {}
    for key, ds in enforced.items():
        for rule_id in {d["rule_id"] for d in ds}:
            entry = rules.setdefault(rule_id, {"enforced_entities": 0, "by_kind": collections.Counter()})
            entry["enforced_entities"] += 1
            entry["by_kind"][kind(key)] += 1
    for d in decisions:
        rules.setdefault(d["rule_id"], {"enforced_entities": 0, "by_kind": collections.Counter()})
    for rule_id, entry in rules.items():
        entry["by_kind"] = dict(entry["by_kind"])
        entry["precision"] = _ratio(entry["by_kind"].get("attack", 0), entry["enforced_entities"])
        entry["decisions"] = sum(1 for d in decisions if d["rule_id"] == rule_id)
        entry["shadow_decisions"] = sum(1 for d in decisions if d["rule_id"] == rule_id and d["mode"] == "shadow")

    audit_status: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in audit:
        audit_status[row["rule_id"]][row["status"]] += 1

    wrongly = sorted(
        f"{etype}:{eid} ({label_of.get((etype, eid), {}).get('scenario', 'unlabelled')}) by {', '.join(sorted(rs))}"
        for (etype, eid), rs in rules_of.items()
        if kind((etype, eid)) != "attack"
    )
    return {
        "scenarios": scenarios,
        "rules": dict(sorted(rules.items())),
        "audit_status_by_rule": {rule: dict(counts) for rule, counts in sorted(audit_status.items())},
        "lookalikes_enforced": sum(e["enforced"] for e in scenarios.values() if e["kind"] == "lookalike"),
        "legit_enforced": sum(e["enforced"] for e in scenarios.values() if e["kind"] == "legit"),
        "enforced_non_attack": wrongly,
    }


def diff(before: Iterable[dict], after: Iterable[dict]) -> dict:
    """Entities newly enforced against, and no longer enforced against, when a pack changes."""
    old, new = _enforced(before), _enforced(after)

    def rows(keys, source):
        return [
            {"entity": f"{t}:{i}", "rules": sorted({d["rule_id"] for d in source[(t, i)]})} for t, i in sorted(keys)
        ]

    newly = set(new) - set(old)
    dropped = set(old) - set(new)
    return {
        "enforced_before": len(old),
        "enforced_after": len(new),
        "newly_enforced": rows(newly, new),
        "no_longer_enforced": rows(dropped, old),
        "unchanged": len(set(old) & set(new)),
    }


# --- the report ------------------------------------------------------------------------
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(decisions: list[dict], scores: dict) -> dict[str, str]:
    """Base64 PNGs: decisions over time per rule, and precision/recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    per_rule: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for d in decisions:
        hour = parse_rfc3339_ms(d["decided_at_ms"]) // 3_600_000 * 3600
        per_rule[d["rule_id"]][hour] += 1
    fig, ax = plt.subplots(figsize=(10, 4.5))
    start = min((h for c in per_rule.values() for h in c), default=0)
    for rule, counts in sorted(per_rule.items()):
        hours = sorted(counts)
        ax.plot([(h - start) / 3600 for h in hours], [counts[h] for h in hours], marker="o", markersize=3, label=rule)
    ax.set_xlabel("hours since the first decision (event time)")
    ax.set_ylabel("decisions per hour")
    ax.set_title("Decisions over time, per rule")
    ax.legend(fontsize=7, ncol=2)
    images["decisions_over_time"] = _png(fig)
    plt.close(fig)

    attack = {n: e for n, e in scores["scenarios"].items() if e["kind"] == "attack"}
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(attack)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [attack[n]["precision"] or 0 for n in names], width=0.4, label="precision")
    ax.bar([x + 0.2 for x in xs], [attack[n]["recall"] or 0 for n in names], width=0.4, label="recall")
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.90, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_title("Precision and recall per attack scenario (entity level)")
    ax.legend()
    images["scenario_quality"] = _png(fig)
    plt.close(fig)

    rules = scores["rules"]
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(rules)
    ax.bar(range(len(names)), [rules[n]["precision"] or 0 for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Precision per rule (enforced entities that are attacks)")
    images["rule_precision"] = _png(fig)
    plt.close(fig)
    return images


def render_html(scores: dict, images: dict[str, str], title: str) -> str:
    esc = html.escape

    def table(headers, rows):
        head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    scenario_rows = [
        (
            name,
            e["kind"],
            f"{e['enforced']}/{e['entities']}",
            e.get("precision", ""),
            e.get("recall", ""),
            e.get("minutes_to_first_decision", ""),
            ", ".join(e.get("rules", [])),
        )
        for name, e in scores["scenarios"].items()
    ]
    rule_rows = [
        (
            rule,
            e["decisions"],
            e["enforced_entities"],
            e["precision"],
            json.dumps(e["by_kind"]),
            json.dumps(scores["audit_status_by_rule"].get(rule, {})),
        )
        for rule, e in scores["rules"].items()
    ]
    imgs = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(name)}</figcaption></figure>"
        for name, data in images.items()
    )
    scenario_headers = ["scenario", "kind", "enforced/entities", "precision", "recall", "minutes to first decision"]
    rule_headers = ["rule", "decisions", "enforced entities", "precision", "entities by kind", "audit statuses"]
    verdict = (
        "No enforce decision against look-alikes or legitimate users."
        if not scores["enforced_non_attack"]
        else "Enforced against non-attack entities: " + "; ".join(scores["enforced_non_attack"])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{esc(title)}</h1>
<p><strong>{esc(verdict)}</strong></p>
<h2>Scenarios</h2>
{table([*scenario_headers, "rules"], scenario_rows)}
<h2>Rules</h2>
{table(rule_headers, rule_rows)}
<h2>Plots</h2>
{imgs}
</body></html>
"""


def write_report(decisions_path, labels_path, output_dir, audit_path=None, title="Rule quality report") -> dict:
    decisions = read_jsonl(decisions_path)
    audit = read_jsonl(audit_path) if audit_path else []
    scores = score(decisions, read_jsonl(labels_path), audit)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    (out / "report.html").write_text(render_html(scores, plots(decisions, scores), title))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="Score decisions against labels; write report.json and report.html.")
    rep.add_argument("--decisions", required=True, help="decisions.jsonl from a backtest.")
    rep.add_argument("--labels", required=True, help="labels.jsonl from pipelines.simulate.")
    rep.add_argument("--audit", default=None, help="audit.jsonl, for suppressed and below-evidence counts.")
    rep.add_argument("--output_dir", required=True, help="Where report.json and report.html go.")
    rep.add_argument("--title", default="Rule quality report", help="Report heading.")
    rep.add_argument(
        "--min_precision", type=float, default=None, help="Exit 1 if any attack scenario's precision is below this."
    )
    rep.add_argument(
        "--min_recall", type=float, default=None, help="Exit 1 if any attack scenario's recall is below this."
    )
    dif = sub.add_parser("diff", help="What changes between two packs' decisions on the same data.")
    dif.add_argument("--before", required=True, help="decisions.jsonl with the current pack.")
    dif.add_argument("--after", required=True, help="decisions.jsonl with the candidate pack.")
    args = parser.parse_args(argv)
    if args.command == "diff":
        print(json.dumps(diff(read_jsonl(args.before), read_jsonl(args.after)), indent=2))
        return 0
    scores = write_report(args.decisions, args.labels, args.output_dir, args.audit, args.title)
    print(json.dumps({k: scores[k] for k in ("scenarios", "lookalikes_enforced", "legit_enforced")}, indent=2))
    failures = gate(scores, args.min_precision, args.min_recall)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"report: {pathlib.Path(args.output_dir) / 'report.html'}")
    return 1 if failures else 0


def gate(scores: dict, min_precision: float | None, min_recall: float | None) -> list[str]:
    """Targets a rule pack must meet; any enforce decision against a non-attack entity fails."""
    failures = [f"enforced against a non-attack entity: {row}" for row in scores["enforced_non_attack"]]
    for name, entry in scores["scenarios"].items():
        if entry["kind"] != "attack":
            continue
        if min_precision is not None and (entry["precision"] or 0) < min_precision:
            failures.append(f"{name}: precision {entry['precision']} < {min_precision}")
        if min_recall is not None and (entry["recall"] or 0) < min_recall:
            failures.append(f"{name}: recall {entry['recall']} < {min_recall}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
