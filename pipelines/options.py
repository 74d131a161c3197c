"""Shared option handling: runner configs from ``runner_configs/`` and common defaults."""

from __future__ import annotations

import argparse
import difflib
import math
import pathlib

import yaml
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

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
        items = value if isinstance(value, list) else [value]
        if key == "setup_file":  # the configs' ./setup.py is the checkout's, wherever the command runs
            items = [
                str(PROJECT_ROOT / v) if isinstance(v, str) and not pathlib.Path(v).is_absolute() else v for v in items
            ]
        for item in items:
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


def _options_parser() -> _BeamArgumentParser:
    """The parser Beam builds from every options class (``PipelineOptions.get_all_options``)."""
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in PipelineOptions.__subclasses__():
        cls._add_argparse_args(parser)
    return parser


def reject_unknown(flags: list[str]) -> None:
    """Fail on a flag no options class declares. Beam only logs a warning and runs with the defaults, so
    ``--rule candidate.yaml`` would backtest the default pack (a diff against itself shows no change)."""
    parser = _options_parser()
    _, unknown = parser.parse_known_args(flags)
    if not unknown:
        return
    known = [s for action in parser._actions for s in action.option_strings]
    problems = []
    for i, arg in enumerate(unknown):
        name = arg.split("=", 1)[0]
        if not name.startswith("-"):
            if not (i and unknown[i - 1].startswith("-") and "=" not in unknown[i - 1]):  # else: that flag's value
                problems.append(f"{arg!r} (not an option)")
            continue
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise OptionsError(f"unknown option(s): {', '.join(problems)}")


def require_finite(options, *names: str) -> None:
    """Float options must be numbers: nan passes every < 0 check (a reload interval of nan re-read the
    policy files on every element)."""
    for name in names:
        if not math.isfinite(getattr(options, name)):
            raise OptionsError(f"--{name} must be a finite number of seconds")


def print_help(prog: str, *option_classes) -> None:
    """``--help`` for an entry point: Beam's own parser knows none of the job's options at that point."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--runner_config", help="YAML file in runner_configs/ with runner options.")
    for cls in option_classes:
        cls._add_argparse_args(parser)
    parser.epilog = "Any other Beam or Dataflow pipeline option may be added (see Beam's PipelineOptions)."
    parser.print_help()
