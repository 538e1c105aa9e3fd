"""The version registry against the stack's Redis: compare-and-set, index, unreachable Redis."""

from __future__ import annotations

import pytest
import redis

from schemas.datasets import Target
from snapshots.manifest import SourcePosition
from snapshots.registry import TargetState, VersionRegistry
from storage_builder.errors import PublishConflict, RegistryError
from storage_builder.settings import RedisSettings, Settings


def _state(version: int, client: int = 1) -> TargetState:
    return TargetState(
        version=version,
        manifest_key=f"r/raw_data/client={client}/manifests/{version:012d}-x.json",
        source_position=SourcePosition(pg_snapshot="5:9:6", offsets={"sb.public.raw_data:3": 41}),
        published_at=1_700_000_000.25 + version,
    )


@pytest.fixture
def registry(settings: Settings) -> VersionRegistry:
    return VersionRegistry(settings.redis)


def test_compare_and_set_publishes_and_fences(registry: VersionRegistry, client_id: int) -> None:
    target = Target("raw_data", client_id)
    assert registry.get(target) is None

    registry.compare_and_set(target, None, _state(1))
    assert registry.get(target) == _state(1)

    with pytest.raises(PublishConflict) as absent:
        registry.compare_and_set(target, None, _state(1))
    assert absent.value.current == 1

    registry.compare_and_set(target, 1, _state(2))
    with pytest.raises(PublishConflict, match="expected version 1 but the registry holds 2"):
        registry.compare_and_set(target, 1, _state(2))
    with pytest.raises(PublishConflict):
        registry.compare_and_set(target, 5, _state(6))
    assert registry.get(target) == _state(2)


def test_a_new_version_must_be_above_the_expected_one(
    registry: VersionRegistry, client_id: int
) -> None:
    with pytest.raises(ValueError, match="not above 3"):
        registry.compare_and_set(Target("raw_data", client_id), 3, _state(3))


def test_targets_come_from_the_index_not_a_scan(
    registry: VersionRegistry, client_id: int, redis_client: redis.Redis
) -> None:
    targets = [Target("raw_data", client_id), Target("entities", client_id + 1)]
    for target in targets:
        registry.compare_and_set(target, None, _state(1))

    assert sorted(registry.targets()) == sorted(targets)
    assert redis_client.zcard(registry.index_key) == 2
    many = registry.get_many([*targets, Target("formulas", client_id)])
    assert many[targets[0]] == _state(1) and many[Target("formulas", client_id)] is None


def test_restore_never_moves_a_target_backwards(registry: VersionRegistry, client_id: int) -> None:
    target = Target("raw_data", client_id)
    assert registry.restore(target, _state(3))
    assert not registry.restore(target, _state(2))
    assert not registry.restore(target, _state(3))
    assert registry.get(target) == _state(3)
    assert registry.restore(target, _state(4))


def test_a_malformed_entry_says_how_to_repair_it(
    registry: VersionRegistry, client_id: int, redis_client: redis.Redis
) -> None:
    target = Target("raw_data", client_id)
    redis_client.hset(registry.target_key(target), mapping={"version": "x"})
    with pytest.raises(RegistryError, match="snapshot reindex"):
        registry.get(target)


def test_unreachable_redis_names_the_host_but_never_the_password(client_id: int) -> None:
    settings = RedisSettings(url="redis://:s3cret-pw@127.0.0.1:1/0")  # type: ignore[arg-type]
    registry = VersionRegistry(settings)
    with pytest.raises(RegistryError, match="127.0.0.1:1") as caught:
        registry.compare_and_set(Target("raw_data", client_id), None, _state(1))
    assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(RegistryError, match="127.0.0.1:1"):
        registry.ping()
