"""Row hashes: Python and PostgreSQL agree bit for bit, and sums stay exact."""

from __future__ import annotations

import random

import psycopg

from snapshots.checksums import format_checksum, parse_checksum, row_hash, sql_row_hash


def test_row_hash_is_a_signed_64_bit_integer_of_key_and_version() -> None:
    hashes = [row_hash(key, version) for key in range(-50, 50) for version in range(1, 50)]
    assert all(-(2**63) <= value < 2**63 for value in hashes)
    assert min(hashes) < 0 < max(hashes)
    assert len(set(hashes)) == len(hashes)
    assert row_hash(42, 7) != row_hash(7, 42)


def test_row_hash_tells_apart_versions_of_one_key() -> None:
    hashes = {row_hash(1234, version) for version in range(1, 20_001)}
    assert len(hashes) == 20_000


def test_swapping_versions_between_rows_changes_their_sum() -> None:
    # A sum of hashes linear in the version would miss two rows that traded versions.
    rng = random.Random(3)
    for _ in range(1000):
        a, b = rng.sample(range(1, 10**9), 2)
        v, w = rng.sample(range(1, 10**9), 2)
        assert row_hash(a, v) + row_hash(b, w) != row_hash(a, w) + row_hash(b, v)


def test_checksums_round_trip_as_decimal_strings() -> None:
    total = sum(row_hash(key, 1) for key in range(1000)) * 10**6
    assert parse_checksum(format_checksum(total)) == total
    assert parse_checksum(format_checksum(-total)) == -total
    assert parse_checksum("-12") == -12


def test_postgresql_computes_the_same_hashes_and_sums(pg: psycopg.Connection) -> None:
    rng = random.Random(7)
    # Key 0 is the seed PostgreSQL does not mix; negative versions fold differently.
    edges = [0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, -(2**63), -(2**32)]
    pairs = [(key, version) for key in edges for version in edges]
    pairs += [(rng.randrange(-(2**63), 2**63), rng.randrange(-(2**63), 2**63)) for _ in range(300)]
    pairs += [(rng.randrange(1, 10**8), rng.randrange(1, 2**40)) for _ in range(300)]
    found = pg.execute(
        f"SELECT {sql_row_hash('k', 'v')} "
        "FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS p(k, v, n) ORDER BY n",
        [[key for key, _ in pairs], [version for _, version in pairs]],
    ).fetchall()
    assert [value for (value,) in found] == [row_hash(key, version) for key, version in pairs]

    total = pg.execute(
        f"SELECT sum({sql_row_hash('k', 'k * 3')}) FROM generate_series(1, 5000) AS k"
    ).fetchone()
    assert total is not None
    assert int(total[0]) == sum(row_hash(k, k * 3) for k in range(1, 5001))
