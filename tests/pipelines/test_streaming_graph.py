"""The streaming job's graph, built by the real DataflowRunner with --dry_run (offline, no job submitted)."""

import os
import pathlib

import pytest

from pipelines.options import OptionsError
from pipelines.streaming import decision_message, make_pipeline

SNAPSHOT = pathlib.Path(__file__).with_name("streaming_steps.txt")
ARGS = [
    "--runner=DataflowRunner",
    "--dry_run=True",
    "--project=my-project",
    "--region=europe-west1",
    "--temp_location=gs://my-bucket/tmp",
    "--staging_location=gs://my-bucket/staging",
    "--input_subscription=projects/my-project/subscriptions/signals",
    "--decisions_topic=projects/my-project/topics/decisions",
    "--audit_table=my-project:mitigation.audit",
    "--decisions_table=my-project:mitigation.decisions",
    "--dead_letter_table=my-project:mitigation.dead_letters",
    # The checkout's rule pack and allowlist, read at launch: workers could not re-read them (gs:// would be
    # read at launch too, and this machine is offline). Reloading does not change the graph.
    "--policy_reload_sec=0",
]
TEST_ONLY = ("TestStream", "Create", "assert_that", "Impulse", "_TestStream")


@pytest.fixture(scope="module")
def transforms():
    pipeline, _ = make_pipeline(ARGS, None)
    result = pipeline.run()
    proto = result.job.proto_pipeline
    return {t.unique_name: t.spec.urn for t in proto.components.transforms.values()}


def step_names(transforms) -> list[str]:
    """Step names three levels deep (ComputeFeatures/Window3600s/Aggregate): what --update matches state by."""
    return sorted({name for name in transforms if name.count("/") <= 2 and not name.startswith("ref_")})


def test_graph_uses_dataflow_native_pubsub_and_bigquery(transforms):
    urns = set(transforms.values())
    assert "beam:transform:pubsub_read:v1" in urns
    assert "beam:transform:pubsub_write:v1" in urns
    assert sum(1 for urn in transforms.values() if urn == "beam:transform:write_to_big_query:v0") == 3


def test_no_test_only_transforms_in_the_production_graph(transforms):
    leaked = [name for name in transforms if any(marker in name for marker in TEST_ONLY)]
    assert leaked == []


def test_step_names_match_the_snapshot(transforms):
    """A renamed step breaks `--update` of a running job unless a --transform_name_mapping is given.

    If the rename is intended, regenerate the snapshot and ship the mapping with the release:
    UPDATE_SNAPSHOT=1 make test
    """
    names = step_names(transforms)
    if os.environ.get("UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text("\n".join(names) + "\n")
    assert names == SNAPSHOT.read_text().split()


@pytest.mark.parametrize(
    "drop, replace, message",
    [
        ("--input_subscription", None, "--input_subscription is required"),
        ("--decisions_topic", "--decisions_topic=decisions", "not of the form projects/P/topics/T"),
        ("--audit_table", "--audit_table=audit", "not of the form PROJECT:DATASET.TABLE"),
    ],
)
def test_bad_options_fail_before_building(drop, replace, message):
    args = [a for a in ARGS if not a.startswith(drop)] + ([replace] if replace else [])
    with pytest.raises(OptionsError, match=message):
        make_pipeline(args, None)


def test_decision_message_carries_filter_attributes():
    from tests.schemas.test_schemas import _decision

    msg = decision_message(_decision())
    assert msg.attributes == {
        "action": "exclude_streams",
        "entity_type": "user",
        "rule_id": "r",
        "mode": "enforce",
        "decision_id": "d1",
    }
    assert b'"window_start_ms":"2026-11-02T00:00:00.000Z"' in msg.data


def test_storage_write_api_is_selectable_and_reaches_the_expansion_service():
    """STORAGE_WRITE_API needs Beam's Java expansion service, which is downloaded at graph
    construction and cannot be fetched here; reaching that step shows the option selects it."""
    with pytest.raises(RuntimeError, match="expansion-service"):
        make_pipeline([*ARGS, "--bigquery_write_method=STORAGE_WRITE_API"], None)


def test_runner_configs_parse_into_flags():
    from pipelines.options import runner_config_args

    flags = runner_config_args("streaming_dataflow.yaml")
    assert "--runner=DataflowRunner" in flags and "--streaming" in flags and "--enable_streaming_engine" in flags
    assert runner_config_args("streaming_local.yaml") == ["--runner=BundleBasedDirectRunner", "--streaming"]


def test_flex_template_metadata_describes_every_job_option():
    import argparse
    import json

    from pipelines.options import PROJECT_ROOT, RuleOptions
    from pipelines.streaming import StreamingOptions

    metadata = json.loads((PROJECT_ROOT / "runner_configs" / "flex_template" / "metadata.json").read_text())
    described = {p["name"]: p for p in metadata["parameters"]}
    for cls in (StreamingOptions, RuleOptions):
        parser = argparse.ArgumentParser()
        cls._add_argparse_args(parser)
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                name = action.option_strings[0].lstrip("-")
                assert name in described, f"{name} is missing from the Flex Template metadata"
                assert described[name]["helpText"], name


def test_the_optional_features_table_adds_one_sink_and_keeps_the_other_step_names(transforms):
    pipeline, _ = make_pipeline([*ARGS, "--features_table=my-project:mitigation.features"], None)
    proto = pipeline.run().job.proto_pipeline
    with_features = {t.unique_name: t.spec.urn for t in proto.components.transforms.values()}
    assert sum(1 for urn in with_features.values() if urn == "beam:transform:write_to_big_query:v0") == 4
    added = set(step_names(with_features)) - set(step_names(transforms))
    assert added and all(name.startswith(("ToFeatureRow", "WriteFeatureRows")) for name in added)
    assert set(step_names(transforms)) <= set(step_names(with_features))


def test_a_feature_row_is_a_valid_bigquery_row():
    from pipelines.streaming import feature_row
    from schemas import FEATURE_ROW_SCHEMA, to_bigquery_row
    from schemas.features import EntityFeatures

    ef = EntityFeatures("user", "u1", 60, 0, 60_000, {"events": 3.0, "streams": 2.0}, ["t1"], 59_000)
    row = to_bigquery_row(FEATURE_ROW_SCHEMA, feature_row(ef))
    assert row["event_count"] == 3 and row["window_start_ms"] == "1970-01-01T00:00:00.000Z"
    assert row["features"] == [{"key": "events", "value": 3.0}, {"key": "streams", "value": 2.0}]


def test_the_optional_bigtable_instance_adds_the_state_sink_and_keeps_the_other_step_names(transforms):
    pipeline, opts = make_pipeline([*ARGS, "--bigtable_instance=my-instance"], None)
    assert opts.bigtable_table == "mitigations"
    proto = pipeline.run().job.proto_pipeline
    with_bigtable = {t.unique_name: t.spec.urn for t in proto.components.transforms.values()}
    added = set(step_names(with_bigtable)) - set(step_names(transforms))
    assert {"WriteActiveMitigations", "WriteActiveMitigations/ToRows", "WriteActiveMitigations/Write"} <= added
    assert all(name.startswith("WriteActiveMitigations") for name in added)
    assert set(step_names(transforms)) <= set(step_names(with_bigtable))
    # The pure-Python writer: no cross-language (expansion service) transform in the graph.
    assert not any("schematransform" in urn or "external" in urn for urn in with_bigtable.values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bigtable_instance=Bad_Instance"], "is not a Bigtable instance id"),
        (["--bigtable_instance=short"], "is not a Bigtable instance id"),  # 5 characters; 6 is the minimum
        (["--bigtable_instance=my-instance-"], "is not a Bigtable instance id"),
        (["--bigtable_instance=my-instance", "--bigtable_table=.hidden"], "is not a Bigtable table id"),
    ],
)
def test_bad_bigtable_options_fail_before_building(extra, message):
    with pytest.raises(OptionsError, match=message):
        make_pipeline([*ARGS, *extra], None)


def test_the_bigtable_sink_needs_a_project():
    args = [a for a in ARGS if not a.startswith(("--project", "--runner", "--dry_run"))]
    with pytest.raises(OptionsError, match="needs --project"):
        make_pipeline([*args, "--bigtable_instance=my-instance"], None)


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--runner=DataflowRunner"], "--rules"),  # the checkout's default pack: workers cannot re-read it
        (["--runner=DataflowRunner", "--rules=gs://b/rules.yaml"], "--allowlist"),  # the default allowlist
        (["--runner=DataflowRunner", "--rules=gs://b/r.yaml", "--allowlist=", "--rule_overrides=/tmp/o.yaml"], None),
        (["--runner=DataflowRunner", "--rules=gs://b/r.yaml", "--allowlist=gs://b/a.yaml"], ""),
        (["--runner=DataflowRunner", "--policy_reload_sec=0"], ""),  # nothing is re-read
        (["--runner=BundleBasedDirectRunner"], ""),  # local: the workers are this machine
    ],
)
def test_on_dataflow_policy_files_workers_re_read_must_be_on_gcs(flags, refused):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.streaming import validate_reload_paths

    options = PipelineOptions(flags)
    if refused == "":
        validate_reload_paths(options)
        return
    with pytest.raises(OptionsError, match=f"{refused or '--rule_overrides'} .* is not a gs:// path"):
        validate_reload_paths(options)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rule", "candidate.yaml"], r"unknown option\(s\): --rule \(did you mean --rules\?\)$"),
        (["--early_firing=5"], r"--early_firing \(did you mean --early_firing_sec\?\)"),
        (["stray"], r"'stray' \(not an option\)"),
        (["--policy_reload_sec=nan"], "--policy_reload_sec must be a finite number"),
        (["--ladder_hold_sec=inf"], "--ladder_hold_sec must be a finite number"),
    ],
)
def test_a_mistyped_or_meaningless_option_fails_before_building(extra, message):
    """Beam only warns about a flag it does not know and runs on the defaults."""
    with pytest.raises(OptionsError, match=message):
        make_pipeline([*ARGS, *extra], None)


def test_help_lists_the_jobs_own_options(capsys):
    from pipelines import backtest, streaming

    assert streaming.main(["--help"]) == 0
    assert "--input_subscription" in capsys.readouterr().out
    assert backtest.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "--dedupe_shards_per_hour" in out and "--rules" in out


def test_runner_configs_setup_file_is_the_checkouts_wherever_the_command_runs(tmp_path, monkeypatch):
    from pipelines.options import PROJECT_ROOT, runner_config_args

    monkeypatch.chdir(tmp_path)
    assert f"--setup_file={PROJECT_ROOT / 'setup.py'}" in runner_config_args("streaming_dataflow.yaml")


def test_the_sdist_dataflow_stages_for_setup_file_carries_what_setup_py_reads(tmp_path):
    """Beam runs ``setup.py sdist`` for --setup_file and workers pip-install the result: setup.py reads
    requirements.txt, so without it in the sdist every worker failed to start. Builds the sdist as Beam
    does, unpacks it elsewhere and runs setup.py there, as pip does first, then compiles the fold and the value
    checks there as pip does when it builds the package."""
    import subprocess
    import sys
    import tarfile

    from pipelines.options import PROJECT_ROOT

    build = subprocess.run(
        # A fresh egg-info: setuptools would otherwise reuse a checkout's old SOURCES.txt, whatever MANIFEST.in says.
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(tmp_path),
            "sdist",
            "--dist-dir",
            str(tmp_path / "dist"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    (root,) = (tmp_path / "src").iterdir()
    info = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path / "src")],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert info.returncode == 0, info.stderr
    requires = (tmp_path / "src" / "streamguard.egg-info" / "requires.txt").read_text()
    assert "apache-beam[gcp]==2.77.0" in requires
    assert sorted(p.name for p in (root / "schemas").glob("*.avsc")), "the schemas ship with the package"
    assert {p.name for p in (root / "transforms").glob("*.pxd")} == {"fold.pxd", "accept.pxd"}, "declarations ship"
    # A worker compiles the fold and the value checks as it installs the package (pyproject.toml's build
    # requirements bring Cython).
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    probe = "import transforms.fold as f, transforms.accept as a; print(f.COMPILED, f.__file__, a.COMPILED, a.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        env={"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    fold_compiled, fold_path, accept_compiled, accept_path = imported.stdout.split()
    assert fold_compiled == accept_compiled == "True", imported.stdout
    assert fold_path.startswith(str(root)) and accept_path.startswith(str(root)), imported.stdout
