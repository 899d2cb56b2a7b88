"""Shared helpers for the record-engine tests: a backend (SQLite file or PostgreSQL schema)
that opens real stores and runs raw SQL on the underlying table, as an attacker with database
access would."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from safehold.store.base import Store

ENGINES = ["sqlite", "postgres"]
TABLE = "safehold_rows"
NAMES = "safehold_namespaces"


@dataclass
class Backend:
    """One real database and a way to tamper with it directly."""

    name: str
    path: Path | None = None
    dsn: str | None = None
    schema: str | None = None
    stores: list[Store] = field(default_factory=list)

    @property
    def url(self) -> str:
        """URL for :func:`safehold.store.open_store` (used by child processes)."""
        if self.name == "sqlite":
            return str(self.path)
        sep = "&" if "?" in str(self.dsn) else "?"
        return f"{self.dsn}{sep}schema={self.schema}"

    def open(self) -> Store:
        if self.name == "sqlite":
            from safehold.store.sqlite import SqliteStore

            s: Store = SqliteStore(self.path, timeout=10)
        else:
            from safehold.store.postgres import PostgresStore

            s = PostgresStore(self.dsn, schema=self.schema, max_size=4, application_name=self.app_name)
        self.stores.append(s)
        return s

    @property
    def app_name(self) -> str:
        """PostgreSQL application_name of this backend's stores (lets a test drop exactly them)."""
        return f"safehold-test-{self.schema}"

    def sql(self, stmt: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``stmt`` straight on the database; ``{t}`` names the rows table, ``{n}`` the namespace
        dictionary, ``?`` binds."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                rows = conn.execute(stmt.format(t=TABLE, n=NAMES), params).fetchall()
            finally:
                conn.close()
            return [tuple(bytes(c) if isinstance(c, bytes | memoryview) else c for c in r) for r in rows]
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            q = stmt.format(t=f'"{self.schema}".{TABLE}', n=f'"{self.schema}".{NAMES}')
            cur = conn.execute(q.replace("?", "%s"), params)
            rows = cur.fetchall() if cur.description else []
        return [tuple(bytes(c) if isinstance(c, bytes | memoryview) else c for c in r) for r in rows]

    def close(self) -> None:
        for s in self.stores:
            s.close()


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name == "sqlite":
        return Backend("sqlite", path=tmp_path / "records.db")
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("pg_schema")
    return Backend("postgres", dsn=dsn, schema=schema)
