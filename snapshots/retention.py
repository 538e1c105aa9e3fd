"""Garbage collection: delete a target's objects once no reader can still need them.

A reader resolves a manifest and then reads its segments, possibly for a while; so an
object goes only when it is older than ``snapshot.retention_s`` AND no manifest that was
current within that period refers to it. The current manifest and everything it refers to
are never deleted, whatever their age. A target Redis does not know is left alone: the truth
would then be S3 alone, and ``snapshot reindex`` must restore the registry first.

Packs are shared by many targets, so they are collected after the targets: a pack goes when
it is older than the retention AND neither the current manifest of any target nor the one
that was current at the cutoff refers to it (as where it sits or through its delta), AND
every target it holds a manifest of was examined (known to Redis, and in this collection).
Every other manifest a reader may still hold was written after the cutoff, and refers only
to the pack it sits in (its cumulative delta is in the same pack). Delta publishes never
change segments, so the segments' collection needs only the standalone manifests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.datasets import Target
from snapshots import keys as object_keys
from snapshots.manifest import Manifest
from snapshots.packs import Location, PackEntry
from snapshots.registry import PackIndex, VersionRegistry, discover_targets, pack_entries
from snapshots.store import ObjectInfo, ObjectStore
from storage_builder.errors import ObjectStoreError, SnapshotFormatError

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What a collection deleted (or, in a dry run, would delete)."""

    targets: int = 0
    packs: int = 0
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
    cutoff = now - retention_s
    report = GcReport()
    if targets is None:
        targets = sorted(set(discover_targets(store, root)) | set(registry.targets()))
    unreadable: set[str] = set()
    packs = pack_entries(store, root, unreadable)
    live_packs: set[str] = set()
    # Targets whose packs could be told; the packs of any other target are left alone.
    examined: set[Target] = set()
    for target in targets:
        report.targets += 1
        try:
            held = packs.get(target, [])
            used = _packs_in_use(store, registry, root, target, held, cutoff)
        except (ObjectStoreError, SnapshotFormatError) as error:
            log.warning("%s: cannot tell which packs it uses (%s); they are kept", target, error)
            used = None
        if used is not None:
            live_packs |= used
            examined.add(target)
        doomed = _garbage_of(store, registry, root, target, cutoff, report)
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
    kept = unreadable | {
        Location.parse(location).key
        for target, held in packs.items()
        if target not in examined
        for _, location in held
    }
    _collect_packs(store, root, packs, live_packs | kept, cutoff, report, dry_run)
    return report


def _packs_in_use(
    store: ObjectStore,
    registry: VersionRegistry,
    root: str,
    target: Target,
    held: list[tuple[PackEntry, str]],
    cutoff: float,
) -> set[str] | None:
    """The packs the target's current manifest and its manifest current at the cutoff use;
    None when the registry does not know the target (then nobody can tell)."""
    state = registry.get(target)
    if state is None:
        return None
    # The manifest current at the cutoff: the highest version written before it, standalone
    # or in a pack (a standalone one, written by a compaction, uses no pack).
    before: list[tuple[int, float, str]] = [
        (entry.version, entry.created_at, location)
        for entry, location in held
        if entry.created_at < cutoff
    ]
    prefix = object_keys.target_prefix(root, target) + object_keys.MANIFESTS
    for info in store.list(prefix):
        version = object_keys.manifest_version(info.key)
        if version is not None and info.last_modified < cutoff:
            before.append((version, info.last_modified, info.key))
    chosen = [state.manifest_key]
    if before:
        chosen.append(max(before)[2])
    used = set()
    for key in chosen:
        if "#" not in key:
            continue  # a standalone manifest: compacted, it has no deltas
        manifest = Manifest.load(store.get(key), target, key)
        used.add(Location.parse(key).key)
        used.update(Location.parse(delta.key).key for delta in manifest.deltas)
    return used


def _collect_packs(
    store: ObjectStore,
    root: str,
    packs: PackIndex,
    live: set[str],
    cutoff: float,
    report: GcReport,
    dry_run: bool,
) -> None:
    """Delete the old packs no usable manifest refers to, then the notes of discarded
    manifests whose pack is gone."""
    doomed = [
        info
        for info in store.list(object_keys.pack_prefix(root))
        if info.last_modified < cutoff and info.key not in live
    ]
    gone = {info.key for info in doomed}
    notes = []
    for target in sorted(packs):
        prefix = object_keys.target_prefix(root, target) + object_keys.DISCARDED
        for info in store.list(prefix):
            try:
                location = json.loads(store.get(info.key))["manifest_key"]
            except (ValueError, KeyError, TypeError):
                continue
            if Location.parse(location).key in gone:
                notes.append(info)
    report.packs = len(doomed)
    report.deleted += [info.key for info in doomed + notes]
    report.bytes_freed += sum(info.size for info in doomed + notes)
    if doomed and not dry_run:
        store.delete_many(info.key for info in doomed + notes)
    log.info(
        "%s %d packs (%d bytes)",
        "would delete" if dry_run else "deleted",
        len(doomed),
        sum(info.size for info in doomed),
    )


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
        elif f"/{object_keys.DISCARDED}" in info.key:
            continue  # goes with its pack
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
