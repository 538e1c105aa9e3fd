"""compose.yaml runs the same services, on the same ports, as `ops/stack`.

No container engine runs here, so the file is parsed and compared with what ops/stack,
ops/local.toml, the Maven poms and ops/debezium/connector.json say.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from schemas.datasets import DATASETS

ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = (ROOT / "ops" / "stack").read_text()
CONNECTOR_FILE = ROOT / "ops" / "debezium" / "connector.json"

# compose service -> the ops/stack port setting of the same service
PORT_SETTINGS = {
    "postgres": "PG",
    "redis": "REDIS",
    "s3": "S3",
    "kafka": "KAFKA",
    "connect": "CONNECT",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def local() -> dict[str, Any]:
    return tomllib.loads((ROOT / "ops" / "local.toml").read_text())


@pytest.fixture(scope="module")
def connector() -> dict[str, Any]:
    return dict(json.loads(CONNECTOR_FILE.read_text()))


def stack_default_port(setting: str) -> int:
    match = re.search(rf"SB_STACK_{setting}_PORT:-(\d+)", STACK_SCRIPT)
    assert match, f"ops/stack has no default for SB_STACK_{setting}_PORT"
    return int(match.group(1))


def published_host_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, host port) of each `ports` entry written as "addr:host:container"."""
    published = []
    for entry in service.get("ports", []):
        address, host_port, _ = str(entry).split(":")
        published.append((address, int(host_port)))
    return published


def pom_value(pom: str, pattern: str) -> str:
    match = re.search(pattern, (ROOT / "ops" / "maven" / pom / "pom.xml").read_text())
    assert match, f"{pattern} not in ops/maven/{pom}/pom.xml"
    return match.group(1)


def test_every_stack_service_is_in_compose(services: dict[str, Any]) -> None:
    assert set(PORT_SETTINGS) | {"connector", "consumer"} <= set(services)


@pytest.mark.parametrize("name", sorted(PORT_SETTINGS))
def test_host_ports_match_ops_stack_and_loopback_only(services: dict[str, Any], name: str) -> None:
    assert published_host_ports(services[name]) == [
        ("127.0.0.1", stack_default_port(PORT_SETTINGS[name]))
    ]


def test_local_settings_point_at_the_same_ports(local: dict[str, Any]) -> None:
    dsn = urlsplit(local["postgres"]["dsn"])
    assert dsn.hostname == "127.0.0.1"
    assert (dsn.port, dsn.path) == (stack_default_port("PG"), "/storage_builder")
    assert urlsplit(local["redis"]["url"]).port == stack_default_port("REDIS")
    assert urlsplit(local["s3"]["endpoint_url"]).port == stack_default_port("S3")
    assert local["kafka"]["bootstrap_servers"] == f"127.0.0.1:{stack_default_port('KAFKA')}"
    assert urlsplit(local["kafka"]["connect_url"]).port == stack_default_port("CONNECT")


def test_postgres_has_logical_decoding_and_the_source_schema(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert "wal_level=logical" in postgres["command"]
    assert "wal_level = logical" in STACK_SCRIPT
    assert postgres["environment"]["POSTGRES_DB"] == "storage_builder"
    assert postgres["environment"]["POSTGRES_USER"] == "storage_builder"
    assert any(v.startswith("./schemas/source.sql:") for v in postgres["volumes"])


def test_images_run_the_versions_ops_stack_resolves(services: dict[str, Any]) -> None:
    kafka_version = pom_value("kafka", r"<kafka.version>([^<]+)</kafka.version>")
    debezium_version = pom_value(
        "debezium", r"debezium-connector-postgres</artifactId>\s*<version>([^<]+)<"
    )
    s3proxy_version = pom_value("s3proxy", r"s3proxy</artifactId>\s*<version>([^<]+)<")

    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert services["topics"]["image"] == f"apache/kafka:{kafka_version}"
    assert services["connect"]["image"] == f"quay.io/debezium/connect:{debezium_version}"
    assert services["s3"]["image"] == f"andrewgaul/s3proxy:s3proxy-{s3proxy_version}"


def test_connect_worker_matches_ops_stack(services: dict[str, Any]) -> None:
    environment = services["connect"]["environment"]
    for compose_name, worker_property in (
        ("GROUP_ID", "group.id"),
        ("CONFIG_STORAGE_TOPIC", "config.storage.topic"),
        ("OFFSET_STORAGE_TOPIC", "offset.storage.topic"),
        ("STATUS_STORAGE_TOPIC", "status.storage.topic"),
    ):
        assert f"{worker_property}={environment[compose_name]}\n" in STACK_SCRIPT
    assert environment["CONNECT_TOPIC_CREATION_ENABLE"] == "true"
    assert "topic.creation.enable=true" in STACK_SCRIPT


def test_both_register_the_same_connector_file(services: dict[str, Any]) -> None:
    mounts = services["connector"]["volumes"]
    assert "./ops/debezium/connector.json:/connector.json:ro" in mounts
    assert "CONNECTOR_FILE=$ROOT/ops/debezium/connector.json" in STACK_SCRIPT


def test_connector_streams_the_five_datasets_as_designed(
    connector: dict[str, Any], local: dict[str, Any]
) -> None:
    config = connector["config"]
    tables = [dataset.table for dataset in DATASETS.values()]

    assert connector["name"] == local["kafka"]["connector_name"]
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert config["plugin.name"] == "pgoutput"
    assert config["topic.prefix"] == local["kafka"]["topic_prefix"]
    assert sorted(config["table.include.list"].split(",")) == sorted(tables)
    assert sorted(config["message.key.columns"].split(";")) == sorted(
        f"{dataset.table}:{dataset.client_column}" for dataset in DATASETS.values()
    )
    assert config["publication.name"] == "storage_builder_pub"
    assert config["slot.name"] == "storage_builder_slot"
    assert config["snapshot.mode"] == "no_data"
    assert config["tombstones.on.delete"] == "false"
    assert config["decimal.handling.mode"] == "string"
    assert config["topic.creation.default.partitions"] == "6"
    assert config["topic.creation.default.cleanup.policy"] == "delete"
    for side in ("key", "value"):
        assert config[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
        assert config[f"{side}.converter.schemas.enable"] == "false"
    assert config["skipped.operations"] == "none"


def test_topics_are_created_up_front_like_ops_stack(
    services: dict[str, Any], connector: dict[str, Any], local: dict[str, Any]
) -> None:
    command = " ".join(services["topics"]["command"])
    words = re.split(r"[\s;]+", command)
    prefix = connector["config"]["topic.prefix"]
    for table in connector["config"]["table.include.list"].split(","):
        assert f"{prefix}.{table}" in words
    assert local["kafka"]["dead_letter_topic"] in words
    assert f"topics+=({local['kafka']['dead_letter_topic']})" in STACK_SCRIPT
    assert "--partitions 6" in command and "cleanup.policy=delete" in command


def test_s3_credentials_match_local_settings(
    services: dict[str, Any], local: dict[str, Any]
) -> None:
    s3 = services["s3"]["environment"]
    assert s3["S3PROXY_IDENTITY"] == local["s3"]["access_key_id"]
    assert s3["S3PROXY_CREDENTIAL"] == local["s3"]["secret_access_key"]
    assert local["s3"]["bucket"] in " ".join(services["s3-bucket"]["command"])


def test_consumer_runs_storage_builder_consume(services: dict[str, Any]) -> None:
    consumer = services["consumer"]
    assert consumer["command"][-1].rstrip().endswith("exec storage-builder consume")
    environment = consumer["environment"]
    assert environment["SB_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:19092"
    assert environment["SB_CONFIG"] == "/src/ops/local.toml"
