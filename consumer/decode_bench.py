"""The decode benchmark: Debezium envelopes of ``raw_data`` decoded per second on one core.

The envelopes have the shape the connector writes (an update with its source block), both
without an embedded schema (about 600 bytes) and with one (about 3.5 kB), so the figure
covers JSON parsing, the row conversion to exact values and the client-id checks.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from consumer.decoding import JsonDecoder
from schemas.datasets import DATASETS
from storage_builder.settings import KafkaSettings

_WIRE_TYPES: dict[str, dict[str, Any]] = {
    "bigint": {"type": "int64"},
    "date": {"type": "int32", "name": "io.debezium.time.Date", "version": 1},
    "numeric(20,6)": {"type": "string"},
    "text": {"type": "string"},
    "timestamptz": {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1},
}

_ROW = {
    "id": 90_000_000_123,
    "client_id": 42,
    "entity_id": 7_001,
    "data_item_id": 3_004,
    "period": 19_875,
    "value": "-1234.500000",
    "currency": "EUR",
    "recorded_at": "2024-06-01T08:15:30.123456Z",
    "row_version": 5_551_212,
}


def sample_envelope(schemas: bool) -> tuple[bytes, bytes]:
    """(key, value) of one update of ``raw_data`` as the JSON converter writes it."""
    payload = {
        "before": None,
        "after": _ROW,
        "source": {
            "version": "3.6.1.Final",
            "connector": "postgresql",
            "name": "sb",
            "ts_ms": 1_717_171_717_000,
            "snapshot": "false",
            "db": "storage_builder",
            "sequence": '["24022968","24023128"]',
            "ts_us": 1_717_171_717_000_000,
            "ts_ns": 1_717_171_717_000_000_000,
            "schema": "public",
            "table": "raw_data",
            "txId": 771,
            "lsn": 24_023_128,
            "xmin": None,
            "origin": None,
            "origin_lsn": None,
        },
        "transaction": None,
        "op": "u",
        "ts_ms": 1_717_171_717_037,
        "ts_us": 1_717_171_717_037_412,
        "ts_ns": 1_717_171_717_037_412_733,
    }
    key: dict[str, Any] = {"client_id": 42}
    if not schemas:
        return orjson.dumps(key), orjson.dumps(payload)

    row_schema = {
        "type": "struct",
        "fields": [
            {**_WIRE_TYPES[c.pg_type], "optional": c.nullable, "field": c.name}
            for c in DATASETS["raw_data"].columns
        ],
        "optional": True,
        "name": "sb.public.raw_data.Value",
    }
    source_fields = [
        {"type": "int64" if isinstance(v, int) else "string", "optional": True, "field": name}
        for name, v in payload["source"].items()  # type: ignore[union-attr]
    ]
    schema = {
        "type": "struct",
        "fields": [
            {**row_schema, "field": "before"},
            {**row_schema, "field": "after"},
            {"type": "struct", "fields": source_fields, "optional": False, "field": "source"},
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            {"type": "int64", "optional": True, "field": "ts_us"},
            {"type": "int64", "optional": True, "field": "ts_ns"},
        ],
        "optional": False,
        "name": "sb.public.raw_data.Envelope",
        "version": 2,
    }
    key_schema = {
        "type": "struct",
        "fields": [{"type": "int64", "optional": False, "field": "client_id"}],
        "optional": False,
        "name": "sb.public.raw_data.Key",
    }
    return (
        orjson.dumps({"schema": key_schema, "payload": key}),
        orjson.dumps({"schema": schema, "payload": payload}),
    )


def run_decode_bench(events: int = 200_000) -> dict[str, Any]:
    """Events decoded per second, best of three runs, with and without embedded schemas."""
    decoder = JsonDecoder(KafkaSettings())
    result: dict[str, Any] = {"workload": "decode", "events": events}
    for label, schemas in (("without_schema", False), ("with_schema", True)):
        key, value = sample_envelope(schemas)
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            for offset in range(events):
                decoder.decode(value, "sb.public.raw_data", 0, offset, key)
            best = max(best, events / (time.perf_counter() - started))

        started = time.perf_counter()
        for _ in range(events):
            orjson.loads(value)
        parse_only = events / (time.perf_counter() - started)

        result[label] = {
            "envelope_bytes": len(value),
            "events_per_s": round(best),
            "json_parse_only_per_s": round(parse_only),
        }
    return result
