"""Fixtures shared by every test: the real services of ops/stack, isolated per test.

The services come from ``ops/stack up`` (started once per session, idempotent) or, when
``SB_CONFIG`` names another settings file, from the addresses it holds. A service that cannot
be reached fails the test with the reason; nothing is skipped.

Isolation: each test gets its own S3 prefix, Redis key prefix and a fresh client id, so tests
share the tables, topics, bucket and Redis database without seeing each other's targets.
"""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from settings_file import write_settings

from schemas.source import ensure_schema
from storage_builder.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "ops" / "local.toml"


def _config_file() -> Path:
    return Path(os.environ.get("SB_CONFIG", LOCAL_CONFIG))


@pytest.fixture(scope="session")
def stack() -> None:
    """Bring the local stack up once per session, unless the environment points elsewhere."""
    if os.environ.get("SB_CONFIG") or os.environ.get("SB_STACK_EXTERNAL"):
        return
    result = subprocess.run(
        [str(ROOT / "ops" / "stack"), "up"], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        pytest.fail(
            f"ops/stack up failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def base_settings(stack: None) -> Settings:
    """The settings of the stack, shared by the session; tests use `settings` instead."""
    return load_settings(_config_file())


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    """Settings with an S3 prefix and Redis key prefix of this test's own."""
    unique = uuid.uuid4().hex[:12]
    return base_settings.model_copy(
        update={
            "s3": base_settings.s3.model_copy(update={"prefix": f"test-{unique}"}),
            "redis": base_settings.redis.model_copy(update={"key_prefix": f"test-{unique}:"}),
        }
    )


@pytest.fixture
def config_file(settings: Settings, tmp_path: Path) -> Path:
    """A TOML file holding this test's settings, for subprocesses of `storage-builder`."""
    return write_settings(settings, tmp_path / "settings.toml")


@pytest.fixture
def pg(base_settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the source database, its schema applied."""
    dsn = base_settings.postgres.dsn.get_secret_value()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL at {base_settings.postgres.dsn} is unreachable: {error}")
    with conn:
        ensure_schema(conn)
        yield conn


@pytest.fixture
def redis_client(base_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(base_settings.redis.url.get_secret_value())
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis is unreachable: {error}")
    yield client
    client.close()


@pytest.fixture
def client_id() -> int:
    """A client id no other test uses: random, far above the ids the demo seeds."""
    return random.randrange(10**9, 2**62)
