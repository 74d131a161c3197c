"""The Mitigation API against the real emulators: Bigtable for state, BigQuery for decisions and audit, Pub/Sub.

Backends are shared by the session (one dataset, topic and Bigtable table);
each test gets its own app over fresh copies of the allowlist and rule
overrides files, so file edits never leak between tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import socket
import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient
from google.cloud import bigtable, pubsub_v1

from devtools.emulators import create_topic_with_subscription
from pipelines import provision
from pipelines.options import DEFAULT_ALLOWLIST, DEFAULT_RULES
from schemas.mitigation_state import FAMILY, TABLE_ID, cell_timestamp, cell_value, row_key
from service.app import Settings, create_app
from tests.schemas.test_schemas import _decision

DATASET = "mitigation_api"
INSTANCE = "api-test"
READ_TOKEN = "read-token-0f1e2d3c"
OPERATE_TOKEN = "operate-token-4b5a6978"
UNKNOWN_TOKEN = "nobody-knows-this-token"
READER = "enforcement-gateway"
OPERATOR = "alice@example.com"
_ids = itertools.count(1)


def lookup(store, entities, now_ms: int) -> dict:
    """``store.lookup`` from sync test code: in an event loop of its own, with a read client made in it
    (an async client belongs to its loop), closed after."""

    async def read() -> dict:
        try:
            return await store.lookup(entities, now_ms)
        finally:
            await store.close()

    return asyncio.run(read())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def backends(gcp_env, tmp_path_factory):
    """Dataset, topic with a subscription, Bigtable table and token file, made once."""
    project = gcp_env["project"]
    bq = provision.client_for(project)
    provision.provision(bq, DATASET)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic, subscription = create_topic_with_subscription(publisher, subscriber, project, "decisions-api")
    admin = bigtable.Client(project=project, admin=True)
    table = admin.instance(INSTANCE).table(TABLE_ID)
    # No GC rule here: the emulator would otherwise collect expired cells, and the read-time filter
    # (what keeps an expired mitigation from being served in production, where GC is lazy) would go untested.
    if not table.exists():
        table.create(column_families={FAMILY: None})
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"sha256": _digest(READ_TOKEN), "actor": READER, "scopes": ["read"]},
                    {"sha256": _digest(OPERATE_TOKEN), "actor": OPERATOR, "scopes": ["operate"]},
                ]
            }
        )
    )
    return {
        "project": project,
        "bq": bq,
        "subscriber": subscriber,
        "subscription": subscription,
        "topic": topic,
        "table": table,
        "tokens": str(tokens),
    }


@pytest.fixture
def settings(backends, tmp_path) -> Settings:
    shutil.copy(DEFAULT_ALLOWLIST, tmp_path / "allowlist.yaml")
    project = backends["project"]
    return Settings(
        project=project,
        bigtable_instance=INSTANCE,
        decisions_topic=backends["topic"],
        decisions_table=f"{project}:{DATASET}.decisions",
        audit_table=f"{project}:{DATASET}.audit",
        allowlist_path=str(tmp_path / "allowlist.yaml"),
        rule_overrides_path=str(tmp_path / "rule_overrides.yaml"),
        rules_path=DEFAULT_RULES,
        tokens_path=backends["tokens"],
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never answers: a Bigtable that has stopped responding."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{time.time_ns() % 10**9}"


def mitigation(entity_type: str, entity_id: str, *, expires_in_sec: int, **fields):
    """A decision active (or, with a negative expires_in_sec, expired) relative to now."""
    now_ms = int(time.time() * 1000)
    return _decision()._replace(
        decision_id=unique("d"),
        entity_type=entity_type,
        entity_id=entity_id,
        window_start_ms=now_ms - 3_600_000,
        window_end_ms=now_ms,
        decided_at_ms=now_ms,
        expires_at_ms=now_ms + expires_in_sec * 1000,
        **fields,
    )


def put_cell(table, decision) -> None:
    """Write one active mitigation as the pipeline's writer does (schemas.mitigation_state)."""
    row = table.direct_row(row_key(decision.entity_type, decision.entity_id))
    row.set_cell(
        FAMILY,
        decision.decision_id.encode(),
        cell_value(decision),
        timestamp=cell_timestamp(decision.expires_at_ms),
    )
    row.commit()


def audit_rows(bq, audit_id: str) -> list[dict]:
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("id", "STRING", audit_id)])
    query = f"SELECT * FROM `{DATASET}.audit` WHERE decision_id = @id"
    return [dict(r) for r in bq.query(query, job_config=config).result()]
