"""Row hashes that Python and PostgreSQL compute identically from a row's key and version.

A row's hash is the first 8 bytes of ``md5("{key}:{version}")`` read as a big-endian signed
64-bit integer. A segment's checksum is the exact sum of its rows' hashes: Python integers
never overflow and PostgreSQL's ``sum(bigint)`` is ``numeric``, so both sides agree exactly,
and a sum can be compared range by range without moving rows.
"""

from __future__ import annotations

from hashlib import md5


def row_hash(key: int, version: int) -> int:
    """The hash of one row, a signed int64."""
    digest = md5(b"%d:%d" % (key, version), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def sql_row_hash(key_sql: str, version_sql: str) -> str:
    """The SQL expression computing :func:`row_hash` of the given column expressions."""
    return (
        f"('x' || left(md5(({key_sql})::text || ':' || ({version_sql})::text), 16))"
        "::bit(64)::bigint"
    )


def format_checksum(value: int) -> str:
    """A checksum as it is stored in a manifest: a decimal string, exact at any size."""
    return str(value)


def parse_checksum(text: str) -> int:
    """A checksum read from a manifest; anything but a decimal integer is refused."""
    stripped = text[1:] if text.startswith("-") else text
    if not stripped.isdigit():
        raise ValueError(f"checksum {text!r} is not a decimal integer")
    return int(text)
