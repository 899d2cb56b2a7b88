"""Versioned schema of the store and the migration step run on open.

Both engines keep the same logical layout (see ``docs/storage.md``):

* ``safehold_schema_version(id = 1, version)`` — one row, the schema version in force;
* ``safehold_namespaces(id, name)`` — the namespace dictionary (schema version 2, issue 17):
  a small integer per namespace name, ``name`` unique;
* ``safehold_rows(ns, key, version, value)``, primary key ``(ns, key)``, ``ns`` the name's id
  (version 1 had ``namespace TEXT`` here: the name repeated in every row, ~23 bytes of each
  ~60-byte search posting row).

A migration is a numbered list of DDL statements per dialect. :func:`pending` picks the steps
above the database's version; an engine runs them and the version bump in one transaction
(SQLite ``BEGIN IMMEDIATE``; PostgreSQL with a transaction-scoped advisory lock), so two
processes opening a fresh database at once cannot both migrate, and a crash mid-migration
leaves the old version intact. A database whose version is newer than :data:`LATEST` is
refused with :class:`~safehold.errors.SchemaVersionError` rather than touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safehold.errors import SchemaVersionError

#: Table holding the single schema-version row.
VERSION_TABLE = "safehold_schema_version"
#: Table holding the rows.
ROWS_TABLE = "safehold_rows"
#: Table mapping namespace names to the integer ids in ``safehold_rows.ns`` (schema version 2).
NAMESPACES_TABLE = "safehold_namespaces"


@dataclass(frozen=True)
class Migration:
    """One schema step.

    Attributes:
        version: the schema version after this step (1, 2, ... without gaps).
        description: one line for logs and docs.
        sqlite: statements for SQLite.
        postgres: statements for PostgreSQL; ``{schema}`` is replaced by the quoted schema name.
    """

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="rows table keyed by (namespace, key) with a CAS version",
        sqlite=(
            f"CREATE TABLE {ROWS_TABLE} ("
            " namespace TEXT NOT NULL,"
            " key BLOB NOT NULL,"
            " version INTEGER NOT NULL CHECK (version >= 1),"
            " value BLOB NOT NULL,"
            " PRIMARY KEY (namespace, key)"
            ") WITHOUT ROWID",
        ),
        postgres=(
            f"CREATE TABLE {{schema}}.{ROWS_TABLE} ("
            " namespace TEXT NOT NULL,"
            " key BYTEA NOT NULL,"
            " version BIGINT NOT NULL CHECK (version >= 1),"
            " value BYTEA NOT NULL,"
            " PRIMARY KEY (namespace, key)"
            ")",
        ),
    ),
    # Version 2 (issue 17): the rows table repeated the namespace name in every row. The rows
    # are copied into a new table keyed by (ns, key) and the old one dropped, all inside the
    # migration's one transaction (an interrupted copy leaves version 1 intact). Column order
    # stays key columns first; SQLite stores a small ns in a 1-byte varint. New ids are the
    # largest + 1 on both engines (SQLite's INTEGER PRIMARY KEY; PostgreSQL without a sequence,
    # so a schema copied table by table keeps creating ids).
    Migration(
        version=2,
        description="namespace dictionary; rows keyed by (ns INTEGER, key)",
        sqlite=(
            f"CREATE TABLE {NAMESPACES_TABLE} ("
            " id INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL UNIQUE"
            ")",
            f"INSERT INTO {NAMESPACES_TABLE} (name) "  # noqa: S608 (constants only)
            f"SELECT DISTINCT namespace FROM {ROWS_TABLE} ORDER BY namespace",
            f"CREATE TABLE {ROWS_TABLE}_v2 ("
            " ns INTEGER NOT NULL,"
            " key BLOB NOT NULL,"
            " version INTEGER NOT NULL CHECK (version >= 1),"
            " value BLOB NOT NULL,"
            " PRIMARY KEY (ns, key)"
            ") WITHOUT ROWID",
            f"INSERT INTO {ROWS_TABLE}_v2 (ns, key, version, value) "  # noqa: S608 (constants only)
            f"SELECT n.id, r.key, r.version, r.value FROM {ROWS_TABLE} r "
            f"JOIN {NAMESPACES_TABLE} n ON n.name = r.namespace ORDER BY n.id, r.key",
            f"DROP TABLE {ROWS_TABLE}",
            f"ALTER TABLE {ROWS_TABLE}_v2 RENAME TO {ROWS_TABLE}",
        ),
        postgres=(
            f"CREATE TABLE {{schema}}.{NAMESPACES_TABLE} ("
            " id INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL UNIQUE"
            ")",
            f"INSERT INTO {{schema}}.{NAMESPACES_TABLE} (id, name) "  # noqa: S608 (constants only)
            f"SELECT row_number() OVER (ORDER BY namespace), namespace "
            f"FROM (SELECT DISTINCT namespace FROM {{schema}}.{ROWS_TABLE}) d",
            f"CREATE TABLE {{schema}}.{ROWS_TABLE}_v2 ("
            " ns INTEGER NOT NULL,"
            " key BYTEA NOT NULL,"
            " version BIGINT NOT NULL CHECK (version >= 1),"
            " value BYTEA NOT NULL,"
            " PRIMARY KEY (ns, key)"
            ")",
            f"INSERT INTO {{schema}}.{ROWS_TABLE}_v2 (ns, key, version, value) "  # noqa: S608
            f"SELECT n.id, r.key, r.version, r.value FROM {{schema}}.{ROWS_TABLE} r "
            f"JOIN {{schema}}.{NAMESPACES_TABLE} n ON n.name = r.namespace",
            f"DROP TABLE {{schema}}.{ROWS_TABLE}",
            f"ALTER TABLE {{schema}}.{ROWS_TABLE}_v2 RENAME TO {ROWS_TABLE}",
            f"ALTER INDEX {{schema}}.{ROWS_TABLE}_v2_pkey RENAME TO {ROWS_TABLE}_pkey",
        ),
    ),
)

#: The schema version this code writes and reads.
LATEST: int = MIGRATIONS[-1].version

SQLITE_VERSION_DDL = (
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " version INTEGER NOT NULL)"
)
POSTGRES_VERSION_DDL = (
    f"CREATE TABLE IF NOT EXISTS {{schema}}.{VERSION_TABLE} ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " version INTEGER NOT NULL)"
)


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Raise ValueError unless versions run 1, 2, ... without gaps."""
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"migration #{i} has version {m.version}; versions must be 1, 2, ...")


def pending(
    current: int, migrations: Sequence[Migration] = MIGRATIONS, *, where: str = "database"
) -> list[Migration]:
    """Steps to run on a database at schema version ``current`` (0 = empty).

    ``where`` names the database in error messages (file path or schema).

    Raises:
        SchemaVersionError: ``current`` is newer than the newest migration known here, or negative.
    """
    check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise SchemaVersionError(
            f"{where}: schema version {current} is newer than this Safehold supports "
            f"(up to {latest}); upgrade Safehold, do not downgrade the database"
        )
    if current < 0:
        raise SchemaVersionError(f"{where}: schema version {current} is invalid")
    return [m for m in migrations if m.version > current]
