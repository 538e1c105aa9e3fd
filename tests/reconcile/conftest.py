"""Fixtures of the reconciliation tests: a small bootstrapped target and ways to compare it.

The target is cut into several small segments, so a test can tell a repair that rewrites
only the segments holding drifted rows from one that rewrites everything.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from reconcile_helpers import ROWS, SEGMENT_ROWS

from bootstrap.bench import seed_target
from bootstrap.reconcile import ReconcileOptions, Reconciler
from bootstrap.snapshot import bootstrap_target
from schemas.datasets import Target
from snapshots.publish import SnapshotWriter
from snapshots.registry import VersionRegistry
from snapshots.store import ObjectStore
from storage_builder.settings import Settings


@pytest.fixture
def small_settings(settings: Settings) -> Settings:
    """This test's settings with segments of 50 rows in blocks of 10."""
    snapshot = settings.snapshot.model_copy(
        update={"segment_max_rows": SEGMENT_ROWS, "block_rows": 10}
    )
    return settings.model_copy(update={"snapshot": snapshot})


@pytest.fixture
def target(pg: psycopg.Connection, client_id: int) -> Iterator[Target]:
    """A raw_data target of 300 generated rows (keys 1 to 300), removed afterwards."""
    target = Target("raw_data", client_id)
    seed_target(pg, target, ROWS)
    yield target
    pg.execute("DELETE FROM raw_data WHERE client_id = %s", [client_id])


@pytest.fixture
def bootstrapped(target: Target, small_settings: Settings) -> Target:
    result = bootstrap_target(target, small_settings)
    assert result.rows == ROWS
    return target


@pytest.fixture
def writer(small_settings: Settings) -> Iterator[SnapshotWriter]:
    writer = SnapshotWriter(
        ObjectStore(small_settings.s3),
        VersionRegistry(small_settings.redis),
        small_settings.snapshot,
        small_settings.s3.prefix,
    )
    yield writer
    writer.close()
    writer.registry.close()


@pytest.fixture
def reconciler(small_settings: Settings) -> Iterator[Reconciler]:
    with Reconciler(small_settings, ReconcileOptions(parallel=2)) as reconciler:
        yield reconciler
