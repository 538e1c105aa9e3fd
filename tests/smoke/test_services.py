"""The local stack's services answer as the rest of the project expects them to.

S3 keeps objects byte for byte, multipart uploads included; Redis answers; the Debezium
connector runs and its change topics have the partitions and cleanup policy they need.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import redis
from boto3.s3.transfer import TransferConfig
from confluent_kafka.admin import AdminClient, ConfigResource

from storage_builder.settings import Settings

pytestmark = pytest.mark.smoke

MIB = 1024 * 1024
DATASETS = ("raw_data", "entities", "data_items", "formulas", "formula_associations")


@pytest.fixture
def s3(settings: Settings) -> Iterator[Any]:
    """A boto3 client for the test's bucket; objects below the test's prefix are removed."""
    secret = settings.s3.secret_access_key
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3.endpoint_url,
        region_name=settings.s3.region,
        aws_access_key_id=settings.s3.access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
    )
    yield client
    listed = client.list_objects_v2(Bucket=settings.s3.bucket, Prefix=settings.s3.prefix + "/")
    keys: list[Any] = [{"Key": item["Key"]} for item in listed.get("Contents", [])]
    if keys:
        client.delete_objects(Bucket=settings.s3.bucket, Delete={"Objects": keys})


def test_s3_object_round_trips(s3: Any, settings: Settings) -> None:
    key = f"{settings.s3.prefix}/small.bin"
    body = os.urandom(1000)

    s3.put_object(Bucket=settings.s3.bucket, Key=key, Body=body)

    assert s3.get_object(Bucket=settings.s3.bucket, Key=key)["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=settings.s3.bucket, Prefix=settings.s3.prefix + "/")
    assert [item["Key"] for item in listed["Contents"]] == [key]


def test_s3_multipart_upload_over_8_mib(s3: Any, settings: Settings) -> None:
    bucket, key = settings.s3.bucket, f"{settings.s3.prefix}/large.bin"
    parts = [os.urandom(5 * MIB), os.urandom(4 * MIB + 123)]

    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=part)
        for number, part in enumerate(parts, start=1)
    ]
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload,
        MultipartUpload={
            "Parts": [
                {"PartNumber": number, "ETag": part["ETag"]}
                for number, part in enumerate(etags, start=1)
            ]
        },
    )

    body = b"".join(parts)
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(body) > 8 * MIB
    got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


def test_s3_managed_transfer_splits_large_objects(s3: Any, settings: Settings) -> None:
    """boto3's upload_fileobj, as the object store uses it, over its multipart threshold."""
    key = f"{settings.s3.prefix}/managed.bin"
    body = os.urandom(9 * MIB)
    config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=5 * MIB)

    s3.upload_fileobj(io.BytesIO(body), settings.s3.bucket, key, Config=config)

    out = io.BytesIO()
    s3.download_fileobj(settings.s3.bucket, key, out, Config=config)
    assert out.getvalue() == body


def test_redis_answers_ping(redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True


def test_connector_and_task_are_running(base_settings: Settings) -> None:
    url = f"{base_settings.kafka.connect_url}/connectors/{base_settings.kafka.connector_name}"
    with urllib.request.urlopen(f"{url}/status", timeout=10) as response:
        status = json.load(response)

    assert status["connector"]["state"] == "RUNNING"
    assert [task["state"] for task in status["tasks"]] == ["RUNNING"]


def test_change_topics_have_six_partitions_and_delete_policy(base_settings: Settings) -> None:
    admin = AdminClient(base_settings.kafka.librdkafka())
    topics = [f"{base_settings.kafka.topic_prefix}.public.{dataset}" for dataset in DATASETS]
    metadata = admin.list_topics(timeout=10)

    for topic in topics:
        assert topic in metadata.topics, f"{topic} does not exist"
        assert len(metadata.topics[topic].partitions) == 6, topic
    resources = [ConfigResource(ConfigResource.Type.TOPIC, topic) for topic in topics]
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=10)["cleanup.policy"].value == "delete", resource.name
