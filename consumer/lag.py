"""How far behind the snapshots are, and whether that is a problem: ``storage-builder lag``.

One observation reads, from outside the consumer group: per topic and partition the
committed offset, the end offset and which member owns it (Kafka's admin API), the timestamp
of the oldest message not yet committed past (the time lag), and the state of the Debezium
connector and its tasks (Kafka Connect's REST API), the replication slot's lag in bytes
(PostgreSQL) and, per target, version and staleness (the version registry in Redis).

A status needs more than one observation: lag that grows, or a committed offset that does
not move, only shows over time. Observations are kept in Redis under the key prefix, so a
one-shot run evaluates over the history earlier runs left and only waits, sampling, when
that history does not span the window yet. The status rules, worst first:

- ERR: the partition could not be observed, or its committed offset lies past its end.
- STOP: no member of the group owned the partition at any observation of the window.
- STALL: a member owns it, lag stayed above zero and the committed offset did not move.
- WARN: the lag grew through the whole window (never fell, ended higher than it began),
  or no member owns the partition yet for less than the window.
- OK: anything else; in particular a quiet partition that is caught up, commits or not.

The source counts too: a paused connector is STOP and a failed connector or task is ERR,
because a connector that does not run means no lag and no news.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import orjson
import typer

from schemas.datasets import DATASETS
from storage_builder.errors import StackError, StorageBuilderError
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

STATUSES = ("OK", "WARN", "STALL", "STOP", "ERR")
# Exit codes for scripts: non-zero from WARN on; 2 stays the CLI's "the command failed".
EXIT_CODES = {"OK": 0, "WARN": 1, "STALL": 3, "STOP": 4, "ERR": 5}
SLOT_NAME = "storage_builder_slot"

_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: the group never committed this partition
_TIMEOUT_S = 10.0


def worst(statuses: Iterable[str]) -> str:
    """The most severe of the statuses (OK when there are none)."""
    return max(statuses, key=STATUSES.index, default="OK")


# ---------------------------------------------------------------------------------------
# Observations and their evaluation (pure)


@dataclass(frozen=True)
class PartitionSample:
    """One partition as seen at one moment."""

    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    start: int  # the earliest offset Kafka still holds
    end: int  # the offset the next message will get
    owned: bool  # a member of the group has it assigned
    oldest_ts_ms: int | None = None  # timestamp of the first message not committed past
    error: str | None = None

    @property
    def offset_lag(self) -> int:
        position = self.start if self.committed is None else max(self.committed, self.start)
        return max(self.end - position, 0)

    def time_lag_s(self, now: float) -> float:
        if self.offset_lag == 0 or self.oldest_ts_ms is None:
            return 0.0
        return max(now - self.oldest_ts_ms / 1000.0, 0.0)


@dataclass(frozen=True)
class Observation:
    """The group's partitions at one moment."""

    ts: float
    group_state: str
    partitions: tuple[PartitionSample, ...]

    def sample(self, topic: str, partition: int) -> PartitionSample | None:
        for sample in self.partitions:
            if sample.topic == topic and sample.partition == partition:
                return sample
        return None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> Observation:
        raw = orjson.loads(data)
        samples = tuple(PartitionSample(**sample) for sample in raw["partitions"])
        return cls(ts=raw["ts"], group_state=raw["group_state"], partitions=samples)


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str


def window_series(
    history: Sequence[Observation], topic: str, partition: int, window_s: float
) -> tuple[list[tuple[float, PartitionSample]], bool]:
    """The samples of one partition inside the window ending at the newest observation.

    The series starts at the newest sample taken at or before the window's start (the
    anchor), so a covered series spans at least the whole window; returns (series, covered).
    """
    samples = [
        (obs.ts, sample)
        for obs in sorted(history, key=lambda o: o.ts)
        if (sample := obs.sample(topic, partition)) is not None
    ]
    if not samples:
        return [], False
    start = samples[-1][0] - window_s
    anchors = [i for i, (ts, _) in enumerate(samples) if ts <= start]
    if not anchors:
        return samples, False
    return samples[anchors[-1] :], True


def evaluate_partition(series: Sequence[tuple[float, PartitionSample]], covered: bool) -> Verdict:
    """The status of one partition from its series over the window (see the module doc)."""
    if not series:
        return Verdict("ERR", "not observed")
    latest_ts, latest = series[-1]
    if latest.error:
        return Verdict("ERR", latest.error)
    if latest.committed is not None and latest.committed > latest.end:
        return Verdict("ERR", f"committed offset {latest.committed} is past the end {latest.end}")

    span = latest_ts - series[0][0]
    lags = [sample.offset_lag for _, sample in series]
    if not any(sample.owned for _, sample in series):
        if covered:
            return Verdict("STOP", f"no member has owned the partition for {span:.0f}s")
        return Verdict("WARN", f"no member owns the partition (for {span:.0f}s so far)")
    if not covered:
        return Verdict("OK", f"window not yet full ({span:.0f}s observed)")

    committed = {sample.committed for _, sample in series}
    if latest.owned and min(lags) > 0 and len(committed) == 1:
        return Verdict("STALL", f"committed offset stuck for {span:.0f}s with lag {lags[-1]}")
    growing = all(b >= a for a, b in zip(lags, lags[1:], strict=False)) and lags[-1] > lags[0]
    if growing:
        return Verdict("WARN", f"lag grew from {lags[0]} to {lags[-1]} over {span:.0f}s")
    return Verdict("OK", "caught up" if lags[-1] == 0 else "consuming")


def evaluate(history: Sequence[Observation], window_s: float) -> dict[tuple[str, int], Verdict]:
    """A verdict for every partition of the newest observation."""
    if not history:
        return {}
    latest = max(history, key=lambda obs: obs.ts)
    verdicts = {}
    for sample in latest.partitions:
        series, covered = window_series(history, sample.topic, sample.partition, window_s)
        verdicts[(sample.topic, sample.partition)] = evaluate_partition(series, covered)
    return verdicts


def window_covered(history: Sequence[Observation], window_s: float) -> bool:
    """True when some observation is at least ``window_s`` older than the newest one."""
    if not history:
        return False
    newest = max(obs.ts for obs in history)
    return any(obs.ts <= newest - window_s for obs in history)


@dataclass(frozen=True)
class ConnectorState:
    """The Debezium connector as Kafka Connect reports it."""

    name: str
    state: str  # RUNNING, PAUSED, FAILED, UNASSIGNED, RESTARTING, STOPPED, or UNREACHABLE
    tasks: tuple[tuple[int, str, str], ...] = ()  # (id, state, first line of the trace)
    error: str | None = None

    def verdict(self) -> Verdict:
        if self.error:
            return Verdict("ERR", self.error)
        failed = [
            f"task {i} {state}: {trace}" for i, state, trace in self.tasks if state == "FAILED"
        ]
        if self.state == "FAILED" or failed:
            return Verdict("ERR", "; ".join(failed) or f"connector {self.name} FAILED")
        if self.state in ("PAUSED", "STOPPED"):
            return Verdict("STOP", f"connector {self.name} is {self.state}: no changes flow")
        if not self.tasks:
            return Verdict("ERR", f"connector {self.name} has no task: no changes flow")
        idle = [f"task {i} {state}" for i, state, _ in self.tasks if state != "RUNNING"]
        if self.state != "RUNNING" or idle:
            return Verdict("WARN", "; ".join(idle) or f"connector {self.name} is {self.state}")
        return Verdict("OK", f"connector {self.name} and {len(self.tasks)} task(s) RUNNING")


@dataclass(frozen=True)
class SlotState:
    """The Debezium replication slot in PostgreSQL."""

    name: str
    active: bool | None = None
    lag_bytes: int | None = None
    error: str | None = None

    def verdict(self, warn_bytes: int) -> Verdict:
        if self.error:
            return Verdict("ERR", self.error)
        if self.lag_bytes is not None and self.lag_bytes > warn_bytes:
            return Verdict("WARN", f"slot {self.name} holds {self.lag_bytes} bytes of WAL")
        if not self.active:
            return Verdict("WARN", f"slot {self.name} has no active client")
        return Verdict("OK", f"slot {self.name} lag {self.lag_bytes} bytes")


@dataclass(frozen=True)
class TargetLag:
    """A target's published version and how old the newest change it contains is."""

    dataset: str
    client_id: int
    version: int
    staleness_s: float
    measured_from: str  # "source" (change's source time) or "publish" (publish time)


# ---------------------------------------------------------------------------------------
# Collection (talks to Kafka, Kafka Connect, PostgreSQL and Redis)


def default_topics(settings: Settings) -> list[str]:
    """The Debezium change topics of every dataset."""
    kafka = settings.kafka
    return [f"{kafka.topic_prefix}.{kafka.schema_name}.{name}" for name in DATASETS]


class LagCollector:
    """Takes observations of one consumer group; clients are created on first use."""

    def __init__(self, settings: Settings, group: str, topics: Sequence[str] | None = None):
        self.settings = settings
        self.group = group
        self.topics = list(topics) if topics else None
        self._admin: Any = None
        self._probe: Any = None

    @property
    def admin(self) -> Any:
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient(self.settings.kafka.librdkafka())
        return self._admin

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def observe(self) -> Observation:
        """One observation of every partition of the watched topics."""
        from confluent_kafka import KafkaException

        try:
            return self._observe()
        except KafkaException as error:
            raise StackError(
                f"cannot read consumer group {self.group!r} from Kafka at "
                f"{self.settings.kafka.bootstrap_servers} (kafka.bootstrap_servers): {error}"
            ) from None

    def _observe(self) -> Observation:
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        metadata = self.admin.list_topics(timeout=_TIMEOUT_S)
        committed = self._committed(ConsumerGroupTopicPartitions)
        wanted = self.topics or sorted(
            {t for t in default_topics(self.settings) if t in metadata.topics}
            | {topic for topic, _ in committed}
        )
        partitions = [
            (topic, p)
            for topic in wanted
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        missing = [topic for topic in wanted if topic not in metadata.topics]
        if missing:
            raise StackError(f"topic(s) {', '.join(missing)} do not exist in Kafka")

        now = time.time()
        group_state, owned = self._members()
        starts = self._offsets(partitions, OffsetSpec.earliest(), TopicPartition)
        ends = self._offsets(partitions, OffsetSpec.latest(), TopicPartition)
        samples = [
            PartitionSample(
                topic=topic,
                partition=p,
                committed=committed.get((topic, p)),
                start=starts[(topic, p)],
                end=ends[(topic, p)],
                owned=(topic, p) in owned,
            )
            for topic, p in partitions
        ]
        samples = self._with_timestamps(samples)
        return Observation(ts=now, group_state=group_state, partitions=tuple(samples))

    def _committed(self, request_type: Any) -> dict[tuple[str, int], int]:
        futures = self.admin.list_consumer_group_offsets([request_type(self.group)])
        result = futures[self.group].result(timeout=_TIMEOUT_S)
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions
            if tp.offset != _NO_OFFSET and tp.error is None
        }

    def _members(self) -> tuple[str, set[tuple[str, int]]]:
        futures = self.admin.describe_consumer_groups([self.group], request_timeout=_TIMEOUT_S)
        description = futures[self.group].result(timeout=_TIMEOUT_S)
        owned = {
            (tp.topic, tp.partition)
            for member in description.members
            for tp in (member.assignment.topic_partitions if member.assignment else [])
        }
        return str(description.state.name), owned

    def _offsets(
        self, partitions: list[tuple[str, int]], spec: Any, tp_type: Any
    ) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        request = {tp_type(topic, p): spec for topic, p in partitions}
        futures = self.admin.list_offsets(request, request_timeout=_TIMEOUT_S)
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    def _with_timestamps(self, samples: list[PartitionSample]) -> list[PartitionSample]:
        """Read the first message not committed past of each lagging partition, for its
        timestamp: the time lag is measured, not estimated from a rate."""
        from confluent_kafka import Consumer, TopicPartition

        lagging = [s for s in samples if s.offset_lag > 0]
        if not lagging:
            return samples
        if self._probe is None:
            config = self.settings.kafka.librdkafka() | {
                # A group id is required, but the probe only assigns and never commits.
                "group.id": f"{self.group}.lag-probe",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
            self._probe = Consumer(config)

        def first_offset(s: PartitionSample) -> int:
            return s.start if s.committed is None else max(s.committed, s.start)

        self._probe.assign([TopicPartition(s.topic, s.partition, first_offset(s)) for s in lagging])
        found: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + _TIMEOUT_S
        while len(found) < len(lagging) and time.monotonic() < deadline:
            for message in self._probe.consume(num_messages=500, timeout=0.5):
                key = (message.topic(), message.partition())
                if message.error() is None and key not in found:
                    found[key] = message.timestamp()[1]
                    self._probe.pause([TopicPartition(*key)])
        # Pause state outlives the assignment in librdkafka: resume before letting go.
        self._probe.resume([TopicPartition(s.topic, s.partition) for s in lagging])
        self._probe.unassign()

        result = []
        for s in samples:
            key = (s.topic, s.partition)
            if s.offset_lag > 0 and key not in found:
                s = PartitionSample(**{**asdict(s), "error": "oldest message not readable"})
            elif key in found:
                s = PartitionSample(**{**asdict(s), "oldest_ts_ms": found[key]})
            result.append(s)
        return result


def connector_state(settings: Settings) -> ConnectorState:
    """The Debezium connector and its tasks, from Kafka Connect's REST API."""
    name = settings.kafka.connector_name
    url = f"{settings.kafka.connect_url.rstrip('/')}/connectors/{name}/status"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            status = orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        reason = "is not deployed" if error.code == 404 else f"status HTTP {error.code}"
        return ConnectorState(name, "UNREACHABLE", error=f"connector {name} {reason} ({url})")
    except (urllib.error.URLError, OSError) as error:
        return ConnectorState(
            name, "UNREACHABLE", error=f"Kafka Connect at {url} (kafka.connect_url): {error}"
        )
    tasks = tuple(
        (int(task["id"]), str(task["state"]), str(task.get("trace", "")).split("\n", 1)[0])
        for task in status.get("tasks", [])
    )
    return ConnectorState(name, str(status["connector"]["state"]), tasks)


def slot_state(settings: Settings, slot: str = SLOT_NAME) -> SlotState:
    """The replication slot's lag in bytes: WAL written but not yet confirmed by Debezium."""
    import psycopg

    query = (
        "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s"
    )
    try:
        with psycopg.connect(settings.postgres.dsn.get_secret_value(), connect_timeout=5) as conn:
            row = conn.execute(query, (slot,)).fetchone()
    except psycopg.Error as error:
        return SlotState(slot, error=f"PostgreSQL (postgres.dsn): {str(error).strip()}")
    if row is None:
        return SlotState(slot, error=f"replication slot {slot!r} does not exist")
    return SlotState(slot, active=bool(row[0]), lag_bytes=None if row[1] is None else int(row[1]))


def target_lags(settings: Settings, now: float) -> list[TargetLag]:
    """Per target, its version and staleness, from the version registry."""
    from snapshots.registry import VersionRegistry

    registry = VersionRegistry(settings.redis)
    targets = list(registry.targets())
    states = registry.get_many(targets)
    lags = []
    for target in targets:
        state = states.get(target)
        if state is None:
            continue
        source_ts = _source_time(state)
        since = source_ts if source_ts is not None else state.published_at
        lags.append(
            TargetLag(
                dataset=target.dataset,
                client_id=target.client_id,
                version=state.version,
                staleness_s=max(now - since, 0.0),
                measured_from="source" if source_ts is not None else "publish",
            )
        )
    return sorted(lags, key=lambda lag: -lag.staleness_s)


def _source_time(state: Any) -> float | None:
    """The source commit time of the last applied change, when the registry keeps it."""
    for holder in (state, getattr(state, "source_position", None)):
        value = getattr(holder, "source_ts_ms", None)
        if value:
            return float(value) / 1000.0
    return None


# ---------------------------------------------------------------------------------------
# The history of observations, kept in Redis so one-shot runs share a window


class ObservationHistory:
    """Observations of one group in a Redis sorted set, or in memory when Redis fails."""

    def __init__(self, settings: Settings, group: str, window_s: float, persist: bool = True):
        self.window_s = window_s
        self.key = f"{settings.redis.key_prefix}lag:{group}:observations"
        self._memory: list[Observation] = []
        self._redis: Any = None
        if persist:
            import redis

            self._redis = redis.Redis.from_url(
                settings.redis.url.get_secret_value(), socket_timeout=5
            )

    def load(self) -> list[Observation]:
        if self._redis is not None:
            try:
                raw = self._redis.zrangebyscore(self.key, "-inf", "+inf")
                stored = [Observation.from_json(item) for item in raw]
                self._memory = sorted(
                    {o.ts: o for o in stored + self._memory}.values(), key=lambda o: o.ts
                )
            except Exception as error:  # a history is an optimisation, never a reason to fail
                log.warning("cannot read the lag history from Redis (%s); sampling anew", error)
                self._redis = None
        return list(self._memory)

    def add(self, observation: Observation) -> list[Observation]:
        self._memory.append(observation)
        # Keep the window plus the newest observation before it: the series' anchor.
        start = observation.ts - self.window_s
        older = [o.ts for o in self._memory if o.ts <= start]
        keep_from = max(older) if older else start
        self._memory = [o for o in self._memory if o.ts >= keep_from]
        if self._redis is not None:
            try:
                pipe = self._redis.pipeline()
                pipe.zadd(self.key, {observation.to_json(): observation.ts})
                pipe.zremrangebyscore(self.key, "-inf", f"({keep_from}")
                pipe.expire(self.key, int(6 * self.window_s) + 60)
                pipe.execute()
            except Exception as error:
                log.warning("cannot store the lag observation in Redis (%s)", error)
        return list(self._memory)


# ---------------------------------------------------------------------------------------
# The report


@dataclass
class LagReport:
    group: str
    window_s: float
    ts: float
    observation: Observation
    verdicts: dict[tuple[str, int], Verdict]
    connector: ConnectorState
    slot: SlotState
    slot_verdict: Verdict
    targets: list[TargetLag] = field(default_factory=list)
    targets_error: str | None = None

    @property
    def group_status(self) -> str:
        if not self.verdicts:
            return "ERR"
        return worst(v.status for v in self.verdicts.values())

    @property
    def status(self) -> str:
        return worst([self.group_status, self.connector.verdict().status, self.slot_verdict.status])

    def to_dict(self) -> dict[str, Any]:
        partitions = []
        for sample in self.observation.partitions:
            verdict = self.verdicts[(sample.topic, sample.partition)]
            partitions.append(
                {
                    "topic": sample.topic,
                    "partition": sample.partition,
                    "committed_offset": sample.committed,
                    "end_offset": sample.end,
                    "offset_lag": sample.offset_lag,
                    "time_lag_seconds": round(sample.time_lag_s(self.observation.ts), 3),
                    "owned": sample.owned,
                    "status": verdict.status,
                    "reason": verdict.reason,
                }
            )
        connector = self.connector.verdict()
        return {
            "status": self.status,
            "group": {
                "id": self.group,
                "state": self.observation.group_state,
                "status": self.group_status,
                "window_seconds": self.window_s,
            },
            "partitions": partitions,
            "connector": {
                "name": self.connector.name,
                "state": self.connector.state,
                "tasks": [{"id": i, "state": s, "trace": t} for i, s, t in self.connector.tasks],
                "status": connector.status,
                "reason": connector.reason,
            },
            "replication_slot": {
                "name": self.slot.name,
                "active": self.slot.active,
                "lag_bytes": self.slot.lag_bytes,
                "status": self.slot_verdict.status,
                "reason": self.slot_verdict.reason,
            },
            "targets": [asdict(t) | {"staleness_s": round(t.staleness_s, 3)} for t in self.targets],
            "targets_error": self.targets_error,
            "observed_at": self.ts,
        }


def build_report(
    settings: Settings,
    collector: LagCollector,
    history: Sequence[Observation],
    window_s: float,
    slot_warn_bytes: int,
) -> LagReport:
    latest = max(history, key=lambda obs: obs.ts)
    slot = slot_state(settings)
    targets: list[TargetLag] = []
    targets_error = None
    try:
        targets = target_lags(settings, latest.ts)
    except (StorageBuilderError, ImportError, OSError) as error:
        targets_error = f"version registry: {error}"
        log.warning("cannot read target staleness: %s", error)
    return LagReport(
        group=collector.group,
        window_s=window_s,
        ts=latest.ts,
        observation=latest,
        verdicts=evaluate(history, window_s),
        connector=connector_state(settings),
        slot=slot,
        slot_verdict=slot.verdict(slot_warn_bytes),
        targets=targets,
        targets_error=targets_error,
    )


def export(report: LagReport) -> None:
    """Set the lag monitor's gauges from a report (for ``lag --watch --metrics-port``)."""
    from storage_builder import metrics as m

    group = report.group
    for sample in report.observation.partitions:
        labels = (group, sample.topic, str(sample.partition))
        verdict = report.verdicts[(sample.topic, sample.partition)]
        m.PARTITION_STATUS.labels(*labels).set(m.STATUS_CODES[verdict.status])
        m.PARTITION_OFFSET_LAG.labels(*labels).set(sample.offset_lag)
        m.PARTITION_TIME_LAG.labels(*labels).set(sample.time_lag_s(report.ts))
    m.GROUP_STATUS.labels(group).set(m.STATUS_CODES[report.group_status])

    connector = report.connector
    m.CONNECTOR_RUNNING.labels(connector.name).set(1 if connector.state == "RUNNING" else 0)
    counts = {state: 0 for state in ("RUNNING", "PAUSED", "FAILED", "UNASSIGNED")}
    for _, state, _ in connector.tasks:
        counts[state] = counts.get(state, 0) + 1
    for state, count in counts.items():
        m.CONNECTOR_TASKS.labels(connector.name, state).set(count)

    if report.slot.lag_bytes is not None:
        m.REPLICATION_SLOT_LAG.labels(report.slot.name).set(report.slot.lag_bytes)
    m.REPLICATION_SLOT_ACTIVE.labels(report.slot.name).set(1 if report.slot.active else 0)
    staleness: dict[str, float] = {}
    for target in report.targets:
        staleness[target.dataset] = max(staleness.get(target.dataset, 0.0), target.staleness_s)
    for dataset, seconds in staleness.items():
        m.MONITOR_STALENESS.labels(dataset).set(seconds)
    m.LAG_COLLECTION_TIMESTAMP.set(report.ts)


def render(report: LagReport, top: int) -> Iterator[Any]:
    """The report as rich renderables: partitions, source, targets."""
    from rich.table import Table

    colour = {"OK": "green", "WARN": "yellow", "STALL": "red", "STOP": "red", "ERR": "bold red"}

    def badge(status: str) -> str:
        return f"[{colour[status]}]{status}[/]"

    data = report.to_dict()
    group = data["group"]
    title = (
        f"group {group['id']} ({group['state']}): {badge(report.group_status)}"
        f" over {report.window_s:.0f}s - overall {badge(report.status)}"
    )
    table = Table(title=title)
    for column in (
        "topic",
        "partition",
        "committed",
        "end",
        "lag",
        "time lag s",
        "owned",
        "status",
        "reason",
    ):
        table.add_column(column)
    for p in data["partitions"]:
        table.add_row(
            p["topic"],
            str(p["partition"]),
            str(p["committed_offset"]),
            str(p["end_offset"]),
            str(p["offset_lag"]),
            f"{p['time_lag_seconds']:.1f}",
            "yes" if p["owned"] else "no",
            badge(p["status"]),
            p["reason"],
        )
    yield table

    connector, slot = data["connector"], data["replication_slot"]
    tasks = ", ".join(f"{t['id']}:{t['state']}" for t in connector["tasks"]) or "none"
    yield (
        f"connector {connector['name']}: {connector['state']} (tasks {tasks}) "
        f"{badge(connector['status'])} {connector['reason']}"
    )
    yield (
        f"replication slot {slot['name']}: active={slot['active']} lag={slot['lag_bytes']} bytes "
        f"{badge(slot['status'])}"
    )

    if report.targets_error:
        yield f"[yellow]targets: {report.targets_error}[/]"
        return
    shown = report.targets if top <= 0 else report.targets[:top]
    targets = Table(title=f"targets ({len(shown)} of {len(report.targets)}, stalest first)")
    for column in ("dataset", "client", "version", "staleness s", "from"):
        targets.add_column(column)
    for t in shown:
        targets.add_row(
            t.dataset, str(t.client_id), str(t.version), f"{t.staleness_s:.1f}", t.measured_from
        )
    yield targets


# ---------------------------------------------------------------------------------------
# The command


def run_lag(
    settings: Settings,
    *,
    group: str,
    topics: Sequence[str] | None,
    window_s: float,
    interval_s: float,
    slot_warn_bytes: int = 1 << 30,
    persist: bool = True,
) -> LagReport:
    """One-shot: observe, and keep sampling until the history spans the window."""
    collector = LagCollector(settings, group, topics)
    history_store = ObservationHistory(settings, group, window_s, persist)
    try:
        history = history_store.load()
        history = history_store.add(collector.observe())
        while not window_covered(history, window_s):
            log.info("lag: sampling until the window of %.0fs is observed", window_s)
            time.sleep(interval_s)
            history = history_store.add(collector.observe())
        return build_report(settings, collector, history, window_s, slot_warn_bytes)
    finally:
        collector.close()


def register(app: typer.Typer) -> None:
    """Add ``lag`` to the ``storage-builder`` app."""

    @app.command("lag")
    def lag_command(
        ctx: typer.Context,
        group: Annotated[
            str | None, typer.Option(help="Consumer group (default: kafka.group_id).")
        ] = None,
        topic: Annotated[
            list[str] | None, typer.Option(help="Topic to watch (repeatable; default: all).")
        ] = None,
        window: Annotated[float, typer.Option(help="Seconds the status is evaluated over.")] = 60,
        interval: Annotated[float, typer.Option(help="Seconds between observations.")] = 10,
        as_json: Annotated[
            bool, typer.Option("--json", help="One JSON object per report.")
        ] = False,
        watch: Annotated[bool, typer.Option(help="Refresh every --interval seconds.")] = False,
        top: Annotated[int, typer.Option(help="Targets shown in the table (0: all).")] = 20,
        slot_warn_bytes: Annotated[int, typer.Option(help="Slot lag that is WARN.")] = 1 << 30,
        metrics_port: Annotated[
            int | None, typer.Option(help="With --watch, serve the status to Prometheus here.")
        ] = None,
        history: Annotated[
            bool, typer.Option(help="Keep observations in Redis between runs.")
        ] = True,
        connector: Annotated[
            str | None,
            typer.Option(help="Kafka Connect connector to check (default: kafka.connector_name)."),
        ] = None,
    ) -> None:
        """Consumer lag, time lag, staleness, connector and slot state, with a status.

        Exit code: 0 OK, 1 WARN, 3 STALL, 4 STOP, 5 ERR (2: the command itself failed).
        """
        from rich.console import Console

        from storage_builder.cli import settings_of

        settings = settings_of(ctx)
        if connector:
            kafka = settings.kafka.model_copy(update={"connector_name": connector})
            settings = settings.model_copy(update={"kafka": kafka})
        group_id = group or settings.kafka.group_id
        if window <= 0 or interval <= 0:
            raise typer.BadParameter("--window and --interval must be above zero")
        console = Console()
        if not console.is_terminal:
            # Piped into a file or a pager: do not squeeze the table to 80 columns.
            console = Console(width=200)

        def show(report: LagReport) -> None:
            if as_json:
                typer.echo(orjson.dumps(report.to_dict()).decode())
            else:
                if watch:
                    console.clear()
                for part in render(report, top):
                    console.print(part)

        if not watch:
            report = run_lag(
                settings,
                group=group_id,
                topics=topic,
                window_s=window,
                interval_s=interval,
                slot_warn_bytes=slot_warn_bytes,
                persist=history,
            )
            show(report)
            raise typer.Exit(EXIT_CODES[report.status])
        _watch(
            settings,
            group_id,
            topic,
            window,
            interval,
            slot_warn_bytes,
            history,
            metrics_port,
            show,
        )


def _watch(
    settings: Settings,
    group: str,
    topics: Sequence[str] | None,
    window_s: float,
    interval_s: float,
    slot_warn_bytes: int,
    persist: bool,
    metrics_port: int | None,
    show: Any,
) -> None:
    """Observe every interval and show each report until interrupted."""
    from storage_builder.metrics import MONITOR_REGISTRY, HealthState, serve

    health = HealthState(poll_timeout_s=3 * interval_s + _TIMEOUT_S, services=("kafka",))
    server = None
    if metrics_port is not None:
        server = serve(settings.consumer.metrics_host, metrics_port, health, MONITOR_REGISTRY)
    collector = LagCollector(settings, group, topics)
    store = ObservationHistory(settings, group, window_s, persist)
    store.load()
    try:
        while True:
            try:
                history = store.add(collector.observe())
                health.polled()
                health.contact_ok("kafka")
                report = build_report(settings, collector, history, window_s, slot_warn_bytes)
                export(report)
                show(report)
            except StackError as error:
                health.contact_failed("kafka", str(error))
                log.warning("lag observation failed: %s", error)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    finally:
        collector.close()
        if server is not None:
            server.close()
