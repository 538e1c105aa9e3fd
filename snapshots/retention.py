"""Garbage collection: delete a target's objects once no reader can still need them.

A reader resolves a manifest and then reads its segments, possibly for a while; so an
object goes only when it is older than ``snapshot.retention_s`` AND no manifest that was
current within that period refers to it. The current manifest and everything it refers to
are never deleted, whatever their age. A target Redis does not know is left alone: the truth
would then be S3 alone, and ``snapshot reindex`` must restore the registry first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.datasets import Target
from snapshots import keys as object_keys
from snapshots.manifest import Manifest
from snapshots.registry import VersionRegistry, discover_targets
from snapshots.store import ObjectInfo, ObjectStore
from storage_builder.errors import ObjectStoreError, SnapshotFormatError

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What a collection deleted (or, in a dry run, would delete)."""

    targets: int = 0
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def collect_garbage(
    store: ObjectStore,
    registry: VersionRegistry,
    root: str,
    retention_s: float,
    *,
    targets: Iterable[Target] | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Collect the garbage of ``targets`` (default: every target found in S3 or Redis)."""
    now = time.time() if now is None else now
    report = GcReport()
    if targets is None:
        targets = sorted(set(discover_targets(store, root)) | set(registry.targets()))
    for target in targets:
        report.targets += 1
        doomed = _garbage_of(store, registry, root, target, now - retention_s, report)
        if not doomed:
            continue
        for info in doomed:
            object_keys.check_key(root, target, info.key)
        report.deleted += [info.key for info in doomed]
        report.bytes_freed += sum(info.size for info in doomed)
        if not dry_run:
            store.delete_many(info.key for info in doomed)
        log.info(
            "%s %d objects of %s (%d bytes)",
            "would delete" if dry_run else "deleted",
            len(doomed),
            target,
            sum(info.size for info in doomed),
        )
    return report


def _garbage_of(
    store: ObjectStore,
    registry: VersionRegistry,
    root: str,
    target: Target,
    cutoff: float,
    report: GcReport,
) -> list[ObjectInfo]:
    state = registry.get(target)
    if state is None:
        log.warning("%s is not in Redis; skipped (run `snapshot reindex` first)", target)
        report.skipped.append(str(target))
        return []

    manifests: list[tuple[int, ObjectInfo]] = []
    segments: dict[str, ObjectInfo] = {}
    for info in store.list(object_keys.target_prefix(root, target)):
        version = object_keys.manifest_version(info.key)
        if version is not None:
            manifests.append((version, info))
        elif info.key.endswith(".avro") and f"/{object_keys.SEGMENTS}" in info.key:
            segments[info.key] = info
        else:
            log.warning(
                "%r is neither a segment nor a manifest of %s; left alone", info.key, target
            )

    try:
        current = Manifest.load(store.get(state.manifest_key), target, state.manifest_key)
    except (ObjectStoreError, SnapshotFormatError) as error:
        log.warning("%s: current manifest unreadable (%s); skipped", target, error)
        report.skipped.append(str(target))
        return []

    kept, doomed = _sort_manifests(manifests, state.manifest_key, state.version, cutoff)
    candidates = {
        key: info
        for key, info in segments.items()
        if info.last_modified < cutoff and key not in {s.key for s in current.segments}
    }
    # A kept manifest may still refer to an old segment the current one replaced.
    for info in sorted(kept, key=lambda item: item.key, reverse=True):
        if not candidates:
            break
        if info.key == state.manifest_key:
            continue
        for segment in Manifest.load(store.get(info.key), target, info.key).segments:
            candidates.pop(segment.key, None)
    return doomed + sorted(candidates.values(), key=lambda item: item.key)


def _sort_manifests(
    manifests: list[tuple[int, ObjectInfo]], current_key: str, current_version: int, cutoff: float
) -> tuple[list[ObjectInfo], list[ObjectInfo]]:
    """Split manifests into those a reader may still use and those that can go.

    Kept: the current one; any younger than the cutoff; and any older version that was
    still current at the cutoff, i.e. whose successor was written after it. A manifest of
    the current version or above that is not the current one was never published (a crash
    or a fenced writer left it): it goes once it is old.
    """
    first_written: dict[int, float] = {}
    for version, info in manifests:
        seen = first_written.get(version, info.last_modified)
        first_written[version] = min(seen, info.last_modified)

    # successor_at[v]: when the first version after v (up to the current one) was written.
    successor_at: dict[int, float] = {}
    earliest = float("inf")
    for version in sorted((v for v in first_written if v <= current_version), reverse=True):
        successor_at[version] = earliest
        earliest = min(earliest, first_written[version])

    kept, doomed = [], []
    for version, info in manifests:
        still_current = version < current_version and successor_at[version] >= cutoff
        young = info.last_modified >= cutoff
        if info.key == current_key or young or still_current:
            kept.append(info)
        else:
            doomed.append(info)
    return kept, doomed
