"""Fixtures of the snapshot core's tests: sample rows of every dataset, writers on the stack."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from schemas.datasets import DATASETS, Dataset, Target
from snapshots.publish import SnapshotWriter
from storage_builder.settings import Settings

RowFactory = Callable[..., dict[str, Any]]

# Text that must survive byte for byte: emoji, combining marks, right-to-left script,
# control characters, quotes and backslashes, a lone surrogate-free astral character.
TEXTS = [
    "plain",
    "emoji 😀🧪 and flags 🇫🇷",
    "e\u0301 combining, Ωμέγα, עברית, 中文",
    'ctrl \x01\x07\t\n\r\x1f "quoted" \\back\\',
    "",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
JSONS = ['{"a": [1, 2.50, "é"], "b": null}', "[]", '{"nested": {"deep": true}}', '"x"']
TIMESTAMPS = [
    dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    dt.datetime(1969, 12, 31, 23, 0, 0, 1, tzinfo=dt.UTC),
    dt.datetime(2038, 1, 19, 3, 14, 8, 123456, tzinfo=dt.UTC),
]
DATES = [dt.date(2024, 2, 29), dt.date(1900, 1, 1), dt.date(9999, 12, 31), dt.date(1970, 1, 1)]


def _value(dataset: Dataset, name: str, key: int) -> Any:
    column = dataset.column(name)
    if column.nullable and key % 5 == 0:
        return None
    numeric = column.numeric_scale
    if numeric is not None:
        precision, scale = numeric
        digits = precision - scale
        sign = -1 if key % 2 else 1
        whole = (key * 7919) % 10**digits
        return Decimal(sign * (whole * 10**scale + key % 10**scale)).scaleb(-scale)
    pg_type = column.pg_type
    if pg_type == "bigint":
        return (key * 2654435761) % 2**63
    if pg_type == "integer":
        return (key % 2**31) - 2**30
    if pg_type == "boolean":
        return key % 2 == 0
    if pg_type == "text":
        return TEXTS[key % len(TEXTS)]
    if pg_type == "jsonb":
        return JSONS[key % len(JSONS)]
    if pg_type == "date":
        return DATES[key % len(DATES)]
    if pg_type == "timestamptz":
        return TIMESTAMPS[key % len(TIMESTAMPS)] + dt.timedelta(seconds=key)
    raise AssertionError(pg_type)


@pytest.fixture
def make_row() -> RowFactory:
    """make_row(dataset, key, client_id=7, version=1): a row exercising every value kind."""

    def make(dataset: Dataset | str, key: int, client_id: int = 7, version: int = 1) -> dict:
        dataset = DATASETS[dataset] if isinstance(dataset, str) else dataset
        row = {name: _value(dataset, name, key) for name in dataset.column_names}
        row[dataset.key_column] = key
        row[dataset.client_column] = client_id
        row[dataset.version_column] = version
        return row

    return make


@pytest.fixture
def writer(settings: Settings) -> Iterator[SnapshotWriter]:
    """A snapshot writer on the stack's S3 and Redis, under this test's own prefixes."""
    snapshot_writer = SnapshotWriter.from_settings(settings)
    snapshot_writer.store.ensure_bucket()
    yield snapshot_writer
    snapshot_writer.close()
    snapshot_writer.registry.close()


@pytest.fixture
def target(client_id: int) -> Target:
    return Target("raw_data", client_id)


Seeder = Callable[..., Any]


@pytest.fixture
def seed(writer: SnapshotWriter, make_row: RowFactory) -> Seeder:
    """seed(target, keys, version=1, expected=None): publish a snapshot of those keys."""
    from snapshots.manifest import SourcePosition
    from snapshots.segments import encode_segments

    def publish(target: Target, keys: list[int], version: int = 1, expected: int | None = None):
        dataset = DATASETS[target.dataset]
        rows = (make_row(dataset, key, target.client_id, version) for key in sorted(keys))
        encoded = encode_segments(
            dataset,
            rows,
            codec=writer.snapshot.codec,
            block_rows=writer.snapshot.block_rows,
            max_rows=writer.snapshot.segment_max_rows,
            client_id=target.client_id,
        )
        entries = writer.upload_segments(target, encoded)
        position = SourcePosition(pg_snapshot="100:105:101,103", offsets={})
        return writer.publish(target, expected, entries, position)

    return publish


@pytest.fixture
def small_writer(writer: SnapshotWriter) -> SnapshotWriter:
    """The writer, with segments of at most 20 rows in blocks of 5: a few rows make many."""
    writer.snapshot = writer.snapshot.model_copy(update={"segment_max_rows": 20, "block_rows": 5})
    return writer
