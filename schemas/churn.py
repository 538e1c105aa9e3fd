"""Churn: a steady, skewed stream of inserts, updates and deletes on the demo source.

``churn`` commits transactions of 1 to ``max_changes_per_transaction`` changes at about
``rate`` changes per second, paced against a monotonic clock, until ``duration`` runs out or
``stop`` is set. Clients are chosen with a power-law skew, so a few of them take most of the
changes, as in a real multi-tenant database. Every committed change can be reported with its
commit time (``on_commit`` or ``record``), which is what latency benchmarks measure from.

Counts are of changes the database made, not of changes attempted: an update or delete that
finds the target empty becomes an insert, and a transaction that fails is rolled back and
counted apart.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from schemas.datasets import Dataset
from schemas.sample import SampleRows
from schemas.seed import validate_clients, validate_datasets, validate_skew
from schemas.source import ConnectionLike, connection, ensure_schema
from storage_builder.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

# Share of each operation in the mix; inserts outnumber deletes, so targets slowly grow.
DEFAULT_MIX = {"insert": 0.3, "update": 0.5, "delete": 0.2}

# How much more often each dataset changes than the least busy one, as in production:
# raw data arrives all day, formulas and their associations are edited now and then.
DATASET_WEIGHTS = {
    "raw_data": 6.0,
    "formula_associations": 2.0,
    "entities": 1.0,
    "data_items": 1.0,
    "formulas": 1.0,
}

_OPS = {"insert": "c", "update": "u", "delete": "d"}
_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class CommittedChange:
    """One change as committed: its target, key, op ('c', 'u' or 'd') and new row version.

    ``row_version`` is the version the row got (for a delete, the version it had), and
    ``commit_ts`` the wall-clock time (epoch seconds) at which COMMIT returned.
    """

    dataset: str
    client_id: int
    id: int
    op: str
    row_version: int
    commit_ts: float


@dataclass
class ChurnStats:
    """What a churn run committed."""

    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    transactions: int = 0
    multi_change_transactions: int = 0
    failed_transactions: int = 0
    seconds: float = 0.0
    changes: list[CommittedChange] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes

    @property
    def rate(self) -> float:
        """Changes committed per second of the run."""
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "inserts": self.inserts,
            "updates": self.updates,
            "deletes": self.deletes,
            "changes": self.total,
            "transactions": self.transactions,
            "multi_change_transactions": self.multi_change_transactions,
            "failed_transactions": self.failed_transactions,
            "seconds": round(self.seconds, 3),
            "changes_per_second": round(self.rate, 1),
        }

    def count(self, committed: list[CommittedChange]) -> None:
        for change in committed:
            if change.op == "c":
                self.inserts += 1
            elif change.op == "u":
                self.updates += 1
            else:
                self.deletes += 1
        self.transactions += 1
        if len(committed) > 1:
            self.multi_change_transactions += 1


class _TargetWriter:
    """The statements of one target and the next id its inserts take."""

    def __init__(self, dataset: Dataset, client_id: int, seed: int) -> None:
        self.dataset = dataset
        self.client_id = client_id
        self.sample = SampleRows(dataset, client_id, seed)
        self.next_id: int | None = None
        table = sql.Identifier(dataset.schema, dataset.name)
        columns = self.sample.columns
        self.insert_sql = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING RETURNING id, row_version"
        ).format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        # The row to change is the first one at or after a random key, else the last one
        # before it: both found through the primary key, wherever deletes left gaps.
        pick = sql.SQL(
            "id = coalesce("
            "(SELECT id FROM {t} WHERE client_id = %(c)s AND id >= %(k)s ORDER BY id LIMIT 1),"
            "(SELECT id FROM {t} WHERE client_id = %(c)s AND id < %(k)s"
            " ORDER BY id DESC LIMIT 1))"
        ).format(t=table)
        changed = list(self.sample.changed_values())
        self.update_sql = sql.SQL(
            "UPDATE {} SET {} WHERE client_id = %(c)s AND {} RETURNING id, row_version"
        ).format(
            table,
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in changed
            ),
            pick,
        )
        self.delete_sql = sql.SQL(
            "DELETE FROM {} WHERE client_id = %(c)s AND {} RETURNING id, row_version"
        ).format(table, pick)

    def load_next_id(self, conn: psycopg.Connection) -> None:
        """Find the first free id of this target, once: one past its largest."""
        if self.next_id is None:
            row = conn.execute(
                sql.SQL("SELECT coalesce(max(id), 0) + 1 FROM {} WHERE client_id = %s").format(
                    sql.Identifier(self.dataset.schema, self.dataset.name)
                ),
                [self.client_id],
            ).fetchone()
            self.next_id = int(row[0]) if row is not None else 1

    def send(self, cursor: psycopg.Cursor, op: str, rng: random.Random) -> None:
        """Send one change; its result, (id, row_version) or none, comes later on ``cursor``."""
        assert self.next_id is not None, "load_next_id first"
        if op == "insert":
            self.send_insert(cursor)
            return
        params: dict[str, object] = {"c": self.client_id, "k": rng.randrange(self.next_id)}
        if op == "update":
            params.update(self.sample.changed_values())
        cursor.execute(self.update_sql if op == "update" else self.delete_sql, params)

    def send_insert(self, cursor: psycopg.Cursor) -> None:
        assert self.next_id is not None, "load_next_id first"
        key = self.next_id
        self.next_id += 1
        cursor.execute(self.insert_sql, self.sample.row(key))


def validate_rate(rate: float, argument: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ConfigError(f"{argument} must be a number of changes per second, got {rate!r}")
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{argument} must be > 0 changes per second, got {rate!r}")
    return float(rate)


def churn(
    dsn: ConnectionLike,
    rate: float,
    duration: float | None = None,
    clients: Sequence[object] | None = None,
    *,
    datasets: Sequence[str] | None = None,
    skew: float = 1.0,
    seed: int | None = None,
    max_changes_per_transaction: int = 20,
    mix: dict[str, float] | None = None,
    on_commit: Callable[[list[CommittedChange]], None] | None = None,
    record: bool = False,
    stop: threading.Event | None = None,
) -> ChurnStats:
    """Commit changes at about ``rate`` per second until ``duration`` passes or ``stop`` is set.

    ``clients`` defaults to every client with rows; the i-th client is chosen with weight
    1 / i**skew. Half of the transactions hold one change, the others 2 to
    ``max_changes_per_transaction``. ``on_commit`` receives each committed transaction's
    changes; ``record`` keeps them all in ``ChurnStats.changes``.
    """
    rate = validate_rate(rate)
    _validate_run(duration, max_changes_per_transaction)
    mix = _validate_mix(mix or DEFAULT_MIX)
    chosen = validate_datasets(datasets)
    skew = validate_skew(skew)
    client_ids = validate_clients(clients) if clients is not None else None

    with connection(dsn) as conn:
        ensure_schema(conn)
        if client_ids is None:
            client_ids = discover_clients(conn, chosen)
        if not client_ids:
            raise ConfigError("clients is empty and the datasets hold no rows; seed first")
        run = _ChurnRun(conn, chosen, client_ids, skew, seed, mix, max_changes_per_transaction)
        log.info(
            "churn started: %.0f changes/s over %d targets (%d clients)",
            rate,
            len(run.writers),
            len(client_ids),
        )
        run.pace(rate, duration, stop or threading.Event(), on_commit, record)

    log.info("churn stopped: %s", run.stats.summary())
    return run.stats


def _validate_run(duration: float | None, max_changes: int) -> None:
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not math.isfinite(duration)
        or duration <= 0
    ):
        raise ConfigError(
            f"duration must be > 0 seconds (or None: until stopped), got {duration!r}"
        )
    if isinstance(max_changes, bool) or not isinstance(max_changes, int) or max_changes < 1:
        raise ConfigError(
            f"max_changes_per_transaction must be an integer >= 1, got {max_changes!r}"
        )


def _validate_mix(mix: dict[str, float]) -> dict[str, float]:
    unknown = set(mix) - set(_OPS)
    shares = list(mix.values())
    if unknown or not all(share >= 0 for share in shares) or not sum(shares) > 0:
        raise ConfigError(
            f"mix must give insert, update and delete shares >= 0, not all 0; got {mix!r}"
        )
    return dict(mix)


def discover_clients(conn: psycopg.Connection, datasets: Sequence[Dataset]) -> list[int]:
    """The clients that have rows in any of ``datasets``, found by skipping through the key."""
    found: set[int] = set()
    for dataset in datasets:
        query = sql.SQL(
            "WITH RECURSIVE c(id) AS ("
            " (SELECT client_id FROM {t} ORDER BY client_id LIMIT 1)"
            " UNION ALL"
            " SELECT (SELECT client_id FROM {t} WHERE client_id > c.id ORDER BY client_id LIMIT 1)"
            " FROM c WHERE c.id IS NOT NULL)"
            " SELECT id FROM c WHERE id IS NOT NULL"
        ).format(t=sql.Identifier(dataset.schema, dataset.name))
        found.update(row[0] for row in conn.execute(query))
    return sorted(found)


class _ChurnRun:
    """One churn run: its targets with their weights, its random source and its counts."""

    # Consecutive failed transactions after which the run gives up instead of spinning.
    MAX_FAILURES_IN_A_ROW = 10

    def __init__(
        self,
        conn: psycopg.Connection,
        datasets: list[Dataset],
        clients: list[int],
        skew: float,
        seed: int | None,
        mix: dict[str, float],
        max_changes: int,
    ) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.ops = list(mix)
        self.op_weights = list(mix.values())
        self.max_changes = max_changes
        self.stats = ChurnStats()
        self.failures_in_a_row = 0
        self.warned_behind = False
        self.writers: list[_TargetWriter] = []
        self.weights: list[float] = []
        for rank, client_id in enumerate(clients, start=1):
            for dataset in datasets:
                self.writers.append(_TargetWriter(dataset, client_id, seed or 0))
                self.weights.append(DATASET_WEIGHTS.get(dataset.name, 1.0) / rank**skew)

    def pace(
        self,
        rate: float,
        duration: float | None,
        stop: threading.Event,
        on_commit: Callable[[list[CommittedChange]], None] | None,
        record: bool,
    ) -> None:
        started = time.monotonic()
        deadline = started + duration if duration is not None else math.inf
        next_progress = started + _PROGRESS_EVERY_S
        planned = 0

        while not stop.is_set():
            # The transaction starting with change number `planned` is due at planned / rate.
            # A run that fell more than a second behind forgets the rest of its backlog, so
            # a stall is never followed by a burst above the rate.
            now = time.monotonic()
            if now >= deadline:
                break
            if started + planned / rate < now - 1.0:
                self._behind(rate)
                planned = int((now - 1.0 - started) * rate)
            due = started + planned / rate
            if due >= deadline:
                stop.wait(deadline - now)
                break
            if due > now and stop.wait(due - now):
                break

            size = self._transaction_size()
            planned += size
            committed = self._transaction(size)
            if committed:
                self.stats.count(committed)
                if record:
                    self.stats.changes.extend(committed)
                if on_commit is not None:
                    on_commit(committed)

            if time.monotonic() >= next_progress:
                next_progress += _PROGRESS_EVERY_S
                self._log_progress(started)

        self.stats.seconds = time.monotonic() - started

    def _behind(self, rate: float) -> None:
        if not self.warned_behind:
            self.warned_behind = True
            log.warning(
                "churn is more than a second behind %.0f changes/s: the database cannot take "
                "this rate; the changes committed per second are reported at the end",
                rate,
            )

    def _transaction_size(self) -> int:
        if self.max_changes == 1 or self.rng.random() < 0.5:
            return 1
        return self.rng.randint(2, self.max_changes)

    def _transaction(self, size: int) -> list[CommittedChange]:
        writers = self.rng.choices(self.writers, self.weights, k=size)
        ops = self.rng.choices(self.ops, self.op_weights, k=size)
        try:
            with self.conn.transaction():
                done = self._changes(writers, ops)
        except psycopg.Error as error:
            self._failed(error)
            return []
        commit_ts = time.time()
        self.failures_in_a_row = 0
        return [
            CommittedChange(writer.dataset.name, writer.client_id, key, op, version, commit_ts)
            for writer, op, key, version in done
        ]

    def _changes(
        self, writers: list[_TargetWriter], ops: list[str]
    ) -> list[tuple[_TargetWriter, str, int, int]]:
        """Make the changes of one transaction; (writer, op, id, row_version) of each."""
        for writer in writers:
            writer.load_next_id(self.conn)

        # Pipelined: all statements go out before any result is awaited, one round trip.
        sent = []
        with self.conn.pipeline():
            for writer, op in zip(writers, ops, strict=True):
                cursor = self.conn.cursor()
                writer.send(cursor, op, self.rng)
                sent.append((writer, _OPS[op], cursor))

        # An update or delete that found its target empty, or an insert whose id another
        # writer took, becomes an insert of a new id: every planned change is made.
        done = []
        for writer, op, cursor in sent:
            row = cursor.fetchone()
            while row is None:
                op = "c"
                writer.send_insert(cursor)
                row = cursor.fetchone()
            done.append((writer, op, int(row[0]), int(row[1])))
        return done

    def _failed(self, error: psycopg.Error) -> None:
        # Ids taken by the rolled-back inserts stay skipped: a gap in the keys is harmless.
        self.stats.failed_transactions += 1
        self.failures_in_a_row += 1
        if self.conn.closed or self.failures_in_a_row >= self.MAX_FAILURES_IN_A_ROW:
            raise SourceError(f"churn cannot write to PostgreSQL: {error}") from error
        log.warning("churn transaction rolled back, continuing: %s", error)

    def _log_progress(self, started: float) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "churn: %d changes in %d transactions, %.0f s (%.0f/s)",
            self.stats.total,
            self.stats.transactions,
            elapsed,
            self.stats.total / elapsed,
        )
