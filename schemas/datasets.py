"""The datasets: which table each one reads, its key, client and version columns, its columns.

These definitions are the contract between the source schema (``source.sql``), the Avro
schema of the segment records (``avro/*.avsc``, generated from here and checked by a test),
the bootstrap's queries and the consumer's decoding of Debezium events.

Every dataset is keyed, inside one client, by a single ``bigint`` column; the table's primary
key is ``(client_id, id)``. The version column is maintained by the database on every insert
and update, so a row's ``(key, version)`` pair says whether two copies of it are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from storage_builder.errors import InvalidTargetError

_NUMERIC = re.compile(r"^numeric\((\d+),(\d+)\)$")
_MAX_CLIENT_ID = 2**63 - 1


@dataclass(frozen=True)
class Column:
    """One column of a source table, with its PostgreSQL type as written in ``source.sql``."""

    name: str
    pg_type: str
    nullable: bool = False

    @property
    def numeric_scale(self) -> tuple[int, int] | None:
        """(precision, scale) for a ``numeric(p,s)`` column, else None."""
        match = _NUMERIC.match(self.pg_type)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def avro_type(self) -> Any:
        """The Avro type of this column in a segment record."""
        numeric = self.numeric_scale
        if numeric is not None:
            base: Any = {
                "type": "bytes",
                "logicalType": "decimal",
                "precision": numeric[0],
                "scale": numeric[1],
            }
        else:
            base = _AVRO_TYPES[self.pg_type]
        return ["null", base] if self.nullable else base


_AVRO_TYPES: dict[str, Any] = {
    "bigint": "long",
    "integer": "int",
    "boolean": "boolean",
    "text": "string",
    # jsonb is kept as the canonical text PostgreSQL prints for it, which is also what
    # Debezium sends; parsing it into Python objects would lose key order and number form.
    "jsonb": "string",
    "date": {"type": "int", "logicalType": "date"},
    "timestamptz": {"type": "long", "logicalType": "timestamp-micros"},
}


@dataclass(frozen=True)
class Dataset:
    """One kind of data: a source table and the schema of its snapshot."""

    name: str
    columns: tuple[Column, ...]
    key_column: str = "id"
    client_column: str = "client_id"
    version_column: str = "row_version"
    schema: str = "public"
    _by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {column.name: column for column in self.columns})
        for required in (self.key_column, self.client_column, self.version_column):
            if required not in self._by_name:
                raise ValueError(f"dataset {self.name!r} lacks its column {required!r}")

    @property
    def table(self) -> str:
        """The source table, schema-qualified."""
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def column(self, name: str) -> Column:
        return self._by_name[name]

    def avro_schema(self) -> dict[str, Any]:
        """The Avro record schema of this dataset's segments."""
        return {
            "type": "record",
            "name": self.name,
            "namespace": "storage_builder.snapshot",
            "doc": f"One row of {self.table} as of a published snapshot version.",
            "fields": [
                {"name": column.name, "type": column.avro_type()} for column in self.columns
            ],
        }


def _dataset(name: str, *columns: Column) -> Dataset:
    common_head = (Column("id", "bigint"), Column("client_id", "bigint"))
    common_tail = (Column("row_version", "bigint"),)
    return Dataset(name=name, columns=common_head + columns + common_tail)


DATASETS: dict[str, Dataset] = {
    dataset.name: dataset
    for dataset in (
        _dataset(
            "raw_data",
            Column("entity_id", "bigint"),
            Column("data_item_id", "bigint"),
            Column("period", "date"),
            Column("value", "numeric(20,6)", nullable=True),
            Column("currency", "text", nullable=True),
            Column("recorded_at", "timestamptz"),
        ),
        _dataset(
            "entities",
            Column("parent_id", "bigint", nullable=True),
            Column("name", "text"),
            Column("kind", "text"),
            Column("attributes", "jsonb", nullable=True),
            Column("active", "boolean"),
            Column("valid_from", "date"),
            Column("updated_at", "timestamptz"),
        ),
        _dataset(
            "data_items",
            Column("code", "text"),
            Column("name", "text"),
            Column("unit", "text", nullable=True),
            Column("decimals", "integer"),
            Column("is_input", "boolean"),
            Column("metadata", "jsonb", nullable=True),
            Column("updated_at", "timestamptz"),
        ),
        _dataset(
            "formulas",
            Column("name", "text"),
            Column("expression", "text"),
            Column("weight", "numeric(18,8)", nullable=True),
            Column("valid_from", "date"),
            Column("valid_to", "date", nullable=True),
            Column("enabled", "boolean"),
            Column("parameters", "jsonb", nullable=True),
            Column("updated_at", "timestamptz"),
        ),
        _dataset(
            "formula_associations",
            Column("formula_id", "bigint"),
            Column("entity_id", "bigint"),
            Column("data_item_id", "bigint", nullable=True),
            Column("priority", "integer"),
            Column("factor", "numeric(12,4)", nullable=True),
            Column("effective_on", "date"),
            Column("created_at", "timestamptz"),
        ),
    )
}


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; an unknown name is refused with the known ones listed."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise InvalidTargetError(f"unknown dataset {name!r}; known datasets: {known}") from None


def parse_client_id(value: object) -> int:
    """A client id as a plain positive integer; anything else is refused, naming the value.

    Client ids become part of object keys, so only digits are ever accepted: no sign, no
    spaces, no leading zeros that would give one client two spellings.
    """
    if isinstance(value, bool):
        raise InvalidTargetError(f"client id {value!r} is not a plain integer")
    if isinstance(value, int):
        number = value
    elif (
        isinstance(value, str) and value.isascii() and value.isdigit() and value == str(int(value))
    ):
        number = int(value)
    else:
        raise InvalidTargetError(f"client id {value!r} is not a plain integer")
    if not 0 < number <= _MAX_CLIENT_ID:
        raise InvalidTargetError(f"client id {value!r} is out of range (1 to 2^63-1)")
    return number


@dataclass(frozen=True, order=True)
class Target:
    """One (dataset, client) pair: the unit that is snapshotted, versioned and published."""

    dataset: str
    client_id: int

    def __post_init__(self) -> None:
        get_dataset(self.dataset)
        parse_client_id(self.client_id)

    @classmethod
    def parse(cls, dataset: str, client: object) -> Target:
        return cls(get_dataset(dataset).name, parse_client_id(client))

    def __str__(self) -> str:
        return f"{self.dataset}/{self.client_id}"
