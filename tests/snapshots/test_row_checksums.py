"""Row hashes: Python and PostgreSQL agree bit for bit, and sums stay exact."""

from __future__ import annotations

import random

import psycopg

from snapshots.checksums import format_checksum, parse_checksum, row_hash, sql_row_hash


def test_row_hash_is_two_squared_residues_side_by_side() -> None:
    p, q = 2**31 - 1, 2**31 - 19
    x = (42 * 48271 + 7) % p
    y = (42 * 69621 + 7 * 16807 + 1) % q
    assert row_hash(42, 7) == (x * x % p) * 2**31 + y * y % q
    assert 0 <= row_hash(42, 7) < 2**62
    assert row_hash(42, 7) != row_hash(42, 8) != row_hash(7, 42)


def test_row_hash_tells_apart_versions_of_one_key() -> None:
    hashes = {row_hash(1234, version) for version in range(1, 20_001)}
    assert len(hashes) == 20_000


def test_checksums_round_trip_as_decimal_strings() -> None:
    total = sum(row_hash(key, 1) for key in range(1000)) * 10**6
    assert parse_checksum(format_checksum(total)) == total
    assert parse_checksum("-12") == -12


def test_postgresql_computes_the_same_hashes_and_sums(pg: psycopg.Connection) -> None:
    rng = random.Random(7)
    pairs = [(42, 7), (1, 1), (2**62, 123456789012), (9_999_999, 0), (5, 2**40)]
    pairs += [(2**63 - 1, 2**63 - 1), (-(2**63), 3), (-5, -7)]
    pairs += [(rng.randrange(-(2**63), 2**63), rng.randrange(1, 2**63)) for _ in range(200)]
    for key, version in pairs:
        value = pg.execute(
            f"SELECT {sql_row_hash('%(k)s::bigint', '%(v)s::bigint')}", {"k": key, "v": version}
        ).fetchone()
        assert value == (row_hash(key, version),), (key, version)

    total = pg.execute(
        f"SELECT sum({sql_row_hash('k', 'k * 3')}) FROM generate_series(1, 5000) AS k"
    ).fetchone()
    assert total is not None
    assert int(total[0]) == sum(row_hash(k, k * 3) for k in range(1, 5001))
