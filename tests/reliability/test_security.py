"""Security review as executable tests: each test tries the attack and records what held (category "security").

No eval/exec on rule or input data; rule conditions cannot reach Python objects or the filesystem; payload
size and per-key state are bounded; no credentials in the repo; logs hold no raw IPs.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import pathlib
import pickle
import re
import signal
import subprocess
import warnings

import yaml
from apache_beam.pvalue import TaggedOutput

from pipelines.logs import setup_logging
from pipelines.options import DEFAULT_RULES
from schemas.features import EntityFeatures
from tests.kit import payload
from tests.kit import signal as make_signal
from transforms import features as F
from transforms.distinct import REGISTERS, HyperLogLog
from transforms.parse import MAX_DEAD_LETTER_BYTES, MAX_PAYLOAD_BYTES, ParseSignalFn
from transforms.policy import Policy, PolicySource
from transforms.rulepack import CompiledRule, RuleEvaluationError, RulePackError, load_rule_pack, parse_rule_pack
from transforms.rules import ApplyRulesFn, RuleHit

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAT = "security"


def repo_files(*pathspec: str) -> list[pathlib.Path]:
    """Tracked files plus untracked, non-ignored ones: everything the next commit could contain."""
    cmd = ["git", "ls-files", "--cached", "--others", "--exclude-standard", *pathspec]
    names = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / n for n in sorted(set(names)) if (ROOT / n).is_file()]


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError instead of hanging (pytest runs tests in the main thread)."""

    def expire(*_):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- 1. No eval/exec/unsafe deserialisation in production code -------------------------------------------------
BANNED = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.load", "marshal.loads"}
BANNED |= {"os.system", "os.popen", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts, node = [node.attr, *parts], node.value
    return ".".join([aliases.get(node.id, node.id), *parts]) if isinstance(node, ast.Name) else ""


def unsafe_calls(source: str, filename: str) -> list[str]:
    """``file:line: name`` of each banned call, resolving ``import x as y`` and ``from x import y``."""
    tree, aliases, found = ast.parse(source, filename), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            prefix = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
            aliases.update({a.asname or a.name: prefix + a.name for a in node.names})
    for node in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name, kw = _dotted(node.func, aliases), {k.arg: k.value for k in node.keywords}
        loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
        unsafe_yaml = name == "yaml.load" and (loader is None or _dotted(loader, aliases) != "yaml.SafeLoader")
        shell = name.startswith("subprocess.") and getattr(kw.get("shell"), "value", False) is not False
        if name.removeprefix("builtins.") in BANNED or unsafe_yaml or shell:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


PLANTED = """import pickle, subprocess, yaml
from marshal import loads as ml
eval(x); exec(x); compile(x, "f", "exec"); __import__(x); pickle.loads(x); ml(x)
yaml.load(x); yaml.load(x, Loader=yaml.Loader); subprocess.run(x, shell=True)
yaml.safe_load(x); yaml.load(x, Loader=yaml.SafeLoader); subprocess.run([x], shell=False); re.compile(x)
"""


def test_no_eval_exec_or_unsafe_loads_outside_tests(reliability):
    assert len(unsafe_calls(PLANTED, "planted.py")) == 9, "the scanner must see every planted call"
    files = [str(p.relative_to(ROOT)) for p in repo_files("*.py") if p.relative_to(ROOT).parts[0] != "tests"]
    findings = [f for name in files for f in unsafe_calls((ROOT / name).read_text(), name)]
    clean = sum(not any(f.startswith(f"{name}:") for f in findings) for name in files)
    reliability.record(CAT, "python files without eval/exec/unsafe loads/shell=True", len(files), clean)
    assert clean == len(files), findings


# --- 2. Rule conditions cannot reach Python objects or the filesystem -------------------------------------------
HOSTILE_CONDITIONS = [
    "__import__('os').system('touch MARKER')",
    "open('MARKER', 'w').write('x') > 0",
    "open('/etc/passwd').read() != ''",
    "().__class__.__bases__[0].__subclasses__()",
    "features.__class__ == 0",
    "''.__class__.__mro__[1] == 0",
    "streams.real > 1",
    "abs.__self__ == 0",
    "(lambda: 1)() > streams",
    "sum(x for x in range(10**9)) > streams",
    "[x for x in (streams,)][0] > 1",
    "9**9**9 > streams",
    "'a' * 10**10 > streams",
    "streams > 0 or '" + "A" * 100_000 + "' == ''",
    "(x := streams) > 1",
    "f'{streams.__class__}' == ''",
    "getattr(streams, '__class__') == 0",
    "globals()['__builtins__'] == 0",
    "type(streams) == float",
    "streams['__class__'] > 1",
    "exec('import os') == 0",
    "unknown_function(streams) > 1",
    "not_a_feature > 1",
    "__builtins__ > 1",
    "min == min and streams > 1",  # a bare reference hands a Python function to the condition
    "max(streams, key=abs) > 1",
    "min(*[streams]) > 1",
    "streams in (1, 2) or streams is None",
    "streams > 1 if 1 else 0",
    "streams > 1; __import__('os').system('touch MARKER')",
    "streams > 1\n__import__('os').system('touch MARKER')",
    "-" * 5000 + "streams > 1",  # MemoryError in the parser
    "-" * 300 + "streams > 1",  # short, but deep enough for RecursionError on a worker's deeper stack
    " + ".join(["streams"] * 20_000) + " > 1",  # RecursionError in the parser
    "streams > 1 and " * 5000 + "streams > 1",  # seconds of CPU per element
    "streams > " + " * ".join(["9" * 4000] * 50),  # a 200,000-digit product per element
]
# Placeholders that walk attributes, index, convert, nest or name no feature.
HOSTILE_REASONS = "{streams.__class__} {streams.__class__.__mro__} {entity_id.__class__.__init__.__globals__}".split()
HOSTILE_REASONS += "{streams[0]} {0} {} {streams!r} {streams:{entity_id}} {__builtins__}".split()
# The shape of stream_farm_exclude in rules/default.yaml.
RULE = dict(version=1, owner="security-review", description="Written by an attacker.", entity="user", window="1h")


def _rule(rule_id: str, when: str = "streams >= 40", reason: str = "{streams:.0f} plays in an hour.") -> dict:
    return {"id": rule_id, **RULE, "when": when, "min_events": 40, "action": "exclude_streams", "reason": reason}


def _pack_text(*rules: dict) -> str:
    return yaml.safe_dump({"pack": "hostile", "version": "1", "rules": list(rules)}, sort_keys=False, width=1 << 30)


def _not_rejected(tmp_path, field: str, rules: list[dict]) -> list[str]:
    """Load each one-rule pack; return the cases NOT refused with a RulePackError naming file, rule and field."""
    missed = []
    for rule in rules:
        path = tmp_path / f"{rule['id']}.yaml"
        path.write_text(_pack_text(rule))
        try:
            load_rule_pack(str(path))
            missed.append(f"{rule['id']}: ACCEPTED {rule[field][:60]!r}")
        except RulePackError as err:
            if not all(n in str(err) for n in (str(path), f"rule '{rule['id']}'", f"field '{field}'")):
                missed.append(f"{rule['id']}: vague error {err}")
        except Exception as err:  # a crash instead of a RulePackError
            missed.append(f"{rule['id']}: raised {type(err).__name__} {str(err)[:60]}")
    return missed


def test_malicious_conditions_and_reasons_are_rejected_at_load_without_side_effects(tmp_path, reliability):
    marker = tmp_path / "pwned"
    (tmp_path / "benign.yaml").write_text(_pack_text(_rule("benign_rule")))
    assert load_rule_pack(str(tmp_path / "benign.yaml")).rules  # the template alone is valid
    when = [_rule(f"hostile_{i:02d}", when=c.replace("MARKER", str(marker))) for i, c in enumerate(HOSTILE_CONDITIONS)]
    with deadline(10):
        missed = _not_rejected(tmp_path, "when", when)
    handled = 0 if marker.exists() else len(when) - len(missed)
    reliability.record(CAT, "malicious rule conditions rejected at load", len(when), handled, "; ".join(missed))
    reasons = [_rule(f"reason_{i:02d}", reason=r) for i, r in enumerate(HOSTILE_REASONS)]
    missed_reasons = _not_rejected(tmp_path, "reason", reasons)
    handled = len(reasons) - len(missed_reasons)
    reliability.record(CAT, "malicious reason templates rejected", len(reasons), handled, "; ".join(missed_reasons))
    assert not marker.exists() and missed == [] and missed_reasons == []


def test_python_yaml_tags_in_a_rule_pack_are_refused(tmp_path, reliability):
    marker = tmp_path / "pwned"
    tags = [f'!!python/object/apply:os.system ["touch {marker}"]', "!!python/name:os.system", "!!python/object:x {}"]
    handled = 0
    for i, tag in enumerate(tags):
        path = tmp_path / f"tag_{i}.yaml"
        path.write_text(_pack_text(_rule("tagged_rule")).replace("streams >= 40", tag))
        try:
            load_rule_pack(str(path))
        except RulePackError as err:
            handled += str(path) in str(err) and "not valid YAML" in str(err) and not marker.exists()
    reliability.record(CAT, "python/* YAML tags in a rule pack refused", len(tags), handled)
    assert handled == len(tags)


# EntityFeatures carries floats (compute_features applies float()), so these go through the whole rule step;
# huge ints can only reach a condition, and are tried there.
HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0]
HUGE_INTS = [10**4000, -(10**4000), 2**64]


def _survives(call) -> bool:
    """True when ``call`` returns within 2 s or raises RuleEvaluationError (which the rule step dead-letters)."""
    try:
        with deadline(2):
            call()
    except RuleEvaluationError:
        return True
    except Exception:  # anything else escapes the rule step: not handled
        return False
    return True


def test_hostile_feature_values_never_escape_the_rule_step(reliability):
    pack = load_rule_pack(DEFAULT_RULES)
    divider = parse_rule_pack(_pack_text(_rule("divides_at_runtime", when="streams / (logins - 1) >= 0")), "x.yaml")
    pack = dataclasses.replace(pack, rules=pack.rules + divider.rules, digest="hostile")
    fn = ApplyRulesFn(PolicySource(Policy(pack)), "event")
    fn.setup()
    tried, handled, out = 0, 0, []
    for size, entity_types in pack.feature_plan().items():
        for entity, value in itertools.product(entity_types, HOSTILE_FLOATS):
            # Every feature hostile; or only streams (read by most rules), with logins=1 to divide by zero.
            for features in (dict.fromkeys(F.FEATURES, value), {**dict.fromkeys(F.FEATURES, 50.0), "logins": 1.0}):
                ef = EntityFeatures(entity, "e1", size, 0, size * 1000, features | {"streams": value}, [], 0)
                tried += 1
                handled += _survives(lambda ef=ef: out.extend(fn.process(ef)))
    for rule, value in itertools.product(pack.rules, HUGE_INTS):  # no Pow in conditions: no blow-up
        tried += 1
        handled += _survives(lambda r=rule, v=value: CompiledRule(r).matches(dict.fromkeys(F.FEATURES, v)))
    dead = sum(isinstance(o, TaggedOutput) and o.value.reason == "rule_evaluation_error" for o in out)
    hits = sum(isinstance(o, RuleHit) for o in out)
    reliability.record(CAT, "hostile feature values, rule step", tried, handled, f"{hits} hits, {dead} dead-lettered")
    assert handled == tried and hits + dead == len(out)


# --- 3. Payload size -------------------------------------------------------------------------------------------
def _padded(size: int) -> bytes:
    base = payload("stream")
    return base[:-1] + b',"pad":"' + b"x" * (size - len(base) - 9) + b'"}'


def test_payloads_over_the_size_limit_are_dead_lettered_with_a_size_reason(reliability):
    fn = ParseSignalFn("security-test")
    assert len(_padded(MAX_PAYLOAD_BYTES)) == MAX_PAYLOAD_BYTES
    assert list(fn.process(_padded(MAX_PAYLOAD_BYTES)))[0].event_type == "stream"  # at the limit: a signal
    oversized = [_padded(MAX_PAYLOAD_BYTES + 1), _padded(2 * MAX_PAYLOAD_BYTES), b"[" * (10 << 20)]
    oversized.append("é" * (MAX_PAYLOAD_BYTES // 2 + 1))  # a file line: fewer characters than the limit, more bytes
    handled = 0
    with deadline(5):
        for raw in oversized:
            (out,) = fn.process(raw)
            dead = out.value if isinstance(out, TaggedOutput) else None
            # Kept whole up to 64 KiB, so a 10 MB message still makes a dead-letter row BigQuery accepts.
            kept = raw if isinstance(raw, bytes) else raw.encode()
            handled += (
                dead is not None
                and dead.reason == "payload_too_large"
                and dead.raw_payload == kept[:MAX_DEAD_LETTER_BYTES]
                and f"{len(kept)} bytes" in dead.detail
            )
    reliability.record(CAT, "payloads over MAX_PAYLOAD_BYTES dead-lettered", len(oversized), handled)
    assert handled == len(oversized)


# --- 4. Per-key state stays bounded ----------------------------------------------------------------------------
SETS = ("users", "devices", "ips", "tracks", "artists", "playlists", "cards", "countries")
BOUNDS = dict.fromkeys(SETS, F.DISTINCT_CAP) | {"trace_ids": F.TRACE_SAMPLE}
BOUNDS |= dict.fromkeys(("stream_artists", "stream_tracks", "playlist_artists"), F.TOP_CAP)
# Features whose distinct values outgrow the cap in _flood(50_000), with how many there are: each is estimated.
ESTIMATED = {"distinct_users": 50_000, "distinct_devices": 50_000, "distinct_ips": 50_000}
ESTIMATED |= {"distinct_tracks": 30_000, "distinct_artists": 20_000, "distinct_playlists": 10_000}
ESTIMATED |= {"distinct_cards": 10_000}


PER_KIND_IDS = {"stream": ("track_id", "artist_id"), "playlist_add": ("track_id", "artist_id", "playlist_id")}
PER_KIND_IDS["payment"] = ("card_fingerprint",)


def _flood(n: int) -> list:
    """n signals for one key, each naming a never-seen user, device, IP and track/artist, playlist or card."""
    base = {k: make_signal(k) for k in ("stream", "playlist_add", "payment", "login")}
    out = []
    for i in range(n):
        kind = ("stream", "stream", "playlist_add", "payment", "login")[i % 5]
        ids = {"user_id": f"u{i}", "device_id": f"d{i}", "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
        ids |= {field: f"{field[0]}{i}" for field in PER_KIND_IDS.get(kind, ())}
        out.append(base[kind]._replace(trace_id=f"tr{i:06d}", **ids))
    return out


def _fold(signals) -> F.Accumulator:
    acc = F.Accumulator()
    for s in signals:
        F.add_signal(acc, s)
    return acc


def _bounded(acc: F.Accumulator, name: str, cap: int) -> bool:
    """A bounded field holds at most ``cap`` values, or is a distinct-value field's fixed-size sketch (a
    distinct-value field may hold a lone value itself; None is empty)."""
    value = getattr(acc, name)
    if name in SETS:
        return len(value.registers) == REGISTERS if isinstance(value, HyperLogLog) else F.distinct_count(value) <= cap
    return len(value or ()) <= cap


def test_distinct_values_per_key_are_bounded(reliability):
    signals = _flood(50_000)
    cuts = [0, 7, 1_000, 9_999, 20_000, 33_333, 49_000, 50_000]
    parts = [_fold(signals[a:b]) for a, b in itertools.pairwise(cuts)]
    merged = F.merge([F.merge(parts[:3]), F.merge(parts[3:])])  # partial accumulators, merged in two levels
    tried = handled = 0
    for acc in (_fold(signals), merged):
        tried += len(BOUNDS) + len(ESTIMATED)
        handled += sum(_bounded(acc, name, cap) for name, cap in BOUNDS.items())
        features = F.compute_features(acc, 3600)
        handled += sum(abs(features[name] / n - 1) < 0.05 for name, n in ESTIMATED.items())  # sketches' estimates
    # After 25,000 signals every set has seen more than DISTINCT_CAP values (cards and playlists: 5,000 each).
    size_25k, size_50k = (len(pickle.dumps(_fold(signals[:n]))) for n in (25_000, 50_000))
    tried, handled = tried + 1, handled + (size_50k <= size_25k * 1.01)
    detail = f"pickled accumulator {size_25k:,} B after 25,000 distinct-valued signals, {size_50k:,} B after 50,000"
    reliability.record(CAT, "per-key state bounded under 50,000 distinct values", tried, handled, detail)
    assert handled == tried, detail


# --- 5. No credentials in the repo -----------------------------------------------------------------------------
# Written so that no line here matches its own pattern; nothing is allow-listed.
SECRET_PATTERNS = {
    "private key PEM": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "service-account private_key value": re.compile(r'"private_key"\s*:\s*"'),
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Google OAuth token": re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    "GitHub token": re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[0-9A-Za-z]{36}\b|\bgithub_pat_[0-9A-Za-z_]{40,}"),
    "password literal": re.compile(r"""password\s*[=:]\s*['"][^'"]+""", re.IGNORECASE),
}
PLANTED_SECRETS = ["-----BEGIN RSA " + "PRIVATE KEY-----", '{"private_key"' + ': "k"}', "AKIA" + "A" * 16]
PLANTED_SECRETS += ["ya29." + "a" * 30, "AIza" + "b" * 35, "ghp_" + "c" * 36, "password" + ' = "hunter2"']


def test_no_credentials_in_the_repo(reliability):
    assert all(any(p.search(s) for s in PLANTED_SECRETS) for p in SECRET_PATTERNS.values()), "a pattern misses"
    text_files = [p for p in repo_files() if b"\0" not in p.read_bytes()]
    files = {str(p.relative_to(ROOT)): p.read_text(errors="replace") for p in text_files}
    hits = [
        f"{name}:{text[: m.start()].count(chr(10)) + 1}: {label}"
        for name, text in files.items()
        for label, pattern in SECRET_PATTERNS.items()
        for m in pattern.finditer(text)
    ]
    # fake_auth.py writes a throwaway service account: its key must be generated at run time, never embedded.
    fake_auth = files["devtools/fake_auth.py"]
    made_here = "generate_private_key(" in fake_auth and "pem = key.private_bytes(" in fake_auth
    no_blob = not re.search(r"[A-Za-z0-9+/]{64,}", fake_auth)  # no base64 key material anywhere in the file
    generated = re.findall(r'"private_key":\s*(\w+),', fake_auth) == ["pem"] and made_here and no_blob
    handled = len(files) - len({h.split(":")[0] for h in hits}) + generated
    reliability.record(CAT, "text files free of credentials; fake_auth key made at run time", len(files) + 1, handled)
    assert hits == [] and generated, hits


# --- 6. Logs hold no raw IPs -----------------------------------------------------------------------------------
IPS = ["203.0.113.9", "198.51.100.23", "2001:db8:85a3::8a2e:370:7334", "2001:db8::1", "fe80::1", "::1"]
IPS += ["2001:0db8:0000:0000:0000:ff00:0042:8329", "2001:DB8::beef", "192.0.2.44"]


def test_logs_hold_no_raw_ips(reliability):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(logging.INFO)  # what the jobs' entry points do
    stream = io.StringIO()
    root.handlers[0].setStream(stream)
    log = logging.getLogger("security.test")
    v4, v4b, v6, v6b, link_local, loopback, full, upper, warned = IPS
    try:
        log.warning("blocked %s after 40 failures from %s.", v4, v6)  # in args, and before a full stop
        log.info(f"entity ip:{v6b} key ip_{v4b} url http://[{full}]:443/ zone {link_local}%eth0 lo {loopback}")
        log.warning("tripped", extra={"rule_id": f"r {v4}", "trace_id": upper, "decision_id": v6, "entity_id": v4})
        try:
            raise ValueError(f"cannot reach {v6b} or {v4b}")
        except ValueError:
            log.exception("call failed")  # exception text
        # Python warnings become log lines too. Called directly: pytest records warnings raised inside a test.
        warnings.showwarning(UserWarning(f"slow peer {warned}"), UserWarning, __file__, 1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["message"] for line in lines)
    leaked = [ip for ip in IPS if ip.lower() in stream.getvalue().lower()]
    reliability.record(CAT, "IPs in log messages, args, extra, exceptions, warnings", len(IPS), len(IPS) - len(leaked))
    assert leaked == [], stream.getvalue()
