"""Settings of every job, as one validated pydantic object.

Values are merged in one fixed order, later wins: the defaults below, the TOML file named by
``SB_CONFIG`` (or passed as ``--config``), then environment variables ``SB_<SECTION>__<NAME>``
(for example ``SB_KAFKA__BOOTSTRAP_SERVERS``), then command-line arguments. Secrets are
``SecretStr`` and print as ``**********``; ``Settings.redacted()`` is what logs may show.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from storage_builder.errors import ConfigError

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9_\-/]*$")


class _Section(BaseModel):
    """A section of the settings: a misspelt name is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class PostgresSettings(_Section):
    """The source database."""

    dsn: SecretStr = SecretStr("postgresql://storage_builder@127.0.0.1:5432/storage_builder")
    statement_timeout_s: float = Field(default=0, ge=0)


class KafkaSettings(_Section):
    """Kafka and the Debezium topics.

    ``client`` passes any librdkafka setting through unchanged (``security.protocol``,
    ``sasl.mechanism``, ``ssl.ca.location``, ...); ``sasl.password`` is kept secret.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "storage-builder"
    topic_prefix: str = "sb"
    schema_name: str = "public"
    dead_letter_topic: str = "storage-builder.dead-letter"
    connect_url: str = "http://127.0.0.1:8083"
    connector_name: str = "storage-builder-source"
    client: dict[str, str] = Field(default_factory=dict)
    sasl_password: SecretStr | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name at least one broker, as host:port")
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return value

    def librdkafka(self) -> dict[str, Any]:
        """The configuration librdkafka receives: ours first, pass-through settings over it."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        config.update(self.client)
        if self.sasl_password is not None:
            config["sasl.password"] = self.sasl_password.get_secret_value()
        return config


class RedisSettings(_Section):
    """The version registry. ``rediss://`` URLs use TLS; a password may sit in the URL."""

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = "sb:"

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().split("://", 1)[0]
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme {scheme!r} is not one of redis://, rediss://, unix://")
        return value


class S3Settings(_Section):
    """The object store. Credentials come from the standard AWS chain unless set here."""

    bucket: str = "storage-builder"
    prefix: str = "snapshots"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    max_attempts: int = Field(default=5, ge=1)
    upload_threads: int = Field(default=8, ge=1, le=64)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_chars(cls, value: str) -> str:
        if not _PREFIX.match(value) or ".." in value:
            raise ValueError(f"{value!r} may hold only letters, digits, '_', '-' and '/'")
        return value.strip("/")


class SnapshotSettings(_Section):
    """How snapshots are cut into segments and how long superseded objects live."""

    # A rewrite uploads its segment whole, however few blocks it re-encodes: 20,000-row
    # segments (about 450 KB of raw_data) halve the time ten rewrites take to upload against
    # 50,000-row ones, for one object per 20,000 rows of a large target.
    segment_max_rows: int = Field(default=20_000, ge=2)
    # 500-row blocks keep a rewrite of a few keys 8-10x cheaper than re-encoding the
    # segment, for about 5% more bytes than 2,000-row blocks.
    block_rows: int = Field(default=500, ge=1)
    codec: str = "zstandard"
    retention_s: float = Field(default=3600.0, ge=0)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value not in ("null", "deflate", "zstandard", "snappy"):
            raise ValueError(f"{value!r} is not one of null, deflate, zstandard, snappy")
        return value


class ConsumerSettings(_Section):
    """Micro-batching, backpressure and shutdown of ``consume``."""

    flush_max_age_s: float = Field(default=1.0, gt=0)
    flush_max_changes: int = Field(default=20_000, ge=1)
    memory_budget_mb: int = Field(default=64, ge=8)
    flush_max_age_cap_s: float = Field(default=10.0, gt=0)
    poll_batch: int = Field(default=2_000, ge=1)
    # Targets compacted at once when several are due: their S3 round trips overlap.
    publish_threads: int = Field(default=8, ge=1, le=64)
    # A target's micro-batches are published as deltas in one pack per flush until its
    # deltas reach this many changes, this many deltas, or this age; then they are folded
    # into rewritten segments (a compaction).
    compact_changes: int = Field(default=500, ge=0)
    compact_deltas: int = Field(default=60, ge=0)
    compact_after_s: float = Field(default=60.0, ge=0)
    shutdown_deadline_s: float = Field(default=30.0, gt=0)
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Where a partition starts when neither Kafka nor Redis knows a position for it.
    initial_position: Literal["earliest", "latest"] = "earliest"
    # Only these clients' targets are followed when not empty (tests, benchmarks, canaries).
    clients: list[int] = Field(default_factory=list)


class Settings(BaseSettings):
    """Every setting of storage-builder."""

    model_config = SettingsConfigDict(
        env_prefix="SB_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    snapshot: SnapshotSettings = Field(default_factory=SnapshotSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments beat the environment, which beats the file (passed in as init values
        # below the arguments by load_settings).
        return (init_settings, env_settings)

    def redacted(self) -> dict[str, Any]:
        """The settings as they may be printed: every secret masked."""
        return self.model_dump(mode="json")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides() -> set[tuple[str, str]]:
    """The (section, name) pairs the environment sets, so the file does not win over them."""
    pairs = set()
    for name in os.environ:
        upper = name.upper()
        if upper.startswith("SB_") and "__" in upper:
            section, _, field = upper[3:].partition("__")
            pairs.add((section.lower(), field.lower()))
    return pairs


def load_settings(
    config_file: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings: defaults, then the TOML file, then the environment, then arguments.

    Raises ConfigError naming the setting and the bad value when anything does not validate.
    """
    path = config_file or os.environ.get("SB_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} (SB_CONFIG) does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None

    # The environment must beat the file, but pydantic-settings ranks init values first;
    # so drop from the file what the environment sets before handing it in.
    for section, field in _env_overrides():
        if isinstance(file_values.get(section), dict):
            file_values[section].pop(field, None)

    values = _deep_merge(file_values, overrides or {})
    try:
        return Settings(**values)
    except ValidationError as error:
        source = str(path) if path else None
        raise ConfigError(describe_validation_error(error, source=source)) from None


def describe_validation_error(error: ValidationError, source: str | None = None) -> str:
    """One line per bad setting, named as the environment variable that sets it."""
    lines = []
    for problem in error.errors():
        dotted = ".".join(str(part) for part in problem["loc"])
        env_name = "SB_" + "__".join(str(part) for part in problem["loc"]).upper()
        value = problem.get("input")
        shown = "**********" if "password" in dotted or "secret" in dotted else repr(value)
        lines.append(f"setting {dotted} ({env_name}) = {shown}: {problem['msg']}")
    where = f" (from {source} and the environment)" if source else ""
    return "invalid settings" + where + ":\n  " + "\n  ".join(lines)
