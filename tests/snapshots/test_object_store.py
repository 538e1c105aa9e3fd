"""The object store against the stack's S3: round trips, listing, errors naming the key."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import botocore.utils
import pytest

from snapshots.store import ObjectStore, _s3_options, parse_timestamp
from storage_builder.errors import ObjectStoreError
from storage_builder.settings import Settings


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    object_store = ObjectStore(settings.s3)
    object_store.ensure_bucket()
    return object_store


def test_put_get_list_delete(store: ObjectStore, settings: Settings) -> None:
    prefix = f"{settings.s3.prefix}/store/"
    for name in ("b", "a", "c/d"):
        store.put(prefix + name, name.encode() * 3)

    assert store.get(prefix + "c/d") == b"c/dc/dc/d"
    assert store.exists(prefix + "a") and not store.exists(prefix + "zz")
    listed = list(store.list(prefix))
    assert [info.key for info in listed] == [prefix + "a", prefix + "b", prefix + "c/d"]
    assert [info.size for info in listed] == [3, 3, 9]
    assert list(store.list_prefixes(prefix)) == [prefix + "c/"]
    assert store.bytes_written == 15 and store.requests >= 7

    assert store.delete_many(info.key for info in listed) == 3
    assert list(store.list(prefix)) == []


def test_listings_of_more_than_a_page_return_every_key_once(
    store: ObjectStore, settings: Settings
) -> None:
    # Keys with "=" as targets have them: a store that mangles continuation tokens of such
    # keys would list the first page again, forever.
    prefix = f"{settings.s3.prefix}/raw_data/"
    keys = [
        f"{prefix}client={client}/segments/{part}.avro" for client in range(6) for part in (0, 1)
    ]
    keys += [f"{prefix}client=1000/segments/{n:04d}.avro" for n in range(1_010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, b"x"), keys))

    listed = [info.key for info in store.list(prefix)]
    assert listed == sorted(keys)
    prefixes = list(store.list_prefixes(prefix))
    assert prefixes == sorted({key[: key.index("/segments/") + 1] for key in keys})
    assert store.delete_many(listed) == len(keys)


def test_a_bounded_listing_asks_for_no_page_outside_its_bounds(
    store: ObjectStore, settings: Settings
) -> None:
    prefix = f"{settings.s3.prefix}/bounded/"
    keys = [f"{prefix}{n:04d}.avro" for n in range(1_010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, b"x"), keys))

    for start, stop in [(3, 7), (1_004, 1_009), (0, 0)]:
        requests = store.requests
        listed = [info.key for info in store.list(prefix, start=keys[start], stop=keys[stop])]
        assert listed == keys[start : stop + 1]
        # Either bound alone would need both pages of the 1,010 keys.
        assert store.requests - requests == 1
    assert store.delete_many(keys) == len(keys)


@pytest.mark.parametrize(
    "endpoint_url, signed",
    [
        ("http://127.0.0.1:9000", False),
        ("http://[::1]:9000", False),
        ("http://localhost:9000", False),
        ("http://10.0.0.7:9000", True),
        ("http://minio.internal:9000", True),
    ],
)
def test_request_bodies_are_signed_unless_on_loopback(endpoint_url: str, signed: bool) -> None:
    options = _s3_options(endpoint_url)
    assert options is not None and options["addressing_style"] == "path"
    assert options.get("payload_signing_enabled", True) is signed


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-03T21:37:00.000Z",  # a LIST's LastModified
        "2026-12-03T21:37:00.123456+01:00",
        "Thu, 03 Dec 2026 21:37:00 GMT",  # a GET's Last-Modified header
        "Thu, 03 Dec 2026 21:37:00 -0000",
        "1764797820",  # neither: botocore's own parser reads it
    ],
)
def test_timestamps_are_read_as_botocore_reads_them(text: str) -> None:
    assert parse_timestamp(text) == botocore.utils.parse_timestamp(text)
    assert parse_timestamp(text).tzinfo is not None


def test_listed_objects_carry_their_time_of_writing(store: ObjectStore, settings: Settings) -> None:
    key = f"{settings.s3.prefix}/store/timed"
    before = time.time()
    store.put(key, b"x")

    (info,) = store.list(key)

    # S3 keeps whole seconds (S3Proxy's filesystem too): a second either side.
    assert before - 1 <= info.last_modified <= time.time() + 1
    store.delete_many([key])


def test_a_missing_object_raises_with_its_key(store: ObjectStore, settings: Settings) -> None:
    key = f"{settings.s3.prefix}/missing"
    with pytest.raises(ObjectStoreError, match="NoSuchKey") as caught:
        store.get(key)
    assert caught.value.key == key


def test_an_unreachable_endpoint_raises_with_the_key_and_the_setting(settings: Settings) -> None:
    s3 = settings.s3.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1})
    with pytest.raises(ObjectStoreError, match="check s3.endpoint_url") as caught:
        ObjectStore(s3).put("some/key", b"x")
    assert caught.value.key == "some/key"


def test_concurrent_uploads_from_threads(store: ObjectStore, settings: Settings) -> None:
    keys = [f"{settings.s3.prefix}/threads/{n:03d}" for n in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: store.put(key, key.encode()), keys))
    assert [store.get(key) for key in keys] == [key.encode() for key in keys]
    assert store.bytes_written == sum(len(key) for key in keys)


def test_large_objects_go_through_multipart(store: ObjectStore, settings: Settings) -> None:
    store.multipart_threshold = 5 * 1024 * 1024
    data = os.urandom(11 * 1024 * 1024)
    key = f"{settings.s3.prefix}/large"
    store.put(key, data)
    assert store.get(key) == data
