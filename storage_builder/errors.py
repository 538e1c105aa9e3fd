"""The exceptions of storage-builder, one tree that can be caught by layer.

    StorageBuilderError
    ├── ConfigError              a setting or argument is invalid; the message names it
    ├── InvalidTargetError       a dataset, client id or object key that must not be used
    ├── SourceError              PostgreSQL could not be read
    ├── ObjectStoreError         S3 failed after its retries; carries the object key
    ├── RegistryError            Redis failed; nothing was published half-way
    │   └── PublishConflict      the compare-and-set lost: a newer version exists
    ├── SnapshotFormatError      a segment or manifest cannot be read; carries the key
    │   └── SnapshotNotFoundError  the target has no published snapshot
    ├── DecodeError              a change event cannot be decoded; carries the reason
    └── StackError               a service of ops/stack is not running or not reachable

Every error carries what it is about (target, object key, partition) in its message, so a
log line or a CLI error is enough to act on.
"""

from __future__ import annotations


class StorageBuilderError(Exception):
    """The root of every error storage-builder raises on purpose."""


class ConfigError(StorageBuilderError):
    """A setting or an argument is invalid."""


class InvalidTargetError(StorageBuilderError, ValueError):
    """A dataset name, client id or derived object key that must not be used."""


class SourceError(StorageBuilderError):
    """Reading PostgreSQL failed."""


class ObjectStoreError(StorageBuilderError):
    """An S3 request failed after all its retries."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RegistryError(StorageBuilderError):
    """Redis could not be read or written."""


class PublishConflict(RegistryError):
    """The compare-and-set of a publish lost: the target moved on to another version."""

    def __init__(self, target: str, expected: int | None, current: int | None) -> None:
        super().__init__(
            f"publish of {target} expected version {expected} but the registry holds {current}"
        )
        self.target = target
        self.expected = expected
        self.current = current


class SnapshotFormatError(StorageBuilderError):
    """A segment or manifest is missing, unreadable or inconsistent."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class SnapshotNotFoundError(SnapshotFormatError):
    """The target has no snapshot: nothing in Redis and no manifest in S3."""


class DecodeError(StorageBuilderError):
    """A change event cannot be decoded or applied; the reason goes to the dead-letter topic."""


class StackError(StorageBuilderError):
    """A service the command needs is not running or not reachable."""
