"""Decoding Debezium envelopes into exact values, with and without embedded schemas."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from envelope_builder import RAW_DATA_ROW, envelope, key, payload, precise, topic

from consumer.decoding import ChangeEvent, EventDecodeError, JsonDecoder, TruncateEvent
from schemas.datasets import Target
from storage_builder.errors import DecodeError
from storage_builder.settings import KafkaSettings

RECORDED = Path(__file__).parent / "envelopes"

ENTITY_ROW: dict[str, Any] = {
    "id": 5,
    "client_id": 42,
    "parent_id": None,
    "name": 'Zürich 🏦 \u0001\t\n\u2028 "quoted" \\ end',
    "kind": "branch",
    "attributes": '{"名前": "東京", "emoji": "😀", "n": 1.50, "nested": {"a": [1, null]}}',
    "active": True,
    "valid_from": -3653,  # 1960-01-01
    "updated_at": "2024-03-31T23:59:59.5+02:00",
    "row_version": 9,
}


@pytest.fixture
def decoder() -> JsonDecoder:
    return JsonDecoder(KafkaSettings())


def decode(decoder: JsonDecoder, value: bytes | None, dataset: str = "raw_data", **kw: Any) -> Any:
    return decoder.decode(value, topic(dataset), 3, 1_234, **kw)


def raw_row(**changes: Any) -> dict[str, Any]:
    return {**RAW_DATA_ROW, **changes}


@pytest.mark.parametrize("schemas", [True, False])
def test_insert_of_raw_data_comes_out_exact(decoder: JsonDecoder, schemas: bool) -> None:
    value = envelope("raw_data", "c", after=raw_row(), schemas=schemas, tx_id=771)

    event = decode(decoder, value, key=key("raw_data", 42, schemas=schemas))

    assert event == ChangeEvent(
        op="c",
        target=Target("raw_data", 42),
        key=90_000_000_123,
        row={
            "id": 90_000_000_123,
            "client_id": 42,
            "entity_id": 7_001,
            "data_item_id": 3_004,
            "period": date(2024, 6, 1),
            "value": Decimal("-1234.500000"),
            "currency": "EUR",
            "recorded_at": datetime(2024, 6, 1, 8, 15, 30, 123456, tzinfo=UTC),
            "row_version": 5_551_212,
        },
        tx_id=771,
        lsn=24_023_128,
        source_ts_ms=1_717_171_717_000,
        topic="sb.public.raw_data",
        partition=3,
        offset=1_234,
    )
    assert str(event.row["value"]) == "-1234.500000"


@pytest.mark.parametrize("schemas", [True, False])
def test_update_and_snapshot_read_are_upserts(decoder: JsonDecoder, schemas: bool) -> None:
    for op in ("u", "r"):
        value = envelope("raw_data", op, after=raw_row(currency=None), schemas=schemas)

        event = decode(decoder, value)

        assert event.op == op
        assert event.row["currency"] is None
        assert event.key == RAW_DATA_ROW["id"]


@pytest.mark.parametrize("schemas", [True, False])
def test_delete_takes_key_and_client_from_before(decoder: JsonDecoder, schemas: bool) -> None:
    # Replica identity DEFAULT: the before image holds the primary key, the rest is null.
    before = {name: None for name in RAW_DATA_ROW} | {"id": 17, "client_id": 42}
    value = envelope("raw_data", "d", before=before, schemas=schemas, tx_id=900)

    event = decode(decoder, value, key=key("raw_data", 42, schemas=schemas))

    assert (event.op, event.target, event.key, event.row, event.tx_id) == (
        "d",
        Target("raw_data", 42),
        17,
        None,
        900,
    )


def test_truncate_becomes_a_truncate_event(decoder: JsonDecoder) -> None:
    value = envelope("formulas", "t", tx_id=1_001, lsn=99)

    event = decoder.decode(value, "sb.public.formulas", 0, 8)

    assert event == TruncateEvent("formulas", 1_001, 99, 1_717_171_717_000, topic("formulas"), 0, 8)


def test_records_without_a_change_give_none(decoder: JsonDecoder) -> None:
    heartbeat = orjson.dumps(
        {
            "schema": {
                "type": "struct",
                "fields": [{"type": "int64", "optional": False, "field": "ts_ms"}],
                "optional": False,
                "name": "io.debezium.connector.common.Heartbeat",
                "version": 1,
            },
            "payload": {"ts_ms": 1_717_171_717_000},
        }
    )
    message = orjson.dumps(
        {
            "source": payload("raw_data", "m")["source"] | {"table": "", "schema": ""},
            "op": "m",
            "ts_ms": 1,
            "message": {"prefix": "audit", "content": "aGVsbG8="},
        }
    )

    assert decoder.decode(heartbeat, "__debezium-heartbeat.sb", 0, 1) is None
    assert decoder.decode(message, "sb.message", 0, 1) is None
    assert decoder.decode(None, topic("raw_data"), 0, 1) is None  # tombstone
    assert decoder.decode(b'{"schema": null, "payload": null}', topic("raw_data"), 0, 1) is None


@pytest.mark.parametrize("schemas", [True, False])
def test_text_and_jsonb_keep_every_character(decoder: JsonDecoder, schemas: bool) -> None:
    value = envelope("entities", "u", after=ENTITY_ROW, schemas=schemas)

    row = decode(decoder, value, dataset="entities").row

    assert row["name"] == ENTITY_ROW["name"]
    assert row["attributes"] == ENTITY_ROW["attributes"]  # the text as sent, not re-serialised
    assert row["parent_id"] is None
    assert row["active"] is True
    assert row["valid_from"] == date(1960, 1, 1)
    assert row["updated_at"] == datetime(2024, 3, 31, 21, 59, 59, 500000, tzinfo=UTC)
    assert row["updated_at"].tzinfo is UTC


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("0", "0.000000"),
        ("1.5", "1.500000"),
        ("1.500000", "1.500000"),
        ("-0.000001", "-0.000001"),
        ("-99999999999999.999999", "-99999999999999.999999"),  # numeric(20,6) at its limit
        ("99999999999999.999999", "99999999999999.999999"),
        ("12.340000000", "12.340000"),  # trailing zeros beyond the scale lose nothing
    ],
)
def test_decimal_strings_get_the_column_scale(
    decoder: JsonDecoder, wire: str, expected: str
) -> None:
    row = decode(decoder, envelope("raw_data", "c", after=raw_row(value=wire))).row

    assert str(row["value"]) == expected
    assert row["value"].as_tuple().exponent == -6


@pytest.mark.parametrize("value", ["-1234.500000", "0.000001", "99999999999999.999999", "-1", "0"])
@pytest.mark.parametrize("schemas", [True, False])
def test_precise_decimal_bytes(value: str, schemas: bool) -> None:
    decoder = JsonDecoder(KafkaSettings(), decimal_mode="precise")
    wire = envelope(
        "raw_data",
        "c",
        after=raw_row(value=precise(value, 6)),
        schemas=schemas,
        decimal_mode="precise",
    )

    row = decode(decoder, wire).row

    assert row["value"] == Decimal(value)
    assert row["value"].as_tuple().exponent == -6


def test_precise_bytes_use_the_scale_of_the_schema(decoder: JsonDecoder) -> None:
    document = orjson.loads(
        envelope("raw_data", "c", after=raw_row(value=precise("12.5", 2)), decimal_mode="precise")
    )
    value_field = next(
        f for f in document["schema"]["fields"][1]["fields"] if f["field"] == "value"
    )
    value_field["parameters"]["scale"] = "2"

    row = decode(decoder, orjson.dumps(document)).row

    assert str(row["value"]) == "12.500000"


def test_the_schema_decides_the_decimal_encoding(decoder: JsonDecoder) -> None:
    # A decimal string that is also valid base64 ("1234"): only the schema can tell.
    as_string = envelope("raw_data", "c", after=raw_row(value="1234"), decimal_mode="string")
    as_bytes = envelope(
        "raw_data", "c", after=raw_row(value=precise("1234", 6)), decimal_mode="precise"
    )

    assert decode(decoder, as_string).row["value"] == Decimal("1234.000000")
    assert decode(decoder, as_bytes).row["value"] == Decimal("1234.000000")


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (1.5, "1.5000"),
        (-0.1, "-0.1000"),
        (7, "7.0000"),
        (12345678.1234, "12345678.1234"),
        (0.12345, None),
    ],
)
def test_doubles_are_accepted_only_when_exact(wire: Any, expected: str | None) -> None:
    decoder = JsonDecoder(KafkaSettings(), decimal_mode="double")
    row = {
        "id": 1,
        "client_id": 42,
        "formula_id": 2,
        "entity_id": 3,
        "data_item_id": None,
        "priority": 1,
        "factor": wire,
        "effective_on": 0,
        "created_at": "1970-01-01T00:00:00Z",
        "row_version": 1,
    }
    value = envelope("formula_associations", "c", after=row, schemas=False)

    if expected is None:
        with pytest.raises(DecodeError, match="factor"):
            decode(decoder, value, dataset="formula_associations")
    else:
        decoded = decode(decoder, value, dataset="formula_associations").row["factor"]
        assert str(decoded) == expected


@pytest.mark.parametrize("wire", [1.0000001, 1e15, 1234567890.5])
def test_inexact_doubles_are_refused(wire: float) -> None:
    decoder = JsonDecoder(KafkaSettings(), decimal_mode="double")
    value = envelope("raw_data", "c", after=raw_row(value=wire), schemas=False)

    with pytest.raises(DecodeError, match="'after.value'"):
        decode(decoder, value)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("2024-06-01T08:15:30Z", datetime(2024, 6, 1, 8, 15, 30, tzinfo=UTC)),
        ("2024-06-01T08:15:30.1Z", datetime(2024, 6, 1, 8, 15, 30, 100000, tzinfo=UTC)),
        ("2024-06-01T08:15:30.000001Z", datetime(2024, 6, 1, 8, 15, 30, 1, tzinfo=UTC)),
        ("2024-06-01T01:00:00+02:00", datetime(2024, 5, 31, 23, 0, tzinfo=UTC)),
        ("1901-12-13T20:45:52.123-05:30", datetime(1901, 12, 14, 2, 15, 52, 123000, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_with_time_zone_become_utc(
    decoder: JsonDecoder, wire: str, expected: datetime
) -> None:
    moment = decode(decoder, envelope("raw_data", "c", after=raw_row(recorded_at=wire))).row[
        "recorded_at"
    ]

    assert moment == expected
    assert moment.utcoffset() == timedelta(0)
    assert moment.tzinfo is UTC


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (0, date(1970, 1, 1)),
        (-1, date(1969, 12, 31)),
        (-719_162, date(1, 1, 1)),
        (2_932_896, date(9999, 12, 31)),
    ],
)
def test_dates_around_and_before_the_epoch(decoder: JsonDecoder, days: int, expected: date) -> None:
    row = decode(decoder, envelope("raw_data", "c", after=raw_row(period=days))).row

    assert row["period"] == expected


def test_extra_columns_are_ignored_and_logged(
    decoder: JsonDecoder, caplog: pytest.LogCaptureFixture
) -> None:
    extra = ({"type": "string", "optional": True, "field": "added_later"},)
    value = envelope(
        "raw_data", "c", after=raw_row(added_later="x"), extra_fields=extra, schemas=True
    )

    with caplog.at_level(logging.DEBUG, logger="consumer.decoding"):
        row = decode(decoder, value).row

    assert "added_later" not in row
    assert set(row) == set(RAW_DATA_ROW)
    assert "added_later" in caplog.text


def error_of(decoder: JsonDecoder, value: bytes | None, **kw: Any) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as caught:
        decoder.decode(value, kw.pop("topic", topic("raw_data")), 3, 1_234, **kw)
    error = caught.value
    assert isinstance(error, DecodeError)
    assert "partition 3 offset 1234" in str(error)
    return error


@pytest.mark.parametrize(
    ("value", "reason", "says"),
    [
        (b"not json", "malformed", "not JSON"),
        (b"[1, 2]", "malformed", "JSON list"),
        (b'{"schema": {"type": "struct"}}', "malformed", "no payload"),
        (b'{"hello": 1}', "malformed", "neither a Debezium envelope"),
        (b'{"schema": {}, "payload": {"after": {}}}', "malformed", "no op"),
        (envelope("raw_data", "x", after=RAW_DATA_ROW), "malformed", "unknown op 'x'"),
        (envelope("raw_data", "c", after=None), "malformed", "'after' is None"),
        (envelope("raw_data", "d", before=None), "malformed", "'before' is None"),
    ],
)
def test_malformed_envelopes(decoder: JsonDecoder, value: bytes, reason: str, says: str) -> None:
    error = error_of(decoder, value)

    assert error.reason == reason
    assert says in str(error)


def test_unknown_table_is_named(decoder: JsonDecoder) -> None:
    value = envelope("raw_data", "c", after=RAW_DATA_ROW)

    error = error_of(decoder, value, topic="sb.public.invoices")

    assert error.reason == "unknown_table"
    assert "unknown table 'public.invoices'" in str(error)
    assert "topic 'sb.public.invoices'" in str(error)

    other = error_of(decoder, value, topic="elsewhere.public.raw_data")
    assert "unknown table" in str(other) and "kafka.topic_prefix" in str(other)


def test_client_of_row_and_key_must_match(decoder: JsonDecoder) -> None:
    value = envelope("raw_data", "c", after=raw_row(client_id=42))

    error = error_of(decoder, value, key=key("raw_data", 43))

    assert error.reason == "client_mismatch"
    assert "client 42" in str(error) and "client 43" in str(error)


@pytest.mark.parametrize(
    ("client", "says"),
    [
        (0, "out of range"),
        (-5, "out of range"),
        ("42", "'42' is not a"),
        (4.0, "4.0 is not a"),
        (True, "True is not"),
    ],
)
def test_client_ids_must_be_positive_integers(decoder: JsonDecoder, client: Any, says: str) -> None:
    for side, value in (
        ("after", envelope("raw_data", "c", after=raw_row(client_id=client))),
        ("before", envelope("raw_data", "d", before={"id": 1, "client_id": client})),
        ("key", envelope("raw_data", "c", after=raw_row())),
    ):
        record_key = key("raw_data", client) if side == "key" else None

        error = error_of(decoder, value, key=record_key)

        assert error.field == f"{side}.client_id"
        assert says in str(error)


@pytest.mark.parametrize("bad_key", [b"not json", b'{"tenant": 42}', b"42", b'{"client_id": "x"}'])
def test_unreadable_message_keys(decoder: JsonDecoder, bad_key: bytes) -> None:
    error = error_of(decoder, envelope("raw_data", "c", after=raw_row()), key=bad_key)

    assert error.reason == "bad_key"


def test_row_keys_must_be_integers(decoder: JsonDecoder) -> None:
    error = error_of(decoder, envelope("raw_data", "d", before={"id": "17", "client_id": 42}))

    assert error.field == "before.id"
    assert "'17'" in str(error)


def test_null_in_a_not_null_column(decoder: JsonDecoder) -> None:
    error = error_of(decoder, envelope("raw_data", "c", after=raw_row(period=None)))

    assert error.reason == "null_value"
    assert error.field == "after.period"
    assert "NULL in NOT NULL column 'period'" in str(error)


def test_missing_column(decoder: JsonDecoder) -> None:
    row = raw_row()
    del row["currency"]

    error = error_of(decoder, envelope("raw_data", "c", after=row))

    assert error.reason == "missing_column"
    assert "column 'currency' of dataset 'raw_data' is missing" in str(error)


@pytest.mark.parametrize(
    ("column", "wire", "says"),
    [
        ("value", "1.2345678", "more than 6 decimal places"),
        ("value", "100000000000000", "too many digits"),
        ("value", "NaN", "not a finite number"),
        ("value", "12,5", "not a decimal number"),
        ("value", 12.5, "not a decimal string"),
        ("period", "2024-06-01", "not a date"),
        ("period", 3_000_000, "outside years 1 to 9999"),
        ("recorded_at", "infinity", "infinite"),
        ("recorded_at", "2024-06-01T08:15:30", "no UTC offset"),
        ("recorded_at", 1_717_171_717_000_000, "not a timestamp with time zone"),
        ("entity_id", 2**63, "not a bigint"),
        ("entity_id", 1.0, "not a bigint"),
        ("entity_id", True, "not a bigint"),
        ("currency", 5, "not a string"),
    ],
)
def test_values_that_do_not_fit_their_column(
    decoder: JsonDecoder, column: str, wire: Any, says: str
) -> None:
    value = envelope("raw_data", "c", after=raw_row(**{column: wire}))

    error = error_of(decoder, value)

    assert error.reason in ("bad_value", "malformed")
    assert f"'after.{column}'" in str(error)
    assert says in str(error)


def test_integer_columns_are_range_checked(decoder: JsonDecoder) -> None:
    row = {
        "id": 1,
        "client_id": 42,
        "code": "c",
        "name": "n",
        "unit": None,
        "decimals": 2**31,
        "is_input": False,
        "metadata": None,
        "updated_at": "2024-01-01T00:00:00Z",
        "row_version": 1,
    }

    error = error_of(decoder, envelope("data_items", "c", after=row), topic=topic("data_items"))

    assert error.field == "after.decimals" and "32-bit" in str(error)


def test_boolean_columns_refuse_integers(decoder: JsonDecoder) -> None:
    value = envelope("entities", "c", after=ENTITY_ROW | {"active": 1})

    error = error_of(decoder, value, topic=topic("entities"))

    assert error.field == "after.active"


def test_source_block_is_required(decoder: JsonDecoder) -> None:
    document = payload("raw_data", "c", after=raw_row())
    no_source = orjson.dumps({k: v for k, v in document.items() if k != "source"})
    bad_tx = orjson.dumps(document | {"source": document["source"] | {"txId": "771"}})

    assert "no source block" in str(error_of(decoder, no_source))
    assert error_of(decoder, bad_tx).field == "source.txId"


def test_unknown_decimal_encoding_in_the_schema(decoder: JsonDecoder) -> None:
    document = orjson.loads(envelope("raw_data", "c", after=raw_row()))
    value_field = next(
        f for f in document["schema"]["fields"][1]["fields"] if f["field"] == "value"
    )
    value_field["type"] = "struct"

    error = error_of(decoder, orjson.dumps(document))

    assert "decimal.handling.mode" in str(error)


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.json")), ids=lambda p: p.name)
def test_recorded_envelopes_decode(decoder: JsonDecoder, path: Path) -> None:
    """Envelopes recorded from the real connector, with the values PostgreSQL returned."""
    recorded = orjson.loads(path.read_bytes())

    event = decoder.decode(
        orjson.dumps(recorded["value"]),
        recorded["topic"],
        0,
        0,
        key=orjson.dumps(recorded["key"]) if recorded.get("key") is not None else None,
    )

    expected = recorded["expected"]
    assert isinstance(event, ChangeEvent)
    assert event.op == expected["op"]
    assert event.key == expected["key"]
    if expected["row"] is None:
        assert event.row is None
    else:
        assert event.row is not None
        assert {name: _plain(value) for name, value in event.row.items()} == expected["row"]


def _plain(value: Any) -> Any:
    """A decoded value as the recorded files spell it."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def test_decode_error_names_the_place_and_the_problem(decoder: JsonDecoder) -> None:
    error = error_of(decoder, envelope("raw_data", "c", after=raw_row(value="1.2345678")))

    assert str(error) == (
        "cannot decode event at topic 'sb.public.raw_data' partition 3 offset 1234 field "
        "'after.value': column 'value': '1.2345678' has more than 6 decimal places for "
        "numeric(20,6)"
    )
    assert (error.topic, error.partition, error.offset) == ("sb.public.raw_data", 3, 1234)
