"""Where the Mitigation API reads and writes a policy file: a local path, or a Cloud Storage object.

The streaming job on Dataflow re-reads its allowlist and rule overrides from
``gs://`` (``pipelines/streaming.py`` refuses local paths there, since its
workers cannot read the launching machine's disk). Given the same ``gs://``
paths, the API edits those objects, so an operator's pause or allowlist entry
reaches the job at its next policy reload (``transforms/policy.py``), with no
copying step in between. Local paths serve the local job and tests.

Both kinds change a file in the same steps, which ``service.app`` drives around
its audit row: ``read`` (the text and what it was read at), ``stage`` the new
text beside the old (a failure here means nothing was audited or changed),
audit, then ``commit`` it in one step that readers see as old or new, or
``discard`` it. Changes to one file are serialised by ``lock``: across this
process's threads and the other processes of ``python -m service --workers N``
on this host (an ``flock`` on a local lock file).

Across hosts: a Cloud Storage commit is conditional on the object's
generation when it was read (``if_generation_match``), so a change made
meanwhile by another host is refused rather than overwritten, and the API
records the change as not made. The Cloud Storage emulator used by the tests
ignores that condition, so this guard is untested here; one host per file
remains the supported deployment (``service/__main__.py``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import tempfile
import threading
import typing
import uuid

_LOGGER = logging.getLogger(__name__)

GCS_PREFIX = "gs://"
# Cloud Storage calls, retries included, give up after this long: a waiting operator and a held file lock are
# worse than a fast 503 (the Bigtable and BigQuery calls have the same kind of bound).
GCS_DEADLINE_SEC = 10.0


class PolicyFileUnwritable(RuntimeError):
    """The new file could not be staged beside the old one, or the staged file could not replace it."""


class PolicyPathError(ValueError):
    """A policy file's path names no file the API can edit (a ``gs://`` path without an object name)."""


class PolicyFileUnreadable(RuntimeError):
    """The policy file's store did not answer or refused a read: the API answers 503."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A policy file's text as read, and the Cloud Storage generation it was read at (0: no object yet, or a
    local file, whose lock alone keeps it from changing)."""

    text: str
    generation: int = 0


class _HostLock:
    """A thread lock, then an exclusive ``flock`` on ``path`` (made on first use): one change at a time to a
    file across this process's threads and the other processes on this host."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            self._thread_lock.release()
            raise PolicyFileUnwritable(f"{type(err).__name__}: {err}") from err
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info) -> None:
        try:
            os.close(self._fd)  # closing the descriptor drops the flock
        finally:
            self._thread_lock.release()


class LocalPolicyFile:
    """A policy file on this host's disk: staged as a temp file in its directory, committed by a rename.

    The lock file is ``.NAME.lock`` beside it."""

    def __init__(self, path: str):
        self.path = path
        self._target = pathlib.Path(path)
        self.lock = _HostLock(self._target.parent / f".{self._target.name}.lock")

    def read(self) -> Snapshot:
        """A missing file reads as empty (no entries); the first commit creates it."""
        try:
            return Snapshot(self._target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Snapshot("")

    def stage(self, text: str) -> str:
        target = self._target
        try:
            mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as err:
            raise PolicyFileUnwritable(f"{type(err).__name__}: {err}") from err
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
        except OSError as err:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise PolicyFileUnwritable(f"{type(err).__name__}: {err}") from err
        return tmp

    def commit(self, staged: str, snapshot: Snapshot) -> None:
        """Replace the file with the staged one (a rename: readers see old or new), then make the rename durable.
        A rename refused (a file bind-mounted on its own: EBUSY) is ``PolicyFileUnwritable``."""
        try:
            os.replace(staged, self._target)
        except OSError as err:
            raise PolicyFileUnwritable(f"{type(err).__name__}: {err}") from err
        directory = os.open(self._target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def discard(self, staged: str) -> None:
        pathlib.Path(staged).unlink(missing_ok=True)


def _gcs_errors() -> tuple[type[BaseException], ...]:
    """What a Cloud Storage call raises when the service refuses, fails or cannot be reached."""
    import requests
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    return (api_exceptions.GoogleAPIError, requests.RequestException, auth_exceptions.GoogleAuthError)


class GcsPolicyFile:
    """A policy file in Cloud Storage: staged as a temp object beside it, committed by a server-side copy
    conditional on the generation it was read at, so readers (the streaming job) see the old object or the new.

    The lock file is in this host's temp directory, named by a digest of the ``gs://`` path."""

    def __init__(self, path: str, project: str | None):
        bucket, _, name = path[len(GCS_PREFIX) :].partition("/")
        if not bucket or not name or name.endswith("/"):
            raise PolicyPathError(f"{path} is not a gs://BUCKET/OBJECT path")
        self.path = path
        self._bucket_name, self._name, self._project = bucket, name, project
        directory, _, base = name.rpartition("/")
        self._staging_prefix = f"{directory}/.{base}." if directory else f".{base}."
        digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
        self.lock = _HostLock(pathlib.Path(tempfile.gettempdir()) / f"mitigation-api-policy-{digest}.lock")
        self._client = None
        self._client_lock = threading.Lock()

    def _bucket(self):
        with self._client_lock:
            if self._client is None:
                from google.cloud import storage  # noqa: PLC0415 - only when a policy file is in Cloud Storage

                self._client = storage.Client(project=self._project)
        return self._client.bucket(self._bucket_name)

    @staticmethod
    def _call_options() -> dict[str, typing.Any]:
        from google.cloud.storage.retry import DEFAULT_RETRY  # noqa: PLC0415

        return {"timeout": GCS_DEADLINE_SEC, "retry": DEFAULT_RETRY.with_timeout(GCS_DEADLINE_SEC)}

    def read(self) -> Snapshot:
        """A missing object reads as empty (no entries); the first commit creates it."""
        try:
            bucket = self._bucket()
            blob = bucket.get_blob(self._name, **self._call_options())
            if blob is None:
                return Snapshot("")
            generation = int(blob.generation)  # before the download, which resets it from headers it may lack
            data = blob.download_as_bytes(if_generation_match=generation, **self._call_options())
        except _gcs_errors() as err:
            raise PolicyFileUnreadable(f"{self.path}: {type(err).__name__}: {err}") from err
        return Snapshot(data.decode("utf-8"), generation)

    def stage(self, text: str) -> str:
        staged = f"{self._staging_prefix}{uuid.uuid4().hex}.tmp"
        try:
            self._bucket().blob(staged).upload_from_string(
                text.encode("utf-8"), content_type="application/yaml", if_generation_match=0, **self._call_options()
            )
        except _gcs_errors() as err:
            raise PolicyFileUnwritable(f"{self.path}: {type(err).__name__}: {err}") from err
        return staged

    def commit(self, staged: str, snapshot: Snapshot) -> None:
        """Copy the staged object over the file, only if the file is still at the generation it was read at
        (0: only if there is still none); then delete the staged object."""
        try:
            bucket = self._bucket()
            bucket.copy_blob(
                bucket.blob(staged), bucket, self._name, if_generation_match=snapshot.generation, **self._call_options()
            )
        except _gcs_errors() as err:
            raise PolicyFileUnwritable(f"{self.path}: {type(err).__name__}: {err}") from err
        self.discard(staged)

    def discard(self, staged: str) -> None:
        """Delete a staged object; a failure leaves a small ``.tmp`` object beside the file, logged, not raised."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        try:
            self._bucket().blob(staged).delete(**self._call_options())
        except NotFound:
            pass
        except _gcs_errors() as err:
            _LOGGER.warning("a staged policy object was left behind: %s: %s", staged, type(err).__name__)


PolicyFile = LocalPolicyFile | GcsPolicyFile


def policy_file(path: str, project: str | None = None) -> PolicyFile:
    """The policy file at ``path``: a ``gs://BUCKET/OBJECT`` path (in ``project``'s Cloud Storage), or local."""
    if path.startswith(GCS_PREFIX):
        return GcsPolicyFile(path, project)
    return LocalPolicyFile(path)
