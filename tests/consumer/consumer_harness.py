"""Helpers of the consumer's live tests: a `storage-builder consume` subprocess per test.

Each test's consumer has its own group id, S3 prefix and Redis key prefix, starts at the end
of the topics (``consumer.initial_position = "latest"``) and follows only the test's own
clients (``consumer.clients``), so tests share the Debezium topics without seeing each
other's targets. It runs as a subprocess so a test can kill it with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from settings_file import write_settings

from bootstrap.verify import verify_target
from schemas.datasets import DATASETS, Target
from snapshots.registry import TargetState, VersionRegistry
from storage_builder.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "storage-builder"
READY_LINE = "ready: "


def consumer_settings(settings: Settings, clients: list[int], **consumer: Any) -> Settings:
    """This test's settings for a consumer: own group, follows only ``clients``."""
    group = f"test-{uuid.uuid4().hex[:12]}"
    options = {"initial_position": "latest", "clients": clients, "metrics_port": 0}
    options.update(consumer)
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"group_id": group}),
            "consumer": settings.consumer.model_copy(update=options),
        }
    )


class ConsumerProcess:
    """One `storage-builder consume` subprocess, with its log in a file."""

    def __init__(self, config: Path, log_path: Path, name: str) -> None:
        self.config = config
        self.log_path = log_path
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, env: dict[str, str] | None = None, wait_ready: bool = True) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        environment = {**os.environ, **(env or {})}
        environment.pop("SB_CONFIG", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(CLI), "--config", str(self.config), "consume", "--client-id", self.name],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        if wait_ready:
            self.wait_for(READY_LINE, timeout=90)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def new_log(self) -> str:
        return self.log()[self._log_offset :]

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.new_log():
                return
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(
                    f"consumer {self.name} exited ({self.process.returncode}):\n{self.log()}"
                )
            time.sleep(0.2)
        pytest.fail(
            f"consumer {self.name} did not log {text!r} in {timeout}s:\n{self.log()[-5000:]}"
        )

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def state_of(settings: Settings, target: Target) -> TargetState | None:
    registry = VersionRegistry(settings.redis)
    try:
        return registry.get(target)
    finally:
        registry.close()


def wait_in_sync(
    settings: Settings,
    targets: list[Target],
    timeout: float = 300,
    consumer: ConsumerProcess | None = None,
) -> dict[Target, int]:
    """Wait until every target's snapshot equals the database; return their versions."""
    deadline = time.monotonic() + timeout
    pending = list(targets)
    versions: dict[Target, int] = {}
    last_problem = ""
    while pending and time.monotonic() < deadline:
        target = pending[0]
        if state_of(settings, target) is None:
            last_problem = f"{target} has no snapshot"
        else:
            report = verify_target(target, settings)
            if report.in_sync:
                versions[target] = report.version
                pending.pop(0)
                continue
            last_problem = f"{target} version {report.version}: " + "; ".join(
                difference.describe() for difference in report.differences[:5]
            )
        time.sleep(0.5)
    if pending:
        tail = consumer.log()[-6000:] if consumer else ""
        pytest.fail(f"not in sync after {timeout}s: {last_problem}\n{tail}")
    return versions


def insert_rows(
    pg: psycopg.Connection, dataset: str, client_id: int, keys: range | list[int], seed: int = 0
) -> None:
    """Insert sample rows of one target in one transaction."""
    from schemas.sample import SampleRows

    sample = SampleRows(dataset, client_id, seed)
    columns = sample.columns
    statement = (
        f"INSERT INTO {DATASETS[dataset].table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )
    with pg.transaction(), pg.cursor() as cursor:
        cursor.executemany(statement, [sample.row(key) for key in keys])


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[Callable[[Settings, str], ConsumerProcess]]:
    """A factory of `storage-builder consume` subprocesses; all are stopped at the end."""
    started: list[ConsumerProcess] = []

    def make(settings: Settings, name: str = "c1") -> ConsumerProcess:
        config = write_settings(settings, tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.toml")
        process = ConsumerProcess(
            config, tmp_path / f"{name}.log", f"{name}-{uuid.uuid4().hex[:6]}"
        )
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
