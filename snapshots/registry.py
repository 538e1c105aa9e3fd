"""The version registry in Redis: which manifest is the published snapshot of each target.

Per target, one hash ``{key_prefix}target:{dataset}:{client_id}`` holds ``version``,
``manifest_key``, ``source_position`` (JSON) and ``published_at``; a sorted set
``{key_prefix}targets`` indexes every known target by its last publish time, so listing
targets never scans the keyspace. A publish is a compare-and-set in one Lua script: the
version is checked and the new state written atomically, which fences a stale writer.

Redis is a cache of the truth: every manifest in S3 carries its version and source position,
and :func:`reindex` rebuilds the registry from them after Redis lost its keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis import Redis, RedisError

from schemas.datasets import Target
from snapshots import keys as object_keys
from snapshots.manifest import Manifest, SourcePosition
from snapshots.packs import IndexTooLong, Location, PackEntry, parse_index
from storage_builder.errors import (
    InvalidTargetError,
    PublishConflict,
    RegistryError,
    SnapshotFormatError,
)
from storage_builder.settings import RedisSettings

log = logging.getLogger(__name__)

# The manifests packs hold, per target, each with its location (see pack_entries).
PackIndex = dict[Target, list[tuple[PackEntry, str]]]

# How much of a pack's end is read for its index at first (most indexes fit).
_PACK_TAIL_BYTES = 64 * 1024

# KEYS: target hash, index. ARGV: expected version ('' = absent), version, manifest key,
# source position, published_at, index member. Returns {1, version} or {0, current or ''}.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'version')
if (ARGV[1] == '' and current) or (ARGV[1] ~= '' and current ~= ARGV[1]) then
  return {0, current or ''}
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'manifest_key', ARGV[3],
           'source_position', ARGV[4], 'published_at', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
return {1, ARGV[2]}
"""

# Same arguments without the expected version: writes only when the registry holds nothing
# or an older version, so a rebuild never moves a target backwards.
_RESTORE = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'manifest_key', ARGV[2],
           'source_position', ARGV[3], 'published_at', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


@dataclass(frozen=True)
class TargetState:
    """What the registry says about a target: its published version and where it stands."""

    version: int
    manifest_key: str
    source_position: SourcePosition
    published_at: float

    @classmethod
    def of(cls, manifest: Manifest, manifest_key: str) -> TargetState:
        """The state that publishes ``manifest``; published_at is its created_at, so a
        rebuild from S3 restores exactly what the publish wrote."""
        return cls(manifest.version, manifest_key, manifest.source_position, manifest.created_at)


def describe_url(url: str) -> str:
    """Where Redis is, as host:port (or the socket path), never with the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname or '?'}:{parts.port or 6379}"


class VersionRegistry:
    """The registry of published versions; connects on the first request."""

    def __init__(self, redis: RedisSettings, client: Redis | None = None) -> None:
        self.settings = redis
        self.prefix = redis.key_prefix
        self.where = describe_url(redis.url.get_secret_value())
        self._client = client
        self._cas: Any = None
        self._restore: Any = None

    @property
    def client(self) -> Redis:
        if self._client is None:
            self._client = Redis.from_url(
                self.settings.url.get_secret_value(),
                socket_connect_timeout=5,
                socket_timeout=10,
                health_check_interval=30,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def target_key(self, target: Target) -> str:
        return f"{self.prefix}target:{target.dataset}:{target.client_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}targets"

    def _failed(self, what: str, error: Exception) -> RegistryError:
        message = str(error)
        password = urlsplit(self.settings.url.get_secret_value()).password
        if password:
            message = message.replace(password, "**********")
        return RegistryError(f"Redis at {self.where} failed to {what}: {message}; check redis.url")

    def ping(self) -> None:
        try:
            self.client.ping()
        except RedisError as error:
            raise self._failed("answer a ping", error) from error

    def get(self, target: Target) -> TargetState | None:
        try:
            fields = self.client.hgetall(self.target_key(target))
        except RedisError as error:
            raise self._failed(f"read {target}", error) from error
        return self._state(target, fields)

    def get_many(self, targets: Iterable[Target]) -> dict[Target, TargetState | None]:
        wanted = list(targets)
        try:
            with self.client.pipeline(transaction=False) as pipeline:
                for target in wanted:
                    pipeline.hgetall(self.target_key(target))
                replies = pipeline.execute()
        except RedisError as error:
            raise self._failed(f"read {len(wanted)} targets", error) from error
        return {
            target: self._state(target, fields)
            for target, fields in zip(wanted, replies, strict=True)
        }

    def _state(self, target: Target, fields: dict[bytes, bytes]) -> TargetState | None:
        if not fields:
            return None
        try:
            return TargetState(
                version=int(fields[b"version"]),
                manifest_key=fields[b"manifest_key"].decode(),
                source_position=SourcePosition.model_validate_json(fields[b"source_position"]),
                published_at=float(fields[b"published_at"]),
            )
        except (KeyError, ValueError) as error:
            raise RegistryError(
                f"registry entry {self.target_key(target)} of {target} is malformed ({error!r}); "
                "run `storage-builder snapshot reindex` to rebuild it from S3"
            ) from None

    def _arguments(self, target: Target, state: TargetState) -> list[str]:
        return [
            str(state.version),
            state.manifest_key,
            state.source_position.model_dump_json(),
            repr(state.published_at),
            f"{target.dataset}:{target.client_id}",
        ]

    def compare_and_set(
        self, target: Target, expected_version: int | None, new: TargetState
    ) -> None:
        """Publish ``new`` if the registry still holds ``expected_version`` (None: absent).

        Raises PublishConflict when another version is current; nothing is written then.
        """
        if new.version <= (expected_version or 0):
            raise ValueError(
                f"new version {new.version} of {target} is not above {expected_version}"
            )
        if self._cas is None:
            self._cas = self.client.register_script(_COMPARE_AND_SET)
        expected = "" if expected_version is None else str(expected_version)
        try:
            won, current = self._cas(
                keys=[self.target_key(target), self.index_key],
                args=[expected, *self._arguments(target, new)],
            )
        except RedisError as error:
            raise self._failed(f"publish {target} version {new.version}", error) from error
        if not won:
            raise PublishConflict(str(target), expected_version, int(current) if current else None)

    def compare_and_set_many(
        self, publishes: list[tuple[Target, int | None, TargetState]]
    ) -> list[PublishConflict | None]:
        """Several compare-and-sets in one round trip, each deciding for its own target.

        Returns, per publish in order, None when it won or the PublishConflict it lost with.
        Raises RegistryError when Redis could not be asked (then no outcome is known).
        """
        if not publishes:
            return []
        if self._cas is None:
            self._cas = self.client.register_script(_COMPARE_AND_SET)
        try:
            with self.client.pipeline(transaction=False) as pipeline:
                for target, expected, new in publishes:
                    self._cas(
                        keys=[self.target_key(target), self.index_key],
                        args=["" if expected is None else str(expected)]
                        + self._arguments(target, new),
                        client=pipeline,
                    )
                replies = pipeline.execute()
        except RedisError as error:
            raise self._failed(f"publish {len(publishes)} targets", error) from error
        outcomes: list[PublishConflict | None] = []
        for (target, expected, _), (won, current) in zip(publishes, replies, strict=True):
            lost = PublishConflict(str(target), expected, int(current) if current else None)
            outcomes.append(None if won else lost)
        return outcomes

    def restore(self, target: Target, state: TargetState) -> bool:
        """Write ``state`` unless the registry already holds it or a newer version."""
        if self._restore is None:
            self._restore = self.client.register_script(_RESTORE)
        try:
            written = self._restore(
                keys=[self.target_key(target), self.index_key],
                args=self._arguments(target, state),
            )
        except RedisError as error:
            raise self._failed(f"restore {target}", error) from error
        return bool(written)

    def targets(self) -> Iterator[Target]:
        """Every target the registry knows, from its index."""
        try:
            members = [member for member, _ in self.client.zscan_iter(self.index_key)]
        except RedisError as error:
            raise self._failed("list targets", error) from error
        for member in sorted(members):
            dataset, _, client = member.decode().rpartition(":")
            try:
                yield Target.parse(dataset, client)
            except InvalidTargetError as error:
                log.warning(
                    "registry index %s holds %r: %s; ignored", self.index_key, member, error
                )

    def staleness(self) -> dict[Target, float]:
        """When each target last published (unix seconds), from the index."""
        try:
            entries = self.client.zrange(self.index_key, 0, -1, withscores=True)
        except RedisError as error:
            raise self._failed("read publish times", error) from error
        result = {}
        for member, score in entries:
            dataset, _, client = member.decode().rpartition(":")
            try:
                result[Target.parse(dataset, client)] = float(score)
            except InvalidTargetError:
                continue
        return result


def discover_targets(store: Any, root: str) -> Iterator[Target]:
    """Every target with objects in S3 below ``root``, found by listing prefixes only."""
    from schemas.datasets import DATASETS

    for dataset in sorted(DATASETS):
        for prefix in store.list_prefixes(object_keys.dataset_prefix(root, dataset)):
            target = object_keys.parse_target_prefix(root, prefix)
            if target is None:
                log.warning("ignoring %r below %r: not a target prefix", prefix, root)
                continue
            yield target


def pack_entries(store: Any, root: str, unreadable: set[str] | None = None) -> PackIndex:
    """Every manifest held in a pack below ``root``, per target, with its location.

    Reads the index at the end of each pack (one ranged GET each, two for a long index). A
    pack whose index cannot be read is skipped with a warning (and added to ``unreadable``).
    """
    found: PackIndex = {}
    for info in store.list(object_keys.pack_prefix(root)):
        try:
            tail = store.get_tail(info.key, _PACK_TAIL_BYTES)
            try:
                entries = parse_index(tail, info.key)
            except IndexTooLong as short:
                entries = parse_index(store.get_tail(info.key, short.needed), info.key)
        except SnapshotFormatError as error:
            log.warning("pack %s: %s; its manifests are not considered", info.key, error)
            if unreadable is not None:
                unreadable.add(info.key)
            continue
        for entry in entries:
            try:
                target = entry.target
            except InvalidTargetError as error:
                log.warning("pack %s names an invalid target: %s; ignored", info.key, error)
                continue
            offset, length = entry.manifest
            location = str(Location(info.key, offset, length))
            found.setdefault(target, []).append((entry, location))
    return found


def discarded_manifests(store: Any, root: str, target: Target) -> set[str]:
    """The locations of manifests in packs that lost their publish (never to be restored)."""
    prefix = object_keys.target_prefix(root, target) + object_keys.DISCARDED
    discarded = set()
    for info in store.list(prefix):
        try:
            discarded.add(json.loads(store.get(info.key))["manifest_key"])
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring %s: not a discarded-manifest note (%s)", info.key, error)
    return discarded


def manifest_keys(
    store: Any,
    root: str,
    target: Target,
    packs: PackIndex | None = None,
) -> dict[int, list[str]]:
    """The keys (or pack locations) of every manifest of ``target`` in S3, by version,
    leaving out those marked discarded. ``packs``: from :func:`pack_entries`, read once for
    many targets (read here when not given)."""
    by_version: dict[int, list[str]] = {}
    prefix = object_keys.target_prefix(root, target) + object_keys.MANIFESTS
    for info in store.list(prefix):
        version = object_keys.manifest_version(info.key)
        if version is None:
            log.warning("ignoring %r: not a manifest key", info.key)
            continue
        by_version.setdefault(version, []).append(info.key)
    held = (packs if packs is not None else pack_entries(store, root)).get(target, [])
    if held:
        discarded = discarded_manifests(store, root, target)
        for entry, location in held:
            if location not in discarded:
                by_version.setdefault(entry.version, []).append(location)
    return by_version


def newest_manifest(
    store: Any,
    root: str,
    target: Target,
    packs: PackIndex | None = None,
) -> tuple[Manifest, str] | None:
    """The newest manifest of ``target`` in S3 and its key, or None when it has none.

    Manifests are standalone objects or parts of packs (see :func:`manifest_keys`). The
    highest version wins. Two manifests may claim the same version: a writer that crashed
    after writing its manifest, or a fenced writer that lost the compare-and-set and died
    before deleting it or marking it discarded, leaves one behind. Among those the newest
    created_at wins. That is safe because every manifest is complete and self-consistent:
    it holds exactly the changes up to its own source position, so whichever is chosen, the
    consumer resumes from that position and converges; the nightly reconciliation then
    repairs any difference from the database.
    """
    by_version = manifest_keys(store, root, target, packs)
    if not by_version:
        return None

    top = max(by_version)
    candidates = []
    for key in by_version[top]:
        object_keys.check_key(root, target, key)
        manifest = Manifest.load(store.get(key), target, key)
        candidates.append((manifest.created_at, key, manifest))
    if len(candidates) > 1:
        log.warning(
            "%s has %d manifests of version %d; taking the newest", target, len(candidates), top
        )
    _, key, manifest = max(candidates, key=lambda item: (item[0], item[1]))
    return manifest, key


def reindex(
    registry: VersionRegistry,
    store: Any,
    root: str,
    targets: Iterable[Target] | None = None,
) -> int:
    """Rebuild the registry from the newest manifest of each target in S3.

    Targets default to every target found below ``root``. A target whose registry entry is
    already at that version or newer is left alone. Returns how many entries were written.
    """
    written = 0
    packs = pack_entries(store, root)
    chosen = targets if targets is not None else sorted({*discover_targets(store, root), *packs})
    for target in chosen:
        found = newest_manifest(store, root, target, packs)
        if found is None:
            log.warning("%s has no manifest in S3; nothing to restore", target)
            continue
        manifest, key = found
        if registry.restore(target, TargetState.of(manifest, key)):
            written += 1
            log.info("restored %s at version %d from %s", target, manifest.version, key)
    return written
