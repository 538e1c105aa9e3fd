"""Manifests: contiguous sorted ranges, binary search, and refusal of other targets."""

from __future__ import annotations

import pytest

from schemas.datasets import Target
from snapshots.manifest import FORMAT_VERSION, Manifest, SegmentEntry, SourcePosition
from storage_builder.errors import SnapshotFormatError


def _entry(
    lo: int | None, hi: int | None, min_key: int, max_key: int, rows: int = 2
) -> SegmentEntry:
    return SegmentEntry(
        key=f"r/raw_data/client=7/segments/{min_key}.avro",
        lo=lo,
        hi=hi,
        min_key=min_key,
        max_key=max_key,
        rows=rows,
        bytes=100,
        checksum="-123",
        block_keys=[min_key],
    )


def _manifest(segments: list[SegmentEntry], **changes: object) -> Manifest:
    values: dict[str, object] = {
        "dataset": "raw_data",
        "client_id": 7,
        "version": 3,
        "source_position": SourcePosition(pg_snapshot="10:20:12,15", offsets={"t:0": 5}),
        "segments": segments,
        "rows": sum(s.rows for s in segments),
    }
    values.update(changes)
    return Manifest(**values)  # type: ignore[arg-type]


def test_segment_index_finds_the_owner_of_every_key() -> None:
    manifest = _manifest(
        [_entry(None, 100, 1, 50), _entry(100, 200, 100, 150), _entry(200, None, 200, 300)]
    )
    assert [manifest.segment_index(k) for k in (-5, 1, 99, 100, 199, 200, 10**12)] == [
        0,
        0,
        0,
        1,
        1,
        2,
        2,
    ]


def test_a_manifest_without_segments_is_valid_and_has_no_owner() -> None:
    manifest = _manifest([])
    assert manifest.rows == 0
    with pytest.raises(IndexError):
        manifest.segment_index(1)


def test_json_round_trip_keeps_everything() -> None:
    manifest = _manifest([_entry(None, 100, 1, 50), _entry(100, None, 100, 150)])
    loaded = Manifest.load(manifest.to_json(), Target("raw_data", 7), "k")
    assert loaded == manifest
    assert loaded.format_version == FORMAT_VERSION == 2
    assert loaded.checksum == -246


def test_a_manifest_of_the_earlier_format_still_loads() -> None:
    manifest = _manifest([_entry(None, None, 1, 50)])
    earlier = manifest.model_copy(update={"format_version": 1}).to_json()
    assert Manifest.load(earlier, Target("raw_data", 7), "k").format_version == 1


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([_entry(None, 100, 1, 50), _entry(101, None, 101, 150)], "not contiguous"),
        ([_entry(0, 100, 1, 50), _entry(100, None, 100, 150)], "first segment"),
        ([_entry(None, 100, 1, 50), _entry(100, 300, 100, 150)], "first segment"),
    ],
)
def test_inconsistent_ranges_are_refused(segments: list[SegmentEntry], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _manifest(segments)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((None, 100, 100, 99), "min_key 100 > max_key 99"),
        ((10, 100, 5, 50), "below lo"),
        ((None, 100, 5, 100), "not below hi"),
    ],
)
def test_an_entry_must_hold_its_keys_inside_its_range(
    bounds: tuple[int | None, int | None, int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _entry(*bounds)


def test_rows_must_add_up() -> None:
    with pytest.raises(ValueError, match="rows 5 differ"):
        _manifest([_entry(None, None, 1, 50)], rows=5)


def test_a_manifest_of_another_client_is_refused() -> None:
    data = _manifest([_entry(None, None, 1, 2)]).to_json()
    with pytest.raises(SnapshotFormatError, match="describes raw_data/7, not raw_data/8"):
        Manifest.load(data, Target("raw_data", 8), "r/raw_data/client=8/manifests/x.json")
    with pytest.raises(SnapshotFormatError, match="not entities/7"):
        Manifest.load(data, Target("entities", 7), "k")


def test_garbage_and_unknown_format_versions_are_refused() -> None:
    with pytest.raises(SnapshotFormatError, match="manifest 'k' is invalid"):
        Manifest.load(b"{not json", Target("raw_data", 7), "k")
    body = _manifest([]).model_dump(mode="json") | {"format_version": 3}
    import orjson

    with pytest.raises(SnapshotFormatError, match="format_version"):
        Manifest.load(orjson.dumps(body), Target("raw_data", 7), "k")
