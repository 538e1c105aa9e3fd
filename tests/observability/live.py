"""Helpers of the observability tests against the real stack.

- :class:`TcpProxy` forwards a local port to a service and can cut the network on demand:
  connections are refused and open ones dropped, until :meth:`TcpProxy.restore`.
- :func:`scrape` reads a consumer's ``/metrics`` over HTTP, parsed by prometheus-client.
- :func:`partition_of_client` finds the partition that carries a client's changes.
- :func:`run_lag` runs ``storage-builder lag --json`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from storage_builder.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "storage-builder"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; cut and restored on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        # A timeout lets the accept loop notice a cut without closing under its feet.
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones (keep-alive pools included)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)
            with self._lock:
                self._sockets -= {source, sink}


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, by name and sorted labels."""
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the labelled series does not exist yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer(settings.kafka.librdkafka() | {"group.id": "test-obs-offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in sorted(partitions)
        }
    finally:
        consumer.close()


def partition_of_client(
    settings: Settings, topic: str, client_id: int, since: dict[int, int], timeout: float = 240
) -> int:
    """The partition of the client's first event after ``since`` (message keys are clients)."""
    consumer = Consumer(
        settings.kafka.librdkafka()
        | {"group.id": f"test-obs-find-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, o) for p, o in since.items()])
    needle = f'"client_id":{client_id}'.encode()
    # Debezium may be working through a backlog other writers left: give it time.
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1):
                key = (message.key() or b"").replace(b" ", b"")
                if message.error() is None and needle in key:
                    return int(message.partition() or 0)
    finally:
        consumer.close()
    pytest.fail(f"no event of client {client_id} reached {topic} in {timeout}s")


def run_lag(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """``storage-builder --config <config> lag --json <args>``: exit code and report."""
    environment = {**os.environ, **(env or {})}
    environment.pop("SB_CONFIG", None)
    result = subprocess.run(
        [str(CLI), "--config", str(config), "lag", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"lag printed no report (exit {result.returncode}):\n{result.stderr[-3000:]}"
    return result.returncode, orjson.loads(lines[-1])
