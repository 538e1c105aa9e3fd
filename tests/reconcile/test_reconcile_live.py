"""Reconciliation while `storage-builder consume` streams changes to the same targets.

The consumer runs as a subprocess following only this test's clients; writers churn the
targets; reconciliations run again and again meanwhile, one of them with real drift to
repair. Afterwards the consumer alone must bring every snapshot to the database (no change
lost to a reconciliation's publish), and every version must have been published once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from reconcile_helpers import assert_snapshot_equals_database, database_rows

from bootstrap.bench import seed_target
from bootstrap.reconcile import ReconcileOptions, Reconciler
from bootstrap.reconcile_report import FAILED, IN_SYNC, REPAIRED
from bootstrap.snapshot import bootstrap_target
from schemas.datasets import Target
from snapshots.publish import SnapshotWriter
from snapshots.registry import VersionRegistry, manifest_keys
from snapshots.store import ObjectStore
from storage_builder.settings import Settings

CLI = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "storage-builder"
ROWS = 60


@pytest.fixture
def consumer(
    config_file: Path, client_id: int, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`storage-builder consume` on this test's prefixes, following only its clients."""
    log_path = tmp_path / "consumer.log"
    env = {
        **os.environ,
        "SB_KAFKA__GROUP_ID": f"test-{uuid.uuid4().hex[:12]}",
        "SB_CONSUMER__INITIAL_POSITION": "latest",
        "SB_CONSUMER__CLIENTS": f"[{client_id}, {client_id + 1}]",
        "SB_CONSUMER__METRICS_PORT": "0",
        "SB_CONSUMER__FLUSH_MAX_AGE_S": "0.3",
    }
    env.pop("SB_CONFIG", None)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(CLI), "--config", str(config_file), "consume"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 90
    while "ready: " not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the consumer did not get ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    process.log_path = log_path  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _churn(settings: Settings, targets: list[Target], stop: threading.Event) -> None:
    rng = random.Random()
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        while not stop.is_set():
            target = rng.choice(targets)
            keys = rng.sample(range(1, ROWS + 1), 3)
            with conn.transaction():
                conn.execute(
                    "UPDATE raw_data SET currency = %s WHERE client_id = %s AND id = ANY(%s)",
                    [uuid.uuid4().hex[:8], target.client_id, keys],
                )
            time.sleep(0.02)


def _wait_in_sync_by_the_consumer(
    settings: Settings, targets: list[Target], consumer_log: Path
) -> None:
    """Dry runs until every target is in sync: only the consumer may bring them there."""
    deadline = time.monotonic() + 240
    options = ReconcileOptions(dry_run=True)
    while True:
        with Reconciler(settings, options) as reconciler:
            report = reconciler.run(targets)
        if all(target.outcome == IN_SYNC for target in report.targets):
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"not in sync: {[t.to_json() for t in report.targets]}\n"
                f"{consumer_log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.5)


def _manifest_versions(settings: Settings, target: Target) -> list[int]:
    """The versions of every manifest of the target, standalone or in a pack."""
    keys = manifest_keys(ObjectStore(settings.s3), settings.s3.prefix, target)
    return sorted(version for version, found in keys.items() for _ in found)


@pytest.mark.slow
def test_reconciling_while_the_consumer_streams_loses_no_change_and_publishes_nothing_stale(
    settings: Settings,
    pg: psycopg.Connection,
    client_id: int,
    request: pytest.FixtureRequest,
) -> None:
    targets = [Target("raw_data", client_id), Target("raw_data", client_id + 1)]
    for target in targets:
        seed_target(pg, target, ROWS)
        bootstrap_target(target, settings)
    process = request.getfixturevalue("consumer")
    stop = threading.Event()
    writer_thread = threading.Thread(target=_churn, args=(settings, targets, stop), daemon=True)
    writer_thread.start()

    reports = []
    try:
        time.sleep(2)
        # Real drift while the stream runs: a row the database never had, put in a snapshot.
        writer = SnapshotWriter(
            ObjectStore(settings.s3), VersionRegistry(settings.redis), settings.snapshot,
            settings.s3.prefix,
        )  # fmt: skip
        for _ in range(5):
            state = writer.registry.get(targets[0])
            assert state is not None
            extra = dict(database_rows(pg, targets[0])[0], id=10_000, row_version=1)
            try:
                writer.apply_changes(
                    targets[0], {10_000: extra}, [], state.source_position, expected=state
                )
                break
            except Exception:  # the consumer published first; try on its version
                continue
        writer.close()
        for _ in range(4):
            with Reconciler(settings, ReconcileOptions(grace_s=0.5, parallel=2)) as reconciler:
                reports.append(reconciler.run(targets))
    finally:
        stop.set()
        writer_thread.join(30)

    _wait_in_sync_by_the_consumer(settings, targets, process.log_path)
    for target in targets:
        assert_snapshot_equals_database(pg, settings, target)
        versions = _manifest_versions(settings, target)
        assert versions == list(range(1, versions[-1] + 1)), f"{target}: {versions}"
    outcomes = [target.outcome for report in reports for target in report.targets]
    assert FAILED not in outcomes, [t.to_json() for r in reports for t in r.targets]
    print([t.to_json() for r in reports for t in r.targets if t.outcome != IN_SYNC])
    removed = [t.rows_removed for r in reports for t in r.targets if t.outcome == REPAIRED]
    assert sum(removed) == 1
    log = process.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    # The consumer did stream: it published versions of both targets meanwhile.
    assert all(f"published {target} version" in log for target in targets)
    pg.execute("DELETE FROM raw_data WHERE client_id = ANY(%s)", [[t.client_id for t in targets]])
