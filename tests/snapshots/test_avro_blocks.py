"""The compiled block encoders write what fastavro's writer writes, byte for byte."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest

from schemas.datasets import DATASETS
from snapshots import avro_blocks
from snapshots.segments import encode_segment, iter_segment_rows, rewrite_segment

LONG_TEXT = "long ✓ text " * 1000  # over 8 KiB: its length takes a three-byte varint


@pytest.mark.parametrize(
    "value",
    [0, -1, 1, 8191, -8192, 8192, -8193, 2**27 - 1, 2**27, 2**41, -(2**41) - 1, 2**55, 2**62]
    + [2**63 - 1, -(2**63)],
)
def test_longs_encode_as_fastavro_does(value: int) -> None:
    expected = io.BytesIO()
    fastavro.schemaless_writer(expected, fastavro.parse_schema("long"), value)

    assert avro_blocks.encode_long(value) == expected.getvalue()


def _edge_rows(name: str, make_row: Any, version: int) -> dict[int, dict[str, Any]]:
    """A row per block of a 10-row-block segment of even keys 0..198, every value kind and
    the edges of longs and text lengths among them."""
    dataset = DATASETS[name]
    rows = {key: make_row(dataset, key, version=version) for key in range(1, 200, 10)}
    texts = [c.name for c in dataset.columns if c.pg_type == "text" and c.nullable]
    longs = [c.name for c in dataset.columns if c.pg_type == "bigint" and c.nullable]
    for index, key in enumerate(rows):
        for column in texts:
            rows[key][column] = LONG_TEXT if index % 2 else ""
        for column in longs:
            rows[key][column] = [2**63 - 1, -(2**63), 8191, -8193][index % 4]
    return rows


def _without_compiled_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # A codec no compiled encoder compresses for: every block goes through fastavro's writer.
    monkeypatch.setattr(avro_blocks, "compressor", lambda codec: None)


@pytest.mark.parametrize("codec", ["null", "deflate", "zstandard"])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_rewritten_blocks_are_byte_identical_to_fastavro_writer(
    name: str, codec: str, make_row: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = DATASETS[name]
    rows = [make_row(dataset, key) for key in range(0, 200, 2)]
    data = encode_segment(dataset, rows, codec=codec, block_rows=10, client_id=7).data
    upserts = _edge_rows(name, make_row, version=2)  # one in each of the 20 blocks
    options: dict[str, Any] = {"codec": codec, "block_rows": 10, "max_rows": 1000}

    compiled = rewrite_segment(dataset, data, upserts, [4, 198], client_id=7, **options)
    _without_compiled_encoder(monkeypatch)
    written = rewrite_segment(dataset, data, upserts, [4, 198], client_id=7, **options)

    assert [part.data for part in compiled] == [part.data for part in written]
    back = [row for part in compiled for row in iter_segment_rows(part.data)]
    assert [row for row in back if row[dataset.key_column] in upserts] == list(upserts.values())


def test_a_value_the_compiled_encoder_refuses_is_written_as_fastavro_writes_it(
    make_row: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fastavro writes a bool into a long as 0 or 1; the compiled encoder takes ints only,
    # so the block goes to fastavro's writer instead, with the same result.
    raw = DATASETS["raw_data"]
    rows = [make_row(raw, key) for key in range(0, 40, 2)]
    data = encode_segment(raw, rows, codec="zstandard", block_rows=10).data
    upserts = {21: make_row(raw, 21) | {"entity_id": True}}
    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}

    compiled = rewrite_segment(raw, data, upserts, [], **options)
    _without_compiled_encoder(monkeypatch)
    written = rewrite_segment(raw, data, upserts, [], **options)

    assert [part.data for part in compiled] == [part.data for part in written]
    assert [row["entity_id"] for row in iter_segment_rows(compiled[0].data) if row["id"] == 21] == [
        1
    ]
