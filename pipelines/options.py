"""Shared option handling: runner configs from ``runner_configs/`` and common defaults."""

from __future__ import annotations

import pathlib

import yaml
from apache_beam.options.pipeline_options import PipelineOptions

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_RULES = str(PROJECT_ROOT / "rules" / "default.yaml")
DEFAULT_ALLOWLIST = str(PROJECT_ROOT / "rules" / "allowlist.yaml")
RUNNER_CONFIGS = PROJECT_ROOT / "runner_configs"


class OptionsError(ValueError):
    """Bad command-line options, reported before any graph is built."""


def runner_config_args(path: str | pathlib.Path) -> list[str]:
    """A runner config (YAML mapping of option -> value) as ``--option=value`` flags.

    Lists become repeated flags (``experiments: [a, b]``); ``true`` becomes a
    bare flag. Flags given on the command line after these override them.
    """
    path = pathlib.Path(path)
    if not path.is_absolute() and not path.exists():
        path = RUNNER_CONFIGS / path
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise OptionsError(f"runner config {path}: {err}") from None
    if not isinstance(doc, dict):
        raise OptionsError(f"runner config {path}: must be a mapping of option names to values")
    args: list[str] = []
    for key, value in doc.items():
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                args.append(f"--{key}")
            elif item is not False and item is not None:
                args.append(f"--{key}={item}")
    return args


class RuleOptions(PipelineOptions):
    """Options every job shares. Beam merges all PipelineOptions subclasses into one
    parser, so an option may be declared only once across the project."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--rules", default=DEFAULT_RULES, help="Rule pack YAML, local or gs:// path.")
        parser.add_argument(
            "--allowlist",
            default=DEFAULT_ALLOWLIST,
            help="Allowlist YAML (entities never enforced against), local or gs:// path; empty for none.",
        )
        parser.add_argument(
            "--rule_overrides",
            default="",
            help="Operators' rule pauses (YAML written by the Mitigation API), local or gs:// path: paused rules "
            "run in shadow. Empty for none.",
        )
        parser.add_argument(
            "--global_cap_per_window",
            type=int,
            default=0,
            help="Circuit breaker: most distinct entities all rules together may enforce against per window; 0 = off.",
        )
        parser.add_argument(
            "--action_memory_max_sec",
            type=int,
            default=31 * 86400,
            help="Seconds an entity's active actions are remembered for the action ladder and cooldowns; 0 = off.",
        )


def load_policy(options: PipelineOptions):
    """The rule pack (with operators' pauses applied) and allowlist named by the options, validated.

    Fails fast, naming file, entry and field.
    """
    from transforms.rulepack import load_rule_overrides, load_rule_pack, paused_rules
    from transforms.safeguards import EMPTY_ALLOWLIST, load_allowlist

    opts = options.view_as(RuleOptions)
    if opts.global_cap_per_window < 0 or opts.action_memory_max_sec < 0:
        raise OptionsError("--global_cap_per_window and --action_memory_max_sec must be >= 0")
    pack = load_rule_pack(opts.rules)
    if opts.rule_overrides:
        pack = paused_rules(pack, load_rule_overrides(opts.rule_overrides, pack.rule_ids))
    allowlist = load_allowlist(opts.allowlist, {r.id for r in pack.rules}) if opts.allowlist else EMPTY_ALLOWLIST
    return pack, allowlist
