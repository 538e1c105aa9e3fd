"""Packs and deltas: how one publish request carries the micro-batches of many targets.

A consumer that published every target in objects of its own would send two PUTs per target
and flush: about a thousand requests a second for 500 busy targets, which neither the CPU
nor the S3 bill can take. Instead, one flush of a member writes one **pack**: an object
below ``<root>/_packs/`` holding, for each target it publishes, a **delta** (the rows
upserted and the keys deleted since the target's segments were written) and the target's
new manifest, which lists its segments as before plus the delta; a reader applies the delta
over the segments. Every so often (by rows, publishes or age of the delta) a target is
**compacted**: its delta is folded into rewritten segments and a standalone manifest.

A location inside a pack is written ``<pack key>#<offset>+<length>``: the registry's
``manifest_key`` and a delta entry's ``key`` both use it, so a reader fetches exactly the
bytes it needs with one ranged GET.

The pack's layout: the parts one after another, then a JSON index (per target: dataset,
client, version, created_at and the manifest's range, so that the registry can be rebuilt
from S3), then the index length as 8 bytes little-endian and the magic ``SBPACK1\\n``.

A delta is an Avro object container file (codec null) in the dataset's segment schema,
with the client and the deleted keys in its metadata, so it reads like a tiny segment and
names the tenant it belongs to. It is cumulative: each publish copies the target's previous
delta's blocks and appends one block of its own upserted rows, so a manifest names one delta,
which a reader, a compaction or a member that just took over the partition reads with one
GET, however many publishes it holds.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fastavro

from schemas.datasets import Dataset, Target
from snapshots import _container
from snapshots.segments import META_CLIENT, META_DATASET, _encode_blocks, _schemas
from storage_builder.errors import SnapshotFormatError

MAGIC = b"SBPACK1\n"
_FOOTER = struct.Struct("<Q")
FOOTER_SIZE = _FOOTER.size + len(MAGIC)
META_DELETES = "sb.deletes"
# Every delta has this sync marker, so that one delta's blocks can be copied into the next.
_SYNC = b"\0" * _container.SYNC_SIZE

_LOCATION = re.compile(r"^(?P<key>[^#]+)#(?P<offset>\d+)\+(?P<length>\d+)$")

# What a delta says of a key: its new row, or None when the key is deleted.
Changes = dict[int, dict[str, Any] | None]


@dataclass(frozen=True)
class Location:
    """Where a part sits: an object, and a byte range of it (None: the whole object)."""

    key: str
    offset: int | None = None
    length: int | None = None

    @classmethod
    def parse(cls, text: str) -> Location:
        match = _LOCATION.match(text)
        if match is None:
            return cls(text)
        return cls(match["key"], int(match["offset"]), int(match["length"]))

    def __str__(self) -> str:
        if self.offset is None:
            return self.key
        return f"{self.key}#{self.offset}+{self.length}"


@dataclass(frozen=True)
class PackEntry:
    """One target's part of a pack, as its index lists it."""

    dataset: str
    client_id: int
    version: int
    created_at: float
    manifest: tuple[int, int]

    @property
    def target(self) -> Target:
        return Target.parse(self.dataset, self.client_id)


class PackBuilder:
    """Lays out the parts of one pack; ``add`` returns where a part will be."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._parts: list[bytes] = []
        self._size = 0
        self._entries: list[dict[str, Any]] = []

    def add(self, data: bytes) -> Location:
        location = Location(self.key, self._size, len(data))
        self._parts.append(data)
        self._size += len(data)
        return location

    def index(self, target: Target, version: int, created_at: float, manifest: Location) -> None:
        self._entries.append(
            {
                "dataset": target.dataset,
                "client_id": target.client_id,
                "version": version,
                "created_at": created_at,
                "manifest": [manifest.offset, manifest.length],
            }
        )

    def build(self) -> bytes:
        index = json.dumps({"entries": self._entries}, separators=(",", ":")).encode()
        return b"".join([*self._parts, index, _FOOTER.pack(len(index)), MAGIC])


def parse_index(tail: bytes, key: str) -> list[PackEntry]:
    """The entries of a pack from its last bytes (at least the index and the footer)."""
    if len(tail) < FOOTER_SIZE or not tail.endswith(MAGIC):
        raise SnapshotFormatError(f"pack {key!r} does not end with its footer", key=key)
    (length,) = _FOOTER.unpack(tail[-FOOTER_SIZE : -len(MAGIC)])
    if length > len(tail) - FOOTER_SIZE:
        raise IndexTooLong(length + FOOTER_SIZE)
    raw = tail[len(tail) - FOOTER_SIZE - length : len(tail) - FOOTER_SIZE]
    try:
        document = json.loads(raw)
        return [
            PackEntry(
                entry["dataset"],
                int(entry["client_id"]),
                int(entry["version"]),
                float(entry["created_at"]),
                (int(entry["manifest"][0]), int(entry["manifest"][1])),
            )
            for entry in document["entries"]
        ]
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise SnapshotFormatError(f"pack {key!r} has an unreadable index: {error}") from None


class IndexTooLong(Exception):
    """The tail read was shorter than the index: read again with at least ``needed`` bytes."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


# Deltas.


def encode_delta(
    dataset: Dataset,
    upserts: Mapping[int, dict[str, Any]],
    deletes: Iterable[int],
    client_id: int,
    previous: bytes | None = None,
) -> bytes:
    """A delta holding ``previous`` (the target's delta so far, if any) and these changes.

    The previous delta's blocks are copied byte for byte and the upserted rows appended as
    one more block, so a publish encodes only its own rows. Rows of a key may repeat across
    blocks (the last wins); the header lists the keys whose last change is a delete.
    """
    deleted = set(deletes)
    blocks: list[bytes] = []
    if previous is not None:
        container = _container.parse(previous)
        if container.sync != _SYNC:
            raise SnapshotFormatError("the previous delta was not written as a delta")
        blocks = [block.raw for block in container.blocks]
        deleted |= set(json.loads(container.metadata[META_DELETES])) - set(upserts)
    encoded = _encode_blocks(
        dataset,
        (upserts[key] for key in sorted(upserts)),
        codec="null",
        block_rows=max(1, len(upserts)),
        sync=_SYNC,
        client_id=client_id,
    )
    _, schema_json = _schemas(dataset)
    metadata = {
        "avro.schema": schema_json,
        "avro.codec": b"null",
        META_DATASET: dataset.name.encode(),
        META_CLIENT: str(client_id).encode(),
        META_DELETES: json.dumps(sorted(deleted), separators=(",", ":")).encode(),
    }
    header = _container.build_header(metadata, _SYNC)
    return b"".join([header, *blocks, *(block.raw for block in encoded)])


def decode_delta(dataset: Dataset, data: bytes, target: Target, where: str) -> Changes:
    """What a delta changes (each key's last row, or None when deleted), refusing a delta
    of another target."""
    try:
        metadata, _, _ = _container.parse_header(data)
        client = int(metadata[META_CLIENT])
        name = metadata[META_DATASET].decode()
        deletes = json.loads(metadata[META_DELETES])
        rows = list(fastavro.reader(io.BytesIO(data)))
    except (ValueError, KeyError, IndexError, EOFError) as error:
        raise SnapshotFormatError(f"delta {where} is unreadable: {error}", key=where) from None
    if (name, client) != (target.dataset, target.client_id):
        # Tenants never mix: a delta named by one target's manifest must describe it.
        raise SnapshotFormatError(
            f"delta {where} holds {name}/{client}, not {target}; refused", key=where
        )
    changes: Changes = {}
    key_column = dataset.key_column
    for row in rows:
        if not isinstance(row, dict) or row.get(dataset.client_column) != target.client_id:
            raise SnapshotFormatError(f"delta {where} holds a row of another client", key=where)
        changes[row[key_column]] = row
    changes.update({int(key): None for key in deletes})
    return changes


def merge_rows(
    rows: Iterable[dict[str, Any]], changes: Changes, key_column: str
) -> Iterator[dict[str, Any]]:
    """Rows in key order with ``changes`` applied: new keys inserted in order, changed rows
    replaced, deleted ones left out."""
    inserted = sorted(key for key, row in changes.items() if row is not None)
    position = 0
    for row in rows:
        key = row[key_column]
        while position < len(inserted) and inserted[position] < key:
            yield changes[inserted[position]]  # type: ignore[misc]
            position += 1
        if key in changes:
            if position < len(inserted) and inserted[position] == key:
                position += 1
            changed = changes[key]
            if changed is not None:
                yield changed
            continue
        yield row
    for key in inserted[position:]:
        yield changes[key]  # type: ignore[misc]
