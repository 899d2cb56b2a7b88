"""PostgreSQL engine: the scale-out store (psycopg 3 + psycopg-pool).

Stateless records-service replicas share one PostgreSQL (or a wire-compatible distributed
SQL) through this engine. Semantics are those of :class:`~safehold.store.sqlite.SqliteStore`:

* CAS is one statement (``INSERT … ON CONFLICT DO NOTHING`` for version 0, ``UPDATE … WHERE
  version = %s`` otherwise). Under READ COMMITTED a concurrent UPDATE re-checks the WHERE
  clause after the other writer commits (PostgreSQL docs, "Transaction Isolation", 13.2.1),
  so exactly one of two racing writers wins.
* Connections run in autocommit; :meth:`PostgresStore.transaction` opens an explicit
  transaction on one pooled connection (nested calls become savepoints).
* A dropped connection or an unreachable server raises
  :class:`~safehold.errors.StoreUnavailableError`. PostgreSQL rolls back whatever the dead
  session had not committed, so nothing is half-written. Reads (idempotent) are retried once
  on a fresh connection; writes are never retried here. One case is in doubt by nature: the
  connection dropping *after* the server committed but before the client heard so — the
  caller re-reads the row's version to find out.
* Pooled connections are checked (an empty query round trip) when handed out, so a server
  restart or a killed backend costs one reconnect instead of a failed write.

The pool owns threads: do not use a :class:`PostgresStore` across ``fork()``; open a new one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from safehold.errors import ConflictError, StoreError, StoreUnavailableError
from safehold.store import migrations as mig
from safehold.store._checks import (
    check_key,
    check_namespace,
    check_scan,
    check_value,
    check_version,
    row_from_db,
)
from safehold.store.base import Row, Store, StoreOps
from safehold.store.errors import StoreClosedError, StoreCorruptError, VersionConflictError

T = TypeVar("T")

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SEARCH_PATH_RE = re.compile(r"-c\s*search_path\s*=\s*([A-Za-z_][A-Za-z0-9_]*)")

# Query templates; {t} is the schema-qualified rows table.
_Q = {
    "get": "SELECT version, value FROM {t} WHERE namespace = %s AND key = %s",
    "version": "SELECT version FROM {t} WHERE namespace = %s AND key = %s",
    "insert": (
        "INSERT INTO {t} (namespace, key, version, value) VALUES (%s, %s, 1, %s) "
        "ON CONFLICT (namespace, key) DO NOTHING"
    ),
    "update": (
        "UPDATE {t} SET version = version + 1, value = %s WHERE namespace = %s AND key = %s AND version = %s"
    ),
    "delete": "DELETE FROM {t} WHERE namespace = %s AND key = %s",
    "delete_v": "DELETE FROM {t} WHERE namespace = %s AND key = %s AND version = %s",
    "scan_first": "SELECT key, version, value FROM {t} WHERE namespace = %s ORDER BY key LIMIT %s",
    "scan_after": (
        "SELECT key, version, value FROM {t} WHERE namespace = %s AND key > %s ORDER BY key LIMIT %s"
    ),
}


class _PgOps(StoreOps):
    """Row operations; subclasses decide which connection runs them."""

    _store: PostgresStore

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, idempotent: bool) -> T:
        raise NotImplementedError

    def get(self, namespace: str, key: bytes) -> Row | None:
        """See :meth:`StoreOps.get`. Raises StoreUnavailableError, StoreError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        q = self._store._q["get"]
        r = self._run(
            "get", lambda c: c.execute(q, (namespace, key), binary=True).fetchone(), idempotent=True
        )
        return None if r is None else row_from_db(namespace, key, r[0], r[1], self._store._where)

    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """See :meth:`StoreOps.put`. Raises VersionConflictError (a ConflictError), StoreError, ValueError."""
        namespace, key, value = check_namespace(namespace), check_key(key), check_value(value)
        expected = check_version(expected_version, name="expected_version", minimum=0)
        q = self._store._q

        def op(c: psycopg.Connection[Any]) -> int:
            if expected == 0:
                n = c.execute(q["insert"], (namespace, key, value)).rowcount
            else:
                n = c.execute(q["update"], (value, namespace, key, expected)).rowcount
            if n == 1:
                return -1
            r = c.execute(q["version"], (namespace, key)).fetchone()
            return 0 if r is None else int(r[0])

        actual = self._run("put", op, idempotent=False)
        if actual == -1:
            return expected + 1
        raise VersionConflictError(namespace, key, expected, actual, "put")

    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """See :meth:`StoreOps.delete`. Raises VersionConflictError, StoreError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        q = self._store._q
        if expected_version is None:
            return self._run(
                "delete", lambda c: c.execute(q["delete"], (namespace, key)).rowcount > 0, idempotent=False
            )
        expected = check_version(expected_version, name="expected_version", minimum=1)

        def op(c: psycopg.Connection[Any]) -> int:
            if c.execute(q["delete_v"], (namespace, key, expected)).rowcount > 0:
                return -1
            r = c.execute(q["version"], (namespace, key)).fetchone()
            return 0 if r is None else int(r[0])

        actual = self._run("delete", op, idempotent=False)
        if actual == -1:
            return True
        raise VersionConflictError(namespace, key, expected, actual, "delete")

    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """See :meth:`StoreOps.scan` (bytea order = unsigned byte order). Raises StoreError, ValueError."""
        namespace = check_namespace(namespace)
        after, limit = check_scan(after, limit)
        q = self._store._q

        def op(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            if after is None:
                return c.execute(q["scan_first"], (namespace, limit), binary=True).fetchall()
            return c.execute(q["scan_after"], (namespace, after, limit), binary=True).fetchall()

        rows = self._run("scan", op, idempotent=True)
        return [row_from_db(namespace, k, v, val, self._store._where) for k, v, val in rows]


class _PgTx(_PgOps):
    """Operations of one open transaction (one connection); unusable after it ends."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]):
        self._store = store
        self._conn: psycopg.Connection[Any] | None = conn

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, idempotent: bool) -> T:
        if self._conn is None:
            raise StoreError("transaction already ended; open a new one")
        with self._store._mapped(f"{what} in transaction"):
            return fn(self._conn)


class _ThreadState(threading.local):
    tx: _PgTx | None = None


class PoolOptions(TypedDict, total=False):
    """Keyword options of :class:`PostgresStore` besides the DSN and schema (see its Args)."""

    min_size: int
    max_size: int
    timeout: float
    application_name: str
    check_connections: bool


class PostgresStore(_PgOps, Store):
    """Store in one schema of a PostgreSQL database.

    Args:
        dsn: libpq connection string or URI (``postgresql://user@host:5432/db``).
        schema: schema holding the tables (created if missing; must match
            ``[A-Za-z_][A-Za-z0-9_]{0,62}``).
        min_size, max_size: pool size bounds (connections).
        timeout: seconds to connect, and to wait for a free pooled connection.
        application_name: shown in ``pg_stat_activity`` (lets operators and tests find the
            store's sessions).
        check_connections: check each pooled connection with an empty query when it is handed
            out (one extra round trip; without it a write on a connection the server already
            dropped fails with StoreUnavailableError instead of reconnecting).

    Raises (constructor):
        StoreUnavailableError: the server cannot be reached within ``timeout``.
        SchemaVersionError: the schema's version is newer than this code.
        StoreError: other database errors (permissions, ...).
        ValueError: bad arguments.

    Thread-safe. Operations on the store from a thread that has a transaction open join that
    transaction (same connection), so a thread can never deadlock against its own transaction.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
        application_name: str = "safehold-store",
        check_connections: bool = True,
    ):
        if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
            raise ValueError(f"schema must match [A-Za-z_][A-Za-z0-9_]{{0,62}}, got {schema!r}")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(
                f"pool sizes need 0 <= min_size <= max_size, max_size >= 1; got {min_size}, {max_size}"
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._store = self
        self.schema = schema
        self.timeout = float(timeout)
        self._local = _ThreadState()
        self._closed = False
        self._where = f"PostgreSQL store (schema {schema!r})"
        table = sql.Identifier(schema, mig.ROWS_TABLE)
        self._q_sql = {k: sql.SQL(v).format(t=table) for k, v in _Q.items()}
        self._q: dict[str, Any] = dict(self._q_sql)
        self._pool = ConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=self.timeout,
            check=ConnectionPool.check_connection if check_connections else None,
            reconnect_timeout=max(60.0, self.timeout),
            name=f"safehold-{schema}",
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(self.timeout)),
                "application_name": application_name,
            },
        )
        try:
            with self._mapped("connect"):
                self._pool.open(wait=min_size > 0, timeout=self.timeout)
                with self._pool.connection() as conn:
                    # Render once per store: psycopg then sees plain strings and can prepare them.
                    self._q = {k: v.as_string(conn) for k, v in self._q_sql.items()}
            self._migrate(mig.MIGRATIONS)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, **kwargs: Unpack[PoolOptions]) -> PostgresStore:
        """Open from ``postgresql://…[?schema=NAME]``; see :func:`safehold.store.open_store`.

        ``schema`` is taken out of the query string before the URI goes to libpq; without it a
        ``search_path`` given in ``options`` (``-csearch_path=NAME``) names the schema.
        Raises as the constructor; ValueError for a malformed URL.
        """
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = None
        rest = []
        for k, v in query:
            if k == "schema":
                schema = v
            else:
                rest.append((k, v))
                if k == "options" and schema is None and (m := _SEARCH_PATH_RE.search(v)):
                    schema = m.group(1)
        dsn = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(dsn, schema=schema or "public", **kwargs)

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Translate psycopg errors into the store's error classes."""
        try:
            yield
        except PoolTimeout as e:
            raise StoreUnavailableError(
                f"{self._where}: {what}: no database connection within {self.timeout:g} s ({e})"
            ) from e
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as e:
            raise ConflictError(
                f"{self._where}: {what}: transaction aborted by a concurrent writer ({e})"
            ) from e
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise StoreUnavailableError(
                f"{self._where}: {what}: database unreachable or connection dropped; "
                f"uncommitted work was rolled back ({type(e).__name__}: {e})"
            ) from e
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as e:
            raise StoreCorruptError(f"{self._where}: {what}: Safehold tables missing ({e})") from e
        except psycopg.Error as e:
            raise StoreError(f"{self._where}: {what}: {type(e).__name__}: {e}") from e

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, idempotent: bool) -> T:
        if self._closed:
            raise StoreClosedError(f"{self._where} is closed")
        tx = self._local.tx
        if tx is not None:  # join this thread's open transaction
            return tx._run(what, fn, idempotent=idempotent)
        attempts = 2 if idempotent else 1
        for attempt in range(attempts):
            try:
                with self._mapped(what), self._pool.connection() as conn:
                    return fn(conn)
            except StoreUnavailableError as e:
                if attempt + 1 == attempts or isinstance(e.__cause__, PoolTimeout):
                    raise
        raise AssertionError("unreachable")

    # -- schema -----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version recorded in the database (0 if none). Raises StoreError."""
        q = sql.SQL("SELECT version FROM {} WHERE id = 1").format(
            sql.Identifier(self.schema, mig.VERSION_TABLE)
        )
        with self._mapped("read schema version"), self._pool.connection() as conn:
            try:
                r = conn.execute(q).fetchone()
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                return 0
        return 0 if r is None else int(r[0])

    def _migrate(self, migrations: tuple[mig.Migration, ...]) -> None:
        """Bring the schema to the newest version in one transaction under an advisory lock.

        Raises SchemaVersionError if the database is newer than ``migrations``.
        """
        if not mig.pending(self.schema_version(), migrations, where=self._where):
            return
        schema = sql.Identifier(self.schema)
        vt = sql.Identifier(self.schema, mig.VERSION_TABLE)
        with self._mapped("migrate"), self._pool.connection() as conn, conn.transaction():
            # Serialise concurrent openers of the same schema (lock ends with the transaction).
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"safehold:{self.schema}",)
            )
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            conn.execute(sql.SQL(mig.POSTGRES_VERSION_DDL).format(schema=schema))
            r = conn.execute(sql.SQL("SELECT version FROM {} WHERE id = 1").format(vt)).fetchone()
            steps = mig.pending(0 if r is None else int(r[0]), migrations, where=self._where)
            for m in steps:
                for stmt in m.postgres:
                    conn.execute(sql.SQL(stmt).format(schema=schema))
            if steps:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (id, version) VALUES (1, %s) "
                        "ON CONFLICT (id) DO UPDATE SET version = excluded.version"
                    ).format(vt),
                    (steps[-1].version,),
                )

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[StoreOps]:
        """Atomic block on one pooled connection; rollback on any exception.

        Nested calls on the same thread become savepoints.

        Raises:
            StoreUnavailableError: connection lost before COMMIT completed; the server rolled
                back (in doubt only if the drop came after the server's commit).
            ConflictError and anything raised inside: after rolling back.
        """
        if self._closed:
            raise StoreClosedError(f"{self._where} is closed")
        st = self._local
        outer = st.tx
        if outer is not None:
            assert outer._conn is not None
            conn = outer._conn
            inner = _PgTx(self, conn)
            st.tx = inner
            try:
                with self._mapped("savepoint"), conn.transaction():
                    yield inner
            finally:
                inner._conn = None
                st.tx = outer
            return
        with self._mapped("transaction"), self._pool.connection() as conn:
            tx = _PgTx(self, conn)
            st.tx = tx
            try:
                with conn.transaction():
                    yield tx
            finally:
                tx._conn = None
                st.tx = None

    def close(self) -> None:
        """Close the pool and all its connections. Idempotent."""
        self._closed = True
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"
