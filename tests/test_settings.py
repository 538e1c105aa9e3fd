"""Settings: merge order, validation messages that name the setting, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage_builder.errors import ConfigError
from storage_builder.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.upper().startswith("SB_"):
            monkeypatch.delenv(name)


def test_defaults_validate() -> None:
    settings = load_settings()

    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.consumer.flush_max_age_s == 1.0


def test_file_then_environment_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sb.toml"
    config.write_text(
        '[kafka]\ngroup_id = "from-file"\ntopic_prefix = "file"\n[s3]\nbucket = "file-bucket"\n'
    )
    monkeypatch.setenv("SB_KAFKA__GROUP_ID", "from-env")

    settings = load_settings(config, overrides={"s3": {"bucket": "arg-bucket"}})

    assert settings.kafka.group_id == "from-env"
    assert settings.kafka.topic_prefix == "file"
    assert settings.s3.bucket == "arg-bucket"


def test_config_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sb.toml"
    config.write_text('[redis]\nkey_prefix = "prod:"\n')
    monkeypatch.setenv("SB_CONFIG", str(config))

    assert load_settings().redis.key_prefix == "prod:"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("SB_KAFKA__BOOTSTRAP_SERVERS", "localhost", "kafka.bootstrap_servers"),
        ("SB_S3__BUCKET", "Not_A_Bucket", "s3.bucket"),
        ("SB_S3__PREFIX", "../escape", "s3.prefix"),
        ("SB_REDIS__URL", "http://127.0.0.1:6379", "redis.url"),
        ("SB_SNAPSHOT__CODEC", "lz4", "snapshot.codec"),
        ("SB_CONSUMER__FLUSH_MAX_AGE_S", "-1", "consumer.flush_max_age_s"),
    ],
)
def test_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    message = str(raised.value)
    assert named in message
    assert env in message
    assert repr(value) in message or "**********" in message


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text("[kafka]\nbootstrap_server = '127.0.0.1:9092'\n")

    with pytest.raises(ConfigError, match="kafka.bootstrap_server"):
        load_settings(config)


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")

    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_secrets_are_masked_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_POSTGRES__DSN", "postgresql://app:hunter2@db/prod")
    monkeypatch.setenv("SB_REDIS__URL", "rediss://:s3cret@cache:6380/0")
    monkeypatch.setenv("SB_S3__SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("SB_KAFKA__SASL_PASSWORD", "kafka-secret")

    settings = load_settings()
    shown = repr(settings) + str(settings.redacted())

    for secret in ("hunter2", "s3cret", "aws-secret", "kafka-secret"):
        assert secret not in shown
    assert settings.kafka.librdkafka()["sasl.password"] == "kafka-secret"


def test_librdkafka_settings_pass_through(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text(
        "[kafka]\nbootstrap_servers = 'b1:9093,b2:9093'\n"
        "[kafka.client]\n'security.protocol' = 'SASL_SSL'\n'sasl.mechanism' = 'SCRAM-SHA-512'\n"
    )

    config_dict = load_settings(config).kafka.librdkafka()

    assert config_dict["bootstrap.servers"] == "b1:9093,b2:9093"
    assert config_dict["security.protocol"] == "SASL_SSL"
    assert config_dict["sasl.mechanism"] == "SCRAM-SHA-512"


def test_bad_password_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_S3__UPLOAD_THREADS", "0")
    monkeypatch.setenv("SB_KAFKA__SASL_PASSWORD", "kafka-secret")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert "s3.upload_threads" in str(raised.value)
    assert "kafka-secret" not in str(raised.value)
