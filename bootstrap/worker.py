"""A bootstrap worker process: reads key ranges of targets and streams their segments back.

The coordinator (:mod:`bootstrap.snapshot`) starts a few of these with
``python -m bootstrap.worker``. A worker imports only what reading and encoding need
(psycopg and the segment encoder): no object store client, no CLI, no Kafka client. That
keeps each worker at a fraction of the coordinator's memory, since every process of the
bootstrap counts towards its memory budget; the coordinator uploads and publishes.

The protocol is pickled messages on the worker's stdin and stdout, one task at a time:

- in: ``("hello", dsn)`` once, then a :class:`RangeTask` per task, then ``None`` to stop;
- out, per task: ``("segment", EncodedSegment)`` for each segment as soon as it is encoded,
  then ``("done", rows, pg_snapshot)`` or ``("failed", reason)``.

A segment written to the pipe blocks the worker until the coordinator takes it, so the
coordinator's upload window bounds the memory of both sides.
"""

from __future__ import annotations

import logging
import pickle
import queue
import sys
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import psycopg

from bootstrap import source
from bootstrap.encode import SegmentEncoder
from schemas.datasets import Target, get_dataset
from snapshots.segments import EncodedSegment
from storage_builder.errors import StorageBuilderError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RangeTask:
    """One key range ``[lo, hi)`` of a target, read in the exported snapshot ``import_id``."""

    target: Target
    lo: int | None
    hi: int | None
    import_id: str | None
    codec: str
    block_rows: int
    max_rows: int


_DONE = object()


def _prefetched(batches: Iterator[T]) -> Generator[T, None, None]:
    """``batches``, fetched by a thread one batch ahead of the consumer.

    While the encoder works on a batch, the database produces the next one: the thread
    spends its time waiting on the socket, which releases the GIL. Closing the iterator
    stops the thread and closes ``batches`` before returning, so the connection is idle
    again when the transaction ends.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            offer(error)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@contextmanager
def range_segments(
    conn: psycopg.Connection, task: RangeTask
) -> Iterator[tuple[str, Iterator[EncodedSegment]]]:
    """The database snapshot a range is read in and its segments, encoded lazily.

    The segments must be consumed inside the block: the transaction stays open meanwhile.
    """
    target = task.target
    encoder = SegmentEncoder(
        get_dataset(target.dataset),
        client_id=target.client_id,
        codec=task.codec,
        block_rows=task.block_rows,
        max_rows=task.max_rows,
    )
    with source.snapshot_transaction(conn, import_id=task.import_id) as snapshot:
        batches = _prefetched(source.stream_batches(conn, target, lo=task.lo, hi=task.hi))
        try:
            yield snapshot.pg_snapshot, encoder.segments(batches)
        finally:
            batches.close()


def describe(error: BaseException) -> str:
    """An error as one line: its type and message."""
    return f"{type(error).__name__}: {error}"


def _send(outbox: BinaryIO, message: tuple[Any, ...]) -> None:
    pickle.dump(message, outbox, protocol=pickle.HIGHEST_PROTOCOL)
    outbox.flush()


def _run_task(conn: psycopg.Connection, task: RangeTask, outbox: BinaryIO) -> None:
    rows = 0
    with range_segments(conn, task) as (pg_snapshot, segments):
        for segment in segments:
            rows += segment.rows
            _send(outbox, ("segment", segment))
    _send(outbox, ("done", rows, pg_snapshot))


def serve(inbox: BinaryIO, outbox: BinaryIO) -> None:
    """Answer the coordinator's tasks until it says stop (or closes the pipe)."""
    hello = pickle.load(inbox)
    dsn = hello[1]
    conn: psycopg.Connection | None = None
    while True:
        try:
            task = pickle.load(inbox)
        except EOFError:
            task = None
        if task is None:
            break
        try:
            if conn is None or conn.closed:
                conn = source.connect(dsn)
            _run_task(conn, task, outbox)
        except (StorageBuilderError, psycopg.Error, ValueError, OSError) as error:
            if isinstance(error, psycopg.Error) and conn is not None:
                # A broken connection is replaced on the next task rather than reused.
                conn.close()
            log.warning("bootstrap of %s failed: %s", task.target, describe(error))
            _send(outbox, ("failed", describe(error)))
    if conn is not None:
        conn.close()


def main() -> None:
    """Entry point of ``python -m bootstrap.worker``: stdout carries only the protocol."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    inbox, outbox = sys.stdin.buffer, sys.stdout.buffer
    # Nothing else may write to the protocol's pipe.
    sys.stdout = sys.stderr
    serve(inbox, outbox)


if __name__ == "__main__":
    main()
