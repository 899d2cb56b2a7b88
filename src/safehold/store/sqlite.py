"""SQLite engine: the embedded default store (stdlib :mod:`sqlite3`).

Durability and concurrency choices (SQLite docs "Write-Ahead Logging", "PRAGMA synchronous"):

* ``journal_mode=WAL``: readers never block the single writer; several processes may share the
  file (same host, local file system — WAL needs shared memory, so not over NFS).
* ``synchronous=FULL``: every commit fsyncs the WAL, so an acknowledged write survives a
  process crash *and* a power cut.
* ``busy_timeout``: a writer waits up to ``timeout`` seconds for the write lock, then fails
  with :class:`~safehold.errors.StoreUnavailableError`.
* One connection per thread (and per process: a forked child opens its own); transactions use
  ``BEGIN IMMEDIATE`` so the write lock is taken up front and a transaction never dies half
  way on a lock upgrade.
* ``page_size=16384`` for a new file (issue 17, measured by ``bench/records_storage.py``): the
  rows table is ``WITHOUT ROWID`` (a B-tree index), whose cells hold at most about a quarter
  of a page inline; a ~3.5 KiB record spilled 2.5 KiB into a 4 KiB overflow page at the
  default 4096 (9,085 B per record, vacuumed) and 1.5 KiB into an 8 KiB one at 8192 (13,631 B);
  at 16384 it fits inline (8,520 B). An existing file keeps its page size (WAL mode cannot
  change it; ``VACUUM INTO`` a new file can).
* ``auto_vacuum=INCREMENTAL`` for a new file (issue 17): rows deleted in bulk — the freshness
  journal a snapshot covers, older snapshot chunks — leave free pages that SQLite reuses for
  later writes but never gives back to the file system; :meth:`SqliteStore.reclaim` gives them
  back (``PRAGMA incremental_vacuum``) in short transactions, and the freshness snapshotter
  calls it after its deletions. SQLite stores the mode in the file header and can set it only
  before the first table: a file created without it (before this change) keeps
  ``auto_vacuum=NONE`` — it works as before, its free pages are reused but stay in the file,
  :meth:`~SqliteStore.reclaim` does nothing, and opening it logs a warning. An offline
  ``PRAGMA auto_vacuum = INCREMENTAL; VACUUM;`` with the service stopped switches it (docs/storage.md).
  The mode adds one pointer-map page per ~3,270 pages (0.03 % at 16 KiB pages).
* ``cache_size`` 32 MiB per connection (issue 17; SQLite's default is 2 MiB, 128 pages of 16
  KiB): a bulk import inserts ~37 posting rows per record at random places of the B-tree, and
  with the default cache most inserts re-read their leaf page from the OS (one same-time pair
  on the shared 2-core machine, 3,000 records imported in process: 7.3 s of CPU with the
  default, 5.7 s with a large cache). The cache fills only as pages are read, so idle read threads stay small.
* The file is outside the trust boundary, so ``trusted_schema=OFF`` (no SQL functions run from
  views/triggers someone planted) and ``cell_size_check=ON`` (detect corrupt pages early).

CAS is one statement each (``INSERT … ON CONFLICT DO NOTHING`` for version 0, ``UPDATE … WHERE
version = ?`` otherwise), atomic by itself and inside a transaction alike.

Namespaces (schema version 2, issue 17; :mod:`safehold.store.migrations`): rows carry the
name's integer id from ``safehold_namespaces`` (a 1-byte varint instead of the ~23-byte name).
Ids are cached per store object (:mod:`safehold.store._nsids`), created on the first write in
the caller's transaction (the write lock serialises creators), cached only after that
transaction commits; each statement re-checks the id ↔ name entry (an edited dictionary raises
:class:`~safehold.store.errors.StoreCorruptError`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safehold.errors import StoreError, StoreUnavailableError
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

log = logging.getLogger("safehold.store")

# Table names are the constants of safehold.store.migrations, written out (no string building).
#: Page size of a new database file (module docstring: measured, issue 17).
PAGE_SIZE = 16384
#: Pages one :meth:`SqliteStore.reclaim` transaction gives back at most (4 MiB at 16 KiB pages:
#: the write lock is held for one such step, then released for waiting writers).
RECLAIM_STEP = 256
#: ``PRAGMA auto_vacuum`` values (SQLite docs).
_AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}
#: Page cache per connection in KiB (module docstring: measured, issue 17); at most this much,
#: allocated as pages are read.
CACHE_KIB = 32768

# Every statement names the namespace by its cached id *and* re-checks, in the same statement,
# that the dictionary still maps that id to the name (a PRIMARY KEY lookup): reads join the
# dictionary entry and return its name, writes are guarded by EXISTS (``insert_new``'s batched
# insert reads the entry once after its rows, in the same write transaction). An edited
# dictionary thus surfaces as StoreCorruptError instead of reads or writes in another
# namespace's rows.
_SQL_GET = (
    "SELECT n.name, r.version, r.value FROM safehold_namespaces n "
    "LEFT JOIN safehold_rows r ON r.ns = n.id AND r.key = ? WHERE n.id = ?"
)
_SQL_VERSION = "SELECT version FROM safehold_rows WHERE ns = ? AND key = ?"
_SQL_INSERT = (
    "INSERT INTO safehold_rows (ns, key, version, value) "
    "SELECT id, ?, 1, ? FROM safehold_namespaces WHERE id = ? AND name = ? "
    "ON CONFLICT (ns, key) DO NOTHING"
)
#: Only inside a transaction, followed by a check of the dictionary entry (``insert_new``).
_SQL_INSERT_PLAIN = (
    "INSERT INTO safehold_rows (ns, key, version, value) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (ns, key) DO NOTHING"
)
_SQL_UPDATE = (
    "UPDATE safehold_rows SET version = version + 1, value = ? "
    "WHERE ns = ? AND key = ? AND version = ? "
    "AND EXISTS (SELECT 1 FROM safehold_namespaces WHERE id = ? AND name = ?)"
)
_SQL_DELETE = (
    "DELETE FROM safehold_rows WHERE ns = ? AND key = ? "
    "AND EXISTS (SELECT 1 FROM safehold_namespaces WHERE id = ? AND name = ?)"
)
_SQL_DELETE_V = (
    "DELETE FROM safehold_rows WHERE ns = ? AND key = ? AND version = ? "
    "AND EXISTS (SELECT 1 FROM safehold_namespaces WHERE id = ? AND name = ?)"
)
_SQL_SCAN_FIRST = (
    "SELECT n.name, r.key, r.version, r.value FROM safehold_namespaces n "
    "LEFT JOIN safehold_rows r ON r.ns = n.id WHERE n.id = ? ORDER BY r.key LIMIT ?"
)
_SQL_SCAN_AFTER = (
    "SELECT n.name, r.key, r.version, r.value FROM safehold_namespaces n "
    "LEFT JOIN safehold_rows r ON r.ns = n.id AND r.key > ? WHERE n.id = ? ORDER BY r.key LIMIT ?"
)
_SQL_NS_ID = "SELECT id FROM safehold_namespaces WHERE name = ?"
_SQL_NS_NAME = "SELECT name FROM safehold_namespaces WHERE id = ?"
_SQL_NS_CREATE = "INSERT INTO safehold_namespaces (name) VALUES (?) ON CONFLICT (name) DO NOTHING"

# Primary SQLite result codes (https://www.sqlite.org/rescode.html).
_BUSY, _LOCKED, _CORRUPT, _CANTOPEN, _NOTADB = 5, 6, 11, 14, 26


def _actual_version(conn: sqlite3.Connection, nsid: int, key: bytes) -> int:
    """Current version for a conflict message (0 = no row; -1 = not an integer: tampered)."""
    row = conn.execute(_SQL_VERSION, (nsid, key)).fetchone()
    if row is None:
        return 0
    return row[0] if isinstance(row[0], int) else -1


class _SqliteOps(StoreOps):
    """Row operations on one connection (the thread's own, or a transaction's)."""

    def __init__(self, store: SqliteStore):
        self._store = store

    def _conn(self) -> sqlite3.Connection:
        return self._store._connection()

    def _nsid(self, conn: sqlite3.Connection, namespace: str, *, create: bool) -> int | None:
        """The namespace's id: cached, else read from the dictionary; created (``create``) if
        missing, in the connection's transaction if one is open (SQLite has one writer, so
        concurrent creators serialise on the write lock). None: no id and not ``create``.
        Raises StoreCorruptError (dictionary edited), sqlite3.Error."""
        store = self._store
        nsid = store._ns_cached(namespace)
        if nsid is not None:
            return nsid
        r = conn.execute(_SQL_NS_ID, (namespace,)).fetchone()
        if r is None:
            if not create:
                return None
            conn.execute(_SQL_NS_CREATE, (namespace,))
            r = conn.execute(_SQL_NS_ID, (namespace,)).fetchone()
            if r is None:
                raise StoreCorruptError(
                    f"{store._where}: namespace {namespace!r} vanished from "
                    f"{mig.NAMESPACES_TABLE} right after it was created"
                )
        # once per name and process: the id must name this namespace alone (a dictionary
        # stripped of its constraints could give it to two)
        found = [x[0] for x in conn.execute(_SQL_NS_NAME, (r[0],)).fetchall()]
        return store._ns_learn(namespace, r[0], found)

    def _verify(self, conn: sqlite3.Connection, namespace: str, nsid: int) -> None:
        """Re-read the dictionary entry of ``nsid`` after a write changed nothing (conflict or
        an edited dictionary). Raises StoreCorruptError if it no longer names ``namespace``."""
        r = conn.execute(_SQL_NS_NAME, (nsid,)).fetchall()
        self._store._ns_check(namespace, nsid, [x[0] for x in r])

    def get(self, namespace: str, key: bytes) -> Row | None:
        """See :meth:`StoreOps.get`. Raises StoreUnavailableError, StoreCorruptError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        with self._store._mapped("get"):
            conn = self._conn()
            nsid = self._nsid(conn, namespace, create=False)
            if nsid is None:
                return None
            rs = conn.execute(_SQL_GET, (key, nsid)).fetchall()
        self._store._ns_check(namespace, nsid, [x[0] for x in rs])
        r = rs[0]
        return None if r[1] is None else row_from_db(namespace, key, r[1], r[2], self._store._where)

    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """See :meth:`StoreOps.put`. Raises VersionConflictError (a ConflictError), StoreError, ValueError."""
        namespace, key, value = check_namespace(namespace), check_key(key), check_value(value)
        expected = check_version(expected_version, name="expected_version", minimum=0)
        with self._store._mapped("put"):
            conn = self._conn()
            nsid = self._nsid(conn, namespace, create=expected == 0)
            if nsid is None:  # an update of a row in a namespace nobody wrote yet
                actual = 0
            else:
                if expected == 0:
                    n = conn.execute(_SQL_INSERT, (key, value, nsid, namespace)).rowcount
                else:
                    n = conn.execute(_SQL_UPDATE, (value, nsid, key, expected, nsid, namespace)).rowcount
                if n == 1:
                    return expected + 1
                self._verify(conn, namespace, nsid)
                actual = _actual_version(conn, nsid, key)
        raise VersionConflictError(namespace, key, expected, actual, "put")

    def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[Row | None]:
        """See :meth:`StoreOps.get_many`: ``key IN (...)``, up to 250 keys per query (SQLite's
        default limit on bound parameters is 999 before 3.32). Raises as :meth:`get`."""
        namespace = check_namespace(namespace)
        keys = [check_key(k) for k in keys]
        found: dict[bytes, tuple[Any, Any]] = {}
        with self._store._mapped("get"):
            conn = self._conn()
            nsid = self._nsid(conn, namespace, create=False)
            if nsid is None:
                return [None] * len(keys)
            for i in range(0, len(keys), 250):
                part = list(dict.fromkeys(keys[i:i + 250]))
                marks = ",".join("?" * len(part))  # placeholders only: every value is bound
                q = (
                    "SELECT n.name, r.key, r.version, r.value FROM safehold_namespaces n "  # noqa: S608
                    f"LEFT JOIN safehold_rows r ON r.ns = n.id AND r.key IN ({marks}) WHERE n.id = ?"
                )
                rs = conn.execute(q, (*part, nsid)).fetchall()
                self._store._ns_check(namespace, nsid, [x[0] for x in rs])
                for _, k, v, val in rs:
                    if isinstance(k, bytes):
                        found[k] = (v, val)
        out: list[Row | None] = []
        for k in keys:
            r = found.get(k)
            out.append(None if r is None else row_from_db(namespace, k, r[0], r[1], self._store._where))
        return out

    def insert_new(self, namespace: str, rows: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """See :meth:`StoreOps.insert_new`: one ``executemany`` of a plain insert-only statement,
        then one read of the dictionary entry in the same transaction (the write lock is held:
        nothing can change the entry between the rows and the check, so one check guards them
        all, as the per-row ``EXISTS`` of :meth:`put` does; issue 17, ~6 µs per posting). An
        entry that no longer names ``namespace`` undoes the statement (a savepoint) and raises
        StoreCorruptError. When the row count shows that some key existed, the statement is
        undone and the rows are inserted one by one to learn which. Raises StoreError,
        ValueError."""
        namespace = check_namespace(namespace)
        checked = [(check_key(k), check_value(v)) for k, v in rows]
        if len(checked) < 2:
            return super().insert_new(namespace, rows)
        with self._store._mapped("put"):
            conn = self._conn()
            if not conn.in_transaction:  # autocommit: the rows one by one (a savepoint would commit)
                n = -1
            else:
                nsid = self._nsid(conn, namespace, create=True)
                assert nsid is not None  # create=True: an id or an exception
                params = [(nsid, k, v) for k, v in checked]
                conn.execute("SAVEPOINT safehold_insert_new")
                try:
                    n = conn.executemany(_SQL_INSERT_PLAIN, params).rowcount
                    try:
                        self._verify(conn, namespace, nsid)
                    except StoreCorruptError:
                        conn.execute("ROLLBACK TO safehold_insert_new")
                        raise
                    if n != len(params):
                        conn.execute("ROLLBACK TO safehold_insert_new")
                finally:
                    conn.execute("RELEASE safehold_insert_new")
        if n == len(checked):
            return [True] * n
        return super().insert_new(namespace, rows)

    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """See :meth:`StoreOps.delete`. Raises VersionConflictError, StoreError, ValueError."""
        namespace, key = check_namespace(namespace), check_key(key)
        if expected_version is not None:
            expected_version = check_version(expected_version, name="expected_version", minimum=1)
        with self._store._mapped("delete"):
            conn = self._conn()
            nsid = self._nsid(conn, namespace, create=False)
            if nsid is None:
                if expected_version is None:
                    return False
                actual = 0
            elif expected_version is None:
                if conn.execute(_SQL_DELETE, (nsid, key, nsid, namespace)).rowcount > 0:
                    return True
                self._verify(conn, namespace, nsid)
                return False
            else:
                if conn.execute(_SQL_DELETE_V, (nsid, key, expected_version, nsid, namespace)).rowcount > 0:
                    return True
                self._verify(conn, namespace, nsid)
                actual = _actual_version(conn, nsid, key)
        raise VersionConflictError(namespace, key, expected_version, actual, "delete")

    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """See :meth:`StoreOps.scan` (keys ordered by memcmp of the bytes).

        Raises:
            StoreCorruptError: the rows came back out of key order or not after ``after`` (a
                corrupt index page), the namespace dictionary was edited, or SQLite reports
                the file malformed.
            StoreError, ValueError: as :meth:`StoreOps.scan`.
        """
        namespace = check_namespace(namespace)
        after, limit = check_scan(after, limit)
        with self._store._mapped("scan"):
            conn = self._conn()
            nsid = self._nsid(conn, namespace, create=False)
            if nsid is None:
                return []
            if after is None:
                cur = conn.execute(_SQL_SCAN_FIRST, (nsid, limit))
            else:
                cur = conn.execute(_SQL_SCAN_AFTER, (after, nsid, limit))
            rows = cur.fetchall()
        self._store._ns_check(namespace, nsid, [r[0] for r in rows])
        if len(rows) == 1 and rows[0][1] is None and rows[0][2] is None:
            return []  # the LEFT JOIN's row for a namespace without (more) rows
        prev = after
        for _, k, _, _ in rows:
            if not isinstance(k, bytes):
                continue  # row_from_db names the wrongly typed column
            # a damaged index page can return keys out of order or again (PRAGMA quick_check does
            # not see it); callers page with ``after = last key`` and would loop forever
            if prev is not None and k <= prev:
                raise StoreCorruptError(
                    f"SQLite store {self._store.path}: scan of namespace {namespace!r} returned "
                    "keys out of order: the database's index pages are corrupt (PRAGMA "
                    "integrity_check names them; restore the file from a backup)"
                )
            prev = k
        return [row_from_db(namespace, k, v, val, self._store._where) for _, k, v, val in rows]


class _Tx(_SqliteOps):
    """Operations of one open transaction; unusable after it ends."""

    def __init__(self, store: SqliteStore, conn: sqlite3.Connection):
        super().__init__(store)
        self._tx_conn: sqlite3.Connection | None = conn

    def _conn(self) -> sqlite3.Connection:
        if self._tx_conn is None:
            raise StoreError("transaction already ended; open a new one")
        return self._tx_conn


class _ThreadState(threading.local):
    conn: sqlite3.Connection | None = None
    pid: int = 0
    depth: int = 0

    def __init__(self) -> None:
        # namespace ids read or created per open transaction level, not yet committed
        self.pending: list[dict[str, int]] = []


class SqliteStore(_SqliteOps, Store):
    """Store on one SQLite database file.

    Args:
        path: file path (created with its parent directory if missing). ``":memory:"`` is
            refused: each thread would see its own empty database.
        timeout: seconds to wait for a lock held by another connection or process.

    Raises (constructor):
        StoreCorruptError: the file exists but is not a SQLite database, or is malformed.
        SchemaVersionError: the file's schema is newer than this code (see migrations).
        StoreUnavailableError: the file cannot be opened or stays locked past ``timeout``.
        ValueError: bad arguments.

    Thread-safe; several processes may use the same file. Operations on the store from a
    thread that has a transaction open join that transaction (same connection).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0):
        super().__init__(self)
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError(f"SqliteStore needs a file path, got {str(path)!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.path = Path(path)
        self.timeout = float(timeout)
        self._where = f"SQLite store {self.path}"
        self._ns = NamespaceIds(self._where)
        self._lock = threading.Lock()
        self._local = _ThreadState()
        # (owning pid, owning thread, connection); see _prune_locked for why the pid matters.
        self._conns: list[tuple[int, weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._closed = False
        self._poison: StoreCorruptError | None = None
        self._idle = threading.Condition()
        self._active = 0  # outermost transactions running (any thread)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"SQLite store {self.path}: cannot create directory: {e}") from e
        try:
            self._migrate(mig.MIGRATIONS)
            with self._mapped("read auto_vacuum"):
                mode = self._connection().execute("PRAGMA auto_vacuum").fetchone()[0]
        except BaseException:
            self.close()
            raise
        #: The file's ``auto_vacuum`` mode: ``"incremental"`` for a file this code created,
        #: ``"none"`` for an older one (:meth:`reclaim` then does nothing), ``"full"`` if set so.
        self.auto_vacuum = _AUTO_VACUUM.get(mode, str(mode))
        if self.auto_vacuum == "none":
            log.warning(
                "%s was created without auto_vacuum: free pages (e.g. the freshness journal a "
                "snapshot deleted) are reused but never returned to the file system; with the "
                "service stopped, 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;' switches the file "
                "(docs/storage.md, 'Free pages')", self._where)

    # -- connections ------------------------------------------------------------------------

    def _open_connection(self) -> sqlite3.Connection:
        with self._mapped("open"):
            conn = sqlite3.connect(
                self.path,
                timeout=self.timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() may run on another thread
                cached_statements=32,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a no-op once the file exists
                # only on a new (empty) file: setting it is a write transaction even where it
                # changes nothing, and every thread's first call would wait for the write lock;
                # an existing file keeps its mode (see reclaim)
                if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                mode = self._enable_wal(conn)
                if str(mode).lower() != "wal":
                    raise StoreError(f"SQLite store {self.path}: cannot enable WAL (journal_mode={mode})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA trusted_schema = OFF")
                conn.execute("PRAGMA cell_size_check = ON")
                conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")  # negative: KiB, not pages
            except BaseException:
                conn.close()
                raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """Switch the file to WAL (persistent; a no-op once done) and return the journal mode.

        Changing the journal mode needs an exclusive lock and SQLite reports SQLITE_BUSY for
        it without calling the busy handler, so two first openers of a new file retry here
        until ``timeout``.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                code = getattr(e, "sqlite_errorcode", -1) & 0xFF
                if code not in (_BUSY, _LOCKED) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def poison(self, error: StoreCorruptError) -> None:
        """Refuse every further operation with ``error`` (a background integrity check found
        the file corrupt: fail closed rather than serve from damaged pages)."""
        self._poison = error

    def _connection(self) -> sqlite3.Connection:
        st = self._local
        if self._closed:
            raise StoreClosedError(f"SQLite store {self.path} is closed")
        if self._poison is not None:
            raise StoreCorruptError(str(self._poison))
        if st.conn is not None and st.pid == os.getpid():
            return st.conn
        conn = self._open_connection()
        with self._lock:
            if self._closed:
                conn.close()
                raise StoreClosedError(f"SQLite store {self.path} is closed")
            self._prune_locked()
            self._conns.append((os.getpid(), weakref.ref(threading.current_thread()), conn))
        st.conn, st.pid, st.depth = conn, os.getpid(), 0
        return conn

    def _prune_locked(self) -> None:
        """Close connections of threads that have ended (called with the lock held).

        Connections inherited through ``fork()`` are dropped without closing: closing them in
        the child could checkpoint or unlock on behalf of the parent (SQLite FAQ: do not carry
        a connection across fork).
        """
        pid = os.getpid()
        keep = []
        for owner, ref, conn in self._conns:
            if owner != pid:
                continue
            t = ref()
            if t is None or not t.is_alive():
                conn.close()
            else:
                keep.append((owner, ref, conn))
        self._conns = keep

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Translate sqlite3 errors into the store's error classes."""
        try:
            yield
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", -1) & 0xFF
            where = f"SQLite store {self.path}: {what}"
            if code in (_BUSY, _LOCKED):
                raise StoreUnavailableError(
                    f"{where}: database stayed locked for {self.timeout:g} s; nothing was written"
                ) from e
            if code == _CANTOPEN:
                raise StoreUnavailableError(f"{where}: cannot open the database file ({e})") from e
            if code in (_CORRUPT, _NOTADB):
                raise StoreCorruptError(f"{where}: not a valid SQLite database or corrupt ({e})") from e
            if isinstance(e, sqlite3.OperationalError) and "no such table" in str(e):
                raise StoreCorruptError(f"{where}: Safehold tables missing ({e})") from e
            raise StoreError(f"{where}: {type(e).__name__}: {e}") from e

    # -- namespace ids ----------------------------------------------------------------------

    def _pending(self) -> list[dict[str, int]]:
        """This thread's open transaction levels' uncommitted namespace ids, innermost first."""
        st = self._local
        return st.pending[st.depth - 1::-1] if st.depth else []

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
        """The schema version recorded in the file (0 if none). Raises StoreError."""
        with self._mapped("read schema version"):
            conn = self._connection()
            t = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (mig.VERSION_TABLE,)
            ).fetchone()
            if t is None:
                return 0
            r = conn.execute("SELECT version FROM safehold_schema_version WHERE id = 1").fetchone()
            return 0 if r is None else int(r[0])

    def _migrate(self, migrations: tuple[mig.Migration, ...]) -> None:
        """Bring the file to the newest schema in one ``BEGIN IMMEDIATE`` transaction.

        Raises SchemaVersionError if the file is newer than ``migrations``.
        """
        if not mig.pending(self.schema_version(), migrations, where=f"SQLite store {self.path}"):
            return  # fast path: no write lock on every open
        with self._mapped("migrate"):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(mig.SQLITE_VERSION_DDL)
                r = conn.execute("SELECT version FROM safehold_schema_version WHERE id = 1").fetchone()
                current = 0 if r is None else int(r[0])
                steps = mig.pending(
                    current, migrations, where=f"SQLite store {self.path}"
                )  # re-check under the lock
                for m in steps:
                    for stmt in m.sqlite:
                        conn.execute(stmt)
                if steps:
                    conn.execute(
                        "INSERT INTO safehold_schema_version (id, version) VALUES (1, ?) "
                        "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                        (steps[-1].version,),
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[StoreOps]:
        """Atomic block (``BEGIN IMMEDIATE`` … ``COMMIT``); rollback on any exception.

        Nested calls on the same thread become savepoints: an exception inside the inner block
        rolls back only the inner block (if the outer block catches it).

        Raises:
            StoreUnavailableError: the write lock stayed taken past ``timeout``; nothing written.
            StoreError: COMMIT failed (I/O); the transaction was rolled back.
            ConflictError and anything raised inside: after rolling back.
        """
        conn = self._connection()
        st = self._local
        depth = st.depth
        sp = f"safehold_sp{depth}"
        if depth == 0:
            with self._idle:  # close() waits for outermost transactions of other threads
                self._active += 1
            try:
                with self._mapped("begin transaction"):
                    conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._leave()
                raise
            try:
                st.depth = 1
                with self._transaction_body(conn, st, 0, sp) as tx:
                    yield tx
            finally:
                self._leave()
            return
        with self._mapped("begin transaction"):
            conn.execute(f"SAVEPOINT {sp}")
        with self._transaction_body(conn, st, depth, sp) as tx:
            yield tx

    def _leave(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    @contextmanager
    def _transaction_body(self, conn: sqlite3.Connection, st: Any, depth: int,
                          sp: str) -> Iterator[StoreOps]:
        st.depth = depth + 1
        del st.pending[depth:]
        st.pending.append({})
        tx = _Tx(self, conn)
        try:
            yield tx
        except BaseException:
            st.depth = depth
            del st.pending[depth:]  # ids read or created in the rolled-back part are not kept
            tx._tx_conn = None
            with self._mapped("rollback"):
                if depth == 0:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                elif conn.in_transaction:
                    conn.execute(f"ROLLBACK TO {sp}")
                    conn.execute(f"RELEASE {sp}")
            raise
        st.depth = depth
        tx._tx_conn = None
        learned = st.pending[depth] if len(st.pending) > depth else {}
        del st.pending[depth:]
        try:
            with self._mapped("commit"):
                conn.execute("COMMIT" if depth == 0 else f"RELEASE {sp}")
        except BaseException:
            if depth == 0 and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if depth == 0:
            self._ns.commit(learned)
        else:
            st.pending[depth - 1].update(learned)

    def free_pages(self) -> int:
        """Pages on the file's freelist (``PRAGMA freelist_count``), in units of ``PRAGMA
        page_size`` bytes. Raises StoreError."""
        with self._mapped("freelist_count"):
            return int(self._connection().execute("PRAGMA freelist_count").fetchone()[0])

    def reclaim(self, max_pages: int | None = None, *, step: int = RECLAIM_STEP) -> int:
        """Give free pages back to the file system (see :meth:`Store.reclaim`): ``PRAGMA
        incremental_vacuum(n)`` in transactions of at most ``step`` pages each (``BEGIN
        IMMEDIATE``; other writers wait for one step at most), until the freelist is empty or
        ``max_pages`` (None: no limit) went back. Each step moves pages from the end of the file
        into free slots and cuts the end off; rows, versions and values do not change, and a
        crash rolls the step back like any transaction. The database file shrinks when the WAL
        is checkpointed. A file with ``auto_vacuum`` ``"none"`` (created before issue 17) or
        ``"full"`` returns 0 without writing.

        Args:
            max_pages: most pages to give back, >= 0; None: all free pages.
            step: pages per transaction, >= 1.

        Returns:
            The number of pages given back (units of ``PRAGMA page_size`` bytes).

        Raises:
            StoreError: called inside a transaction of this thread (each step must commit on
                its own), or SQLite failed (StoreUnavailableError: the write lock stayed taken
                past ``timeout``; the steps before it stay done).
            ValueError: bad ``max_pages`` or ``step``.
        """
        if max_pages is not None and (isinstance(max_pages, bool) or max_pages < 0):
            raise ValueError(f"max_pages must be None or >= 0, got {max_pages!r}")
        if isinstance(step, bool) or step < 1:
            raise ValueError(f"step must be >= 1, got {step!r}")
        if self.auto_vacuum != "incremental":
            return 0
        if self._local.depth:
            raise StoreError(f"{self._where}: reclaim() inside a transaction; call it outside")
        done = 0
        while max_pages is None or done < max_pages:
            want = step if max_pages is None else min(step, max_pages - done)
            with self.transaction():
                with self._mapped("incremental_vacuum"):
                    conn = self._connection()
                    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                    # the sqlite3 module steps a statement without result columns once, and
                    # incremental_vacuum frees one page per step: one statement per page
                    for _ in range(min(want, free)):
                        conn.execute("PRAGMA incremental_vacuum(1)")
                    got = free - int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            if got <= 0:
                break
            done += got
        return done

    def quick_check(self, *, max_errors: int = 3) -> None:
        """Run ``PRAGMA quick_check`` (SQLite docs: O(N) in the file size: every page is read
        once; cheaper than ``integrity_check``, which also verifies index order and contents).

        Raises:
            StoreCorruptError: the check reports problems (the first ``max_errors`` quoted) or
                cannot run because the file is malformed.
        """
        try:
            with self._mapped("quick_check"):
                rows = self._connection().execute(f"PRAGMA quick_check({int(max_errors)})").fetchall()
        except StoreCorruptError as e:  # too damaged for the check itself to run
            cause = e.__cause__ if e.__cause__ is not None else e
            raise StoreCorruptError(f"SQLite store {self.path} is corrupt (PRAGMA quick_check: "
                                    f"{cause}); restore it from a backup") from e
        # one line: SQLite puts a newline after the "*** in database main ***" header it adds
        # to some findings (e.g. the pointer-map pages of an auto_vacuum file)
        found = [" ".join(str(r[0]).split("\n")) for r in rows]
        if found != ["ok"]:
            raise StoreCorruptError(
                f"SQLite store {self.path} is corrupt (PRAGMA quick_check: {'; '.join(found)[:500]}); "
                "restore it from a backup"
            )

    def close(self) -> None:
        """Close every connection this store opened. Idempotent. Waits (up to ``timeout``)
        for transactions running on other threads to end first: closing a connection under a
        running statement crashes the sqlite3 module (background writers such as the records
        service's read-audit flush may still be committing)."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + self.timeout
        with self._idle:
            while self._active > (1 if self._local.depth else 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
        with self._lock:
            conns, self._conns = self._conns, []
        pid = os.getpid()
        for owner, _, conn in conns:
            if owner != pid:
                continue  # inherited through fork(): the parent's to close
            try:
                conn.close()
            except sqlite3.Error:  # closing a broken connection: nothing left to release
                pass

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"
