"""Segments: exact round trips of every value kind, block-level rewrites, splits, merges."""

from __future__ import annotations

import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import fastavro
import pytest

from schemas.datasets import DATASETS, Dataset
from snapshots import _container
from snapshots.checksums import row_hash
from snapshots.segments import (
    EncodedSegment,
    block_rows_of,
    encode_segment,
    encode_segments,
    iter_segment_rows,
    rewrite_segment,
    rewrite_segment_fully,
    segment_metadata,
)
from storage_builder.errors import InvalidTargetError

RAW = DATASETS["raw_data"]


def _checksum(dataset: Dataset, rows: list[dict[str, Any]]) -> int:
    return sum(row_hash(r[dataset.key_column], r[dataset.version_column]) for r in rows)


def _rows_of(parts: list[EncodedSegment]) -> list[dict[str, Any]]:
    return [row for part in parts for row in iter_segment_rows(part.data)]


@pytest.mark.parametrize("codec", ["null", "deflate", "zstandard"])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_value_round_trips_exactly(name: str, codec: str, make_row: Any) -> None:
    dataset = DATASETS[name]
    rows = [make_row(dataset, key) for key in range(1, 60)]

    segment = encode_segment(dataset, iter(rows), codec=codec, block_rows=16, client_id=7)
    back = list(iter_segment_rows(segment.data))

    assert back == rows
    for column in dataset.columns:
        scale = column.numeric_scale
        for row in back:
            value = row[column.name]
            if value is None:
                assert column.nullable
            elif scale is not None:
                assert value.as_tuple().exponent == -scale[1]  # the column's scale
            elif column.pg_type == "timestamptz":
                assert value.utcoffset() == dt.timedelta(0)
            elif column.pg_type == "date":
                assert type(value) is dt.date
    assert (segment.rows, segment.min_key, segment.max_key) == (59, 1, 59)
    assert segment.block_keys == [1, 17, 33, 49]
    assert segment.checksum == _checksum(dataset, rows)


def test_decimals_come_back_with_the_column_scale(make_row: Any) -> None:
    row = make_row(RAW, 1) | {"value": Decimal("1.5")}
    (back,) = iter_segment_rows(encode_segment(RAW, [row], codec="null", block_rows=5).data)
    assert str(back["value"]) == "1.500000"


def test_timestamps_in_other_zones_come_back_as_the_same_instant_in_utc(make_row: Any) -> None:
    zone = dt.timezone(dt.timedelta(hours=5, minutes=30))
    moment = dt.datetime(2024, 6, 1, 12, 0, 0, 1, tzinfo=zone)
    row = make_row(RAW, 1) | {"recorded_at": moment}
    (back,) = iter_segment_rows(encode_segment(RAW, [row], codec="null", block_rows=5).data)
    assert back["recorded_at"] == moment
    assert back["recorded_at"].tzinfo == dt.UTC


def test_any_avro_reader_reads_a_segment_and_its_metadata(make_row: Any) -> None:
    rows = [make_row(RAW, key, client_id=31) for key in range(10)]
    segment = encode_segment(RAW, rows, codec="zstandard", block_rows=4, client_id=31)

    reader = fastavro.reader(io.BytesIO(segment.data))
    assert list(reader) == rows
    assert isinstance(reader.writer_schema, dict)
    assert reader.writer_schema["name"] == "storage_builder.snapshot.raw_data"
    metadata = segment_metadata(segment.data)
    assert json.loads(metadata["avro.schema"]) == RAW.avro_schema()
    assert metadata["sb.dataset"] == "raw_data"
    assert metadata["sb.client_id"] == "31"
    assert len(json.loads(metadata["sb.blocks"])) == 3


def test_blocks_hold_exactly_block_rows(make_row: Any) -> None:
    segment = encode_segment(
        RAW, (make_row(RAW, k) for k in range(25)), codec="null", block_rows=10
    )
    assert [block.rows for block in _container.parse(segment.data).blocks] == [10, 10, 5]


def test_rows_out_of_order_or_of_another_client_are_refused(make_row: Any) -> None:
    with pytest.raises(ValueError, match="ascending key order at key 3"):
        encode_segment(RAW, [make_row(RAW, 5), make_row(RAW, 3)], codec="null", block_rows=5)
    with pytest.raises(InvalidTargetError, match="belongs to client 8, not 7"):
        encode_segment(
            RAW, [make_row(RAW, 1, client_id=8)], codec="null", block_rows=5, client_id=7
        )
    with pytest.raises(ValueError, match="at least one row"):
        encode_segment(RAW, [], codec="null", block_rows=5)


def test_a_row_that_does_not_fit_the_schema_names_its_key(make_row: Any) -> None:
    with pytest.raises(ValueError, match="row 4 of raw_data cannot be encoded"):
        encode_segment(RAW, [make_row(RAW, 4) | {"entity_id": "x"}], codec="null", block_rows=5)


def test_encode_segments_cuts_at_max_rows_lazily(make_row: Any) -> None:
    consumed = []

    def rows() -> Any:
        for key in range(23):
            consumed.append(key)
            yield make_row(RAW, key)

    parts = encode_segments(RAW, rows(), codec="null", block_rows=4, max_rows=10)
    first = next(parts)
    assert first.rows == 10 and len(consumed) <= 11
    rest = list(parts)
    assert [p.rows for p in rest] == [10, 3]
    assert [r["id"] for r in _rows_of([first, *rest])] == list(range(23))


def _base(make_row: Any, codec: str = "zstandard") -> tuple[list[dict[str, Any]], bytes]:
    rows = [make_row(RAW, key) for key in range(0, 200, 2)]  # even keys 0..198
    return rows, encode_segment(RAW, rows, codec=codec, block_rows=10, client_id=7).data


def _expected(rows: list[dict[str, Any]], upserts: dict[int, Any], deletes: list[int]) -> list:
    merged = {row["id"]: row for row in rows if row["id"] not in deletes} | upserts
    return [merged[key] for key in sorted(merged)]


def test_rewrite_applies_updates_inserts_and_deletes(make_row: Any) -> None:
    rows, data = _base(make_row)
    upserts = {
        40: make_row(RAW, 40, version=2),  # update
        41: make_row(RAW, 41, version=5),  # insert inside a block's range
        -3: make_row(RAW, -3),  # below the first key
        500: make_row(RAW, 500),  # above the last key
    }
    deletes = [42, 100, 7]  # 7 does not exist

    parts = rewrite_segment(
        RAW, data, upserts, deletes, codec="zstandard", block_rows=10, max_rows=1000, client_id=7
    )

    expected = _expected(rows, upserts, deletes)
    assert len(parts) == 1
    assert _rows_of(parts) == expected
    assert parts[0].checksum == _checksum(RAW, expected)
    assert (parts[0].rows, parts[0].min_key, parts[0].max_key) == (len(expected), -3, 500)
    assert parts[0].block_keys == sorted(parts[0].block_keys)
    assert segment_metadata(parts[0].data)["sb.client_id"] == "7"


def test_every_rewritten_block_keeps_the_checksum_of_its_own_rows(make_row: Any) -> None:
    rows, data = _base(make_row)
    # Blocks of ten even keys: in the first an update and a delete, and in the seventh a
    # delete and an insert, leave one block each (whose checksum is corrected by the changed
    # rows); an insert into the third and three into the fourth overfill them (cut again).
    upserts = {4: make_row(RAW, 4, version=7), 41: make_row(RAW, 41, version=3)}
    upserts |= {key: make_row(RAW, key, version=2) for key in (61, 63, 65, 121)}
    deletes = [8, 120]

    (part,) = rewrite_segment(
        RAW, data, upserts, deletes, codec="zstandard", block_rows=10, max_rows=1000
    )

    described = json.loads(segment_metadata(part.data)["sb.blocks"])
    decoded = block_rows_of(RAW, part.data, set(range(len(described))))
    for index, (first, last, count, checksum) in enumerate(described):
        held = decoded[index]
        assert (first, last, count) == (held[0]["id"], held[-1]["id"], len(held))
        assert int(checksum) == _checksum(RAW, held), f"block {index}"
    assert _rows_of([part]) == _expected(rows, upserts, deletes)
    assert part.checksum == _checksum(RAW, _expected(rows, upserts, deletes))


def test_untouched_blocks_are_copied_byte_for_byte(make_row: Any) -> None:
    rows, data = _base(make_row)
    before = _container.parse(data)

    (part,) = rewrite_segment(
        RAW,
        data,
        {60: make_row(RAW, 60, version=9)},
        [],
        codec="zstandard",
        block_rows=10,
        max_rows=1000,
    )

    after = _container.parse(part.data)
    assert after.sync == before.sync
    assert len(after.blocks) == len(before.blocks) == 10
    changed = [
        i
        for i, (a, b) in enumerate(zip(before.blocks, after.blocks, strict=True))
        if a.raw != b.raw
    ]
    assert changed == [3]  # keys 60..78 live in the fourth block


def test_block_level_and_full_rewrite_agree(make_row: Any) -> None:
    rows, data = _base(make_row)
    upserts = {k: make_row(RAW, k, version=3) for k in (1, 2, 3, 99, 150, 151, 197)}
    deletes = [0, 198, 50]
    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}
    fast = rewrite_segment(RAW, data, upserts, deletes, **options)
    slow = rewrite_segment_fully(RAW, data, upserts, deletes, **options)
    assert _rows_of(fast) == _rows_of(slow) == _expected(rows, upserts, deletes)
    assert fast[0].checksum == slow[0].checksum


def test_blocks_the_caller_decoded_are_taken_as_given(make_row: Any) -> None:
    rows, data = _base(make_row)
    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}
    upserts = {60: make_row(RAW, 60, version=9)}
    # Block 3 holds keys 60..78: as the caller decoded it, with key 62 in a currency the
    # bytes do not hold, so that the result shows where its rows came from. (The caller
    # decodes them from these same bytes: the block's checksum is its header's, corrected by
    # the changed rows.)
    block = block_rows_of(RAW, data, {3})[3]
    assert [row["id"] for row in block] == [row["id"] for row in rows[30:40]]
    block[1]["currency"] = "XTS"

    (plain,) = rewrite_segment(RAW, data, upserts, [], **options)
    (given,) = rewrite_segment(RAW, data, upserts, [], **options, decoded={3: block})

    assert _rows_of([plain]) == _expected(rows, upserts, [])
    by_key = {row["id"]: row for row in _rows_of([given])}
    assert by_key[62]["currency"] == "XTS"
    assert by_key[60] == upserts[60]
    assert given.checksum == plain.checksum == _checksum(RAW, list(by_key.values()))


def test_a_segment_over_max_rows_splits_into_contiguous_parts(make_row: Any) -> None:
    rows, data = _base(make_row)  # 100 rows in blocks of 10
    upserts = {k: make_row(RAW, k) for k in range(1, 120, 2)}  # 60 odd keys: 160 rows

    parts = rewrite_segment(RAW, data, upserts, [], codec="zstandard", block_rows=10, max_rows=70)

    assert len(parts) == 3
    assert all(part.rows <= 70 for part in parts)
    assert sum(part.rows for part in parts) == 160
    for left, right in zip(parts, parts[1:], strict=False):
        assert left.max_key < right.min_key
    assert _rows_of(parts) == _expected(rows, upserts, [])
    assert sum(p.checksum for p in parts) == _checksum(RAW, _expected(rows, upserts, []))


def test_a_segment_whose_rows_are_all_deleted_disappears(make_row: Any) -> None:
    rows, data = _base(make_row)
    deletes = [row["id"] for row in rows]
    assert (
        rewrite_segment(RAW, data, {}, deletes, codec="zstandard", block_rows=10, max_rows=99) == []
    )


def test_a_rewrite_to_another_codec_re_encodes_everything(make_row: Any) -> None:
    rows, data = _base(make_row, codec="deflate")
    (part,) = rewrite_segment(
        RAW,
        data,
        {2: make_row(RAW, 2, version=4)},
        [],
        codec="zstandard",
        block_rows=10,
        max_rows=1000,
    )
    assert segment_metadata(part.data)["avro.codec"] == "zstandard"
    assert _rows_of([part]) == _expected(rows, {2: make_row(RAW, 2, version=4)}, [])


def test_changes_must_be_consistent(make_row: Any) -> None:
    _, data = _base(make_row)
    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}
    with pytest.raises(ValueError, match="under key 4 holds key 6"):
        rewrite_segment(RAW, data, {4: make_row(RAW, 6)}, [], **options)
    with pytest.raises(ValueError, match="both upserted and deleted"):
        rewrite_segment(RAW, data, {4: make_row(RAW, 4)}, [4], **options)
    with pytest.raises(InvalidTargetError):
        rewrite_segment(RAW, data, {5: make_row(RAW, 5, client_id=9)}, [], client_id=7, **options)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_blocks_rewritten_in_plain_values_keep_every_value_exact(name: str, make_row: Any) -> None:
    # A rewrite of the dataset's own segments decodes and encodes blocks as days,
    # microseconds and unscaled bytes; what comes back must still be the exact values.
    dataset = DATASETS[name]
    rows = [make_row(dataset, key) for key in range(0, 200, 2)]
    data = encode_segment(dataset, rows, codec="zstandard", block_rows=10, client_id=7).data
    upserts = {key: make_row(dataset, key, version=6) for key in (3, 44, 45, 199, 250)}
    decoded = block_rows_of(dataset, data, {2})
    assert [row[dataset.key_column] for row in decoded[2]] == list(range(40, 60, 2))

    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}
    parts = rewrite_segment(dataset, data, upserts, [10, 58], **options, decoded=decoded)

    expected = _expected(rows, upserts, [10, 58])
    assert _rows_of(parts) == expected
    assert parts[0].checksum == _checksum(dataset, expected)


def test_a_segment_in_another_schema_is_rewritten_from_its_own(make_row: Any) -> None:
    # Another tool's file: the same record with its fields in another order. Its blocks
    # are read with the schema it carries, and none is copied into the dataset's schema.
    rows = [make_row(RAW, key) for key in range(30)]
    schema = RAW.avro_schema()
    schema["fields"] = schema["fields"][::-1]
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(schema), rows, codec="zstandard")
    upserts = {4: make_row(RAW, 4, version=3), 31: make_row(RAW, 31)}

    decoded = block_rows_of(RAW, out.getvalue(), {0})
    assert decoded[0][:2] == rows[:2]
    parts = rewrite_segment(
        RAW, out.getvalue(), upserts, [6], codec="zstandard", block_rows=10, max_rows=1000
    )

    assert _rows_of(parts) == _expected(rows, upserts, [6])


def test_an_upsert_that_does_not_fit_the_schema_names_its_key_in_a_rewrite(
    make_row: Any,
) -> None:
    _, data = _base(make_row)
    options: dict[str, Any] = {"codec": "zstandard", "block_rows": 10, "max_rows": 1000}
    with pytest.raises(ValueError, match="row 44 of raw_data cannot be encoded"):
        rewrite_segment(RAW, data, {44: make_row(RAW, 44) | {"period": "soon"}}, [], **options)
