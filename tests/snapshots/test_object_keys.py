"""Object keys: built only from validated targets, never leaving the target's prefix."""

from __future__ import annotations

import pytest

from schemas.datasets import Target
from snapshots import keys
from storage_builder.errors import InvalidTargetError


def test_prefix_layout() -> None:
    target = Target("raw_data", 42)
    assert keys.target_prefix("snapshots", target) == "snapshots/raw_data/client=42/"
    assert keys.target_prefix("", target) == "raw_data/client=42/"
    assert keys.target_prefix("a/b/", target) == "a/b/raw_data/client=42/"


def test_segment_and_manifest_keys_are_unique_and_below_the_prefix() -> None:
    target = Target("entities", 9)
    segment_keys = {keys.segment_key("root", target) for _ in range(200)}
    assert len(segment_keys) == 200
    for key in segment_keys:
        assert key.startswith("root/entities/client=9/segments/") and key.endswith(".avro")
        assert keys.check_key("root", target, key) == key

    manifest = keys.manifest_key("root", target, 17)
    assert manifest.startswith("root/entities/client=9/manifests/000000000017-")
    assert keys.manifest_version(manifest) == 17
    assert keys.check_key("root", target, manifest) == manifest


def test_manifest_keys_sort_by_version() -> None:
    target = Target("entities", 9)
    names = [keys.manifest_key("r", target, version) for version in (2, 10, 1, 100)]
    assert [keys.manifest_version(name) for name in sorted(names)] == [1, 2, 10, 100]


@pytest.mark.parametrize(
    "key",
    [
        "root/raw_data/client=43/segments/0000000000000-0123456789abcdef.avro",  # other client
        "root/entities/client=42/segments/0000000000000-0123456789abcdef.avro",  # other dataset
        "root/raw_data/client=42/segments/../../client=43/x.avro",
        "root/raw_data/client=42/other/thing.avro",
        "other/raw_data/client=42/segments/0000000000000-0123456789abcdef.avro",
        "root/raw_data/client=42/",
    ],
)
def test_a_key_outside_the_target_is_refused(key: str) -> None:
    with pytest.raises(InvalidTargetError, match="is not a segment or manifest below"):
        keys.check_key("root", Target("raw_data", 42), key)


@pytest.mark.parametrize(
    ("dataset", "client"),
    [("raw_data", "../1"), ("raw_data", "-1"), ("raw_data", 0), ("nope", 1), ("raw_data", "01")],
)
def test_targets_are_validated_before_they_become_keys(dataset: str, client: object) -> None:
    with pytest.raises(InvalidTargetError):
        keys.target_prefix("root", Target.parse(dataset, client))


def test_target_prefixes_parse_back() -> None:
    assert keys.parse_target_prefix("r", "r/raw_data/client=5/") == Target("raw_data", 5)
    assert keys.parse_target_prefix("", "formulas/client=12/") == Target("formulas", 12)
    assert keys.parse_target_prefix("r", "r/raw_data/client=05/") is None
    assert keys.parse_target_prefix("r", "r/unknown/client=5/") is None
    assert keys.parse_target_prefix("r", "q/raw_data/client=5/") is None
