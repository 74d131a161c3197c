"""Start the official Pub/Sub and Bigtable emulators, a BigQuery and a Cloud Storage emulator on 127.0.0.1.

Used by the test session fixtures, ``make streaming-local`` and the soak run.
Each emulator gets a free port and a log file; ``start`` waits until it
answers and raises ``EmulatorError`` with the log's tail when it does not.
Nothing here skips: a missing emulator is an error that says how to get it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PUBSUB_LAUNCHER = pathlib.Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
BIGTABLE_LAUNCHER = pathlib.Path("/usr/lib/google-cloud-sdk/platform/bigtable-emulator/cbtemulator")
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
BQ_VENV = PROJECT_ROOT / ".venv-bq"


class EmulatorError(RuntimeError):
    """An emulator is missing or did not come up."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    name = "emulator"

    def __init__(self, workdir: pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_sec: float = 60) -> Emulator:
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.environment(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_sec
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorError(
                    f"{self.name} exited with {self.process.returncode}; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self.ready():
                    return self
            except EmulatorError:
                self.stop()
                raise
            time.sleep(0.2)
        self.stop()
        raise EmulatorError(
            f"{self.name} did not answer within {timeout_sec} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class PubSubEmulator(Emulator):
    """Google's Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator)."""

    name = "pubsub"

    def command(self):
        if not PUBSUB_LAUNCHER.exists():
            raise EmulatorError(
                f"The Pub/Sub emulator is not installed ({PUBSUB_LAUNCHER} is missing). "
                "Install the Debian package google-cloud-cli-pubsub-emulator; it is not on PyPI."
            )
        if shutil.which("java") is None:
            raise EmulatorError("The Pub/Sub emulator needs a Java runtime (java not on PATH).")
        return [str(PUBSUB_LAUNCHER), "--host=127.0.0.1", f"--port={self.port}"]

    def environment(self):
        return {**os.environ, "JAVA_OPTS": "-Xmx256m"}

    def ready(self):
        return b"Server started" in self.log_path.read_bytes()


class BigQueryEmulator(Emulator):
    """``local-bigquery`` (PyPI), run from its own Python 3.13 environment (``make .venv-bq``)."""

    name = "bigquery"
    project = "test-project"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.grpc_port = free_port()
        self.data_dir = self.workdir / "bq-data"
        self.data_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self):
        launcher = BQ_VENV / "bin" / "local-bigquery"
        if not launcher.exists():
            raise EmulatorError(
                f"The BigQuery emulator is not installed ({launcher} is missing). Run `make .venv-bq` "
                "(it needs the pyenv Python 3.13 interpreter)."
            )
        return [
            str(launcher),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--project",
            self.project,
            "--data-dir",
            str(self.data_dir),
        ]

    def environment(self):
        # DuckDB extensions were installed under this HOME by `make .venv-bq`.
        return {**os.environ, "HOME": str(BQ_VENV / "home")}

    def ready(self):
        """200 from the projects list: the first request also runs DuckDB's lazy set-up.

        Any other HTTP answer means that set-up failed, which poisons the
        process (every later request fails), so fail at once with the log.
        """
        try:
            with urllib.request.urlopen(f"{self.url}/bigquery/v2/projects", timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as err:
            raise EmulatorError(
                f"bigquery emulator answered {err.code} while starting; log:\n{self.log_tail()}"
            ) from None
        except OSError:
            return False


class BigtableEmulator(Emulator):
    """Google's Bigtable emulator (Debian package google-cloud-cli-bigtable-emulator); in memory."""

    name = "bigtable"

    def command(self):
        if not BIGTABLE_LAUNCHER.exists():
            raise EmulatorError(
                f"The Bigtable emulator is not installed ({BIGTABLE_LAUNCHER} is missing). "
                "Install the Debian package google-cloud-cli-bigtable-emulator; it is not on PyPI."
            )
        return [str(BIGTABLE_LAUNCHER), "-host", "127.0.0.1", "-port", str(self.port)]

    def ready(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


class StorageEmulator(Emulator):
    """``gcp-storage-emulator`` (PyPI, in requirements-dev.txt), in memory: Cloud Storage for the policy files
    the Mitigation API edits and the streaming job re-reads. Clients reach it through ``STORAGE_EMULATOR_HOST``.

    It ignores preconditions such as ``ifGenerationMatch`` and has no permissions; tests that depend on them put
    a proxy in front of it that supplies them (``StorageProxy`` in ``tests/service/test_policy_in_cloud_storage.py``).
    """

    name = "storage"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self):
        try:
            import gcp_storage_emulator  # noqa: F401, PLC0415 - only checks it is installed
        except ImportError:
            raise EmulatorError(
                "The Cloud Storage emulator is not installed: pip install -r requirements-dev.txt "
                "(gcp-storage-emulator)."
            ) from None
        return [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--in-memory",
        ]

    def ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test-project", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False


def create_topic_with_subscription(publisher, subscriber, project: str, name: str) -> tuple[str, str]:
    """Topic ``name`` and subscription ``name-sub`` on the Pub/Sub emulator; returns their paths."""
    topic = publisher.topic_path(project, name)
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(project, f"{name}-sub")
    subscriber.create_subscription(name=subscription, topic=topic)
    return topic, subscription


def local_streaming_command(
    project: str, subscription: str, decisions_topic: str, dataset: str, *extra: str
) -> list[str]:
    """The command line that runs ``pipelines.streaming`` on the local runner against the emulators' resources."""
    return [
        sys.executable,
        "-m",
        "pipelines.streaming",
        "--runner_config=streaming_local.yaml",
        f"--project={project}",
        f"--input_subscription={subscription}",
        f"--decisions_topic={decisions_topic}",
        f"--audit_table={project}:{dataset}.audit",
        f"--decisions_table={project}:{dataset}.decisions",
        f"--dead_letter_table={project}:{dataset}.dead_letters",
        *extra,
    ]


def stop_job(job: subprocess.Popen, timeout_sec: float = 60) -> None:
    """Stop a job started as a child process: SIGTERM, up to ``timeout_sec`` to exit, then kill."""
    if job.poll() is None:
        job.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.wait(timeout=timeout_sec)
    if job.poll() is None:
        job.kill()
        job.wait()
