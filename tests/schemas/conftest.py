"""Fixtures of the source-schema tests: the schema applied, and the DSN for new connections."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from schemas.source import ensure_schema
from storage_builder.settings import Settings


@pytest.fixture
def source(pg: psycopg.Connection) -> psycopg.Connection:
    """The `pg` connection with source.sql applied."""
    ensure_schema(pg)
    return pg


@pytest.fixture
def dsn(base_settings: Settings) -> str:
    return base_settings.postgres.dsn.get_secret_value()


@pytest.fixture
def demo_config(dsn: str, tmp_path: Path) -> Path:
    """A settings file for `storage-builder demo` subprocesses: the demo needs only the DSN."""
    path = tmp_path / "demo.toml"
    path.write_text(f'[postgres]\ndsn = "{dsn}"\n')
    return path
