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

* Namespaces (schema version 2, issue 17): rows carry the name's ``INTEGER`` id from
  ``safehold_namespaces``. Ids are cached per store object (:mod:`safehold.store._nsids`) and
  created on the first write with ``INSERT … SELECT max(id) + 1 … ON CONFLICT DO NOTHING``
  then ``SELECT``, in the caller's transaction if one is open: a replica creating the same name
  (or another name with the same next id) at once waits for that insert's transaction, then
  reads the one id or retries (READ COMMITTED: each statement is a new snapshot). Cached only
  after the transaction commits; every statement re-checks the id ↔ name entry, so an edited
  dictionary raises :class:`~safehold.store.errors.StoreCorruptError`.

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
from safehold.store._nsids import NamespaceIds
from safehold.store.base import Row, Store, StoreOps
from safehold.store.errors import StoreClosedError, StoreCorruptError, VersionConflictError

T = TypeVar("T")

#: Tries to create a namespace id when concurrent creators of other names take the same one.
_CREATE_ATTEMPTS = 32
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SEARCH_PATH_RE = re.compile(r"-c\s*search_path\s*=\s*([A-Za-z_][A-Za-z0-9_]*)")

# Query templates; {t} is the schema-qualified rows table, {n} the namespace dictionary. As in
# the SQLite engine, every statement names the namespace by its cached id and re-checks in the
# same statement that the dictionary still maps the id to the name (reads return the entry's
# name through a LEFT JOIN, writes are guarded by EXISTS): no extra round trip.
_Q = {
    "get": (
        "SELECT n.name, r.version, r.value FROM {n} n "
        "LEFT JOIN {t} r ON r.ns = n.id AND r.key = %s WHERE n.id = %s"
    ),
    "version": "SELECT version FROM {t} WHERE ns = %s AND key = %s",
    "insert": (
        "INSERT INTO {t} (ns, key, version, value) SELECT id, %s, 1, %s FROM {n} "
        "WHERE id = %s AND name = %s ON CONFLICT (ns, key) DO NOTHING"
    ),
    "update": (
        "UPDATE {t} SET version = version + 1, value = %s "
        "WHERE ns = %s AND key = %s AND version = %s "
        "AND EXISTS (SELECT 1 FROM {n} WHERE id = %s AND name = %s)"
    ),
    "delete": (
        "DELETE FROM {t} WHERE ns = %s AND key = %s "
        "AND EXISTS (SELECT 1 FROM {n} WHERE id = %s AND name = %s)"
    ),
    "delete_v": (
        "DELETE FROM {t} WHERE ns = %s AND key = %s AND version = %s "
        "AND EXISTS (SELECT 1 FROM {n} WHERE id = %s AND name = %s)"
    ),
    # scans: the dictionary name as an uncorrelated subquery (an InitPlan, run once), not a
    # LEFT JOIN: PostgreSQL sorts a LEFT JOIN's rows instead of walking the primary key in order
    # (measured: the whole namespace read for every page); an empty page re-reads the entry
    "scan_first": (
        "SELECT (SELECT name FROM {n} WHERE id = %s), key, version, value FROM {t} "
        "WHERE ns = %s ORDER BY key LIMIT %s"
    ),
    "scan_after": (
        "SELECT (SELECT name FROM {n} WHERE id = %s), key, version, value FROM {t} "
        "WHERE ns = %s AND key > %s ORDER BY key LIMIT %s"
    ),
    "ns_id": "SELECT id FROM {n} WHERE name = %s",
    "ns_name": "SELECT name FROM {n} WHERE id = %s",
    # the next id is the largest + 1 (no sequence to fall behind in a copied schema); two
    # creators of different names may pick the same id: the loser does nothing and retries
    "ns_create": (
        "INSERT INTO {n} (id, name) SELECT COALESCE(max(id), 0) + 1, %s FROM {n} ON CONFLICT DO NOTHING"
    ),
}


class _PgOps(StoreOps):
    """Row operations; subclasses decide which connection runs them."""

    _store: PostgresStore

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, idempotent: bool) -> T:
        raise NotImplementedError

    def _nsid(self, c: psycopg.Connection[Any], namespace: str, *, create: bool) -> int | None:
        """The namespace's id on connection ``c``: cached, else read from the dictionary;
        created (``create``) if missing as the largest id + 1 (``INSERT … ON CONFLICT DO
        NOTHING`` then ``SELECT``, retried while concurrent creators take that id) — in the
        caller's transaction if one is open, else committed at once. None: no id and not
        ``create``. Raises StoreCorruptError (dictionary edited), ConflictError, psycopg.Error."""
        store = self._store
        nsid = store._ns_cached(namespace)
        if nsid is not None:
            return nsid
        q = store._q
        r = c.execute(q["ns_id"], (namespace,)).fetchone()
        if r is None:
            if not create:
                return None
            for _ in range(_CREATE_ATTEMPTS):
                c.execute(q["ns_create"], (namespace,))
                r = c.execute(q["ns_id"], (namespace,)).fetchone()
                if r is not None:
                    break
            else:  # each miss means another name took the id: only a flood of new names gets here
                raise ConflictError(
                    f"{store._where}: could not create namespace {namespace!r} in "
                    f"{mig.NAMESPACES_TABLE} after {_CREATE_ATTEMPTS} attempts (concurrent creators)"
                )
        # once per name and process: the id must name this namespace alone (a dictionary
        # stripped of its constraints could give it to two)
        found = [x[0] for x in c.execute(q["ns_name"], (r[0],)).fetchall()]
        return store._ns_learn(namespace, r[0], found)

    def _verify(self, c: psycopg.Connection[Any], namespace: str, nsid: int) -> None:
        """Re-read the dictionary entry of ``nsid`` after a write changed nothing (conflict or
        an edited dictionary). Raises StoreCorruptError if it no longer names ``namespace``."""
        r = c.execute(self._store._q["ns_name"], (nsid,)).fetchall()
        self._store._ns_check(namespace, nsid, [x[0] for x in r])

    def get(self, namespace: str, key: bytes) -> Row | None:
        """See :meth:`StoreOps.get`. Raises StoreUnavailableError, StoreCorruptError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        q = self._store._q["get"]

        def op(c: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            nsid = self._nsid(c, namespace, create=False)
            if nsid is None:
                return None
            rs = c.execute(q, (key, nsid), binary=True).fetchall()
            self._store._ns_check(namespace, nsid, [x[0] for x in rs])
            return tuple(rs[0])

        r = self._run("get", op, idempotent=True)
        if r is None or r[1] is None:
            return None
        return row_from_db(namespace, key, r[1], r[2], self._store._where)

    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """See :meth:`StoreOps.put`. Raises VersionConflictError (a ConflictError), StoreError, ValueError."""
        namespace, key, value = check_namespace(namespace), check_key(key), check_value(value)
        expected = check_version(expected_version, name="expected_version", minimum=0)
        q = self._store._q

        def op(c: psycopg.Connection[Any]) -> int:
            nsid = self._nsid(c, namespace, create=expected == 0)
            if nsid is None:
                return 0
            if expected == 0:
                n = c.execute(q["insert"], (key, value, nsid, namespace)).rowcount
            else:
                n = c.execute(q["update"], (value, nsid, key, expected, nsid, namespace)).rowcount
            if n == 1:
                return -1
            self._verify(c, namespace, nsid)
            r = c.execute(q["version"], (nsid, key)).fetchone()
            return 0 if r is None else int(r[0])

        actual = self._run("put", op, idempotent=False)
        if actual == -1:
            return expected + 1
        raise VersionConflictError(namespace, key, expected, actual, "put")

    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """See :meth:`StoreOps.delete`. Raises VersionConflictError, StoreError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        q = self._store._q
        expected = (None if expected_version is None
                    else check_version(expected_version, name="expected_version", minimum=1))

        def op(c: psycopg.Connection[Any]) -> int:
            nsid = self._nsid(c, namespace, create=False)
            if nsid is None:
                return 0
            if expected is None:
                n = c.execute(q["delete"], (nsid, key, nsid, namespace)).rowcount
            else:
                n = c.execute(q["delete_v"], (nsid, key, expected, nsid, namespace)).rowcount
            if n > 0:
                return -1
            self._verify(c, namespace, nsid)
            if expected is None:
                return 0
            r = c.execute(q["version"], (nsid, key)).fetchone()
            return 0 if r is None else int(r[0])

        actual = self._run("delete", op, idempotent=False)
        if actual == -1:
            return True
        if expected is None:
            return False
        raise VersionConflictError(namespace, key, expected, actual, "delete")

    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """See :meth:`StoreOps.scan` (bytea order = unsigned byte order).

        Raises StoreCorruptError (namespace dictionary edited), StoreError, ValueError."""
        namespace = check_namespace(namespace)
        after, limit = check_scan(after, limit)
        q = self._store._q

        def op(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            nsid = self._nsid(c, namespace, create=False)
            if nsid is None:
                return []
            if after is None:
                rs = c.execute(q["scan_first"], (nsid, nsid, limit), binary=True).fetchall()
            else:
                rs = c.execute(q["scan_after"], (nsid, nsid, after, limit), binary=True).fetchall()
            if rs:
                self._store._ns_check(namespace, nsid, [x[0] for x in rs])
            else:
                self._verify(c, namespace, nsid)
            return [tuple(r[1:]) for r in rs]

        rows = self._run("scan", op, idempotent=True)
        return [row_from_db(namespace, k, v, val, self._store._where) for k, v, val in rows]


class _PgTx(_PgOps):
    """Operations of one open transaction (one connection); unusable after it ends.

    ``pending``: namespace ids read or created in this transaction level, added to the store's
    cache once the outermost transaction commits (dropped on rollback)."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any], parent: _PgTx | None = None):
        self._store = store
        self._conn: psycopg.Connection[Any] | None = conn
        self.parent = parent
        self.pending: dict[str, int] = {}

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
        self._ns = NamespaceIds(self._where)
        table = sql.Identifier(schema, mig.ROWS_TABLE)
        names = sql.Identifier(schema, mig.NAMESPACES_TABLE)
        self._q_sql = {k: sql.SQL(v).format(t=table, n=names) for k, v in _Q.items()}
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
        except psycopg.errors.CardinalityViolation as e:  # only our dictionary subqueries can
            raise StoreCorruptError(
                f"{self._where}: {what}: namespace dictionary ({mig.NAMESPACES_TABLE}) edited or "
                f"corrupt: one id names several namespaces ({e})"
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

    # -- namespace ids ----------------------------------------------------------------------

    def _pending(self) -> list[dict[str, int]]:
        """This thread's open transaction levels' uncommitted namespace ids, innermost first."""
        out = []
        tx = self._local.tx
        while tx is not None:
            out.append(tx.pending)
            tx = tx.parent
        return out

    def _ns_cached(self, namespace: str) -> int | None:
        """See :meth:`NamespaceIds.cached` (this thread's open transactions)."""
        return self._ns.cached(namespace, self._pending())

    def _ns_learn(self, namespace: str, nsid: object, found: list[object]) -> int:
        """See :meth:`NamespaceIds.learn`. Raises StoreCorruptError."""
        return self._ns.learn(namespace, nsid, found, self._pending())

    def _ns_check(self, namespace: str, nsid: int, found: list[object]) -> None:
        """See :meth:`NamespaceIds.verify`. Raises StoreCorruptError."""
        self._ns.verify(namespace, nsid, found, self._pending())

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
            inner = _PgTx(self, conn, outer)
            st.tx = inner
            try:
                with self._mapped("savepoint"), conn.transaction():
                    yield inner
            finally:
                inner._conn = None
                st.tx = outer
            outer.pending.update(inner.pending)  # savepoint released: part of the outer one
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
        self._ns.commit(tx.pending)  # committed: the ids it read or created are durable

    def close(self) -> None:
        """Close the pool and all its connections. Idempotent."""
        self._closed = True
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"
