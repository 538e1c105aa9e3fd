"""Avro container blocks encoded by code compiled for a dataset's columns.

fastavro's writer interprets the schema for every value it writes. A dataset's columns are
known before its first row, so an encoder compiled from them, one loop over the rows with
the Avro encoding of every column written out inline and zig-zag varints taken 14 bits at a
time from two lookup tables, does the same work at a third of the cost per row. Two row
shapes use it: the bootstrap's rows as PostgreSQL sends them (:mod:`bootstrap.encode`) and
the plain rows a segment rewrite decodes and encodes again (:mod:`snapshots.segments`).
Each shape brings its own snippet per column kind; what is shared is here: the varints, the
framing and compression of a block, and the assembly of the per-column statements.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from schemas.datasets import Column

_GROUP = 1 << 14
_GROUP_MASK = _GROUP - 1


def _varint(value: int) -> bytes:
    """An unsigned varint: 7 bits per byte, least significant group first."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# LAST[z]: the varint of z < 2^14. MORE[g]: a 14-bit group followed by more groups, so
# both of its bytes carry the continuation bit.
LAST = [_varint(z) for z in range(_GROUP)]
MORE = [bytes(((g & 0x7F) | 0x80, (g >> 7) | 0x80)) for g in range(_GROUP)]


def encode_long(value: int) -> bytes:
    """An Avro ``int`` or ``long``: zig-zag, then varint."""
    z = (value << 1) ^ (value >> 63)
    if z < _GROUP:
        return LAST[z]
    if z < 1 << 28:
        return MORE[z & _GROUP_MASK] + LAST[z >> 14]
    if z < 1 << 42:
        return MORE[z & _GROUP_MASK] + MORE[(z >> 14) & _GROUP_MASK] + LAST[z >> 28]
    if z < 1 << 56:
        return (
            MORE[z & _GROUP_MASK]
            + MORE[(z >> 14) & _GROUP_MASK]
            + MORE[(z >> 28) & _GROUP_MASK]
            + LAST[z >> 42]
        )
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{value} does not fit an Avro long")
    return _varint(z)


# Snippets: the statements that encode one value ``v`` and pass its bytes to ``append``,
# written out inline since a call per value would cost as much as the encoding itself.
# VARINT appends ``z``, zig-zagged already from the signed ``w``.
VARINT = [
    "if z < 16384:",
    "    append(LAST[z])",
    "elif z < 268435456:",
    "    append(MORE[z & 16383])",
    "    append(LAST[z >> 14])",
    "elif z < 4398046511104:",
    "    append(MORE[z & 16383])",
    "    append(MORE[(z >> 14) & 16383])",
    "    append(LAST[z >> 28])",
    "elif z < 72057594037927936:",
    "    append(MORE[z & 16383])",
    "    append(MORE[(z >> 14) & 16383])",
    "    append(MORE[(z >> 28) & 16383])",
    "    append(LAST[z >> 42])",
    "else:",
    "    append(encode_long(w))",
]
LONG = ["w = v", "z = (w << 1) ^ (w >> 63)", *VARINT]
TEXT = [
    "b = v.encode()",
    "n = len(b)",
    "append(LAST[n << 1] if n < 8192 else encode_long(n))",
    "append(b)",
]
BOOLEAN = ['append(b"\\x01" if v else b"\\x00")']

Snippets = Mapping[str, list[str]]


def column_kind(column: Column) -> str:
    """What a column's snippet is chosen by: numeric, long, text, boolean, date or
    timestamptz."""
    if column.numeric_scale is not None:
        return "numeric"
    if column.pg_type in ("bigint", "integer"):
        return "long"
    if column.pg_type in ("text", "jsonb"):
        return "text"
    if column.pg_type in ("boolean", "date", "timestamptz"):
        return column.pg_type
    raise ValueError(f"column {column.name} has a type no compiled encoder encodes")


def value_statements(name: str, column: Column, snippets: Snippets) -> list[str]:
    """The statements encoding the value named ``name`` of ``column``; a nullable column's
    value goes behind its union branch."""
    body = [re.sub(r"\bv\b", name, line) for line in snippets[column_kind(column)]]
    if not column.nullable:
        return body
    return [
        f"if {name} is None:",
        '    append(b"\\x00")',
        "else:",
        '    append(b"\\x02")',
        *indented(body, 1),
    ]


def row_loop(signature: str, values: str, rows: str, key: str) -> list[str]:
    """The head of a compiled encoder: the function ``signature`` (taking ``after``), a
    checksum set to 0, and a loop binding each row of ``rows`` to ``values`` that checks
    that the ``key`` values ascend from ``after``."""
    return [
        f"def {signature}:",
        "    checksum = 0",
        # Below any bigint: the first key then needs no test of its own.
        "    previous = -(2**64) if after is None else after",
        f"    for {values} in {rows}:",
        f"        if {key} <= previous:",
        f"            raise ValueError(f'rows are not in ascending key order at key {{{key}}}')",
        f"        previous = {key}",
    ]


def compile_encoder(lines: list[str], label: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """The function the source ``lines`` define, with the varint tables in its namespace."""
    scope = {"LAST": LAST, "MORE": MORE, "encode_long": encode_long, **namespace}
    code = compile("\n".join(lines), f"<{label}>", "exec")
    exec(code, scope)
    name = lines[0].removeprefix("def ").split("(", 1)[0]
    function: Callable[..., Any] = scope[name]
    return function


def indented(lines: list[str], depth: int) -> list[str]:
    return ["    " * depth + line for line in lines]


def compressor(codec: str) -> Callable[[bytes], bytes] | None:
    """The block compression of ``codec``, called as fastavro's writer calls it; None for a
    codec fastavro alone implements."""
    if codec == "null":
        return bytes
    if codec == "deflate":
        # Raw deflate: zlib's two header bytes and its checksum trailer are cut off.
        return lambda data: zlib.compress(data)[2:-1]
    if codec == "zstandard":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        compress: Callable[[bytes], bytes] = zstd.compress
        return compress
    return None


def frame_block(rows: int, data: bytes, sync: bytes) -> bytes:
    """A container block: its record count, its size, its compressed records, the file's
    sync marker."""
    return b"".join((encode_long(rows), encode_long(len(data)), data, sync))
