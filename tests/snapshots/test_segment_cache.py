"""The segment cache of the consumer's object store, against the real S3 store."""

from __future__ import annotations

from snapshots.segment_cache import SegmentCache
from snapshots.store import ObjectStore
from storage_builder.settings import Settings


def test_segments_written_are_read_back_without_a_request_and_evicted_by_budget(
    settings: Settings,
) -> None:
    store = ObjectStore(settings.s3)
    store.ensure_bucket()
    cache = SegmentCache(store, budget_bytes=8_000)
    root = settings.s3.prefix
    first, second = f"{root}/t/segments/a.avro", f"{root}/t/segments/b.avro"
    manifest = f"{root}/t/manifests/000000000001-x.json"

    cache.put(first, b"1" * 900)
    cache.put(manifest, b"{}")
    before = store.requests
    assert cache.get(first) == b"1" * 900
    assert store.requests == before and cache.hits == 1

    assert cache.get(manifest) == b"{}"  # manifests are not cached
    assert store.requests == before + 1

    for index in range(10):  # 9,000 bytes of other segments push the first one out
        cache.put(f"{root}/t/segments/{index}.avro", b"x" * 900)
    assert cache.get(first) == b"1" * 900 and cache.hits == 1

    cache.delete_many([second, first])
    assert not store.exists(first)
