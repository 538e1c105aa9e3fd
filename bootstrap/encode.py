"""The bootstrap's fast path from database rows to segments.

Rows arrive in the *encoder* shape of :mod:`bootstrap.source` (dates, timestamps and
numerics already turned into the integers Avro stores), so no ``date``, ``datetime`` or
``Decimal`` is ever built. The output is the same segment format as
:func:`snapshots.segments.encode_segment`: an Avro object container with the dataset's
schema, ``block_rows`` rows per block, and the first key of every block recorded; it is
written by the snapshot core's own encoder, which accepts these integers as the values of
the logical types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from schemas.datasets import Dataset
from snapshots import segments
from snapshots.segments import EncodedSegment

Row = Sequence[Any]


def _unscaled_bytes(value: int | str) -> bytes:
    """A decimal's unscaled integer as Avro stores it: big-endian two's complement."""
    number = int(value)
    return number.to_bytes(number.bit_length() // 8 + 1, "big", signed=True)


def record_builder(dataset: Dataset) -> Callable[[Row], dict[str, Any]]:
    """A function turning one encoder-shape row into the record fastavro writes."""
    names = dataset.column_names
    decimals = [
        (index, name)
        for index, name in enumerate(names)
        if dataset.column(name).numeric_scale is not None
    ]

    def build(row: Row) -> dict[str, Any]:
        record = dict(zip(names, row, strict=True))
        for index, name in decimals:
            if row[index] is not None:
                record[name] = _unscaled_bytes(row[index])
        return record

    return build


def encode_segments(
    dataset: Dataset,
    rows: Iterable[Row],
    *,
    client_id: int,
    codec: str,
    block_rows: int,
    max_rows: int,
) -> Iterator[EncodedSegment]:
    """Cut encoder-shape rows (ascending keys) into segments of at most ``max_rows``, lazily.

    The snapshot core writes the container, so the format cannot drift from the one the
    consumer rewrites; only the values it is handed are cheaper. One segment is held in
    memory at a time.
    """
    build = record_builder(dataset)
    records = (build(row) for row in rows)
    return segments.encode_segments(
        dataset,
        records,
        codec=codec,
        block_rows=block_rows,
        max_rows=max_rows,
        client_id=client_id,
    )
