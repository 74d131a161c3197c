"""Rule packs: named, described, versioned predicates over features, kept as YAML data.

A rule says *when* (a condition over the feature names in
``transforms.features.FEATURES``) and *what* (an action against one entity
type), plus who owns it and why it exists. Conditions are evaluated by
``simpleeval`` on an AST that the loader has already checked to contain only
comparisons, arithmetic, ``and``/``or``/``not``, numbers, feature names and
``min``/``max``/``abs``: no attribute access, no subscripts, no strings, no
calls to anything else. Python's ``eval`` is never used. A condition whose
first test (``streams >= 40 and ...``) is false is answered from that one
comparison, without walking the tree (``CompiledRule``).

Everything that can be wrong with a pack is found by ``load_rule_pack`` and
reported as ``RulePackError`` naming the file, the rule and the field. Every
part of a condition is run on an all-zero window at load, so a division by a
feature that can be zero is refused; a condition can still fail at run time
on other values (``streams / (logins - 1)`` with one login), and then that
rule's result for that window is dead-lettered while the others run.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import hashlib
import logging
import math
import re
import string
import time
import typing
from collections.abc import Mapping

import yaml
from simpleeval import DEFAULT_OPERATORS, SimpleEval

from schemas import ACTIONS, ENTITY_TYPES, MODES
from transforms.features import FEATURES

_LOGGER = logging.getLogger(__name__)

# Content and creators may be victims of sabotage streams bought by someone
# else, so they are never enforced against automatically, only reviewed.
REVIEW_ONLY_ENTITIES = frozenset({"track", "artist"})
REVIEW_ACTION = "flag_for_review"
# block_ip only makes sense against an IP.
IP_ONLY_ACTIONS = frozenset({"block_ip"})

DEFAULT_TTL_SEC = {
    "flag_for_review": 7 * 86400,
    "exclude_streams": 7 * 86400,
    "throttle": 3600,
    "challenge": 86400,
    "block_ip": 86400,
    "suspend": 30 * 86400,
}
# A decision's expiry must stay a timestamp every sink can write: ttl: 3000000d passed, and its decisions,
# dated past year 9999, failed in every sink's conversion, where a streaming bundle is retried for ever.
MAX_TTL_SEC = 3650 * 86400
MIN_WINDOW_SEC = 60
MAX_WINDOW_SEC = 7 * 86400
_SAFE_FUNCTIONS = {"min": min, "max": max, "abs": abs}
# Real conditions are under 150 characters and a few levels deep. The limits keep a
# hostile or careless condition from costing per-element CPU, or from hitting
# Python's parser and recursion limits (MemoryError, RecursionError) instead of
# failing with a RulePackError.
MAX_CONDITION_CHARS = 1000
MAX_CONDITION_DEPTH = 32
# A decision's reason is one human sentence; a format spec such as {streams:>50000000} must not make every
# decision a 50 MB message. Checked at load on an all-zero window, and cut at run time as a backstop.
MAX_REASON_CHARS = 500
_CONTEXT_NAMES = ("entity_type", "entity_id", "window")
_RULE_ID_RE = re.compile(r"[a-z][a-z0-9_]{2,63}")
_DURATION_RE = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SEC = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_RULE_FIELDS = {
    "id": "unique snake_case name",
    "version": "integer >= 1; bump it whenever the rule's meaning changes",
    "owner": "team or person answerable for the rule",
    "description": "why the rule exists and what abuse it targets",
    "entity": f"one of {', '.join(ENTITY_TYPES)}",
    "window": "fixed window length, e.g. 10m, 1h, 1d",
    "when": "condition over feature names",
    "action": f"one of {', '.join(ACTIONS)}",
    "mode": "enforce (default) or shadow",
    "reason": "one human sentence; may use {feature} placeholders",
    "ttl": "how long the action lasts, e.g. 24h (default depends on the action)",
    "min_events": "signals the window must hold before the rule may enforce (default 1)",
    "expires": "date (YYYY-MM-DD, UTC) after which the rule stops enforcing and runs in shadow",
    "max_entities_per_window": "circuit breaker: most distinct entities enforced per window; more go to shadow",
}
_REQUIRED_FIELDS = ("id", "version", "owner", "description", "entity", "window", "when", "action", "reason")
_ALLOWED_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.UAdd,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Call,
)


def load_yaml(text: str):
    """Policy files' YAML (rule packs, rule overrides, allowlists): ``yaml.SafeLoader``, refusing a key given
    twice in one mapping. YAML's last-one-wins would silently drop a rule's first ``when``, or a whole first
    ``rules:`` list."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:  # PyYAML composes nested collections recursively: "[" * 5000 gets here
            raise yaml.YAMLError("nested too deeply to read") from None
        if root is None:
            return None
        seen_nodes, stack = set(), [root]
        while stack:  # aliases may share nodes, or make a cycle
            node = stack.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, yaml.MappingNode):
                keys = set()
                for key_node, value_node in node.value:
                    # Other keys are refused by the constructor below; a merge key (<<) is YAML's own override.
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        key = loader.construct_object(key_node)
                        if key in keys:
                            problem = f"duplicate key {key!r} (YAML would keep only the last)"
                            raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                        keys.add(key)
                    stack.append(value_node)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
        return loader.construct_document(root)
    finally:
        loader.dispose()


class RulePackError(ValueError):
    """A rule pack that cannot be used. The message names file, rule and field."""

    def __init__(self, source: str, problem: str, rule: str | None = None, field: str | None = None):
        where = source
        if rule is not None:
            where += f": rule '{rule}'"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.source, self.rule, self.field, self.problem = source, rule, field, problem


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule as written in the pack (plain data: pickles small, compiles in setup)."""

    id: str
    version: int
    owner: str
    description: str
    entity: str
    window_sec: int
    when: str
    action: str
    mode: str
    reason: str
    ttl_sec: int
    min_events: int
    features: tuple[str, ...]  # feature names the condition reads, in order of first use
    expires_ms: int | None = None  # end of the expiry date, UTC
    max_entities_per_window: int = 0  # 0 = no per-rule cap
    paused: bool = False  # an operator paused it (rule overrides): runs in shadow, audited as rule_paused


@dataclasses.dataclass(frozen=True)
class RulePack:
    name: str
    version: str
    source: str
    digest: str  # sha256 of the file, so audit rows say exactly which text decided
    rules: tuple[Rule, ...]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def rule_ids(self) -> frozenset[str]:
        return frozenset(r.id for r in self.rules)

    def feature_plan(self) -> dict[int, tuple[str, ...]]:
        """Window size -> entity types that rules read at that size."""
        plan: dict[int, set[str]] = {}
        for rule in self.rules:
            plan.setdefault(rule.window_sec, set()).add(rule.entity)
        return {size: tuple(sorted(types)) for size, types in sorted(plan.items())}


def parse_duration(value, source: str, rule: str, field: str) -> int:
    """'90s', '10m', '1h', '7d' (or a bare number of seconds) to seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match and int(match.group(1)) > 0:
            return int(match.group(1)) * _UNIT_SEC[match.group(2)]
    raise RulePackError(source, f"'{value}' is not a duration such as 90s, 10m, 1h or 7d", rule, field)


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_condition(expr, source: str, rule_id: str) -> tuple[str, tuple[str, ...]]:
    """Parse and vet a condition; return it as the checked tree prints it, and the feature names it reads.

    What runs is printed from the tree checked here (``ast.unparse``), not the
    text with its whitespace squeezed: a ``# comment`` or a backslash line
    break in a multi-line ``when: |`` would otherwise swallow or break the
    rest of the condition after it was checked.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise RulePackError(source, "must be a non-empty condition string", rule_id, "when")
    if len(expr) > MAX_CONDITION_CHARS:
        raise RulePackError(source, f"longer than {MAX_CONDITION_CHARS} characters", rule_id, "when")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise RulePackError(source, f"syntax error at column {err.offset}: {err.msg}", rule_id, "when") from None
    except (ValueError, RecursionError, MemoryError) as err:  # the parser's own limits
        raise RulePackError(source, f"cannot be parsed: {type(err).__name__}", rule_id, "when") from None
    if _depth(tree.body) > MAX_CONDITION_DEPTH:
        raise RulePackError(source, f"nested deeper than {MAX_CONDITION_DEPTH} levels", rule_id, "when")
    callees = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise RulePackError(source, f"'{type(node).__name__}' is not allowed in a condition", rule_id, "when")
        if isinstance(node, ast.Constant) and (
            isinstance(node.value, bool) or not isinstance(node.value, (int, float))
        ):
            raise RulePackError(source, f"only numbers may appear as constants, got {node.value!r}", rule_id, "when")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SAFE_FUNCTIONS or node.keywords:
                raise RulePackError(source, f"only {', '.join(_SAFE_FUNCTIONS)} may be called", rule_id, "when")
        elif isinstance(node, ast.Name) and node.id in _SAFE_FUNCTIONS:
            if id(node) not in callees:  # a bare 'min' would hand a Python function object to the condition
                raise RulePackError(source, f"'{node.id}' may only be called", rule_id, "when")
        elif isinstance(node, ast.Name):
            if node.id not in FEATURES:
                raise RulePackError(
                    source, f"unknown feature '{node.id}' (known: {', '.join(sorted(FEATURES))})", rule_id, "when"
                )
            if node.id not in names:
                names.append(node.id)
    if not names:
        raise RulePackError(source, "the condition reads no feature", rule_id, "when")
    if not _is_boolean(tree.body):
        raise RulePackError(source, "must be a true/false test: comparisons joined by and, or, not", rule_id, "when")
    _check_parts_on_zeros(tree.body, source, rule_id)
    return ast.unparse(tree.body), tuple(names)


def _check_parts_on_zeros(body: ast.expr, source: str, rule_id: str) -> None:
    """Every part of the condition, each on its own, on a window whose features are all zero.

    Every feature can be zero (an entity with no plays, no logins, no IP).
    Checking the whole condition is not enough: ``and`` and ``or`` stop at
    the first answer, so in ``streams >= 40 and logins / payments >= 1`` the
    division by ``payments`` is never reached on zeros, and would fail at run
    time on the very windows the first test lets through. Each part checked
    alone also finds a call with the wrong arguments (``max(streams)``).
    """
    zeros = dict.fromkeys(FEATURES, 0.0)
    evaluator = SimpleEval(functions=dict(_SAFE_FUNCTIONS), names=zeros)
    for node in _parts_innermost_first(body):
        if isinstance(node, (ast.Name, ast.Constant)):
            continue
        part = ast.unparse(node)
        try:
            evaluator.eval(part)
        except Exception as err:  # simpleeval raises many types; each means this part cannot run on zeros
            hint = "; divide by max(feature, 1) or use the ratio features" if "division" in str(err) else ""
            raise RulePackError(
                source, f"'{part}' fails on an all-zero window ({type(err).__name__}: {err}){hint}", rule_id, "when"
            ) from None


def _parts_innermost_first(node: ast.expr):
    """The expression's parts, each after the parts inside it, so an error names the smallest failing part.
    Recursive: the condition was checked to be at most MAX_CONDITION_DEPTH deep."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            yield from _parts_innermost_first(child)
    yield node


def _depth(node: ast.AST) -> int:
    """Nesting depth of expression nodes, without recursion (the tree may be very deep)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr))
    return deepest


def _is_boolean(node: ast.AST) -> bool:
    """True when the expression always yields a bool (so 'a > 1 and b' is refused)."""
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return True
    if isinstance(node, ast.BoolOp):
        return all(_is_boolean(value) for value in node.values)
    return False


def _check_reason(template, features: tuple[str, ...], source: str, rule_id: str) -> None:
    if not isinstance(template, str) or not template.strip():
        raise RulePackError(source, "must be a non-empty sentence", rule_id, "reason")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise RulePackError(source, f"bad placeholder: {err}", rule_id, "reason") from None
    for _, field_name, format_spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in FEATURES and field_name not in _CONTEXT_NAMES:
            raise RulePackError(
                source,
                f"placeholder '{{{field_name}}}' must be a feature name or one of {', '.join(_CONTEXT_NAMES)}",
                rule_id,
                "reason",
            )
        if conversion is not None or "{" in (format_spec or ""):
            raise RulePackError(
                source, f"placeholder '{{{field_name}}}' may only carry a format spec", rule_id, "reason"
            )
    try:
        rendered = template.format_map({**dict.fromkeys(FEATURES, 0.0), **dict.fromkeys(_CONTEXT_NAMES, "x")})
    except (ValueError, TypeError) as err:
        raise RulePackError(source, f"cannot be rendered: {err}", rule_id, "reason") from None
    if len(rendered) > MAX_REASON_CHARS:
        raise RulePackError(
            source,
            f"renders to {len(rendered)} characters on an all-zero window; a reason may have {MAX_REASON_CHARS}",
            rule_id,
            "reason",
        )


def render_reason(
    template: str, features: Mapping[str, float], entity_type: str, entity_id: str, window_sec: int
) -> str:
    """The decision's human sentence. Placeholders were vetted at load time."""
    values = dict(features)
    values.update(entity_type=entity_type, entity_id=entity_id, window=format_duration(window_sec))
    text = template.format_map(values)
    # Checked at load on zeros; a huge feature value or entity id could still make it long.
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "\u2026"


def _rule_from_mapping(raw, source: str, index: int, seen: set[str]) -> Rule:
    if not isinstance(raw, dict):
        raise RulePackError(source, f"rule #{index + 1} must be a mapping")
    rule_id = raw.get("id")
    label = rule_id if isinstance(rule_id, str) else f"#{index + 1}"
    for key in raw:
        if key not in _RULE_FIELDS:
            raise RulePackError(source, f"unknown field (allowed: {', '.join(_RULE_FIELDS)})", label, str(key))
    for key in _REQUIRED_FIELDS:
        if raw.get(key) in (None, ""):
            raise RulePackError(source, f"is required: {_RULE_FIELDS[key]}", label, key)
    if not isinstance(rule_id, str) or not _RULE_ID_RE.fullmatch(rule_id):
        raise RulePackError(source, "must be 3..64 characters of a-z, 0-9 and _, starting with a letter", label, "id")
    if rule_id in seen:
        raise RulePackError(source, "duplicate rule id", rule_id, "id")
    seen.add(rule_id)
    version = raw["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RulePackError(source, "must be an integer >= 1", rule_id, "version")
    for key in ("owner", "description"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise RulePackError(source, "must be non-empty text", rule_id, key)
    entity = raw["entity"]
    if entity not in ENTITY_TYPES:
        raise RulePackError(
            source, f"unknown entity type {entity!r} (known: {', '.join(ENTITY_TYPES)})", rule_id, "entity"
        )
    action = raw["action"]
    if action not in ACTIONS:
        raise RulePackError(source, f"unknown action {action!r} (known: {', '.join(ACTIONS)})", rule_id, "action")
    mode = raw.get("mode", "enforce")
    if mode not in MODES:
        raise RulePackError(source, f"unknown mode {mode!r} (known: {', '.join(MODES)})", rule_id, "mode")
    if entity in REVIEW_ONLY_ENTITIES and action != REVIEW_ACTION:
        raise RulePackError(
            source,
            f"{entity} entities may only get {REVIEW_ACTION}: content and creators are never auto-enforced against",
            rule_id,
            "action",
        )
    if action in IP_ONLY_ACTIONS and entity != "ip":
        raise RulePackError(source, f"{action} applies only to ip entities", rule_id, "action")
    window_sec = parse_duration(raw["window"], source, rule_id, "window")
    if not MIN_WINDOW_SEC <= window_sec <= MAX_WINDOW_SEC or (86400 % window_sec and window_sec % 86400):
        raise RulePackError(
            source, "window must be 1m..7d and divide a day (or be whole days), so windows align", rule_id, "window"
        )
    ttl_sec = parse_duration(raw["ttl"], source, rule_id, "ttl") if "ttl" in raw else DEFAULT_TTL_SEC[action]
    if ttl_sec > MAX_TTL_SEC:
        raise RulePackError(source, f"at most {format_duration(MAX_TTL_SEC)} (ten years)", rule_id, "ttl")
    min_events = raw.get("min_events", 1)
    if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
        raise RulePackError(source, "must be an integer >= 1", rule_id, "min_events")
    when, features = _check_condition(raw["when"], source, rule_id)
    _check_reason(raw["reason"], features, source, rule_id)
    expires_ms = _parse_expiry(raw.get("expires"), source, rule_id)
    cap = raw.get("max_entities_per_window", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise RulePackError(source, "must be an integer >= 0 (0 = no cap)", rule_id, "max_entities_per_window")
    rule = Rule(
        id=rule_id,
        version=version,
        owner=raw["owner"].strip(),
        description=" ".join(raw["description"].split()),
        entity=entity,
        window_sec=window_sec,
        when=when,
        action=action,
        mode=mode,
        reason=raw["reason"].strip(),
        ttl_sec=ttl_sec,
        min_events=min_events,
        features=features,
        expires_ms=expires_ms,
        max_entities_per_window=cap,
    )
    if expires_ms is not None and expires_ms <= time.time() * 1000:
        _LOGGER.warning("%s: rule '%s' expired on %s: it runs in shadow only", source, rule_id, raw["expires"])
    try:
        CompiledRule(rule).matches(dict.fromkeys(FEATURES, 0.0))
    except RuleEvaluationError as err:  # the parts passed; kept as the check of the whole condition's answer
        raise RulePackError(
            source, f"fails on an all-zero window ({err.__cause__ or err}); use the ratio features", rule_id, "when"
        ) from None
    return rule


def expiry_end_ms(value) -> int:
    """A YYYY-MM-DD date (text or a YAML date) to the end of that day, UTC, in epoch ms: the moment a rule's
    or an allowlist entry's ``expires`` day is over. ``ValueError`` says what is wrong with anything else."""
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            value = None
    if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
        raise ValueError("must be a date such as 2027-01-31")
    if value >= dt.date.max:  # its end, the next midnight, is past what a date can hold
        raise ValueError(f"must be a date before {dt.date.max.isoformat()}")
    end = dt.datetime.combine(value + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return int(end.timestamp() * 1000)


def _parse_expiry(value, source: str, rule_id: str) -> int | None:
    if value is None:
        return None
    try:
        return expiry_end_ms(value)
    except ValueError as err:
        raise RulePackError(source, str(err), rule_id, "expires") from None


def parse_rule_pack(text: str, source: str) -> RulePack:
    """Validate a pack's YAML text; ``source`` names it in errors."""
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as err:
        raise RulePackError(source, f"not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise RulePackError(source, "must be a mapping with 'pack', 'version' and 'rules'")
    for key in doc:
        if key not in ("pack", "version", "description", "rules"):
            raise RulePackError(source, f"unknown top-level field '{key}' (allowed: pack, version, description, rules)")
    name, version, raw_rules = doc.get("pack"), doc.get("version"), doc.get("rules")
    if not isinstance(name, str) or not name.strip():
        raise RulePackError(source, "top-level 'pack' (the pack's name) is required")
    if version in (None, ""):
        raise RulePackError(source, "top-level 'version' is required")
    if isinstance(version, (bool, dt.datetime)) or not isinstance(version, (str, int, dt.date)):
        # YAML reads an unquoted 2026.10 as the number 2026.1, and the audit rows would name that. A date
        # (2026-11-28) prints as typed; a timestamp would not.
        raise RulePackError(
            source,
            f"top-level 'version' must be text or a whole number, got {version!r}: quote it so YAML keeps it as typed",
        )
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulePackError(source, "top-level 'rules' must be a non-empty list")
    seen: set[str] = set()
    rules = tuple(_rule_from_mapping(raw, source, i, seen) for i, raw in enumerate(raw_rules))
    return RulePack(
        name=name.strip(),
        version=str(version),
        source=source,
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        rules=rules,
    )


def paused_rules(pack: RulePack, paused: typing.Collection[str]) -> RulePack:
    """The pack with these rules paused: they keep running, in shadow, so their owners still see what they do."""
    if not paused:
        return pack
    rules = tuple(dataclasses.replace(r, paused=r.id in paused) for r in pack.rules)
    return dataclasses.replace(pack, rules=rules)


_OVERRIDE_FIELDS = ("rule", "actor", "reason", "paused_at")


def parse_rule_overrides(text: str, source: str, known_rules: typing.Collection[str]) -> frozenset[str]:
    """Rule ids paused by operators (the Mitigation API writes this file), validated like a pack.

    Format: ``paused: [{rule, actor, reason, paused_at}]``. An unknown rule id
    is refused, so a typo cannot silently leave the intended rule enforcing.
    """
    try:
        doc = load_yaml(text) if text.strip() else {"paused": []}
    except yaml.YAMLError as err:
        raise RulePackError(source, f"not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paused", []), list) or set(doc) - {"paused"}:
        raise RulePackError(source, "must be a mapping with a 'paused' list")
    ids = set()
    for n, entry in enumerate(doc.get("paused") or [], start=1):
        where = f"paused entry #{n}"
        if not isinstance(entry, dict):
            raise RulePackError(source, "must be a mapping", where)
        for key in entry:
            if key not in _OVERRIDE_FIELDS:
                raise RulePackError(source, f"unknown field (allowed: {', '.join(_OVERRIDE_FIELDS)})", where, key)
        for key in ("rule", "actor", "reason"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise RulePackError(source, "is required", where, key)
        if entry["rule"] not in known_rules:
            raise RulePackError(source, f"unknown rule id '{entry['rule']}'", where, "rule")
        ids.add(entry["rule"])
    return frozenset(ids)


def load_rule_overrides(path: str, known_rules: typing.Collection[str]) -> frozenset[str]:
    from apache_beam.io.filesystems import FileSystems  # noqa: PLC0415 - keeps the plain loader import-light

    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except Exception as err:  # Beam wraps filesystem errors in BeamIOError
        raise RulePackError(path, f"cannot be read: {err}") from None
    return parse_rule_overrides(text, path, known_rules)


def load_rule_pack(path: str) -> RulePack:
    """Read and validate a pack from a local path or any Beam filesystem (``gs://``)."""
    from apache_beam.io.filesystems import FileSystems  # noqa: PLC0415 - keeps the plain loader import-light

    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RulePackError(path, f"cannot be read: {err}") from None
    except Exception as err:  # Beam wraps filesystem errors in BeamIOError
        raise RulePackError(path, f"cannot be read: {err}") from None
    return parse_rule_pack(text, path)


class RuleEvaluationError(RuntimeError):
    """A condition raised while evaluating (routed to the dead-letter output)."""


# A condition's first test, when it is ``feature <op> number``, is checked before simpleeval runs, with
# simpleeval's own functions for the comparisons.
_GUARD_OPS = {op: DEFAULT_OPERATORS[op] for op in (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)}


def first_test(node: ast.AST) -> tuple[str, typing.Callable, int | float] | None:
    """``(feature, operator, number)`` when simpleeval's first step on ``node`` is ``feature <op> number``.

    simpleeval evaluates an ``and`` left to right and returns the first false
    value, so a false first test is the whole condition's answer. Only ``and``
    is descended: a false first value of an ``or`` or under a ``not`` decides
    nothing.
    """
    while isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        node = node.values[0]
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.left, ast.Name)
        and isinstance(node.comparators[0], ast.Constant)
        and type(node.comparators[0].value) in (int, float)
        and type(node.ops[0]) in _GUARD_OPS  # the loader refuses 'is' and 'in'; a rule built by hand may not
    ):
        return node.left.id, _GUARD_OPS[type(node.ops[0])], node.comparators[0].value
    return None


class CompiledRule:
    """A rule with its condition parsed once; ``matches`` is the per-window cost.

    Most windows are ordinary and fail a rule's first test (``streams >= 40``
    and the like: every rule of the default pack starts with one). When a
    condition starts with ``feature <op> number`` and the feature is a plain
    float or int, that comparison is made first, as simpleeval would make it
    first; if it is false, so is the condition, and simpleeval's walk of the
    whole tree (1.3 to 2.6 us a condition, benchmarks/README.md) is skipped.
    Anything else (a true first test, another value type, another shape of
    condition) goes to simpleeval, which stays the only evaluator of what a
    condition means and the only source of its errors.
    ``tests/transforms/test_rulepack.py`` checks both paths give the same answer.
    """

    def __init__(self, rule: Rule):
        self.rule = rule
        self._node = SimpleEval.parse(rule.when)
        self._evaluator = SimpleEval(functions=dict(_SAFE_FUNCTIONS), names={})
        # simpleeval's own tree (an expression statement; it evaluates the expression under it), not a second parse.
        self._guard = first_test(self._node.value) if isinstance(self._node, ast.Expr) else None

    def matches(self, features: Mapping[str, float]) -> bool:
        guard = self._guard
        if guard is not None:
            try:
                value = features[guard[0]]  # read as simpleeval reads it
            except Exception:  # absent: simpleeval reports it
                value = None
            # Exact types only (type(), which an object cannot fake): a bool, a str or any other object goes to
            # simpleeval, which may refuse it; a float or an int compares with a number without raising.
            if (type(value) is float or type(value) is int) and guard[1](value, guard[2]) is False:
                return False
        return self._evaluate(features)

    def _evaluate(self, features: Mapping[str, float]) -> bool:
        """The condition through simpleeval alone (what ``matches`` answers, without the first-test shortcut)."""
        self._evaluator.names = features
        try:
            result = self._evaluator.eval(self.rule.when, previously_parsed=self._node)
        except Exception as err:  # simpleeval raises many types; all mean "this condition failed"
            raise RuleEvaluationError(f"rule '{self.rule.id}' condition failed: {err}") from err
        if not isinstance(result, bool):
            raise RuleEvaluationError(
                f"rule '{self.rule.id}' condition returned {type(result).__name__}, not true/false"
            )
        if result:  # a hit's reason, evidence and event count need real numbers; int(nan) would raise out of the step
            bad = sorted(name for name, value in features.items() if not _is_number(value))
            if bad:
                raise RuleEvaluationError(
                    f"rule '{self.rule.id}' matched a window whose features are not finite numbers: {', '.join(bad)}"
                )
        return result


def _is_number(value) -> bool:
    """A finite float, or an int that fits in 64 bits (what a decision's fields and reason can hold)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and -(2**63) <= value < 2**63
