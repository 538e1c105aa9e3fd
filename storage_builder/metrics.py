"""Prometheus metrics of storage-builder, the health endpoints, and batch-job outcome files.

Every metric carries the prefix ``storage_builder_``, is in base units (seconds, bytes) and has
no label per client or target, so the number of series stays bounded however many tenants
there are. Three producers write them:

- ``consume`` updates the consumer metrics below and serves them with :func:`serve`, together
  with ``/healthz`` and ``/readyz``, from a thread of its own: the poll loop only records
  timestamps in a :class:`HealthState`, so a stuck poll loop makes ``/healthz`` fail instead
  of answering for it.
- ``bootstrap`` and ``reconcile`` are batch jobs that end before any scrape; they leave their
  outcome in a node-exporter textfile-collector file with :func:`write_job_metrics`.
- ``lag --metrics-port`` exports the group-wide view (status per partition, connector state,
  replication slot lag) through :data:`MONITOR_REGISTRY`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    write_to_textfile,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from storage_builder.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "storage_builder"
TEXTFILE_DIR_ENV = "SB_METRICS_TEXTFILE_DIR"

# What ``consume`` exports; a registry of our own so tests and the server see only these.
REGISTRY = CollectorRegistry(auto_describe=True)

# Latencies from a few milliseconds (a small local publish) to a minute (a stuck S3).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
    return Gauge(f"{PREFIX}_{name}", doc, list(labels), registry=REGISTRY)


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
    # prometheus-client appends "_total" itself; the name here is the family name.
    return Counter(f"{PREFIX}_{name}", doc, list(labels), registry=REGISTRY)


def _histogram(name: str, doc: str, labels: Iterable[str] = ()) -> Histogram:
    return Histogram(
        f"{PREFIX}_{name}", doc, list(labels), registry=REGISTRY, buckets=_LATENCY_BUCKETS
    )


CONSUMER_OFFSET_LAG = _gauge(
    "consumer_offset_lag",
    "Messages between the committed offset and the end of an assigned partition.",
    ("topic", "partition"),
)
CONSUMER_TIME_LAG = _gauge(
    "consumer_time_lag_seconds",
    "Age of the oldest change of an assigned partition not yet applied (message timestamps).",
    ("topic", "partition"),
)
CONSUMER_COMMITTED_OFFSET = _gauge(
    "consumer_committed_offset",
    "The offset last committed for an assigned partition.",
    ("topic", "partition"),
)
BATCHES_APPLIED = _counter(
    "batches_applied",
    "Micro-batches applied and published, as a delta in a pack or by rewriting segments.",
    ("dataset", "how"),
)
PACKS_WRITTEN = _counter("packs_written", "Packs written to S3 (one per flush, or a few).", ())
PACK_BYTES = _counter("pack_bytes_written", "Bytes of packs written to S3.", ())
CHANGES_APPLIED = _counter(
    "changes_applied", "Changes applied to snapshots, by operation (c, u, d, r).", ("dataset", "op")
)
PUBLISH_DURATION = _histogram(
    "publish_duration_seconds",
    "Time to apply one micro-batch and publish it: segments, manifest, compare-and-set.",
    ("dataset",),
)
COMMIT_TO_PUBLISH = _histogram(
    "commit_to_publish_seconds",
    "Time from a change's commit in the source database to the publish that contains it.",
)
SEGMENTS_WRITTEN = _counter("segments_written", "Segments written to S3.", ("dataset",))
BYTES_WRITTEN = _counter("bytes_written", "Bytes of segments written to S3.", ("dataset",))
DEAD_LETTER_EVENTS = _counter(
    "dead_letter_events", "Events sent to the dead-letter topic, by reason.", ("reason",)
)
PUBLISH_CONFLICTS = _counter(
    "publish_conflicts",
    "Publishes that lost the compare-and-set on the version in Redis.",
    ("dataset",),
)
EVENTS_SKIPPED = _counter(
    "events_skipped",
    "Events skipped as already contained in a snapshot (handoff: bootstrap, replay: offsets).",
    ("reason",),
)
PAUSED_PARTITIONS = _gauge("paused_partitions", "Partitions paused by backpressure.")
BUFFERED_CHANGES = _gauge("buffered_changes", "Changes buffered in micro-batches, not published.")
BUFFERED_BYTES = _gauge("buffered_bytes", "Estimated bytes of the buffered changes.")
REBALANCES = _counter(
    "rebalances", "Consumer-group rebalance callbacks, by kind (assign, revoke, lost).", ("kind",)
)
LAST_POLL_TIMESTAMP = _gauge(
    "last_poll_timestamp_seconds", "Unix time at which the poll loop last returned."
)
MAX_TARGET_STALENESS = _gauge(
    "max_target_staleness_seconds",
    "Largest age, among a dataset's targets, of the source time of the last applied change.",
    ("dataset",),
)


# What ``lag --metrics-port`` exports: the view of the whole group, from outside it.
MONITOR_REGISTRY = CollectorRegistry(auto_describe=True)


def _monitor_gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
    return Gauge(f"{PREFIX}_{name}", doc, list(labels), registry=MONITOR_REGISTRY)


STATUS_CODES = {"OK": 0, "WARN": 1, "STALL": 2, "STOP": 3, "ERR": 4}
STATUS_DOC = "0 OK, 1 WARN, 2 STALL, 3 STOP, 4 ERR, evaluated over the lag window."

PARTITION_STATUS = _monitor_gauge(
    "partition_status", "Status of a partition: " + STATUS_DOC, ("group", "topic", "partition")
)
GROUP_STATUS = _monitor_gauge(
    "group_status", "Status of the consumer group: " + STATUS_DOC, ("group",)
)
PARTITION_OFFSET_LAG = _monitor_gauge(
    "partition_offset_lag",
    "Messages between the group's committed offset and the end of the partition.",
    ("group", "topic", "partition"),
)
PARTITION_TIME_LAG = _monitor_gauge(
    "partition_time_lag_seconds",
    "Age of the oldest message of the partition the group has not committed past.",
    ("group", "topic", "partition"),
)
MONITOR_STALENESS = _monitor_gauge(
    "max_target_staleness_seconds",
    "Largest staleness among a dataset's targets, read from the version registry.",
    ("dataset",),
)
REPLICATION_SLOT_LAG = _monitor_gauge(
    "replication_slot_lag_bytes",
    "WAL bytes between the server's current position and the slot's confirmed flush.",
    ("slot",),
)
REPLICATION_SLOT_ACTIVE = _monitor_gauge(
    "replication_slot_active", "1 while a client streams from the replication slot.", ("slot",)
)
CONNECTOR_RUNNING = _monitor_gauge(
    "connector_running",
    "1 when Kafka Connect reports the Debezium connector RUNNING, else 0 (also unreachable).",
    ("connector",),
)
CONNECTOR_TASKS = _monitor_gauge(
    "connector_tasks", "Tasks of the Debezium connector, by state.", ("connector", "state")
)
LAG_COLLECTION_TIMESTAMP = _monitor_gauge(
    "lag_collection_timestamp_seconds", "Unix time of the last observation of the lag monitor."
)


@dataclass
class HealthState:
    """What the poll loop reports about itself, read by the health endpoints' thread.

    The poll loop calls :meth:`polled` on every turn, :meth:`assigned` from its rebalance
    callbacks, :meth:`contact_ok`/:meth:`contact_failed` after talking to Kafka, Redis or S3,
    and sets :meth:`stalled` when it cannot make progress. All of it is cheap and
    thread-safe, so the loop never waits on the server.
    """

    poll_timeout_s: float = 30.0
    services: tuple[str, ...] = ("kafka", "redis", "s3")
    last_poll: float | None = None
    partitions: frozenset[tuple[str, int]] = frozenset()
    is_stalled: bool = False
    stalled_reason: str = ""
    _contacts: dict[str, tuple[float | None, float | None, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def polled(self, now: float | None = None) -> None:
        stamp = time.time() if now is None else now
        with self._lock:
            self.last_poll = stamp
        LAST_POLL_TIMESTAMP.set(stamp)

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            self.partitions = frozenset(partitions)

    def stalled(self, flag: bool, reason: str = "") -> None:
        with self._lock:
            self.is_stalled = flag
            self.stalled_reason = reason if flag else ""

    def contact_ok(self, service: str, now: float | None = None) -> None:
        stamp = time.time() if now is None else now
        with self._lock:
            _, failed, reason = self._contacts.get(service, (None, None, ""))
            self._contacts[service] = (stamp, failed, reason)

    def contact_failed(self, service: str, reason: str, now: float | None = None) -> None:
        stamp = time.time() if now is None else now
        with self._lock:
            ok, _, _ = self._contacts.get(service, (None, None, ""))
            self._contacts[service] = (ok, stamp, reason)

    def liveness(self, now: float | None = None) -> tuple[bool, str]:
        """Alive while the poll loop returned within ``poll_timeout_s``."""
        now = time.time() if now is None else now
        with self._lock:
            last = self.last_poll
        if last is None:
            return False, "the poll loop has not run yet"
        age = now - last
        if age > self.poll_timeout_s:
            return (
                False,
                f"the poll loop last returned {age:.1f}s ago (limit {self.poll_timeout_s}s)",
            )
        return True, f"the poll loop returned {age:.1f}s ago"

    def readiness(self, now: float | None = None) -> tuple[bool, list[str]]:
        """Ready when alive, assigned, not stalled, and the last contact with each service
        succeeded (a failure newer than the last success means disconnected)."""
        alive, why = self.liveness(now)
        problems = [] if alive else [why]
        with self._lock:
            if not self.partitions:
                problems.append("no partition is assigned")
            if self.is_stalled:
                problems.append(f"stalled: {self.stalled_reason or 'no progress'}")
            for service in self.services:
                ok, failed, reason = self._contacts.get(service, (None, None, ""))
                if ok is None and failed is None:
                    problems.append(f"{service}: not contacted yet")
                elif failed is not None and (ok is None or failed >= ok):
                    problems.append(f"{service}: {reason}")
        return not problems, problems


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive, why = self.server.health.liveness()
            self._reply(200 if alive else 503, (why + "\n").encode())
        elif path == "/readyz":
            ready, problems = self.server.health.readiness()
            body = "ready\n" if ready else "".join(p + "\n" for p in problems)
            self._reply(200 if ready else 503, body.encode())
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("metrics http: " + format, *args)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], health: HealthState, registry: CollectorRegistry
    ) -> None:
        super().__init__(address, _Handler)
        self.health = health
        self.registry = registry


class MetricsServer:
    """A running metrics server; :attr:`port` is the bound port (useful with port 0)."""

    def __init__(self, server: _MetricsServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(
    host: str,
    port: int,
    health: HealthState,
    registry: CollectorRegistry = REGISTRY,
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz from a daemon thread; port 0 picks a free port."""
    try:
        server = _MetricsServer((host, port), health, registry)
    except OSError as error:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({error.strerror}); change "
            "consumer.metrics_port (SB_CONSUMER__METRICS_PORT) or consumer.metrics_host"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("serving metrics and health on http://%s:%d/metrics", host, server.server_address[1])
    return MetricsServer(server, thread)


def textfile_path(job: str, directory: Path | str | None = None) -> Path | None:
    """Where a batch job's outcome file goes: ``<dir>/storage_builder_<job>.prom``.

    The directory is the argument, else the environment variable ``SB_METRICS_TEXTFILE_DIR``
    (point it at node-exporter's ``--collector.textfile.directory``); None when neither is set.
    """
    chosen = directory if directory is not None else os.environ.get(TEXTFILE_DIR_ENV)
    if not chosen:
        return None
    return Path(chosen) / f"{PREFIX}_{job}.prom"


def _previous_success(path: Path, job: str) -> float | None:
    """The last-success time a previous run recorded, so a failed run does not erase it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            if family.name == f"{PREFIX}_job_last_success_timestamp_seconds":
                for sample in family.samples:
                    if sample.labels.get("batch_job") == job:
                        return float(sample.value)
    except ValueError:
        log.warning("ignoring unreadable metrics file %s; last success time is lost", path)
    return None


def write_job_metrics(
    job: str,
    *,
    succeeded: bool,
    duration_s: float,
    targets: Mapping[str, int] | None = None,
    drift_rows: Mapping[str, int] | None = None,
    directory: Path | str | None = None,
    now: float | None = None,
) -> Path | None:
    """Leave a batch job's outcome where node-exporter's textfile collector reads it.

    ``targets`` counts targets per outcome (e.g. ``{"in_sync": 598, "repaired": 2}``),
    ``drift_rows`` the drifted rows found per dataset (reconcile). The file is written to a
    temporary name and renamed over the old one, so a scrape never reads half a file. A
    failed run keeps the previous run's last-success time. Returns the path, or None when
    no directory is configured.
    """
    path = textfile_path(job, directory)
    if path is None:
        log.debug("no %s set; %s outcome not written", TEXTFILE_DIR_ENV, job)
        return None
    now = time.time() if now is None else now
    last_success = now if succeeded else _previous_success(path, job)

    registry = CollectorRegistry()
    # Not "job": Prometheus would rename it to exported_job, as the scrape sets its own job.
    labels = {"batch_job": job}
    Gauge(
        f"{PREFIX}_job_last_run_timestamp_seconds",
        "Unix time a batch job last ended.",
        ["batch_job"],
        registry=registry,
    ).labels(**labels).set(now)
    Gauge(
        f"{PREFIX}_job_last_run_succeeded",
        "1 if the batch job's last run succeeded, else 0.",
        ["batch_job"],
        registry=registry,
    ).labels(**labels).set(1 if succeeded else 0)
    Gauge(
        f"{PREFIX}_job_duration_seconds",
        "Duration of the batch job's last run.",
        ["batch_job"],
        registry=registry,
    ).labels(**labels).set(duration_s)
    if last_success is not None:
        Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "Unix time a batch job last succeeded.",
            ["batch_job"],
            registry=registry,
        ).labels(**labels).set(last_success)
    outcome = Gauge(
        f"{PREFIX}_job_targets",
        "Targets of the last run, by outcome.",
        ["batch_job", "outcome"],
        registry=registry,
    )
    for name, count in (targets or {}).items():
        outcome.labels(batch_job=job, outcome=name).set(count)
    if drift_rows is not None:
        drift = Gauge(
            f"{PREFIX}_reconcile_drift_rows",
            "Rows found drifted by the last reconciliation, by dataset.",
            ["dataset"],
            registry=registry,
        )
        for dataset, rows in drift_rows.items():
            drift.labels(dataset=dataset).set(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    # write_to_textfile writes a temporary file beside the target and renames it over.
    write_to_textfile(str(path), registry)
    log.info("wrote %s outcome to %s", job, path)
    return path
