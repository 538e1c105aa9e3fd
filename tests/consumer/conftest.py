"""Fixtures of the consumer's live tests (helpers are in consumer_harness.py)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from consumer_harness import ROOT, consumers  # noqa: F401 (a fixture, re-exported)
from pydantic import SecretStr

from schemas.datasets import DATASETS
from schemas.source import apply_schema
from storage_builder.settings import Settings


def _connect_request(settings: Settings, method: str, path: str, body: object = None) -> object:
    request = urllib.request.Request(
        f"{settings.kafka.connect_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


@pytest.fixture
def private_source(settings: Settings, pg: psycopg.Connection) -> Iterator[Settings]:
    """A database and Debezium connector of this test's own, for what would disturb others.

    A TRUNCATE empties a table for every client, so it cannot run on the shared tables:
    this fixture creates a database with the source schema, a connector (no embedded
    schemas, truncates captured) with its own slot and topic prefix, and the five topics;
    it yields the test's settings pointed at them and removes all of it afterwards.
    """
    name = f"sbt{uuid.uuid4().hex[:10]}"
    pg.execute(f"CREATE DATABASE {name}")
    dsn = settings.postgres.dsn.get_secret_value().rsplit("/", 1)[0] + f"/{name}"
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    topics = [f"{name}.{settings.kafka.schema_name}.{dataset}" for dataset in DATASETS]
    try:
        apply_schema(dsn)
        for future in admin.create_topics([NewTopic(t, 6, 1) for t in topics]).values():
            future.result(30)
        config = json.loads((ROOT / "ops" / "debezium" / "connector.json").read_text())["config"]
        config.update(
            {
                "name": name,
                "database.dbname": name,
                "slot.name": name,
                "slot.drop.on.stop": "true",
                "topic.prefix": name,
                "key.converter.schemas.enable": "false",
                "value.converter.schemas.enable": "false",
                "skipped.operations": "none",
            }
        )
        _connect_request(settings, "PUT", f"/connectors/{name}/config", config)
        _wait_for_slot(pg, name)
        yield settings.model_copy(
            update={
                "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(dsn)}),
                "kafka": settings.kafka.model_copy(
                    update={"topic_prefix": name, "connector_name": name}
                ),
            }
        )
    finally:
        with contextlib.suppress(urllib.error.URLError):  # never registered
            _connect_request(settings, "DELETE", f"/connectors/{name}")
        _drop_slot(pg, name)
        pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.delete_topics(topics + [f"__debezium-heartbeat.{name}"])


def _wait_for_slot(pg: psycopg.Connection, name: str, timeout: float = 120) -> None:
    """Wait until the connector streams from its slot: changes from now on are captured."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchone()
        if row is not None and row[0]:
            return
        time.sleep(0.5)
    pytest.fail(f"the connector {name} did not start streaming from its slot in {timeout}s")


def _drop_slot(pg: psycopg.Connection, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchone()
        if row is None:
            return
        if row[0] is not None:
            pg.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            time.sleep(0.5)
            continue
        with contextlib.suppress(psycopg.Error):  # dropped by the connector meanwhile
            pg.execute("SELECT pg_drop_replication_slot(%s)", (name,))
