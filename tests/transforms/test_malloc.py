"""glibc's mmap threshold, fixed for the backtest's processes (transforms.malloc).

Each check runs ``tests/transforms/malloc_probe.py`` in a fresh process, whose malloc nothing else has
touched: after an 8 MiB mapping is freed, is a 2 MiB block still a mapping of its own? With glibc's
moving threshold it is not; with the threshold fixed at 1 MiB it is. The first test shows the probe
tells the two apart on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time

import apache_beam as beam
import psutil
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import PROJECT_ROOT, runner_config_args
from tests.transforms import malloc_probe
from transforms import malloc

PRELUDE = "import json\nfrom tests.transforms.malloc_probe import block_is_mapped\n"


def _glibcs_defaults() -> dict:
    """The test's environment without any malloc setting of its own, so a child starts with glibc's."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return {**environ, "PYTHONPATH": str(PROJECT_ROOT)}


def _run(code: str, env: dict | None = None, args: list[str] = ()) -> dict:
    """``code`` in a fresh Python with the probe imported; the last line it prints, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args],
        env={**_glibcs_defaults(), **(env or {})},
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE_ONLY = "print(json.dumps({'mapped': block_is_mapped()}))"


def test_the_probe_sees_glibcs_moving_threshold_on_this_machine():
    assert _run(PROBE_ONLY) == {"mapped": False}


def test_a_fixed_threshold_maps_blocks_over_it_whatever_was_freed_before():
    code = """
from transforms.malloc import fix_mmap_threshold
fixed = fix_mmap_threshold()
print(json.dumps({"fixed": fixed, "mapped": block_is_mapped(), "again": fix_mmap_threshold()}))
"""
    assert _run(code) == {"fixed": True, "mapped": True, "again": True}


def test_a_threshold_the_user_set_stands():
    code = """
from transforms.malloc import fix_mmap_threshold
print(json.dumps({"fixed": fix_mmap_threshold(), "mapped": block_is_mapped()}))
"""
    # 16 MiB through glibc's variable: the 2 MiB block comes from a heap, and ours must not override it.
    assert _run(code, env={malloc.ENV_VAR: str(16 << 20)}) == {"fixed": False, "mapped": False}


@pytest.mark.parametrize(
    "env",
    [{"MALLOC_TRIM_THRESHOLD_": str(64 << 20)}, {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={16 << 20}"}],
    ids=["trim variable", "tunable"],
)
def test_thresholds_the_user_set_otherwise_stand_too(env):
    code = """
from transforms.malloc import fix_mmap_threshold, mmap_threshold_for_children
import os
with mmap_threshold_for_children():
    children = "MALLOC_MMAP_THRESHOLD_" in os.environ
print(json.dumps({"fixed": fix_mmap_threshold(), "children": children}))
"""
    assert _run(code, env=env) == {"fixed": False, "children": False}


def test_fixing_it_also_undoes_the_trim_threshold_a_moving_one_raised():
    code = """
from tests.transforms.malloc_probe import heap_kept_after_freeing, raise_moving_threshold
from transforms.malloc import fix_mmap_threshold
import sys
raise_moving_threshold()
fixed = fix_mmap_threshold() if sys.argv[-1] == "fix" else None
print(json.dumps({"fixed": fixed, "kept_mib": heap_kept_after_freeing() >> 20}))
"""
    moving = _run(code)
    fixed = _run(code, args=["fix"])
    # The moving threshold's 16 MiB trim threshold keeps the 12 MiB freed; glibc's starting 128 KiB does not.
    assert moving["fixed"] is None and moving["kept_mib"] >= 12
    assert fixed["fixed"] is True and fixed["kept_mib"] <= 2


def test_processes_started_while_open_inherit_the_threshold_and_later_ones_do_not():
    environ: dict = {}
    with malloc.mmap_threshold_for_children(environ):
        inherited = dict(environ)
    assert inherited == {malloc.ENV_VAR: str(malloc.MMAP_THRESHOLD_BYTES)}
    assert environ == {}
    assert _run(PROBE_ONLY, env=inherited) == {"mapped": True}

    users = {malloc.ENV_VAR: "65536"}
    with malloc.mmap_threshold_for_children(users):
        assert users == {malloc.ENV_VAR: "65536"}
    assert users == {malloc.ENV_VAR: "65536"}


@pytest.mark.parametrize(("flag", "mapped"), [([], True), (["--mmap_threshold=moving"], False)])
def test_the_backtest_fixes_its_own_processs_threshold_unless_told_not_to(flag, mapped, tmp_path):
    signals = tmp_path / "signals.jsonl"
    signals.write_text("")
    code = f"""
from pipelines import backtest
backtest.run(["--input", {str(signals)!r}, "--output_dir", {str(tmp_path / "out")!r}, *{flag!r}])
{PROBE_ONLY}
"""
    assert _run(code) == {"mapped": mapped}


@pytest.mark.parametrize(("flag", "inherited"), [([], "1048576"), (["--mmap_threshold=moving"], None)])
def test_the_backtests_local_workers_start_with_it_unless_told_not_to(flag, inherited, tmp_path):
    """Each worker's own environment, read from the system while a two-worker backtest runs."""
    signals = tmp_path / "signals.jsonl"
    signals.write_text("")
    code = f"""
from pipelines import backtest
argv = ["--input", {str(signals)!r}, "--output_dir", {str(tmp_path / "out")!r}, *{flag!r}]
backtest.run(argv, "backtest_local_parallel.yaml")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_glibcs_defaults(),
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner, workers = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        for child in runner.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid not in workers and "sdk_worker_main" in " ".join(child.cmdline()):
                    workers[child.pid] = child.environ().get(malloc.ENV_VAR)
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert len(workers) >= 2, workers  # the two workers (and the shells Beam starts them through)
    assert set(workers.values()) == {inherited}


@pytest.mark.parametrize("opened", [True, False], ids=["opened", "not opened"])
def test_the_local_runners_worker_processes_inherit_it(opened, tmp_path, monkeypatch):
    """What the backtest relies on for its workers: Beam starts them with the runner's environment."""
    monkeypatch.delenv(malloc.ENV_VAR, raising=False)
    options = PipelineOptions(runner_config_args("backtest_local_parallel.yaml"))
    out = tmp_path / "probes"
    with malloc.mmap_threshold_for_children() if opened else contextlib.nullcontext():
        with beam.Pipeline(options=options) as pipeline:
            _ = (
                pipeline
                | beam.Create([0])
                | beam.Map(malloc_probe.in_worker)
                | beam.io.WriteToText(str(out), shard_name_template="", num_shards=1)
            )
    [line] = pathlib.Path(out).read_text().splitlines()
    pid, mapped = line.split()
    assert int(pid) != os.getpid(), "the step ran in the test's own process, not a worker"
    assert mapped == str(opened)
