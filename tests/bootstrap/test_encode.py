"""The bootstrap's own encoder writes the snapshot core's segment format, byte for byte."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import psycopg
import pytest

from bootstrap import encode, source
from bootstrap.snapshot import BOOTSTRAPPED, FAILED, bootstrap_target, bootstrap_targets
from schemas.datasets import Target, get_dataset
from schemas.source import source_sql
from snapshots import _container, segments
from snapshots.reader import open_snapshot
from snapshots.store import ObjectStore
from storage_builder.settings import Settings

UTC = dt.UTC
LONG_TEXT = "long ✓ text " * 1000  # over 8 KiB: its length takes a three-byte varint


def _fixed_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both encoders draw the same sync marker, so their files can be compared whole."""
    marker = bytes(range(16))
    monkeypatch.setattr(encode.os, "urandom", lambda size: marker[:size])
    monkeypatch.setattr(segments.os, "urandom", lambda size: marker[:size])


def _insert_edge_rows(pg: psycopg.Connection, client_id: int) -> None:
    moments = [
        dt.datetime(1970, 1, 1, tzinfo=UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
        dt.datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC),
        dt.datetime(2024, 2, 29, 12, tzinfo=dt.timezone(dt.timedelta(hours=-7))),
    ]
    values = [None, Decimal("0"), Decimal("-0.000001"), Decimal("-128"), Decimal("128")]
    values += [Decimal("99999999999999.999999"), Decimal("-99999999999999.999999")]
    texts = [None, "", "é🚀\x01\t\n", LONG_TEXT]
    keys = [1, 2, 8191, 8192, 2**27, 2**41, 2**55, 2**62]
    rows = []
    for index, key in enumerate(keys):
        rows.append(
            (
                key,
                client_id,
                -(2**63) if index == 0 else 2**63 - 1 if index == 1 else -index * 10_000,
                index,
                dt.date(1899, 12, 31) + dt.timedelta(days=index * 40_000),
                values[index % len(values)],
                texts[index % len(texts)],
                moments[index % len(moments)],
            )
        )
    with pg.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, "
            "currency, recorded_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    pg.execute(
        "INSERT INTO formulas (id, client_id, name, expression, weight, valid_from, valid_to, "
        "enabled, parameters, updated_at) VALUES "
        "(5, %(c)s, 'f', 'a + b', 1234567890.12345678, '2020-01-01', NULL, true, "
        '\'{"z": 1, "a": [1.50, null]}\', now()), '
        "(6, %(c)s, '', %(long)s, NULL, '0001-01-01', '9999-12-31', false, NULL, now()), "
        "(7, %(c)s, 'g', '', -0.00000001, '2000-01-01', '2000-01-02', true, '[]', now())",
        {"c": client_id, "long": LONG_TEXT},
    )


@pytest.mark.parametrize("codec", ["zstandard", "deflate", "null"])
@pytest.mark.parametrize("dataset", ["raw_data", "formulas"])
def test_segments_are_byte_identical_to_the_snapshot_core(
    pg: psycopg.Connection,
    client_id: int,
    monkeypatch: pytest.MonkeyPatch,
    dataset: str,
    codec: str,
) -> None:
    _insert_edge_rows(pg, client_id)
    _fixed_sync(monkeypatch)
    target = Target(dataset, client_id)
    definition = get_dataset(dataset)

    with source.snapshot_transaction(pg):
        exact = [
            dict(zip(definition.column_names, row, strict=True))
            for row in source.stream_rows(pg, target, exact=True)
        ]
        fast = list(
            encode.encode_segments(
                definition,
                source.stream_rows(pg, target),
                client_id=client_id,
                codec=codec,
                block_rows=3,
                max_rows=5,
            )
        )
    core = list(
        segments.encode_segments(
            definition, exact, codec=codec, block_rows=3, max_rows=5, client_id=client_id
        )
    )

    assert exact and len(fast) == len(core)
    for mine, theirs in zip(fast, core, strict=True):
        assert mine.data == theirs.data
        assert (mine.rows, mine.min_key, mine.max_key, mine.checksum, mine.block_keys) == (
            theirs.rows,
            theirs.min_key,
            theirs.max_key,
            theirs.checksum,
            theirs.block_keys,
        )


def test_bootstrap_output_reads_and_rewrites_block_by_block(
    pg: psycopg.Connection, settings: Settings, client_id: int
) -> None:
    _insert_edge_rows(pg, client_id)
    snapshot = settings.snapshot.model_copy(update={"block_rows": 2, "segment_max_rows": 100})
    settings = settings.model_copy(update={"snapshot": snapshot})
    target = Target("raw_data", client_id)
    assert bootstrap_target(target, settings).outcome == BOOTSTRAPPED

    with open_snapshot("raw_data", client_id, settings) as snap:
        [entry] = snap.manifest.segments
        rows = {row["id"]: row for row in snap}
    assert rows[2**62]["entity_id"] == -70_000 and rows[1]["entity_id"] == -(2**63)
    assert rows[8192]["currency"] == LONG_TEXT and rows[8191]["value"] == Decimal("-0.000001")
    data = ObjectStore(settings.s3).get(entry.key)
    original = _container.parse(data)

    changed = {**rows[8192], "currency": "changed"}
    parts = segments.rewrite_segment(
        get_dataset("raw_data"),
        data,
        {8192: changed},
        [2**55],
        codec=settings.snapshot.codec,
        block_rows=2,
        max_rows=100,
        client_id=client_id,
    )

    [part] = parts
    after = {row["id"]: row for row in segments.iter_segment_rows(part.data)}
    assert set(after) == set(rows) - {2**55}
    assert after[8192]["currency"] == "changed"
    # Blocks 0 and 2 hold keys 1-2 and 2^27-2^41: untouched, so copied byte for byte.
    rewritten = [block.raw for block in _container.parse(part.data).blocks]
    assert original.blocks[0].raw in rewritten and original.blocks[2].raw in rewritten
    assert original.blocks[1].raw not in rewritten and original.blocks[3].raw not in rewritten


def test_an_infinite_date_fails_its_target_by_name(
    pg: psycopg.Connection, settings: Settings, client_id: int
) -> None:
    pg.execute(
        "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, currency,"
        " recorded_at) VALUES (1, %s, 1, 1, 'infinity', NULL, NULL, now())",
        [client_id],
    )
    pg.execute(
        "INSERT INTO entities (id, client_id, name, kind, active, valid_from, updated_at)"
        " VALUES (1, %s, 'n', 'k', true, '2020-01-01', now())",
        [client_id],
    )
    targets = [Target("raw_data", client_id), Target("entities", client_id)]

    try:
        results = {
            result.target.dataset: result
            for result in bootstrap_targets(targets, settings, parallel=2)
        }

        assert results["raw_data"].outcome == FAILED
        assert "infinite date" in (results["raw_data"].error or "")
        assert "raw_data" in (results["raw_data"].error or "")
        assert results["entities"].outcome == BOOTSTRAPPED
        with pytest.raises(ValueError, match="infinite date"):
            bootstrap_target(targets[0], settings)
    finally:
        # The shared tables must not keep a row every later `bootstrap --all` would fail on.
        pg.execute("DELETE FROM raw_data WHERE client_id = %s", [client_id])
        pg.execute("DELETE FROM entities WHERE client_id = %s", [client_id])


def test_schema_without_publication_keeps_tables_and_triggers() -> None:
    full, bare = source_sql(), source_sql(publication=False)

    assert "CREATE PUBLICATION" in full and "PUBLICATION" not in bare
    assert bare.count("CREATE TABLE IF NOT EXISTS") == 5
    assert bare.count("CREATE OR REPLACE TRIGGER") == 5
