"""``storage-builder bench stream``: the W3 workload, printed as one JSON object.

600 targets (120 clients x 5 datasets, rows skewed like tenants' sizes) are seeded and
bootstrapped below their own S3 and Redis prefixes. Then two phases run through the real
Debezium connector and a consumer in a process of its own:

1. latency: ``demo churn`` (a subprocess) commits skewed changes at ``--rate`` for
   ``--duration`` seconds while the consumer publishes; each change's latency is its
   publish time minus its commit time in PostgreSQL (``source.ts_ms``);
2. backlog: with the consumer stopped, at least ``--backlog`` changes are committed and
   left to pile up in Kafka; a consumer then drains them, which gives the rate it sustains.

Seeding and bootstrapping, and each phase's consumer, run in processes of their own: the
peak RSS sampled during each phase is the consumer's own, as in a deployed member.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import psycopg
import typer
from confluent_kafka import Consumer, TopicPartition

from bootstrap.snapshot import bootstrap_targets
from consumer.app import ConsumerApp, dataset_topics
from schemas.datasets import DATASETS, Target
from schemas.sample import SampleRows
from schemas.seed import seed
from storage_builder.process import bound_malloc_arenas
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

BENCH_STREAM_CLIENT_BASE = 8_500_000_000


class RssSampler:
    """The peak resident set of this process, sampled from /proc while running."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            with open(f"/proc/{os.getpid()}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _current_rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _bench_settings(settings: Settings, clients: list[int]) -> Settings:
    run = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "s3": settings.s3.model_copy(update={"prefix": f"bench-stream-{run}"}),
            "redis": settings.redis.model_copy(update={"key_prefix": f"bench-stream-{run}:"}),
            "kafka": settings.kafka.model_copy(update={"group_id": f"bench-stream-{run}"}),
            "consumer": settings.consumer.model_copy(
                update={"initial_position": "latest", "clients": clients, "metrics_port": 0}
            ),
        }
    )


def _high_watermarks(settings: Settings) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "x"})
    try:
        total = 0
        for topic in dataset_topics(settings):
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            for partition in partitions:
                tp = TopicPartition(topic, partition)
                total += consumer.get_watermark_offsets(tp, timeout=30)[1]
        return total
    finally:
        consumer.close()


def _wait_for_debezium(settings: Settings, at_least: int, quiet_s: float = 5.0) -> int:
    """Wait until the change topics hold ``at_least`` records and stop growing."""
    last, stable_since = _high_watermarks(settings), time.monotonic()
    while True:
        time.sleep(1.0)
        now = _high_watermarks(settings)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - stable_since >= quiet_s:
            return now


def _prepare(settings: Settings, clients: list[int], rows_per_target: int) -> None:
    dsn = settings.postgres.dsn.get_secret_value()
    seed(dsn, clients, rows_per_target, skew=1.0, reset=True, vacuum=False)
    targets = [Target(name, client) for client in clients for name in DATASETS]
    bootstrap_targets(targets, settings, parallel=2)


def _drained(app: ConsumerApp, goal: dict[tuple[str, int], int]) -> bool:
    """Every partition consumed up to ``goal`` and nothing left to publish."""
    if app.batches:
        return False
    for (topic, partition), high in goal.items():
        offsets = app.offsets.get(topic, partition)
        if offsets is None:
            return False
        position = offsets.consumed + 1 if offsets.consumed is not None else offsets.start
        if position is None or position < high:
            return False
    return True


def _partition_highs(settings: Settings) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "x"})
    try:
        highs = {}
        for topic in dataset_topics(settings):
            for partition in consumer.list_topics(topic, timeout=30).topics[topic].partitions:
                tp = TopicPartition(topic, partition)
                highs[(topic, partition)] = consumer.get_watermark_offsets(tp, timeout=30)[1]
        return highs
    finally:
        consumer.close()


def _latency_phase(
    settings: Settings, config: Path, clients: list[int], rate: float, duration: float
) -> dict[str, Any]:
    app = ConsumerApp(settings, client_id="bench-stream", track_latency=True)
    churn: subprocess.Popen[bytes] | None = None
    churned: dict[str, Any] = {}
    started = time.monotonic()

    def until() -> bool:
        nonlocal churn
        if churn is None and app.offsets.partitions() and app.is_ready:
            churn = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "storage-builder"),
                    "--config",
                    str(config),
                    "--log-level",
                    "WARNING",
                    "demo",
                    "churn",
                    "--rate",
                    str(rate),
                    "--duration",
                    str(duration),
                    "--clients",
                    ",".join(str(c) for c in clients),
                    "--json",
                ],
                stdout=subprocess.PIPE,
            )
            return False
        if churn is None or churn.poll() is None:
            return False
        if not churned:
            churned.update(orjson.loads(churn.stdout.read() if churn.stdout else b"{}"))
            churned["goal"] = _partition_highs(settings)
            churned["goal_at"] = time.monotonic()
        # Debezium may still be delivering the last changes: refresh the goal for a while.
        if time.monotonic() - churned["goal_at"] < 5:
            churned["goal"] = _partition_highs(settings)
        return _drained(app, churned["goal"]) and time.monotonic() - churned["goal_at"] >= 5

    store = app.writer.store
    requests_before, bytes_before = store.requests, store.bytes_written
    stats = app.run(until=until)
    latencies = sorted(stats.latencies_ms)
    changes = len(latencies)
    elapsed = time.monotonic() - started
    return {
        "changes": changes,
        "churn_rate": churned.get("rate"),
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "publishes_per_s": round(stats.publishes / max(elapsed, 1e-9), 1),
        "mean_batch_changes": round(stats.changes_published / max(stats.publishes, 1), 1),
        "flush_window_max_s": round(stats.flush_window_max_s, 2),
        "s3_requests": store.requests - requests_before,
        "s3_bytes_per_change": round((store.bytes_written - bytes_before) / max(changes, 1), 1),
        "s3_requests_per_change": round((store.requests - requests_before) / max(changes, 1), 3),
        "seconds": round(elapsed, 1),
    }


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(share * len(values)))], 1)


def _backlog_phase(settings: Settings, clients: list[int], backlog: int) -> dict[str, Any]:
    before = _high_watermarks(settings)
    _bulk_changes(settings, clients, backlog)
    _wait_for_debezium(settings, before + backlog)
    goal = _partition_highs(settings)

    app = ConsumerApp(settings, client_id="bench-stream-backlog")
    started: list[float] = []

    def until() -> bool:
        if not started and app.offsets.partitions():
            started.append(time.monotonic())
        return bool(started) and _drained(app, goal)

    stats = app.run(until=until)
    seconds = time.monotonic() - started[0]
    return {
        "backlog_events": stats.events,
        "drain_seconds": round(seconds, 1),
        "max_sustained_per_s": round(stats.events / seconds, 1),
        "drain_publishes": stats.publishes,
        "drain_publishes_per_s": round(stats.publishes / seconds, 1),
        "drain_mean_batch_changes": round(stats.changes_published / max(stats.publishes, 1), 1),
        "drain_flush_window_max_s": round(stats.flush_window_max_s, 2),
    }


def _bulk_changes(settings: Settings, clients: list[int], total: int) -> None:
    """Insert ``total`` new rows over every target, skewed like tenants, in a few transactions."""
    weights = [1.0 / rank for rank in range(1, len(clients) + 1)]
    scale = total / (sum(weights) * len(DATASETS))
    with psycopg.connect(settings.postgres.dsn.get_secret_value(), autocommit=True) as conn:
        for name, dataset in DATASETS.items():
            with conn.transaction(), conn.cursor() as cursor:
                for client, weight in zip(clients, weights, strict=True):
                    count = max(1, round(weight * scale))
                    sample = SampleRows(name, client, seed=int(time.time()))
                    first = cursor.execute(
                        f"SELECT coalesce(max(id), 0) + 1 FROM {dataset.table} "
                        "WHERE client_id = %s",
                        (client,),
                    ).fetchone()
                    start = int(first[0]) if first else 1
                    columns = ", ".join(sample.columns)
                    with cursor.copy(f"COPY {dataset.table} ({columns}) FROM STDIN") as copy:
                        for row in sample.rows(start, count):
                            copy.write_row(row)


def bench_stream_command(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option("--rate", help="Changes per second of the churn.")] = 1000,
    duration: Annotated[float, typer.Option("--duration", help="Seconds of churn.")] = 60,
    clients: Annotated[int, typer.Option("--clients", help="Clients (x5 datasets).")] = 120,
    rows_per_target: Annotated[
        int, typer.Option("--rows-per-target", help="Average seeded rows per target.")
    ] = 200,
    backlog: Annotated[
        int, typer.Option("--backlog", help="Changes left in Kafka for the drain phase.")
    ] = 200_000,
) -> None:
    """W3 streaming: commit-to-publish latency under churn, and the rate a backlog drains at."""
    from storage_builder.cli import settings_of

    client_ids = [BENCH_STREAM_CLIENT_BASE + index for index in range(1, clients + 1)]
    settings = _bench_settings(settings_of(ctx), client_ids)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
        file.write(_toml(settings))
    config = Path(file.name)
    try:
        # Seeding and bootstrapping run in a child process: the peak RSS measured here is
        # then the consumer's alone, as it would be in its own process.
        preparation = multiprocessing.get_context("spawn").Process(
            target=_prepare, args=(settings, client_ids, rows_per_target)
        )
        preparation.start()
        preparation.join()
        if preparation.exitcode != 0:
            raise typer.BadParameter(f"preparing the targets failed ({preparation.exitcode})")
        _wait_for_debezium(settings, 0)
        # Each phase's consumer runs in a process of its own, as a deployed one does: its
        # peak RSS is then the consumer's alone.
        latency, latency_peak_kb, rss_before_kb = _in_child(
            _latency_phase, settings, config, client_ids, rate, duration
        )
        drain, drain_peak_kb, _ = _in_child(_backlog_phase, settings, client_ids, backlog)
    finally:
        config.unlink(missing_ok=True)

    result = {
        "workload": "W3 streaming",
        "rate": rate,
        "duration_s": duration,
        "targets": len(client_ids) * len(DATASETS),
        **latency,
        **drain,
        "peak_rss_mb": round(max(latency_peak_kb, drain_peak_kb) / 1024, 1),
        "peak_rss_latency_phase_mb": round(latency_peak_kb / 1024, 1),
        "peak_rss_drain_phase_mb": round(drain_peak_kb / 1024, 1),
        # The consumer's process before it started (the interpreter and its imports).
        "rss_before_consume_mb": round(rss_before_kb / 1024, 1),
    }
    typer.echo(orjson.dumps(result).decode())


def _in_child(phase: Callable[..., dict[str, Any]], *args: Any) -> tuple[dict[str, Any], int, int]:
    """Run a phase in a new process; its result, its peak RSS and its RSS before (KiB)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_phase_child, args=(results, phase, *args))
    child.start()
    try:
        result, peak_kb, before_kb = results.get()
    finally:
        child.join()
    if isinstance(result, BaseException):
        raise result
    return result, peak_kb, before_kb


def _phase_child(results: Any, phase: Callable[..., dict[str, Any]], *args: Any) -> None:
    bound_malloc_arenas()
    before_kb = _current_rss_kb()
    try:
        with RssSampler() as rss:
            result: dict[str, Any] | BaseException = phase(*args)
    except Exception as error:  # noqa: BLE001 (handed to the parent, which raises it)
        result = error
    results.put((result, rss.peak_kb, before_kb))


def _toml(settings: Settings) -> str:
    """The settings the churn subprocess needs (only the database)."""
    dsn = settings.postgres.dsn.get_secret_value().replace('"', '\\"')
    return f'[postgres]\ndsn = "{dsn}"\n'


def register_benchmarks(bench_app: typer.Typer) -> None:
    bench_app.command("stream")(bench_stream_command)
