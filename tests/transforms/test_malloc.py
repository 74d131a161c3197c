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

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import PROJECT_ROOT, runner_config_args
from tests.transforms import malloc_probe
from transforms import malloc


def _run(code: str, env: dict | None = None) -> dict:
    """``code`` in a fresh Python with the probe imported; the last line it prints, as JSON."""
    environ = {k: v for k, v in os.environ.items() if k != malloc.ENV_VAR}
    environ["PYTHONPATH"] = str(PROJECT_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", "import json\nfrom tests.transforms.malloc_probe import block_is_mapped\n" + code],
        env={**environ, **(env or {})},
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
