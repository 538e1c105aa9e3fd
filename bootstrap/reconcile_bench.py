"""``bench reconcile``: the W4 workload, printed as one JSON object.

Two measurements on the benchmark data of ``bench rebuild`` (600 targets, generated inside
PostgreSQL) and one large target of its own:

1. every target in sync: how long proving it takes (the median of three passes), how many
   rows per second are proven equal, and how many segments were read doing so (the goal
   is none);
2. ten rows drifted on purpose in a 1,000,000-row target: how long finding and repairing
   them takes (the median of five repairs), how many segments were rewritten, and how long
   a bootstrap of the same target takes (the median of three, between the repairs), for
   comparison.

Snapshots go below their own S3 prefix and Redis key prefix, so other benchmarks' targets
are never touched; each run bootstraps its targets afresh, so that no snapshot an earlier
version of the code wrote is measured.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from typing import Annotated, Any

import psycopg
import typer
from psycopg import sql

from bootstrap.bench import (
    BENCH_CLIENT_BASE,
    bench_settings,
    clean_outputs,
    ensure_bench_database,
    rebuild_sizes,
    seed_target,
)
from bootstrap.reconcile import ReconcileOptions, Reconciler
from bootstrap.reconcile_report import IN_SYNC, REPAIRED
from bootstrap.snapshot import FAILED, bootstrap_target, bootstrap_targets
from schemas.datasets import DATASETS, Target
from snapshots.publish import SnapshotWriter
from storage_builder.settings import Settings

# The targets of `bench rebuild`, so both benchmarks share one copy of the data.
REBUILD_FIRST_CLIENT = BENCH_CLIENT_BASE + 1_000_000_000
# The large target drifted on purpose: a client of this benchmark alone.
DRIFT_CLIENT_BASE = BENCH_CLIENT_BASE + 2_000_000_000
DRIFT_ROWS = 10
DRIFT_REPAIRS = 5


def _settings(settings: Settings) -> Settings:
    # The benchmark database is outside the change stream: ten million seeded rows must not
    # reach Debezium, and its tables are shared with `bench rebuild`, so seeding happens once.
    ensure_bench_database(settings)
    bench = bench_settings(settings)
    return bench.model_copy(
        update={
            "s3": bench.s3.model_copy(update={"prefix": "bench-reconcile"}),
            "redis": bench.redis.model_copy(update={"key_prefix": "bench-reconcile:"}),
        }
    )


def _vacuum(conn: psycopg.Connection) -> None:
    # Index-only scans need the visibility map that VACUUM sets.
    for dataset in sorted(DATASETS):
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(dataset)))


def _prepare_in_sync(settings: Settings, clients: int, rows: int, parallel: int) -> list[Target]:
    """Seed the targets (if needed) and bootstrap those without a snapshot here yet."""
    sizes = rebuild_sizes(clients, rows)
    targets = [
        Target(dataset, REBUILD_FIRST_CLIENT + index)
        for dataset in sorted(DATASETS)
        for index in range(clients)
    ]
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        seeded = [seed_target(conn, t, sizes[t.client_id - REBUILD_FIRST_CLIENT]) for t in targets]
        if any(seeded):
            _vacuum(conn)
    # Snapshots of earlier runs may come from other code: start from fresh ones every time.
    writer = SnapshotWriter.from_settings(settings)
    try:
        clean_outputs(writer, settings)
    finally:
        writer.close()
    results = bootstrap_targets(targets, settings, parallel=parallel)
    failed = [str(result.target) for result in results if result.outcome == FAILED]
    if failed:
        raise typer.BadParameter(f"bootstrap of benchmark targets failed: {', '.join(failed)}")
    return targets


def _drift(conn: psycopg.Connection, target: Target, rows: int, count: int, run: int) -> None:
    """Change ``count`` rows spread over the whole key range of ``target`` (a new value each
    run, so that every run drifts)."""
    step = max(1, rows // count)
    keys = [1 + step * index + step // 2 for index in range(count)]
    conn.execute(
        "UPDATE raw_data SET currency = %s WHERE client_id = %s AND id = ANY(%s)",
        [f"DR{run}", target.client_id, keys],
    )


def _collected() -> None:
    """Collect the garbage the runs before left: a full collection landing in a timed run
    costs up to a quarter of a second here (the boto3 clients of every reconciler before),
    which a nightly process, with one reconciler, never pays."""
    gc.collect()


def _run(reconciler: Reconciler, targets: list[Target]) -> tuple[Any, float, float]:
    """The report, the seconds and the CPU seconds of this process (all its threads)."""
    _collected()
    started, cpu = time.perf_counter(), time.process_time()
    report = reconciler.run(targets)
    return report, time.perf_counter() - started, time.process_time() - cpu


def _reconciler(settings: Settings, parallel: int) -> Reconciler:
    reconciler = Reconciler(settings, ReconcileOptions(parallel=parallel, grace_s=0.0))
    # A nightly run connects to S3, Redis and PostgreSQL once for all its targets: not part
    # of any target's time.
    reconciler.store.ensure_bucket()
    reconciler.registry.ping()
    reconciler.connect()
    return reconciler


def bench_reconcile_command(
    ctx: typer.Context,
    clients: Annotated[int, typer.Option("--clients", min=1)] = 120,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows in all in-sync targets.")] = (
        10_000_000
    ),
    drift_target_rows: Annotated[int, typer.Option("--drift-target-rows", min=DRIFT_ROWS)] = (
        1_000_000
    ),
    parallel: Annotated[int, typer.Option("--parallel", min=1)] = os.cpu_count() or 2,
) -> None:
    """W4: reconcile --clients x 5 targets in sync, then a drifted large target."""
    from storage_builder.cli import settings_of

    settings = _settings(settings_of(ctx))
    targets = _prepare_in_sync(settings, clients, rows, parallel)
    # Three passes, each by a reconciler of its own as a nightly process would run it (its
    # own connections, nothing cached): the median is the figure, every pass's time beside it.
    passes = []
    for _ in range(3):
        with _reconciler(settings, parallel) as reconciler:
            passes.append(_run(reconciler, targets))
    in_sync, in_sync_seconds, _ = sorted(passes, key=lambda one: one[1])[1]
    compared = sum(target.rows for target in in_sync.targets)

    # The drifted target is repaired five times (ten new rows drifted each time) and
    # bootstrapped before the first, third and fifth repair: this machine's speed swings by
    # a fifth from one minute to the next, so both sides of the ratio are measured in the
    # same minutes, and the medians are the figures. Each repair is by a reconciler of its
    # own, which reads the segments from S3 as a nightly run would (one reconciler would still
    # hold those it wrote in the repair before); the first repair, which also pays for the
    # process's first decode and encode, is reported beside them.
    drift_target = Target("raw_data", DRIFT_CLIENT_BASE + drift_target_rows)
    repairs: list[tuple[Any, float, float]] = []
    bootstraps: list[float] = []
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        if seed_target(conn, drift_target, drift_target_rows):
            _vacuum(conn)
        for run in range(DRIFT_REPAIRS):
            if run % 2 == 0:
                _collected()
                bootstraps.append(bootstrap_target(drift_target, settings, force=True).seconds)
            _drift(conn, drift_target, drift_target_rows, DRIFT_ROWS, run)
            with _reconciler(settings, parallel) as reconciler:
                repairs.append(_run(reconciler, [drift_target]))
    drifted, drift_seconds, drift_cpu = sorted(repairs, key=lambda repair: repair[1])[
        DRIFT_REPAIRS // 2
    ]
    bootstrap_seconds = statistics.median(bootstraps)
    repaired = drifted.targets[0]

    result = {
        "workload": "W4 reconcile",
        "targets": len(targets),
        "in_sync_targets": in_sync.counts()[IN_SYNC],
        "in_sync_rows": compared,
        "in_sync_seconds": round(in_sync_seconds, 2),
        "in_sync_rows_per_s": round(compared / in_sync_seconds),
        "in_sync_seconds_runs": [round(seconds, 2) for _, seconds, _ in passes],
        "in_sync_all": all(r.counts()[IN_SYNC] == len(targets) for r, _, _ in passes),
        "segments_read_in_sync": sum(t.segments_read for r, _, _ in passes for t in r.targets),
        "s3_requests_in_sync": in_sync.s3_requests,
        "drift_target_rows": drift_target_rows,
        "drift_rows": repaired.drift_rows,
        "drift_repaired": repaired.outcome == REPAIRED,
        "drift_seconds": round(drift_seconds, 3),
        "drift_seconds_first": round(repairs[0][1], 3),
        "drift_seconds_runs": [round(seconds, 3) for _, seconds, _ in repairs],
        # The CPU of this process in the median repair: its Python runs on one core at a
        # time, beside PostgreSQL's and the object store's share of the same cores.
        "drift_process_cpu_seconds": round(drift_cpu, 3),
        "drift_repaired_all": all(r.targets[0].outcome == REPAIRED for r, _, _ in repairs),
        "segments_read_drift": repaired.segments_read,
        "segments_rewritten": repaired.segments_rewritten,
        "segments_in_drift_target": _segments(settings, drift_target),
        "bootstrap_seconds": round(bootstrap_seconds, 2),
        "bootstrap_seconds_runs": [round(seconds, 2) for seconds in bootstraps],
        "bootstrap_vs_drift": round(bootstrap_seconds / drift_seconds, 1),
        "parallel": parallel,
    }
    typer.echo(json.dumps(result))


def _segments(settings: Settings, target: Target) -> int:
    with Reconciler(settings) as reconciler:
        state = reconciler.registry.get(target)
        if state is None:
            return 0
        return len(reconciler.writer.load_manifest(state, target).segments)
