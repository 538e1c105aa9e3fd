"""``bench bootstrap`` and ``bench rebuild``: the W1 and W2 workloads, one JSON object each.

The benchmarks run in a database of their own on the same server, ``storage_builder_bench``:
its tables have no publication, so the millions of rows they seed never reach the change
stream the consumers follow, and being UNLOGGED they do not even pass through the WAL a
replication slot holds back. The rows are generated inside PostgreSQL by
``generate_series`` and kept between runs: a marker table records what each target was
seeded with, so a rerun asking for the same rows starts at once. Snapshots go below their
own S3 prefix and Redis key prefix, emptied before every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import fastavro
import psycopg
import typer
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr

from bootstrap import source
from bootstrap.snapshot import FAILED, bootstrap_targets, open_writer
from schemas.datasets import DATASETS, Column, Dataset, Target, get_dataset
from schemas.source import apply_schema
from snapshots.publish import SnapshotWriter
from storage_builder.settings import Settings

BENCH_DATABASE = "storage_builder_bench"
BENCH_S3_PREFIX = "bench"
BENCH_KEY_PREFIX = "bench:"
# Client ids of the benchmark targets (in the benchmark database): W1's target of N rows is
# client BENCH_CLIENT_BASE + N, W2's clients follow REBUILD_FIRST_CLIENT.
BENCH_CLIENT_BASE = 8_000_000_000
REBUILD_FIRST_CLIENT = BENCH_CLIENT_BASE + 1_000_000_000
NAIVE_SAMPLE_ROWS = 20_000
# Bumped whenever the generated values change, so older seeded rows are regenerated.
SEED_GENERATION = 1
_MARKER = sql.Identifier("public", "bench_seed")


def register_benchmarks(bench_app: typer.Typer) -> None:
    """Add ``bench bootstrap`` and ``bench rebuild`` to ``bench_app``."""
    bench_app.command("bootstrap")(bench_bootstrap_command)
    bench_app.command("rebuild")(bench_rebuild_command)


def bench_settings(settings: Settings) -> Settings:
    """The settings pointed at the benchmark database, S3 prefix and Redis key prefix."""
    dsn = settings.postgres.dsn.get_secret_value()
    bench_dsn = make_conninfo(dsn, dbname=BENCH_DATABASE)
    return settings.model_copy(
        update={
            "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(bench_dsn)}),
            "s3": settings.s3.model_copy(update={"prefix": BENCH_S3_PREFIX}),
            "redis": settings.redis.model_copy(update={"key_prefix": BENCH_KEY_PREFIX}),
        }
    )


def ensure_bench_database(settings: Settings) -> None:
    """Create the benchmark database when missing: the dataset tables, no publication.

    ``settings`` are the ordinary ones; the database is created on the same server, from a
    connection to the configured database.
    """
    dsn = settings.postgres.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DATABASE]
        ).fetchone()
        if exists is None:
            # A concurrent run may create it in the meantime.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DATABASE)))
    bench_dsn = make_conninfo(dsn, dbname=BENCH_DATABASE)
    with psycopg.connect(bench_dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('public.bench_seed')").fetchone() == (None,):
            apply_schema(conn, publication=False)
            # Benchmark rows need no crash safety, and unlogged writes skip the WAL.
            for dataset in DATASETS.values():
                table = sql.Identifier(dataset.schema, dataset.name)
                conn.execute(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(table))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (dataset text, client_id bigint, rows bigint,"
                    " generation int, PRIMARY KEY (dataset, client_id))"
                ).format(_MARKER)
            )


def clean_outputs(writer: SnapshotWriter, settings: Settings) -> int:
    """Delete what earlier runs left below the benchmark S3 prefix and Redis key prefix."""
    store = writer.store
    store.ensure_bucket()
    deleted = store.delete_many(info.key for info in store.list(settings.s3.prefix + "/"))
    client = writer.registry.client
    keys = list(client.scan_iter(match=settings.redis.key_prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    return deleted


def _database_name(settings: Settings) -> str:
    return str(conninfo_to_dict(settings.postgres.dsn.get_secret_value()).get("dbname", ""))


class PeakRss:
    """The peak resident memory of this process and all its descendants, sampled.

    ``peak_rss_mb`` is the largest sum of plain RSS over the process tree seen at one
    sample: what the processes hold, each counted in full, shared pages included.
    ``peak_pss_mb`` sums the proportional set size instead (a page shared by several
    processes counts once, as in physical memory). Peaks per process are kept too.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_pss_kb = 0
        self.peak_rss_kb = 0
        self.peak_by_pid: dict[int, int] = {}
        self._root = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_rss_mb(self) -> float:
        return round(self.peak_rss_kb / 1024, 1)

    @property
    def peak_pss_mb(self) -> float:
        return round(self.peak_pss_kb / 1024, 1)

    @property
    def root_peak_mb(self) -> float:
        return round(self.peak_by_pid.get(self._root, 0) / 1024, 1)

    @property
    def worker_peak_mb(self) -> float:
        others = [kb for pid, kb in self.peak_by_pid.items() if pid != self._root]
        return round(max(others, default=0) / 1024, 1)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            pss = rss = 0
            for pid, (one_pss, one_rss) in _tree_memory_kb(self._root).items():
                pss += one_pss
                rss += one_rss
                self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), one_rss)
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


def _tree_memory_kb(root: int) -> dict[int, tuple[int, int]]:
    """PSS and RSS in kB of ``root`` and each of its descendants."""
    memory = {}
    for pid in _descendants(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        pss = rss = 0
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
        memory[pid] = (pss, rss)
    return memory


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


def _marker_rows(conn: psycopg.Connection, target: Target) -> int | None:
    """The rows the marker table says ``target`` was seeded with (None: no marker)."""
    if conn.execute("SELECT to_regclass('public.bench_seed')").fetchone() == (None,):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT rows FROM {} WHERE dataset = %s AND client_id = %s AND generation = %s"
        ).format(_MARKER),
        [target.dataset, target.client_id, SEED_GENERATION],
    ).fetchone()
    return -1 if row is None else row[0]


def seed_target(conn: psycopg.Connection, target: Target, rows: int) -> bool:
    """Give ``target`` exactly ``rows`` generated rows; False when it already had them.

    In the benchmark database the marker table answers; elsewhere the rows are counted.
    """
    dataset = get_dataset(target.dataset)
    table = sql.SQL("{}.{}").format(sql.Identifier(dataset.schema), sql.Identifier(dataset.name))
    marked = _marker_rows(conn, target)
    if marked is None:
        counted = source.row_counts(conn, dataset, [target.client_id])
        if counted.get(target.client_id, 0) == rows:
            return False
    elif marked == rows:
        return False
    with conn.transaction():
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE client_id = %s").format(table), [target.client_id]
        )
        if rows:
            conn.execute(_insert_query(dataset, table), [target.client_id, rows])
        if marked is not None:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} VALUES (%s, %s, %s, %s) ON CONFLICT (dataset, client_id) "
                    "DO UPDATE SET rows = excluded.rows, generation = excluded.generation"
                ).format(_MARKER),
                [target.dataset, target.client_id, rows, SEED_GENERATION],
            )
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


def naive_rows(
    conn: psycopg.Connection, target: Target, sample: int, offset: int = 0
) -> tuple[int, float]:
    """The old service's shape on ``sample`` rows from the ``offset``-th key: per row a
    query (one round trip), a fetch, a serialization and a write. Rows and seconds."""
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
            sql.SQL(
                "SELECT id FROM {}.{} WHERE client_id = %s ORDER BY id LIMIT %s OFFSET %s"
            ).format(sql.Identifier(dataset.schema), sql.Identifier(dataset.name)),
            [target.client_id, sample, offset],
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
    return len(keys), elapsed


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _bootstrap(settings: Settings, targets: list[Target], parallel: int) -> dict[str, Any]:
    # One writer, and so one S3 client, for the cleaning and the bootstrap: a second client
    # would count in the coordinator's memory, and the bootstrap command has one.
    writer = open_writer(settings)
    clean_outputs(writer, settings)
    load = _load()
    with PeakRss() as rss:
        started = time.perf_counter()
        results = bootstrap_targets(targets, settings, parallel=parallel, force=True, writer=writer)
        seconds = time.perf_counter() - started
    writer.close()
    failed = [f"{result.target} ({result.error})" for result in results if result.outcome == FAILED]
    if failed:
        raise typer.BadParameter(f"benchmark targets failed: {', '.join(failed[:5])}")
    return {
        "rows": sum(result.rows for result in results),
        "seconds": seconds,
        "peak_rss_mb": rss.peak_rss_mb,
        "peak_pss_mb": rss.peak_pss_mb,
        "coordinator_peak_rss_mb": rss.root_peak_mb,
        "worker_peak_rss_mb": rss.worker_peak_mb,
        "load_1m_before": load,
        "load_1m_after": _load(),
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


def _prepare(settings: Settings, sizes: dict[Target, int]) -> Settings:
    """The benchmark settings, with every target seeded as asked (reusing earlier rows)."""
    ensure_bench_database(settings)
    settings = bench_settings(settings)
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        seeded = {
            target.dataset for target, rows in sizes.items() if seed_target(conn, target, rows)
        }
        for dataset in sorted(seeded):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(dataset)))
    return settings


def bench_bootstrap(settings: Settings, rows: int, parallel: int) -> dict[str, Any]:
    """The W1 figures: the bootstrap, the naive path on a sample and the COPY ceiling.

    The machine is shared, so its load drifts during a run: half of the naive sample and
    one COPY are measured just before the bootstrap, the other half and a second COPY just
    after, and each rate is their total rows over their total time.
    """
    target = Target("raw_data", BENCH_CLIENT_BASE + rows)
    settings = _prepare(settings, {target: rows})
    sample = min(NAIVE_SAMPLE_ROWS, rows)
    dsn = settings.postgres.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        copy_before = copy_rows_per_s(conn, [target])
        naive_before = naive_rows(conn, target, sample // 2)
    run = _bootstrap(settings, [target], parallel)
    with psycopg.connect(dsn, autocommit=True) as conn:
        naive_after = naive_rows(conn, target, sample - sample // 2, offset=sample // 2)
        copy_after = copy_rows_per_s(conn, [target])
    rows_per_s = run.pop("rows") / run["seconds"]
    naive = _rate(naive_before, naive_after)
    copy_rate = _rate(copy_before, copy_after)
    return {
        "workload": "W1 bootstrap",
        "database": _database_name(settings),
        "rows": rows,
        "seconds": round(run.pop("seconds"), 2),
        "rows_per_s": round(rows_per_s),
        "naive_rows_per_s": round(naive),
        "naive_sample_rows": sample,
        "copy_rows_per_s": round(copy_rate),
        "copy_rows_per_s_before_after": [round(r / t) for r, t in (copy_before, copy_after)],
        "vs_naive": round(rows_per_s / naive, 2),
        "vs_copy": round(rows_per_s / copy_rate, 3),
        **run,
        "parallel": parallel,
    }


def _rate(*measures: tuple[int, float]) -> float:
    return sum(rows for rows, _ in measures) / sum(seconds for _, seconds in measures)


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
    sizes = rebuild_sizes(clients, rows)
    targets = [
        Target(dataset, REBUILD_FIRST_CLIENT + index)
        for dataset in sorted(DATASETS)
        for index in range(clients)
    ]
    settings = _prepare(
        settings, {target: sizes[target.client_id - REBUILD_FIRST_CLIENT] for target in targets}
    )
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        copy_rows, copy_seconds = copy_rows_per_s(conn, targets)
    run = _bootstrap(settings, targets, parallel)
    return {
        "workload": "W2 rebuild",
        "database": _database_name(settings),
        "targets": len(targets),
        "rows": run.pop("rows"),
        "largest_target_rows": max(sizes),
        "smallest_target_rows": min(sizes),
        "seconds": round(run["seconds"], 2),
        "copy_seconds": round(copy_seconds, 2),
        "copy_rows": copy_rows,
        "vs_copy": round(copy_seconds / run.pop("seconds"), 3),
        **run,
        "parallel": parallel,
    }
