"""Object keys of a target in S3, built only from a validated target.

Everything of a target lives below ``{root}/{dataset}/client={client_id}/``: its segments
under ``segments/`` and its manifests under ``manifests/``. Keys are never built from raw
strings of events or arguments, and a key that does not sit below its target's prefix is
refused, so one client's snapshot can never name another client's objects.

Packs, which hold the deltas and manifests of many targets (:mod:`snapshots.packs`), live
below ``{root}/_packs/``; a target refers to a part of one by its location,
``{pack key}#{offset}+{length}``, and every part names the target it belongs to, which
readers check.
"""

from __future__ import annotations

import re
import secrets
import time

from schemas.datasets import Target
from storage_builder.errors import InvalidTargetError

SEGMENTS = "segments/"
MANIFESTS = "manifests/"
DISCARDED = "discarded/"
PACKS = "_packs/"

# A unique name: milliseconds since the epoch (so names sort by creation) and 64 random bits.
_UNIQUE = r"\d{13}-[0-9a-f]{16}"
_SEGMENT_NAME = re.compile(rf"^{SEGMENTS}{_UNIQUE}\.avro$")
_MANIFEST_NAME = re.compile(rf"^{MANIFESTS}(\d{{12}})-{_UNIQUE}\.json$")
_PART_LOCATION = re.compile(rf"^{PACKS}{_UNIQUE}\.pack#\d+\+\d+$")
_TARGET_PREFIX = re.compile(r"^(?:(.+)/)?([a-z_]+)/client=([1-9]\d*)/$")


def _unique() -> str:
    return f"{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(8)}"


def target_prefix(root: str, target: Target) -> str:
    """The prefix below which every object of ``target`` lives, ending in a slash."""
    target = Target.parse(target.dataset, target.client_id)
    head = f"{root.strip('/')}/" if root.strip("/") else ""
    return f"{head}{target.dataset}/client={target.client_id}/"


def dataset_prefix(root: str, dataset: str) -> str:
    """The prefix holding every target of one dataset (used to discover targets in S3)."""
    head = f"{root.strip('/')}/" if root.strip("/") else ""
    return f"{head}{dataset}/"


def segment_key(root: str, target: Target) -> str:
    """A new, unique object key for a segment of ``target``."""
    return f"{target_prefix(root, target)}{SEGMENTS}{_unique()}.avro"


def manifest_key(root: str, target: Target, version: int) -> str:
    """A new, unique object key for the manifest of ``version`` of ``target``."""
    if not 0 < version < 10**12:
        raise InvalidTargetError(f"version {version!r} of {target} is out of range")
    return f"{target_prefix(root, target)}{MANIFESTS}{version:012d}-{_unique()}.json"


def pack_key(root: str) -> str:
    """A new, unique object key for a pack."""
    return f"{_head(root)}{PACKS}{_unique()}.pack"


def pack_prefix(root: str) -> str:
    """The prefix holding every pack."""
    return f"{_head(root)}{PACKS}"


def discarded_key(root: str, target: Target, version: int) -> str:
    """A new key for the note that a manifest of ``version`` in a pack lost its publish."""
    return f"{target_prefix(root, target)}{DISCARDED}{version:012d}-{_unique()}.json"


def _head(root: str) -> str:
    return f"{root.strip('/')}/" if root.strip("/") else ""


def check_key(root: str, target: Target, key: str) -> str:
    """Return ``key`` if it names a segment or manifest of ``target``, or a part of a pack
    (whose content names its target, checked when it is read); refuse it otherwise."""
    prefix = target_prefix(root, target)
    rest = key[len(prefix) :] if key.startswith(prefix) else None
    head = _head(root)
    if rest is None and key.startswith(head) and _PART_LOCATION.match(key[len(head) :]):
        return key
    if rest is None or not (_SEGMENT_NAME.match(rest) or _MANIFEST_NAME.match(rest)):
        raise InvalidTargetError(
            f"object key {key!r} is not a segment or manifest below {prefix!r} of {target}"
        )
    return key


def manifest_version(key: str) -> int | None:
    """The version a manifest key names, or None when ``key`` is not a manifest key."""
    name = key.rsplit("/", 2)
    if len(name) < 2:
        return None
    match = _MANIFEST_NAME.match(f"{name[-2]}/{name[-1]}")
    return int(match.group(1)) if match else None


def parse_target_prefix(root: str, prefix: str) -> Target | None:
    """The target whose prefix is ``prefix`` (as S3 lists it), or None for anything else."""
    head = f"{root.strip('/')}/" if root.strip("/") else ""
    if not prefix.startswith(head):
        return None
    match = _TARGET_PREFIX.match("x/" + prefix[len(head) :])
    if match is None:
        return None
    try:
        return Target.parse(match.group(2), match.group(3))
    except InvalidTargetError:
        return None
