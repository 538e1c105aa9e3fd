"""Conversion of Debezium's JSON field values into exact Python values, one column type at a time.

Each converter takes the value of one field of a row image as the JSON converter wrote it
(never None: NULL is handled by the caller) and returns the value a segment stores, or
raises ``InvalidValue`` saying what is wrong with it. Converters are built once per column
(``column_converter``) so decoding an event is a loop over prebuilt functions.

How the connector represents each type (Debezium PostgreSQL connector, JSON converter,
``time.precision.mode=adaptive``):

================  ==============================================  ======================
PostgreSQL        Debezium                                         Python
================  ==============================================  ======================
bigint, integer   int64 / int32                                    int (range-checked)
boolean           boolean                                          bool
text              string                                           str
jsonb             string (io.debezium.data.Json), PostgreSQL text  str, as sent
numeric(p,s)      ``decimal.handling.mode``: string, precise       Decimal, exponent -s
                  (base64 two's complement, scale in the schema),
                  or double
date              int32 days since 1970-01-01 (io.debezium.time.Date)         date
timestamptz       ISO-8601 string with offset (ZonedTimestamp)     aware datetime, UTC
timestamp         int64 microseconds since epoch (MicroTimestamp)  naive datetime
time              int64 microseconds since midnight (MicroTime)    time
================  ==============================================  ======================
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from schemas.datasets import Column

Converter = Callable[[Any], Any]

DECIMAL_MODES = ("string", "precise", "double")

_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1)
_MICROS_PER_DAY = 86_400_000_000
# Every decimal with at most this many significant digits survives a trip through a double.
_DOUBLE_EXACT_DIGITS = 15
# Wide enough for any PostgreSQL numeric (1000 digits), so quantize never rounds.
_EXACT = Context(prec=2100, traps=[InvalidOperation])


class InvalidValue(ValueError):
    """A field value that does not fit its column; the message says why."""


def column_converter(
    column: Column, decimal_mode: str = "string", scale: int | None = None
) -> Converter:
    """The converter of one column.

    ``decimal_mode`` and ``scale`` matter only for ``numeric(p,s)`` columns: the mode is
    how the connector encodes them, ``scale`` the scale of the "precise" bytes when the
    event's schema gives one (else the column's own scale is assumed).
    """
    numeric = column.numeric_scale
    if numeric is not None:
        return _decimal_converter(column, numeric[0], numeric[1], decimal_mode, scale)

    try:
        return _CONVERTERS[column.pg_type]
    except KeyError:
        raise ValueError(
            f"column {column.name!r} has type {column.pg_type!r}, which the decoder does not "
            "know; known: numeric(p,s), " + ", ".join(sorted(_CONVERTERS))
        ) from None


def _bigint(value: Any) -> int:
    if type(value) is int and _INT64[0] <= value <= _INT64[1]:
        return value
    raise InvalidValue(f"{value!r} is not a bigint")


def _integer(value: Any) -> int:
    if type(value) is int and _INT32[0] <= value <= _INT32[1]:
        return value
    raise InvalidValue(f"{value!r} is not an integer (32-bit)")


def _boolean(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise InvalidValue(f"{value!r} is not a boolean")


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    raise InvalidValue(f"{value!r} is not a string")


def _jsonb(value: Any) -> str:
    # Kept as the text PostgreSQL printed: parsing would change key order and number form.
    if type(value) is str:
        return value
    raise InvalidValue(f"{value!r} is not JSON text (io.debezium.data.Json is a string)")


def _date(value: Any) -> date:
    if type(value) is not int:
        raise InvalidValue(f"{value!r} is not a date (days since 1970-01-01)")
    try:
        return date.fromordinal(_EPOCH_ORDINAL + value)
    except (ValueError, OverflowError):
        raise InvalidValue(f"date {value!r} days from 1970-01-01 is outside years 1 to 9999") from (
            None
        )


def _timestamptz(value: Any) -> datetime:
    if type(value) is not str:
        raise InvalidValue(f"{value!r} is not a timestamp with time zone (ISO-8601 text)")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidValue(
            f"{value!r} is not an ISO-8601 timestamp in years 1 to 9999 (infinite and BC "
            "timestamps cannot be stored)"
        ) from None

    if moment.tzinfo is UTC:
        return moment
    offset = moment.utcoffset()
    if offset is None:
        raise InvalidValue(f"{value!r} has no UTC offset")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise InvalidValue(f"{value!r} is outside years 1 to 9999 in UTC") from None


def _timestamp(value: Any) -> datetime:
    if type(value) is not int:
        raise InvalidValue(f"{value!r} is not a timestamp (microseconds since the epoch)")
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        raise InvalidValue(f"timestamp {value!r} microseconds is outside years 1 to 9999") from (
            None
        )


def _time(value: Any) -> time:
    if type(value) is not int or not 0 <= value < _MICROS_PER_DAY:
        raise InvalidValue(f"{value!r} is not a time of day (microseconds since midnight)")
    seconds, micros = divmod(value, 1_000_000)
    minutes, second = divmod(seconds, 60)
    return time(minutes // 60, minutes % 60, second, micros)


_CONVERTERS: dict[str, Converter] = {
    "bigint": _bigint,
    "integer": _integer,
    "boolean": _boolean,
    "text": _text,
    "jsonb": _jsonb,
    "date": _date,
    "timestamptz": _timestamptz,
    "timestamp": _timestamp,
    "time": _time,
}


def _decimal_converter(
    column: Column, precision: int, scale: int, mode: str, wire_scale: int | None
) -> Converter:
    fit = _decimal_fitter(column, precision, scale)

    if mode == "string":

        def from_string(value: Any) -> Decimal:
            if type(value) is not str:
                raise InvalidValue(f"{value!r} is not a decimal string")
            try:
                number = Decimal(value)
            except InvalidOperation:
                raise InvalidValue(f"{value!r} is not a decimal number") from None
            return fit(number, value)

        return from_string

    if mode == "precise":
        byte_scale = scale if wire_scale is None else wire_scale

        def from_bytes(value: Any) -> Decimal:
            if type(value) is not str:
                raise InvalidValue(f"{value!r} is not base64 decimal bytes")
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidValue(f"{value!r} is not base64 decimal bytes") from None
            if not raw:
                raise InvalidValue(f"{value!r} holds no bytes, so no decimal")
            unscaled = int.from_bytes(raw, "big", signed=True)
            return fit(Decimal(f"{unscaled}E{-byte_scale}"), value)

        return from_bytes

    if mode == "double":
        # Decimals with up to 15 significant digits survive the trip through a double, and
        # a column value below 10^(15-s) has at most 15. Above that, several values of the
        # column share one double, so none of them can be recovered.
        limit = Decimal(10) ** (_DOUBLE_EXACT_DIGITS - scale)

        def from_double(value: Any) -> Decimal:
            if type(value) is int:
                number = Decimal(value)
            elif type(value) is float:
                number = Decimal(repr(value)) if value == value else Decimal("NaN")
            else:
                raise InvalidValue(f"{value!r} is not a number")
            if number.is_finite() and abs(number) >= limit:
                raise InvalidValue(
                    f"{value!r} came as a double and is too large to be exact at scale {scale}; "
                    "set the connector's decimal.handling.mode to string or precise"
                )
            return fit(number, value)

        return from_double

    raise ValueError(f"decimal handling mode {mode!r} is not one of {', '.join(DECIMAL_MODES)}")


def _decimal_fitter(
    column: Column, precision: int, scale: int
) -> Callable[[Decimal, Any], Decimal]:
    """Bring a decimal to the column's exact scale, refusing any loss or overflow."""
    quantum = Decimal(1).scaleb(-scale)
    max_adjusted = precision - scale  # a value's leading digit must sit below 10^(p-s)
    described = f"{column.pg_type}"

    def fit(number: Decimal, raw: Any) -> Decimal:
        if not number.is_finite():
            raise InvalidValue(f"{raw!r} is not a finite number; {described} cannot store it")
        if number.as_tuple().exponent != -scale:
            fitted = number.quantize(quantum, context=_EXACT)
            if fitted != number:
                raise InvalidValue(f"{raw!r} has more than {scale} decimal places for {described}")
            number = fitted
        if number and number.adjusted() >= max_adjusted:
            raise InvalidValue(f"{raw!r} has too many digits for {described}")
        return number

    return fit
