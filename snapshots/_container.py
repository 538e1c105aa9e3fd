"""The Avro object container layout, read and written block by block without decoding.

A container is a header (magic, a metadata map, a 16-byte sync marker) followed by blocks,
each ``count, size, <size compressed bytes>, sync``. Splitting a file into these raw blocks
lets a rewrite copy untouched blocks byte for byte into a new file that keeps the same sync
marker, and lets the header be written after the blocks are known.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"Obj\x01"
SYNC_SIZE = 16


@dataclass(frozen=True)
class RawBlock:
    """One block as stored: the whole ``count, size, data, sync`` byte string."""

    raw: bytes
    rows: int


@dataclass(frozen=True)
class Container:
    """A parsed container: its metadata, its sync marker and its blocks, still compressed."""

    metadata: dict[str, bytes]
    sync: bytes
    header: bytes
    blocks: list[RawBlock]


def _read_long(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    shift = 0
    value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return (value >> 1) ^ -(value & 1), pos


def _write_long(value: int) -> bytes:
    encoded = (value << 1) ^ (value >> 63)
    out = bytearray()
    while encoded & ~0x7F:
        out.append((encoded & 0x7F) | 0x80)
        encoded >>= 7
    out.append(encoded)
    return bytes(out)


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = _read_long(data, pos)
    return data[pos : pos + length], pos + length


def build_header(metadata: dict[str, bytes], sync: bytes) -> bytes:
    """A container header holding ``metadata`` and ``sync``."""
    parts = [MAGIC, _write_long(len(metadata))]
    for name, value in metadata.items():
        encoded_name = name.encode()
        parts += [_write_long(len(encoded_name)), encoded_name, _write_long(len(value)), value]
    parts += [_write_long(0), sync]
    return b"".join(parts)


def parse_header(data: bytes) -> tuple[dict[str, bytes], bytes, int]:
    """The metadata, the sync marker and the offset of the first block."""
    if data[:4] != MAGIC:
        raise ValueError("not an Avro object container file (bad magic)")
    pos = 4
    metadata: dict[str, bytes] = {}
    while True:
        count, pos = _read_long(data, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _read_long(data, pos)
        for _ in range(count):
            name, pos = _read_bytes(data, pos)
            value, pos = _read_bytes(data, pos)
            metadata[name.decode()] = value
    sync = data[pos : pos + SYNC_SIZE]
    if len(sync) != SYNC_SIZE:
        raise ValueError("truncated Avro header")
    return metadata, sync, pos + SYNC_SIZE


def parse(data: bytes) -> Container:
    """Split a container into its header and raw blocks, checking every sync marker."""
    metadata, sync, pos = parse_header(data)
    header_end = pos
    blocks = []
    end = len(data)
    while pos < end:
        start = pos
        rows, pos = _read_long(data, pos)
        size, pos = _read_long(data, pos)
        pos += size
        if data[pos : pos + SYNC_SIZE] != sync:
            raise ValueError(f"block at offset {start} does not end with the sync marker")
        pos += SYNC_SIZE
        blocks.append(RawBlock(raw=data[start:pos], rows=rows))
    return Container(metadata=metadata, sync=sync, header=data[:header_end], blocks=blocks)
