"""Reading a published snapshot: resolve the version, then stream its rows in key order.

The current version comes from Redis; when Redis has no entry for the target (after a
flush, before a reindex) the newest manifest in S3 is used instead, with a warning. Rows
come segment by segment, so memory holds one segment at a time (plus the deltas, which
compaction keeps small), and every row is checked to belong to the target and to its
segment's key range before it is handed out; the deltas are applied over them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from schemas.datasets import Target, get_dataset
from snapshots import keys as object_keys
from snapshots.manifest import Manifest
from snapshots.packs import Changes, decode_delta, merge_rows
from snapshots.registry import VersionRegistry, newest_manifest
from snapshots.segments import iter_segment_rows
from snapshots.store import ObjectStore
from storage_builder.errors import SnapshotFormatError, SnapshotNotFoundError
from storage_builder.settings import Settings, load_settings

log = logging.getLogger(__name__)


class Snapshot:
    """One published version of a target; iterate it for its rows in key order."""

    def __init__(self, target: Target, manifest: Manifest, manifest_key: str, store: ObjectStore):
        self.target = target
        self.manifest = manifest
        self.manifest_key = manifest_key
        self._store = store

    @property
    def version(self) -> int:
        return self.manifest.version

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = get_dataset(self.target.dataset)
        changes = read_delta_changes(self._store, self.target, self.manifest)
        rows = self._segment_rows(dataset.key_column, dataset.client_column)
        if not changes:
            yield from rows
            return
        yield from merge_rows(rows, changes, dataset.key_column)

    def _segment_rows(self, key_column: str, client_column: str) -> Iterator[dict[str, Any]]:
        for segment in self.manifest.segments:
            rows = 0
            for row in iter_segment_rows(self._store.get(segment.key)):
                if row[client_column] != self.target.client_id or not segment.owns(row[key_column]):
                    raise SnapshotFormatError(
                        f"segment {segment.key} of {self.target} holds row {row[key_column]} "
                        f"of client {row[client_column]} outside its range; refused",
                        key=segment.key,
                    )
                rows += 1
                yield row
            if rows != segment.rows:
                raise SnapshotFormatError(
                    f"segment {segment.key} holds {rows} rows, its manifest says {segment.rows}",
                    key=segment.key,
                )


def read_delta_changes(store: Any, target: Target, manifest: Manifest) -> Changes:
    """What the manifest's deltas change, read in order, the later winning."""
    dataset = get_dataset(target.dataset)
    changes: Changes = {}
    for delta in manifest.deltas:
        changes.update(decode_delta(dataset, store.get(delta.key), target, delta.key))
    return changes


def open_snapshot(dataset: str, client: int | str, settings: Settings | None = None) -> Snapshot:
    """The current snapshot of (dataset, client), for reading."""
    settings = settings or load_settings()
    target = Target.parse(dataset, client)
    root = settings.s3.prefix
    store = ObjectStore(settings.s3)
    registry = VersionRegistry(settings.redis)
    try:
        state = registry.get(target)
    finally:
        registry.close()

    if state is not None:
        object_keys.check_key(root, target, state.manifest_key)
        manifest = Manifest.load(store.get(state.manifest_key), target, state.manifest_key)
        key = state.manifest_key
    else:
        found = newest_manifest(store, root, target)
        if found is None:
            raise SnapshotNotFoundError(
                f"{target} has no snapshot (nothing in Redis, no manifest below "
                f"{object_keys.target_prefix(root, target)!r}); run `storage-builder bootstrap`"
            )
        manifest, key = found
        log.warning(
            "Redis has no version of %s; reading the newest manifest in S3 (version %d). "
            "Run `storage-builder snapshot reindex` to restore the registry",
            target,
            manifest.version,
        )
    named = [segment.key for segment in manifest.segments] + [d.key for d in manifest.deltas]
    for part in named:
        object_keys.check_key(root, target, part)
    return Snapshot(target, manifest, key, store)
