"""The sample source database: applying ``source.sql`` and opening connections to it.

``source.sql`` ships inside this package (package data), so an installed ``storage-builder``
can create the schema without a checkout. Applying it is idempotent and safe to run concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from schemas.datasets import DATASETS
from storage_builder.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

PUBLICATION = "storage_builder_pub"
VERSION_SEQUENCE = "public.row_version_seq"

# Next to this module, also in an installed package (it is package data).
SOURCE_SQL = Path(__file__).resolve().parent / "source.sql"

ConnectionLike = psycopg.Connection | str


# Where source.sql's last part, the publication, begins.
_PUBLICATION_PART = "-- The publication Debezium's pgoutput plugin reads."


def source_sql(*, publication: bool = True) -> str:
    """The text of ``source.sql``; without its publication part when ``publication`` is False."""
    text = SOURCE_SQL.read_text(encoding="utf-8")
    if publication:
        return text
    head, found, _ = text.partition(_PUBLICATION_PART)
    if not found:
        raise SourceError(f"{SOURCE_SQL.name} lacks the line {_PUBLICATION_PART!r}")
    return head


@contextmanager
def connection(
    conn_or_dsn: ConnectionLike, *, autocommit: bool = True
) -> Iterator[psycopg.Connection]:
    """A connection: the one given (left open), or a new one to the DSN (closed afterwards)."""
    if isinstance(conn_or_dsn, psycopg.Connection):
        yield conn_or_dsn
        return
    if not isinstance(conn_or_dsn, str) or not conn_or_dsn.strip():
        raise ConfigError(f"postgres dsn {conn_or_dsn!r} is empty or not a string")
    try:
        conn = psycopg.connect(conn_or_dsn, autocommit=autocommit)
    except psycopg.Error as error:
        raise SourceError(f"cannot connect to PostgreSQL (postgres.dsn): {error}") from None
    with conn:
        yield conn


def apply_schema(conn_or_dsn: ConnectionLike, *, publication: bool = True) -> None:
    """Create the tables, version triggers and publication of ``source.sql`` (idempotent).

    ``publication=False`` leaves the publication out: a database whose writes no change
    stream should follow (a benchmark's, say) gets the tables and triggers only.
    """
    with connection(conn_or_dsn) as conn:
        try:
            with conn.transaction():
                conn.execute(source_sql(publication=publication))
        except psycopg.Error as error:
            raise SourceError(f"applying source.sql failed: {error}") from error
    published = PUBLICATION if publication else "none"
    log.info("source schema applied (%d datasets, publication %s)", len(DATASETS), published)


def schema_is_applied(conn: psycopg.Connection) -> bool:
    """True when every dataset table has its version trigger and is in the publication.

    A cheap catalog check, so callers can skip ``apply_schema``: re-creating triggers takes a
    lock that would stall concurrent writers for a moment.
    """
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE t.tgname IS NOT NULL AND p.tablename IS NOT NULL)
        FROM unnest(%(names)s::text[]) AS d(name)
        LEFT JOIN pg_trigger t
               ON t.tgrelid = to_regclass('public.' || d.name)
              AND t.tgname = d.name || '_row_version' AND t.tgenabled = 'O'
        LEFT JOIN pg_publication_tables p
               ON p.pubname = %(pub)s AND p.schemaname = 'public' AND p.tablename = d.name
        """,
        {"names": list(DATASETS), "pub": PUBLICATION},
    ).fetchone()
    return row is not None and row[0] == len(DATASETS)


def ensure_schema(conn: psycopg.Connection) -> None:
    """Apply ``source.sql`` unless it is already in place."""
    if not schema_is_applied(conn):
        apply_schema(conn)
