"""Session fixtures: real emulators on 127.0.0.1, started here and stopped at the end.

A missing emulator is an error with instructions, never a skip. Logs stay in
pytest's temporary folder and their tails are printed when an emulator fails.
"""

from __future__ import annotations

import os

import pytest

from devtools.emulators import BigQueryEmulator, BigtableEmulator, PubSubEmulator, StorageEmulator
from devtools.fake_auth import FakeCredentials

_EMULATOR_ENV = (
    "PUBSUB_EMULATOR_HOST",
    "BIGQUERY_EMULATOR_HOST",
    "BIGTABLE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    emulator = PubSubEmulator(tmp_path_factory.mktemp("pubsub")).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory):
    emulator = BigQueryEmulator(tmp_path_factory.mktemp("bigquery")).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory):
    emulator = BigtableEmulator(tmp_path_factory.mktemp("bigtable")).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def storage_emulator(tmp_path_factory):
    emulator = StorageEmulator(tmp_path_factory.mktemp("storage")).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def gcp_env(pubsub_emulator, bigquery_emulator, bigtable_emulator, storage_emulator):
    """Point every Google client in this process (and its children) at the emulators."""
    creds = FakeCredentials(project=BigQueryEmulator.project).start()
    saved = {name: os.environ.get(name) for name in _EMULATOR_ENV}
    os.environ.update(
        PUBSUB_EMULATOR_HOST=pubsub_emulator.host,
        BIGQUERY_EMULATOR_HOST=bigquery_emulator.url,
        BIGTABLE_EMULATOR_HOST=bigtable_emulator.host,
        STORAGE_EMULATOR_HOST=storage_emulator.url,
        **creds.environment(),
    )
    yield {
        "project": BigQueryEmulator.project,
        "pubsub": pubsub_emulator,
        "bigquery": bigquery_emulator,
        "bigtable": bigtable_emulator,
        "storage": storage_emulator,
    }
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    creds.stop()
