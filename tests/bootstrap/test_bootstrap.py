"""The bootstrap against the real stack: values, empty targets, resume, split targets, faults."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import botocore.exceptions
import psycopg
import pytest

from bootstrap import snapshot as bootstrap_snapshot
from bootstrap.snapshot import (
    BOOTSTRAPPED,
    SKIPPED,
    bootstrap_target,
    bootstrap_targets,
    open_writer,
)
from bootstrap.verify import DIFFERENT, EXTRA, MISSING, verify_target
from schemas.datasets import Target
from snapshots import keys as object_keys
from snapshots.reader import open_snapshot
from snapshots.registry import VersionRegistry
from snapshots.store import ObjectStore
from storage_builder.errors import ObjectStoreError
from storage_builder.settings import Settings

UTC = dt.UTC


def insert_raw_data(pg: psycopg.Connection, client_id: int, rows: list[tuple[Any, ...]]) -> None:
    with pg.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, "
            "currency, recorded_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [(row[0], client_id, *row[1:]) for row in rows],
        )


def simple_rows(count: int, start: int = 1) -> list[tuple[Any, ...]]:
    moment = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    return [
        (key, key % 7, key % 5, dt.date(2024, 1, 1), Decimal("1.500000"), "EUR", moment)
        for key in range(start, start + count)
    ]


@pytest.fixture
def small_segments(settings: Settings) -> Settings:
    """Tiny segments and blocks, so a few hundred rows make many of both."""
    snapshot = settings.snapshot.model_copy(update={"segment_max_rows": 50, "block_rows": 10})
    return settings.model_copy(update={"snapshot": snapshot})


def test_values_round_trip_exactly(pg: psycopg.Connection, settings: Settings, client_id: int):
    rows = [
        (1, 1, 1, dt.date(1970, 1, 1), None, None, dt.datetime(1970, 1, 1, tzinfo=UTC)),
        (
            2,
            -5,
            9,
            dt.date(1899, 12, 31),
            Decimal("-0.000001"),
            "",
            dt.datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
        ),
        (
            3,
            2**62,
            0,
            dt.date(2999, 12, 31),
            Decimal("99999999999999.999999"),
            "emoji 🚀 and controls \x01\t\n\x7f",
            dt.datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC),
        ),
        (
            4,
            0,
            0,
            dt.date(2024, 2, 29),
            Decimal("-99999999999999.999999"),
            "ünïcödé ∑",
            dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        ),
        (
            2**62,
            3,
            3,
            dt.date(2000, 1, 1),
            Decimal("12.340000"),
            "x",
            dt.datetime(2000, 1, 1, tzinfo=UTC),
        ),
    ]
    insert_raw_data(pg, client_id, rows)
    pg.execute(
        "INSERT INTO entities (id, client_id, parent_id, name, kind, attributes, active, "
        "valid_from, updated_at) VALUES (1, %s, NULL, 'n', 'k', %s, true, '2020-01-01', now()), "
        "(2, %s, 1, 'm', 'k', NULL, false, '2020-01-02', now())",
        [client_id, '{"b": [1, 2.50, null], "a": "é🚀"}', client_id],
    )

    for dataset in ("raw_data", "entities"):
        result = bootstrap_target(Target(dataset, client_id), settings)
        assert result.outcome == BOOTSTRAPPED
        report = verify_target(Target(dataset, client_id), settings)
        assert report.in_sync, [d.describe() for d in report.differences]

    with open_snapshot("raw_data", client_id, settings) as snap:
        got = {row["id"]: row for row in snap}
    assert got[1]["value"] is None and got[1]["currency"] is None
    assert str(got[2]["value"]) == "-0.000001"
    assert str(got[3]["value"]) == "99999999999999.999999"
    assert got[3]["currency"] == "emoji 🚀 and controls \x01\t\n\x7f"
    assert got[3]["entity_id"] == 2**62
    assert got[2]["period"] == dt.date(1899, 12, 31)
    assert got[4]["recorded_at"] == dt.datetime(2024, 2, 29, 18, 59, 59, 999999, tzinfo=UTC)
    with open_snapshot("entities", client_id, settings) as snap:
        attributes = [row["attributes"] for row in snap]
    assert attributes == ['{"a": "é🚀", "b": [1, 2.50, null]}', None]


def test_client_without_rows_publishes_an_empty_snapshot(
    pg: psycopg.Connection, settings: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(3))

    result = bootstrap_target(Target("formulas", client_id), settings)

    assert (result.outcome, result.rows, result.version) == (BOOTSTRAPPED, 0, 1)
    with open_snapshot("formulas", client_id, settings) as snap:
        assert snap.manifest.segments == [] and list(snap) == []
        assert snap.manifest.source_position.pg_snapshot


def test_resume_skips_bootstrapped_targets_unless_forced(
    pg: psycopg.Connection, settings: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(20))
    targets = [Target("raw_data", client_id), Target("entities", client_id)]

    first = bootstrap_targets(targets, settings, parallel=2)
    again = bootstrap_targets(targets, settings, parallel=2)
    forced = bootstrap_targets(targets[:1], settings, parallel=1, force=True)

    assert {r.outcome for r in first} == {BOOTSTRAPPED}
    assert {r.outcome for r in again} == {SKIPPED}
    assert [(r.outcome, r.version, r.rows) for r in forced] == [(BOOTSTRAPPED, 2, 20)]


def test_large_target_is_split_across_workers_in_one_snapshot(
    pg: psycopg.Connection, small_segments: Settings, client_id: int, monkeypatch
):
    insert_raw_data(pg, client_id, simple_rows(1000))
    monkeypatch.setattr(bootstrap_snapshot, "SPLIT_ROWS", 300)
    target = Target("raw_data", client_id)

    [result] = bootstrap_targets([target], small_segments, parallel=2)

    assert (result.outcome, result.rows) == (BOOTSTRAPPED, 1000)
    with open_snapshot("raw_data", client_id, small_segments) as snap:
        segments = snap.manifest.segments
        keys = [row["id"] for row in snap]
    assert keys == list(range(1, 1001))
    assert segments[0].lo is None and segments[-1].hi is None
    assert all(a.hi == b.lo for a, b in zip(segments, segments[1:], strict=False))
    assert all(len(segment.block_keys) == -(-segment.rows // 10) for segment in segments)
    assert verify_target(target, small_segments).in_sync


class FlakyStore(ObjectStore):
    """The real store, with segment puts failing after ``healthy_puts`` of them."""

    def __init__(self, settings: Settings, healthy_puts: int) -> None:
        super().__init__(settings.s3)
        self.healthy_puts = healthy_puts

    def put(self, key: str, data: bytes) -> None:
        if "/segments/" in key:
            if self.healthy_puts <= 0:
                raise ObjectStoreError(f"put {key!r} failed: injected", key=key)
            self.healthy_puts -= 1
        super().put(key, data)


def _writer_with(settings: Settings, store: ObjectStore):
    writer = open_writer(settings)
    writer.store = store
    return writer


def test_s3_failing_mid_target_publishes_nothing(
    pg: psycopg.Connection, small_segments: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(300))
    target = Target("raw_data", client_id)
    bootstrap_target(target, small_segments)
    before = VersionRegistry(small_segments.redis).get(target)
    store = ObjectStore(small_segments.s3)
    prefix = object_keys.target_prefix(small_segments.s3.prefix, target) + "manifests/"
    manifests_before = [info.key for info in store.list(prefix)]

    writer = _writer_with(small_segments, FlakyStore(small_segments, healthy_puts=2))
    with pytest.raises(ObjectStoreError, match="injected"):
        bootstrap_target(target, small_segments, force=True, writer=writer)

    assert VersionRegistry(small_segments.redis).get(target) == before
    assert [info.key for info in store.list(prefix)] == manifests_before


def test_s3_connection_errors_are_retried(
    pg: psycopg.Connection, small_segments: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(120))
    store = ObjectStore(small_segments.s3)
    real_put = store.client.put_object
    failures = {"left": 2}

    def flaky_put(**kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="injected")
        return real_put(**kwargs)

    store.client.put_object = flaky_put
    writer = _writer_with(small_segments, store)

    result = bootstrap_target(Target("raw_data", client_id), small_segments, writer=writer)

    assert (result.outcome, result.rows) == (BOOTSTRAPPED, 120)
    assert failures["left"] == 0


def test_nothing_is_written_outside_the_target_prefix(
    pg: psycopg.Connection, small_segments: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(200))
    insert_raw_data(pg, client_id + 1, simple_rows(50))
    target = Target("raw_data", client_id)

    bootstrap_target(target, small_segments)

    store = ObjectStore(small_segments.s3)
    written = [info.key for info in store.list(small_segments.s3.prefix + "/")]
    assert written
    prefix = object_keys.target_prefix(small_segments.s3.prefix, target)
    assert all(key.startswith(prefix) for key in written), written
    with open_snapshot("raw_data", client_id, small_segments) as snap:
        assert {row["client_id"] for row in snap} == {client_id}


def test_verify_reports_every_difference(
    pg: psycopg.Connection, settings: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(10))
    target = Target("raw_data", client_id)
    bootstrap_target(target, settings)

    pg.execute("UPDATE raw_data SET currency = 'USD' WHERE client_id = %s AND id = 3", [client_id])
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 5", [client_id])
    insert_raw_data(pg, client_id, simple_rows(1, start=11))
    report = verify_target(target, settings)

    found = {(d.kind, d.key): d for d in report.differences}
    assert set(found) == {(DIFFERENT, 3), (EXTRA, 5), (MISSING, 11)}
    assert found[(DIFFERENT, 3)].columns == ("currency", "row_version")


CLI = Path(sys.executable).parent / "storage-builder"


def run_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The console script, on the stack's settings with this test's prefixes."""
    environment = {
        **os.environ,
        "SB_S3__PREFIX": settings.s3.prefix,
        "SB_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        **env,
    }
    config = os.environ.get("SB_CONFIG", str(Path(__file__).parents[2] / "ops" / "local.toml"))
    command = [str(CLI), "--config", config, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def test_bad_targets_are_refused_by_name(
    pg: psycopg.Connection, settings: Settings, client_id: int
):
    unknown_dataset = run_cli(settings, "bootstrap", "--dataset", "nope", "--client", "1")
    bad_id = run_cli(settings, "bootstrap", "--dataset", "raw_data", "--client", "12a")
    absent = run_cli(settings, "bootstrap", "--client", str(client_id))

    assert unknown_dataset.returncode == 2 and "'nope'" in unknown_dataset.stderr
    assert bad_id.returncode == 2 and "'12a'" in bad_id.stderr
    assert absent.returncode == 2 and f"client {client_id} does not exist" in absent.stderr


def test_redis_unreachable_fails_clearly_and_writes_nothing(
    pg: psycopg.Connection, settings: Settings, client_id: int
):
    insert_raw_data(pg, client_id, simple_rows(5))

    result = run_cli(
        settings, "bootstrap", "--client", str(client_id), SB_REDIS__URL="redis://127.0.0.1:1/0"
    )

    assert result.returncode == 2
    assert "Redis at 127.0.0.1:1" in result.stderr
    assert list(ObjectStore(settings.s3).list(settings.s3.prefix + "/")) == []
