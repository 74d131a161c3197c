"""Rule pack tools: ``validate`` checks a pack exactly as the pipeline will at start-up.

Meant for a rule repository's CI: exit status 0 when the pack is valid, 2
with a message naming file, rule and field when it is not.

Run locally::

    python -m pipelines.rules validate rules/default.yaml --allowlist rules/allowlist.yaml
    python -m pipelines.rules features          # the feature names conditions may use
"""

from __future__ import annotations

import argparse
import sys
import time

from transforms.features import FEATURES
from transforms.rulepack import RulePackError, format_duration, load_rule_pack
from transforms.safeguards import AllowlistError, load_allowlist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rule pack tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="Validate one or more rule pack files.")
    validate.add_argument("paths", nargs="+", help="Rule pack YAML files (local or gs://).")
    validate.add_argument("--allowlist", default=None, help="Also validate this allowlist against the packs' rule ids.")
    sub.add_parser("features", help="List the features rule conditions may reference.")
    args = parser.parse_args(argv)

    if args.command == "features":
        for feature in FEATURES.values():
            print(f"{feature.name:28} {feature.description}")
        return 0
    status = 0
    rule_ids: set[str] = set()
    for path in args.paths:
        try:
            pack = load_rule_pack(path)
        except RulePackError as err:
            print(f"INVALID {err}", file=sys.stderr)
            status = 2
            continue
        rule_ids |= {rule.id for rule in pack.rules}
        print(f"OK {path}: pack {pack.label}, {len(pack.rules)} rules")
        for rule in pack.rules:
            window = format_duration(rule.window_sec)
            extra = f", cap {rule.max_entities_per_window}" if rule.max_entities_per_window else ""
            if rule.expires_ms is not None and rule.expires_ms <= time.time() * 1000:
                extra += ", EXPIRED: shadow only"
            print(f"  {rule.id} v{rule.version} [{rule.mode}] {rule.entity}/{window} -> {rule.action}{extra}")
    if args.allowlist:
        try:
            allowlist = load_allowlist(args.allowlist, rule_ids)
        except AllowlistError as err:
            print(f"INVALID {err}", file=sys.stderr)
            return 2
        print(f"OK {args.allowlist}: {len(allowlist.entries)} allowlist entries")
    return status


if __name__ == "__main__":
    sys.exit(main())
