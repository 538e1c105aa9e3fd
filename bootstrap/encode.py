"""The bootstrap's fast path from database rows to segments.

Rows arrive in the *encoder* shape of :mod:`bootstrap.source`: dates and timestamps as
PostgreSQL's binary integers, numerics as text at their fixed scale, so no ``date``,
``datetime`` or ``Decimal`` is ever built; shifting an epoch and dropping a decimal point
is all the conversion there is.

Each dataset gets a block encoder compiled from its columns (:func:`compile_block_encoder`,
made as :mod:`snapshots.avro_blocks` describes) for rows of this shape. It does what
fastavro's generic writer does at about a third of its cost per row, since it knows the
schema when it is built rather than interpreting it for every value.

The output is the snapshot core's segment format, byte for byte: blocks of ``block_rows``
rows compressed by the same codec calls, framed as Avro object container blocks, and
assembled by :func:`snapshots.segments.segment_from_blocks` (the same header, block list
and checksums as :func:`snapshots.segments.encode_segment`). A test compares the two.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from bootstrap.source import PG_EPOCH_DAYS, PG_EPOCH_MICROS
from schemas.datasets import Dataset
from snapshots import _container, avro_blocks
from snapshots.segments import EncodedSegment, SegmentBlock, segment_from_blocks

Row = Sequence[Any]

# PostgreSQL's binary forms of -infinity and infinity.
_INFINITE_DATES = (-(2**31), 2**31 - 1)
_INFINITE_TIMESTAMPS = (-(2**63), 2**63 - 1)

# Per column kind, the statements encoding a value as PostgreSQL sends it.
_SNIPPETS: avro_blocks.Snippets = {
    "long": avro_blocks.LONG,
    "date": [
        "if v in _INFINITE_DATES:",
        "    raise ValueError('an infinite date has no Avro date')",
        f"w = v + {PG_EPOCH_DAYS}",
        "z = (w << 1) ^ (w >> 63)",
        *avro_blocks.VARINT,
    ],
    "timestamptz": [
        "if v in _INFINITE_TIMESTAMPS:",
        "    raise ValueError('an infinite timestamp has no Avro timestamp-micros')",
        f"w = v + {PG_EPOCH_MICROS}",
        "z = (w << 1) ^ (w >> 63)",
        *avro_blocks.VARINT,
    ],
    "text": avro_blocks.TEXT,
    "boolean": avro_blocks.BOOLEAN,
    # A numeric's text at its column's fixed scale, without the point, is the unscaled
    # integer, written as fastavro writes a decimal: big-endian two's complement in
    # bit_length // 8 + 1 bytes.
    "numeric": [
        "n = int(v.replace('.', ''))",
        "b = n.to_bytes((abs(n).bit_length() + 8) >> 3, 'big', signed=True)",
        "append(LAST[len(b) << 1])",
        "append(b)",
    ],
}


BlockEncoder = Callable[[Sequence[Row], Callable[[bytes], None], Any, bytes], tuple[Any, int]]


def compile_block_encoder(dataset: Dataset) -> BlockEncoder:
    """``encode(rows, append, after) -> (last key, checksum)`` for ``dataset``.

    Appends the Avro binary of every row to ``append``; checks that keys ascend from
    ``after``; sums the row hashes, which come as each row's last value (see
    :mod:`bootstrap.source`). The client column is not encoded from the row: its bytes come
    as ``client`` (the encoder's caller reads one client only).
    """
    names = [f"v{index}" for index in range(len(dataset.columns))]
    key = names[dataset.column_names.index(dataset.key_column)]
    signature = "encode_block(rows, append, after, client)"
    lines = avro_blocks.row_loop(signature, f"{', '.join(names)}, row_hash", "rows", key)
    for name, column in zip(names, dataset.columns, strict=True):
        if column.name == dataset.client_column:
            lines.append("        append(client)")
            continue
        lines += avro_blocks.indented(avro_blocks.value_statements(name, column, _SNIPPETS), 2)
    lines += [
        "        checksum += row_hash",
        "    return previous, checksum",
    ]
    namespace = {"_INFINITE_DATES": _INFINITE_DATES, "_INFINITE_TIMESTAMPS": _INFINITE_TIMESTAMPS}
    encoder: BlockEncoder = avro_blocks.compile_encoder(
        lines, f"block encoder of {dataset.name}", namespace
    )
    return encoder


_block_encoder = functools.cache(compile_block_encoder)


class SegmentEncoder:
    """Encodes the encoder-shape rows of one target into segments.

    ``client_id`` is the client every row belongs to: the query reads that client only, so
    the column is not read back; its encoded value is written into every record.
    """

    def __init__(
        self, dataset: Dataset, *, client_id: int, codec: str, block_rows: int, max_rows: int
    ) -> None:
        self.dataset = dataset
        self.client_id = client_id
        self.codec = codec
        self.block_rows = max(1, min(block_rows, max_rows))
        self.max_rows = max_rows
        compress = avro_blocks.compressor(codec)
        if compress is None:
            raise ValueError(f"codec {codec!r} is not supported by the bootstrap encoder")
        self._compress = compress
        names = dataset.column_names
        self._key_index = names.index(dataset.key_column)
        self._client_bytes = avro_blocks.encode_long(client_id)
        self._encode_rows = _block_encoder(dataset)

    def _encode_block(self, rows: Sequence[Row], sync: bytes, after: Any) -> SegmentBlock:
        """One container block: its rows encoded, compressed and framed.

        ``after`` is the key before the first row (None at the start), to check the order.
        """
        pieces: list[bytes] = []
        try:
            last, checksum = self._encode_rows(rows, pieces.append, after, self._client_bytes)
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"a row of {self.dataset.name} cannot be encoded: {error}") from None
        data = self._compress(b"".join(pieces))
        raw = avro_blocks.frame_block(len(rows), data, sync)
        first = rows[0][self._key_index]
        return SegmentBlock(raw, first, last, len(rows), checksum)

    def segments(self, batches: Iterable[Sequence[Row]]) -> Iterator[EncodedSegment]:
        """Cut batches of rows (ascending keys) into segments of at most ``max_rows``, lazily.

        Memory holds one batch of rows and one segment's compressed blocks.
        """
        blocks: list[SegmentBlock] = []
        in_segment = 0
        sync = os.urandom(_container.SYNC_SIZE)
        last_key = None
        carry: list[Row] = []
        for batch in batches:
            rows = carry + list(batch) if carry else batch
            start = 0
            while True:
                # A block ends at block_rows rows or at the end of its segment.
                size = min(self.block_rows, self.max_rows - in_segment)
                if len(rows) - start < size:
                    carry = list(rows[start:])
                    break
                block = self._encode_block(rows[start : start + size], sync, last_key)
                blocks.append(block)
                last_key = block.last_key
                start += size
                in_segment += size
                if in_segment == self.max_rows:
                    yield self._segment(blocks, sync)
                    blocks, in_segment = [], 0
                    sync = os.urandom(_container.SYNC_SIZE)
        if carry:
            blocks.append(self._encode_block(carry, sync, last_key))
        if blocks:
            yield self._segment(blocks, sync)

    def _segment(self, blocks: list[SegmentBlock], sync: bytes) -> EncodedSegment:
        return segment_from_blocks(
            self.dataset, blocks, codec=self.codec, sync=sync, client_id=self.client_id
        )


def encode_segments(
    dataset: Dataset,
    rows: Iterable[Row],
    *,
    client_id: int,
    codec: str,
    block_rows: int,
    max_rows: int,
) -> Iterator[EncodedSegment]:
    """Cut encoder-shape rows (ascending keys) into segments of at most ``max_rows``, lazily."""
    encoder = SegmentEncoder(
        dataset, client_id=client_id, codec=codec, block_rows=block_rows, max_rows=max_rows
    )
    iterator = iter(rows)
    batches = iter(lambda: list(itertools.islice(iterator, encoder.block_rows)), [])
    return encoder.segments(batches)
