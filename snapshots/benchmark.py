"""``storage-builder bench segments``: how fast segments are encoded and rewritten.

Encoding is measured on ``raw_data``-like rows with exact Python values (Decimal, date,
aware datetime) streamed from a generator, against fastavro's own writer on the same rows
as the baseline. Rewriting compares decoding and re-encoding a whole segment with the
block-level rewrite, for a few changed keys spread over the segment.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import statistics
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import fastavro

from schemas.datasets import DATASETS
from snapshots.segments import encode_segment, rewrite_segment, rewrite_segment_fully

_RAW = DATASETS["raw_data"]
_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def sample_rows(count: int, start: int = 1, version: int = 1) -> Iterator[dict[str, Any]]:
    """``raw_data`` rows as the bootstrap reads them from PostgreSQL, generated lazily."""
    for key in range(start, start + count):
        yield {
            "id": key,
            "client_id": 1,
            "entity_id": key % 5000,
            "data_item_id": key % 300,
            "period": dt.date(2020 + key % 5, 1 + key % 12, 1),
            "value": None if key % 17 == 0 else Decimal(key * 37 % 10**9).scaleb(-6),
            "currency": "EUR" if key % 3 else "USD",
            "recorded_at": _EPOCH + dt.timedelta(seconds=key),
            "row_version": version,
        }


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(
    *, rows: int, segment_rows: int, changed: int, codec: str, block_rows: int, repeat: int
) -> dict[str, Any]:
    """Measure encoding and rewriting; returns one JSON-ready object."""
    parsed = fastavro.parse_schema(_RAW.avro_schema())
    baseline = _median_s(
        lambda: fastavro.writer(io.BytesIO(), parsed, sample_rows(rows), codec=codec), repeat
    )
    encode = _median_s(
        lambda: encode_segment(_RAW, sample_rows(rows), codec=codec, block_rows=block_rows),
        repeat,
    )

    segment = encode_segment(_RAW, sample_rows(segment_rows), codec=codec, block_rows=block_rows)
    keys = random.Random(7).sample(range(1, segment_rows + 1), changed)
    upserts = {row["id"]: row for key in keys for row in sample_rows(1, start=key, version=2)}
    options: dict[str, Any] = {"codec": codec, "block_rows": block_rows, "max_rows": 10**9}
    full = _median_s(
        lambda: rewrite_segment_fully(_RAW, segment.data, upserts, [], **options), repeat
    )
    block_level = _median_s(
        lambda: rewrite_segment(_RAW, segment.data, upserts, [], **options), repeat
    )
    return {
        "workload": "segments",
        "codec": codec,
        "block_rows": block_rows,
        "encode_rows": rows,
        "encode_rows_per_s": round(rows / encode),
        "fastavro_writer_rows_per_s": round(rows / baseline),
        "segment_rows": segment_rows,
        "segment_bytes": len(segment.data),
        "changed_keys": changed,
        "rewrite_full_ms": round(full * 1000, 1),
        "rewrite_block_level_ms": round(block_level * 1000, 1),
        "repeat": repeat,
    }
