"""Row hashes: Python and PostgreSQL agree bit for bit, and sums stay exact."""

from __future__ import annotations

import hashlib

import psycopg

from snapshots.checksums import format_checksum, parse_checksum, row_hash, sql_row_hash


def test_row_hash_is_the_first_eight_bytes_of_md5_signed() -> None:
    digest = hashlib.md5(b"42:7").digest()
    assert row_hash(42, 7) == int.from_bytes(digest[:8], "big", signed=True)
    assert -(2**63) <= row_hash(42, 7) < 2**63
    assert row_hash(42, 7) != row_hash(42, 8) != row_hash(7, 42)


def test_checksums_round_trip_as_decimal_strings() -> None:
    total = sum(row_hash(key, 1) for key in range(1000)) * 10**6
    assert parse_checksum(format_checksum(total)) == total
    assert parse_checksum("-12") == -12


def test_postgresql_computes_the_same_hashes_and_sums(pg: psycopg.Connection) -> None:
    pairs = [(42, 7), (1, 1), (2**62, 123456789012), (9_999_999, 0), (5, 2**40)]
    for key, version in pairs:
        value = pg.execute(
            f"SELECT {sql_row_hash('%s::bigint', '%s::bigint')}", (key, version)
        ).fetchone()
        assert value == (row_hash(key, version),), (key, version)

    total = pg.execute(
        f"SELECT sum({sql_row_hash('k', 'k * 3')}) FROM generate_series(1, 5000) AS k"
    ).fetchone()
    assert total is not None
    assert int(total[0]) == sum(row_hash(k, k * 3) for k in range(1, 5001))
