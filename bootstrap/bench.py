"""``bench bootstrap`` and ``bench rebuild``: the W1 and W2 workloads, one JSON object each.

Benchmark data lives in its own client id range and is generated inside PostgreSQL by
``generate_series`` (seeding 10 million rows row by row from Python would take longer than
the rebuild it measures); it is kept between runs and regenerated only when its row count
is not the one asked for. Snapshots go below their own S3 prefix and Redis key prefix.
"""

from __future__ import annotations

import io
import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import fastavro
import psycopg
import typer
from psycopg import sql

from bootstrap import source
from bootstrap.snapshot import FAILED, bootstrap_targets
from schemas.datasets import DATASETS, Column, Dataset, Target, get_dataset
from storage_builder.settings import Settings

BENCH_CLIENT_BASE = 8_000_000_000
NAIVE_SAMPLE_ROWS = 20_000


def register_benchmarks(bench_app: typer.Typer) -> None:
    """Add ``bench bootstrap`` and ``bench rebuild`` to ``bench_app``."""
    bench_app.command("bootstrap")(bench_bootstrap_command)
    bench_app.command("rebuild")(bench_rebuild_command)


def _bench_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "s3": settings.s3.model_copy(update={"prefix": "bench"}),
            "redis": settings.redis.model_copy(update={"key_prefix": "bench:"}),
        }
    )


class PeakRss:
    """The peak resident memory of this process and all its descendants, sampled.

    ``peak_mb`` sums the proportional set size (PSS): a page shared by several processes
    of the tree (the interpreter, libraries loaded before a fork) counts once, as it does in
    physical memory. ``peak_rss_sum_mb`` sums plain RSS, counting shared pages per process.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_pss_kb = 0
        self.peak_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_pss_kb / 1024, 1)

    @property
    def peak_rss_sum_mb(self) -> float:
        return round(self.peak_rss_kb / 1024, 1)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            pss, rss = _tree_memory_kb(os.getpid())
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the parent pid is the second field after it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _tree_memory_kb(root: int) -> tuple[int, int]:
    pss = rss = 0
    for pid in _descendants(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
    return pss, rss


def _generated_value(column: Column) -> str:
    """An SQL expression of ``g`` giving a plausible value of ``column``."""
    numeric = column.numeric_scale
    if numeric is not None:
        value = f"round(((g * 7919) % 10000000)::numeric / 1000, {numeric[1]})"
    else:
        value = {
            "bigint": "(g * 31) % 100000",
            "integer": "(g % 100)::int",
            "boolean": "(g % 2 = 0)",
            "text": "'name ' || g || ' é€'",
            "jsonb": "jsonb_build_object('n', g, 'tag', 'x' || (g % 10))",
            "date": "date '2020-01-01' + (g % 2000)::int",
            "timestamptz": "timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'",
        }[column.pg_type]
    if column.nullable:
        return f"CASE WHEN g % 11 = 0 THEN NULL ELSE {value} END"
    return value


def seed_target(conn: psycopg.Connection, target: Target, rows: int) -> bool:
    """Give ``target`` exactly ``rows`` generated rows; False when it already had them."""
    dataset = get_dataset(target.dataset)
    table = sql.SQL("{}.{}").format(sql.Identifier(dataset.schema), sql.Identifier(dataset.name))
    if source.row_counts(conn, dataset, [target.client_id]).get(target.client_id, 0) == rows:
        return False
    with conn.transaction():
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE client_id = %s").format(table), [target.client_id]
        )
        if rows:
            conn.execute(_insert_query(dataset, table), [target.client_id, rows])
    return True


def _insert_query(dataset: Dataset, table: sql.Composable) -> sql.Composed:
    columns = [column for column in dataset.columns if column.name != dataset.version_column]
    values = []
    for column in columns:
        if column.name == dataset.key_column:
            values.append(sql.SQL("g"))
        elif column.name == dataset.client_column:
            values.append(sql.SQL("%s"))
        else:
            # The expressions use % as modulo; doubled, it survives parameter binding.
            values.append(sql.SQL(_generated_value(column).replace("%", "%%")))
    query = "INSERT INTO {} ({}) SELECT {} FROM generate_series(1::bigint, %s::bigint) AS g"
    return sql.SQL(query).format(
        table,
        sql.SQL(", ").join(sql.Identifier(column.name) for column in columns),
        sql.SQL(", ").join(values),
    )


def copy_rows_per_s(conn: psycopg.Connection, targets: list[Target]) -> tuple[int, float]:
    """``COPY (SELECT ...) TO STDOUT`` of the targets' rows into nothing: the ceiling."""
    rows = 0
    started = time.perf_counter()
    for target in targets:
        dataset = get_dataset(target.dataset)
        query, params = source.range_query(dataset, exact=True)
        copy = sql.SQL("COPY ({}) TO STDOUT").format(query)
        with conn.cursor() as cursor, cursor.copy(copy, [target.client_id, *params]) as stream:
            for chunk in stream:
                rows += bytes(chunk).count(b"\n")
    return rows, time.perf_counter() - started


def naive_rows_per_s(conn: psycopg.Connection, target: Target, sample: int) -> float:
    """The old service's shape, on a sample: per row a query, a fetch, a serialization and
    a write."""
    dataset = get_dataset(target.dataset)
    schema = fastavro.parse_schema(dataset.avro_schema())
    names = dataset.column_names
    query = sql.SQL("SELECT {} FROM {}.{} WHERE client_id = %s AND id = %s").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.Identifier(dataset.schema),
        sql.Identifier(dataset.name),
    )
    keys = [
        row[0]
        for row in conn.execute(
            sql.SQL("SELECT id FROM {}.{} WHERE client_id = %s ORDER BY id LIMIT %s").format(
                sql.Identifier(dataset.schema), sql.Identifier(dataset.name)
            ),
            [target.client_id, sample],
        )
    ]
    sink = open(os.devnull, "wb")  # noqa: SIM115 - closed below, after the timed loop
    started = time.perf_counter()
    with conn.cursor() as cursor:
        for key in keys:
            cursor.execute(query, [target.client_id, key])
            row = cursor.fetchone()
            record = dict(zip(names, row, strict=True))  # type: ignore[arg-type]
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, schema, record)
            sink.write(buffer.getvalue())
            sink.flush()
    elapsed = time.perf_counter() - started
    sink.close()
    return len(keys) / elapsed


def _bootstrap(settings: Settings, targets: list[Target], parallel: int) -> dict[str, Any]:
    with PeakRss() as rss:
        started = time.perf_counter()
        results = bootstrap_targets(targets, settings, parallel=parallel, force=True)
        seconds = time.perf_counter() - started
    failed = [str(result.target) for result in results if result.outcome == FAILED]
    if failed:
        raise typer.BadParameter(f"benchmark targets failed: {', '.join(failed)}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "rows": sum(result.rows for result in results),
        "seconds": seconds,
        "peak_rss_mb": rss.peak_mb,
        "peak_rss_sum_mb": rss.peak_rss_sum_mb,
        "max_worker_rss_mb": round(children / 1024, 1),
    }


def bench_bootstrap_command(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows of the raw_data target.")] = (
        1_000_000
    ),
    parallel: Annotated[int, typer.Option("--parallel", min=1)] = os.cpu_count() or 2,
) -> None:
    """W1: bootstrap one raw_data target of --rows rows; print one JSON object."""
    from storage_builder.cli import settings_of

    typer.echo(json.dumps(bench_bootstrap(settings_of(ctx), rows, parallel)))


def bench_bootstrap(settings: Settings, rows: int, parallel: int) -> dict[str, Any]:
    """The W1 figures: the bootstrap, the naive path on a sample and the COPY ceiling."""
    settings = _bench_settings(settings)
    target = Target("raw_data", BENCH_CLIENT_BASE + rows)
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        if seed_target(conn, target, rows):
            conn.execute("VACUUM ANALYZE raw_data")
        copy_rows, copy_seconds = copy_rows_per_s(conn, [target])
        naive = naive_rows_per_s(conn, target, min(NAIVE_SAMPLE_ROWS, rows))
    run = _bootstrap(settings, [target], parallel)
    rows_per_s = run["rows"] / run["seconds"]
    copy_rate = copy_rows / copy_seconds
    return {
        "workload": "W1 bootstrap",
        "rows": run["rows"],
        "seconds": round(run["seconds"], 2),
        "rows_per_s": round(rows_per_s),
        "naive_rows_per_s": round(naive),
        "naive_sample_rows": min(NAIVE_SAMPLE_ROWS, rows),
        "copy_rows_per_s": round(copy_rate),
        "vs_naive": round(rows_per_s / naive, 2),
        "vs_copy": round(rows_per_s / copy_rate, 3),
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_sum_mb": run["peak_rss_sum_mb"],
        "parallel": parallel,
    }


def rebuild_sizes(clients: int, total_rows: int) -> list[int]:
    """Rows per client (per dataset): a power law, so a few clients are much larger."""
    weights = [1 / (rank + 1) ** 1.1 for rank in range(clients)]
    scale = total_rows / len(DATASETS) / sum(weights)
    return [max(1, round(weight * scale)) for weight in weights]


def bench_rebuild_command(
    ctx: typer.Context,
    clients: Annotated[int, typer.Option("--clients", min=1)] = 120,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows in all targets.")] = (10_000_000),
    parallel: Annotated[int, typer.Option("--parallel", min=1)] = os.cpu_count() or 2,
) -> None:
    """W2: rebuild all five datasets of --clients clients; print one JSON object."""
    from storage_builder.cli import settings_of

    typer.echo(json.dumps(bench_rebuild(settings_of(ctx), clients, rows, parallel)))


def bench_rebuild(settings: Settings, clients: int, rows: int, parallel: int) -> dict[str, Any]:
    """The W2 figures: a rebuild of every target of ``clients`` clients and its COPY time."""
    settings = _bench_settings(settings)
    sizes = rebuild_sizes(clients, rows)
    first = BENCH_CLIENT_BASE + 1_000_000_000
    targets = [
        Target(dataset, first + index) for dataset in sorted(DATASETS) for index in range(clients)
    ]
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        seeded = [seed_target(conn, t, sizes[t.client_id - first]) for t in targets]
        if any(seeded):
            for dataset in DATASETS:
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(dataset)))
        copy_rows, copy_seconds = copy_rows_per_s(conn, targets)
    run = _bootstrap(settings, targets, parallel)
    return {
        "workload": "W2 rebuild",
        "targets": len(targets),
        "rows": run["rows"],
        "seconds": round(run["seconds"], 2),
        "copy_seconds": round(copy_seconds, 2),
        "copy_rows": copy_rows,
        "vs_copy": round(copy_seconds / run["seconds"], 3),
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_sum_mb": run["peak_rss_sum_mb"],
        "parallel": parallel,
    }
