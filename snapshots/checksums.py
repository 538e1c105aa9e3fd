"""Row hashes that Python and PostgreSQL compute identically from a row's key and version.

A row's hash mixes its key and version into two residues modulo the primes P = 2^31 - 1 and
Q = 2^31 - 19, squares each (so the hash is not linear in key and version: two drifted rows
cannot cancel out by arithmetic coincidence) and puts them side by side in 62 bits:

    x = ((key mod P) * 48271 + version mod P) mod P
    y = ((key mod Q) * 69621 + (version mod Q) * 16807 + 1) mod Q
    hash = (x^2 mod P) * 2^31 + (y^2 mod Q)

Every intermediate fits a signed 64-bit integer, so PostgreSQL computes it with plain
``bigint`` arithmetic, about as fast as it counts rows; a cryptographic hash such as md5
costs it eight times as much per row, which is what bounds checking a million rows in sync.
This is a checksum against accidental drift, not against an adversary.

A segment's checksum is the exact sum of its rows' hashes: Python integers never overflow and
PostgreSQL's ``sum(bigint)`` is ``numeric``, so both sides agree exactly, and a sum can be
compared range by range without moving rows.
"""

from __future__ import annotations

_P = 2_147_483_647
_Q = 2_147_483_629


def row_hash(key: int, version: int) -> int:
    """The hash of one row, a non-negative integer below 2^62."""
    # Python's % gives residues between 0 and the modulus whatever the sign of the key.
    x = (key % _P * 48271 + version % _P) % _P
    y = (key % _Q * 69621 + version % _Q * 16807 + 1) % _Q
    return (x * x % _P) << 31 | (y * y % _Q)


def sql_row_hash(key_sql: str, version_sql: str) -> str:
    """The SQL expression computing :func:`row_hash` of the given ``bigint`` expressions.

    It uses ``mod()`` rather than ``%`` so it can sit in a query that takes parameters.
    """
    x, y = sql_hash_residues(key_sql, version_sql)
    return sql_hash_of_residues(x, y)


def sql_hash_residues(key_sql: str, version_sql: str) -> tuple[str, str]:
    """SQL expressions congruent to the residues ``x`` and ``y`` of :func:`row_hash`.

    PostgreSQL's ``mod()`` keeps the sign of the dividend, so these lie between -P and P
    rather than between 0 and P; squaring, as the hash does next, makes that difference
    vanish, and saves the four additions that would make every term non-negative (a tenth
    of the time of summing a million rows). Every intermediate stays below 2^49.
    """
    k, v = f"({key_sql})::bigint", f"({version_sql})::bigint"
    x = f"mod(mod({k}, {_P}) * 48271 + mod({v}, {_P}), {_P})"
    y = f"mod(mod({k}, {_Q}) * 69621 + mod({v}, {_Q}) * 16807 + 1, {_Q})"
    return x, y


def sql_hash_of_residues(x: str, y: str) -> str:
    """The SQL expression of the hash from its residues, each written twice for its square.

    PostgreSQL evaluates an expression written twice twice: a query that computes the
    residues once, in a subquery, passes their column names here rather than expressions.
    """
    return f"(mod({x} * {x}, {_P}) * 2147483648 + mod({y} * {y}, {_Q}))"


def format_checksum(value: int) -> str:
    """A checksum as it is stored in a manifest: a decimal string, exact at any size."""
    return str(value)


def parse_checksum(text: str) -> int:
    """A checksum read from a manifest; anything but a decimal integer is refused."""
    stripped = text[1:] if text.startswith("-") else text
    if not stripped.isdigit():
        raise ValueError(f"checksum {text!r} is not a decimal integer")
    return int(text)
