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
records the change as not made. The Cloud Storage emulator the tests use
ignores that condition; the tests put a proxy in front of it that applies
the condition as Cloud Storage does. One host per file remains the supported
deployment (``service/__main__.py``).

A commit that fails may still have been made: the copy applied, its answer
lost, and the client's retry then refused by the condition the first attempt
satisfied. So a failed commit is checked by reading the object back: holding
the staged text, it was made; holding anything else, it was not; unreadable,
``PolicyChangeUnconfirmed``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import stat
import tempfile
import threading
import typing
import uuid

_LOGGER = logging.getLogger(__name__)

GCS_PREFIX = "gs://"
# A Cloud Storage call, retries included, gives up within about this long: a waiting operator and a held file
# lock are worse than a fast 503 (the Bigtable and BigQuery calls have the same kind of bound). The client's
# retry checks its deadline only before it starts another attempt, and an attempt runs to its own timeout, so
# each gets half: a call ends within one retry deadline plus one attempt.
GCS_DEADLINE_SEC = 10.0


class PolicyFileUnwritable(RuntimeError):
    """The new file could not be staged beside the old one, or the staged file could not replace it."""


class PolicyPathError(ValueError):
    """A policy file's path names no file the API can edit (a ``gs://`` path without an object name)."""


class PolicyFileUnreadable(RuntimeError):
    """The policy file's store did not answer or refused a read, or its bucket does not exist: 503."""


class PolicyFileNotText(ValueError):
    """The policy file is not UTF-8 text: a person must fix it (409), as a file that is not valid YAML."""


class PolicyChangeUnconfirmed(RuntimeError):
    """The staged file may or may not have replaced the old one: the commit failed and reading the file back
    failed too. The change's audit row stands; whoever retries must read the file first."""


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
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
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
        except UnicodeDecodeError as err:
            raise PolicyFileNotText(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start})") from None

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
    """What a Cloud Storage call raises when the service refuses, fails or cannot be reached, or a download's
    checksum does not match."""
    import requests
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud.storage.exceptions import DataCorruption

    return (api_exceptions.GoogleAPIError, requests.RequestException, auth_exceptions.GoogleAuthError, DataCorruption)


def _private_lock_dir() -> pathlib.Path:
    """This user's lock directory in the host's temp directory, made private (0700). Lock files there are named
    by a digest of their ``gs://`` path, so another user could otherwise make or hold one first."""
    directory = pathlib.Path(tempfile.gettempdir()) / f"mitigation-api-locks-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise PolicyPathError(f"cannot make the policy lock directory {directory}: {err}") from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PolicyPathError(f"{directory} must be a directory of this user's that only it can use (0700)")
    return directory


class _Staged(typing.NamedTuple):
    name: str  # the temp object's name in the bucket
    text: str


class GcsPolicyFile:
    """A policy file in Cloud Storage: staged as a temp object beside it, committed by a server-side copy
    conditional on the generation it was read at, so readers (the streaming job) see the old object or the new.

    The lock file is in a private directory of this user's in the host's temp directory, named by a digest of
    the ``gs://`` path."""

    def __init__(self, path: str, project: str | None):
        bucket, _, name = path[len(GCS_PREFIX) :].partition("/")
        if not bucket or not name or name.endswith("/"):
            raise PolicyPathError(f"{path} is not a gs://BUCKET/OBJECT path")
        self.path = path
        self._bucket_name, self._name, self._project = bucket, name, project
        directory, _, base = name.rpartition("/")
        self._staging_prefix = f"{directory}/.{base}." if directory else f".{base}."
        digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
        self.lock = _HostLock(_private_lock_dir() / f"{digest}.lock")
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

        half = GCS_DEADLINE_SEC / 2
        return {"timeout": half, "retry": DEFAULT_RETRY.with_timeout(half)}

    def read(self) -> Snapshot:
        """A missing object reads as empty (no entries); the first commit creates it. A missing bucket is
        ``PolicyFileUnreadable``: a mistyped bucket must not list as an empty allowlist."""
        try:
            bucket = self._bucket()
            blob = bucket.get_blob(self._name, **self._call_options())
            if blob is None:
                # A missing bucket also answers None: listing raises NotFound for it. (Listing needs only object
                # permissions, where asking whether the bucket exists would need storage.buckets.get.)
                next(iter(bucket.list_blobs(max_results=1, prefix=self._name, **self._call_options())), None)
                return Snapshot("")
            generation = int(blob.generation)  # before the download, which resets it from headers it may lack
            data = blob.download_as_bytes(if_generation_match=generation, **self._call_options())
        except _gcs_errors() as err:
            raise PolicyFileUnreadable(f"{self.path}: {type(err).__name__}: {err}") from err
        try:
            return Snapshot(data.decode("utf-8"), generation)
        except UnicodeDecodeError as err:
            raise PolicyFileNotText(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start})") from None

    def stage(self, text: str) -> _Staged:
        staged = _Staged(f"{self._staging_prefix}{uuid.uuid4().hex}.tmp", text)
        try:
            self._bucket().blob(staged.name).upload_from_string(
                text.encode("utf-8"), content_type="application/yaml", if_generation_match=0, **self._call_options()
            )
        except _gcs_errors() as err:
            raise PolicyFileUnwritable(f"{self.path}: {type(err).__name__}: {err}") from err
        return staged

    def commit(self, staged: _Staged, snapshot: Snapshot) -> None:
        """Copy the staged object over the file, only if the file is still at the generation it was read at
        (0: only if there is still none); then delete the staged object. A failed copy that the file shows was
        made anyway (its answer lost, the retry refused) counts as made (module docstring)."""
        try:
            bucket = self._bucket()
            bucket.copy_blob(
                bucket.blob(staged.name),
                bucket,
                self._name,
                if_generation_match=snapshot.generation,
                **self._call_options(),
            )
        except _gcs_errors() as err:
            if not self._holds(staged.text, err):
                raise PolicyFileUnwritable(f"{self.path}: {type(err).__name__}: {err}") from err
            _LOGGER.warning("a policy file copy reported %s but had been made", type(err).__name__)
        self.discard(staged)

    def _holds(self, text: str, failure: BaseException) -> bool:
        """Whether the file now holds ``text``; ``PolicyChangeUnconfirmed`` if it cannot be read."""
        try:
            return self.read().text == text
        except (PolicyFileUnreadable, PolicyFileNotText) as err:
            raise PolicyChangeUnconfirmed(
                f"{self.path}: the copy failed ({type(failure).__name__}) and the file could not be read back ({err})"
            ) from err

    def discard(self, staged: _Staged) -> None:
        """Delete a staged object; a failure leaves a small ``.tmp`` object beside the file, logged, not raised."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        try:
            self._bucket().blob(staged.name).delete(**self._call_options())
        except NotFound:
            pass
        except _gcs_errors() as err:
            _LOGGER.warning("a staged policy object was left behind: %s: %s", staged.name, type(err).__name__)


PolicyFile = LocalPolicyFile | GcsPolicyFile


def policy_file(path: str, project: str | None = None) -> PolicyFile:
    """The policy file at ``path``: a ``gs://BUCKET/OBJECT`` path (in ``project``'s Cloud Storage), or local."""
    if path.startswith(GCS_PREFIX):
        return GcsPolicyFile(path, project)
    return LocalPolicyFile(path)
