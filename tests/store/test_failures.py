"""Store failure modes: schema versions and migration, corrupt SQLite files, locks, dropped
PostgreSQL connections, unreachable servers."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import psycopg
import pytest

from safehold.errors import ConflictError, SchemaVersionError, StoreError, StoreUnavailableError
from safehold.store import Store, open_store
from safehold.store import migrations as mig
from safehold.store.errors import StoreCorruptError
from safehold.store.postgres import PostgresStore
from safehold.store.sqlite import SqliteStore
from tests.support.shared import free_port

# --- helpers: run raw SQL against either engine, as an operator (or attacker) would ----------


class Engine:
    """Opens stores and runs raw SQL on the same database, for one engine."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "s.db"
        else:
            self.dsn = request.getfixturevalue("postgres_dsn")
            self.schema = request.getfixturevalue("pg_schema")

    def open(self, **kw) -> Store:
        if self.kind == "sqlite":
            return SqliteStore(self.path, **kw)
        return PostgresStore(self.dsn, schema=self.schema, max_size=3, **kw)

    def sql(self, stmt: str, params: tuple = ()) -> list[tuple]:
        """Run one statement; ``{schema}.`` prefixes are resolved per engine."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                return conn.execute(stmt.replace("{schema}.", ""), params).fetchall()
            finally:
                conn.close()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(stmt.replace("{schema}", f'"{self.schema}"').replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path) -> Engine:
    return Engine(request.param, request, tmp_path)


# --- schema version and migration ---------------------------------------------------------------


def test_fresh_store_is_at_latest_schema(engine: Engine) -> None:
    with engine.open() as s:
        assert s.schema_version() == mig.LATEST
    assert engine.sql("SELECT id, version FROM {schema}.safehold_schema_version") == [(1, mig.LATEST)]
    # reopening is a no-op and keeps data
    with engine.open() as s:
        s.put("ns", b"k", b"v", expected_version=0)
    with engine.open() as s:
        assert s.get("ns", b"k").value == b"v"


def test_newer_schema_is_refused(engine: Engine) -> None:
    with engine.open() as s:
        s.put("ns", b"k", b"v", expected_version=0)
    engine.sql("UPDATE {schema}.safehold_schema_version SET version = ?", (mig.LATEST + 1,))
    with pytest.raises(
        SchemaVersionError, match=rf"schema version {mig.LATEST + 1} is newer .*\(up to {mig.LATEST}\)"
    ):
        engine.open()
    # the database was not touched
    assert engine.sql("SELECT version FROM {schema}.safehold_schema_version") == [(mig.LATEST + 1,)]


def _v2(statements_sqlite: tuple[str, ...], statements_pg: tuple[str, ...]) -> tuple[mig.Migration, ...]:
    return (*mig.MIGRATIONS, mig.Migration(mig.LATEST + 1, "test step", statements_sqlite, statements_pg))


def test_migration_step_runs_once_and_keeps_rows(engine: Engine) -> None:
    with engine.open() as s:
        s.put("ns", b"k", b"v", expected_version=0)
        steps = _v2(
            ("CREATE INDEX safehold_rows_by_version ON safehold_rows (version)",),
            ("CREATE INDEX safehold_rows_by_version ON {schema}.safehold_rows (version)",),
        )
        s._migrate(steps)
        assert s.schema_version() == mig.LATEST + 1
        s._migrate(steps)  # second run: nothing pending (a re-run CREATE INDEX would fail)
        assert s.get("ns", b"k").value == b"v"
    # this code only knows LATEST, so the migrated database is now refused
    with pytest.raises(SchemaVersionError):
        engine.open()


def test_failed_migration_rolls_back_entirely(engine: Engine) -> None:
    with engine.open() as s:
        steps = _v2(
            ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL"),
            ("CREATE TABLE {schema}.half_done (x INTEGER)", "THIS IS NOT SQL"),
        )
        with pytest.raises(StoreError):
            s._migrate(steps)
        assert s.schema_version() == mig.LATEST
    if engine.kind == "sqlite":
        tables = engine.sql("SELECT name FROM sqlite_master WHERE name = 'half_done'")
    else:
        tables = engine.sql("SELECT to_regclass(?)::text", (f"{engine.schema}.half_done",))
        tables = [t for t in tables if t[0] is not None]
    assert tables == []


def test_concurrent_first_open_migrates_once(engine: Engine) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def opener() -> None:
        barrier.wait()
        try:
            with engine.open() as s:
                s.get("ns", b"k")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert engine.sql("SELECT version FROM {schema}.safehold_schema_version") == [(mig.LATEST,)]


@pytest.mark.parametrize("table", ["safehold_rows", "safehold_namespaces"])
def test_missing_rows_table_is_clear_error(engine: Engine, table: str) -> None:
    s = engine.open()
    try:
        s.put("ns", b"k", b"v", expected_version=0)  # a namespace with an id: reads query the rows
        engine.sql(f"DROP TABLE {{schema}}.{table}")
        with pytest.raises(StoreCorruptError, match="Safehold tables missing"):
            s.get("ns", b"k")
        if table == "safehold_namespaces":  # the lookup of a name without an id reads it too
            with pytest.raises(StoreCorruptError, match="Safehold tables missing"):
                s.get("never-written", b"k")
    finally:
        s.close()


def test_migrations_must_be_contiguous() -> None:
    bad = (*mig.MIGRATIONS, mig.Migration(mig.LATEST + 2, "gap", (), ()))
    with pytest.raises(ValueError, match="versions must be 1, 2"):
        mig.pending(0, bad)


# --- SQLite: garbage, truncated and corrupt files, locks -----------------------------------------


def test_sqlite_garbage_file_is_clear_error(tmp_path) -> None:
    p = tmp_path / "garbage.db"
    p.write_bytes(b"this is not a database, just patient notes? no: random bytes " * 200)
    with pytest.raises(StoreCorruptError, match=r"garbage\.db.*not a valid SQLite database") as ei:
        SqliteStore(p)
    assert isinstance(ei.value, StoreError)


def _filled_db(tmp_path, n: int = 300):
    p = tmp_path / "filled.db"
    with SqliteStore(p) as s:
        for i in range(n):
            s.put("ns", b"k%05d" % i, bytes([i % 256]) * 400, expected_version=0)
    # closing the last connection checkpoints the WAL into the main file
    assert not (tmp_path / "filled.db-wal").exists() or (tmp_path / "filled.db-wal").stat().st_size == 0
    return p


def test_sqlite_corrupt_pages_are_clear_error(tmp_path) -> None:
    p = _filled_db(tmp_path)
    data = bytearray(p.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    for off in range(2 * page, len(data), page):  # trash every b-tree page after the schema
        data[off : off + 64] = b"\xa5" * 64
    p.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="not a valid SQLite database or corrupt"):
        with SqliteStore(p) as s:
            list(s.scan_all("ns"))


def test_sqlite_truncated_file_is_clear_error(tmp_path) -> None:
    p = _filled_db(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreCorruptError):
        with SqliteStore(p) as s:
            list(s.scan_all("ns"))


def test_sqlite_empty_file_becomes_new_store(tmp_path) -> None:
    p = tmp_path / "empty.db"
    p.write_bytes(b"")
    with SqliteStore(p) as s:
        assert s.schema_version() == mig.LATEST


def test_sqlite_is_wal_and_synchronous_full(tmp_path) -> None:
    with SqliteStore(tmp_path / "w.db") as s:
        conn = s._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_sqlite_lock_held_too_long_is_unavailable(tmp_path) -> None:
    p = tmp_path / "lock.db"
    with SqliteStore(p, timeout=0.3) as s:
        s.put("ns", b"k", b"v1", expected_version=0)
        other = sqlite3.connect(p, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process/connection holds the write lock
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=r"stayed locked for 0\.3 s; nothing was written"):
                s.put("ns", b"k", b"v2", expected_version=1)
            assert time.monotonic() - t0 >= 0.25
            with pytest.raises(StoreUnavailableError):
                with s.transaction() as tx:
                    tx.put("ns", b"x", b"y", expected_version=0)
            assert s.get("ns", b"k").value == b"v1"  # WAL: readers are not blocked
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.put("ns", b"k", b"v2", expected_version=1) == 2


def test_sqlite_memory_path_refused() -> None:
    with pytest.raises(ValueError, match="needs a file path"):
        SqliteStore(":memory:")


# --- PostgreSQL: dropped connections, unreachable server ------------------------------------------


@pytest.fixture
def pg(postgres_dsn: str, pg_schema: str):
    app = f"safehold-test-{uuid.uuid4().hex[:10]}"
    s = PostgresStore(postgres_dsn, schema=pg_schema, min_size=1, max_size=3, timeout=5, application_name=app)
    yield s, app, postgres_dsn
    s.close()


def _terminate(dsn: str, app: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        return admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        ).fetchone()[0]


def test_pg_connection_dropped_inside_transaction(pg) -> None:
    s, app, dsn = pg
    s.put("ns", b"existing", b"old", expected_version=0)
    with pytest.raises(StoreUnavailableError, match="connection dropped"), s.transaction() as tx:
        tx.put("ns", b"a", b"1", expected_version=0)
        tx.put("ns", b"existing", b"new", expected_version=1)
        assert _terminate(dsn, app) >= 1
        tx.put("ns", b"b", b"2", expected_version=0)
    # nothing of the transaction is visible; the store recovers with fresh connections
    assert s.get("ns", b"a") is None
    assert s.get("ns", b"b") is None
    assert s.get("ns", b"existing").value == b"old"
    assert s.put("ns", b"a", b"after", expected_version=0) == 1


def test_pg_connection_dropped_mid_statement(pg) -> None:
    """The store's UPDATE blocks on a row lock; its backend is killed while it waits."""
    s, app, dsn = pg
    s.put("ns", b"row", b"old", expected_version=0)
    result: list[BaseException | int] = []
    with psycopg.connect(dsn) as locker:
        locker.execute(f'SELECT 1 FROM "{s.schema}".safehold_rows WHERE key = %s FOR UPDATE', (b"row",))

        def writer() -> None:
            try:
                result.append(s.put("ns", b"row", b"new", expected_version=1))
            except BaseException as e:  # noqa: BLE001 - checked below
                result.append(e)

        t = threading.Thread(target=writer)
        t.start()
        with psycopg.connect(dsn, autocommit=True) as admin:
            for _ in range(200):
                waiting = admin.execute(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (app,),
                ).fetchall()
                if waiting:
                    break
                time.sleep(0.02)
            assert waiting, "store's UPDATE never blocked on the row lock"
            admin.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
        t.join(10)
        locker.rollback()
    assert len(result) == 1 and isinstance(result[0], StoreUnavailableError), result
    row = s.get("ns", b"row")
    assert row is not None and (row.version, row.value) == (1, b"old")


def test_pg_idle_connections_killed_reads_and_writes_recover(pg) -> None:
    s, app, dsn = pg
    s.put("ns", b"k", b"v", expected_version=0)
    assert _terminate(dsn, app) >= 1  # every pooled (idle) connection dies
    assert s.get("ns", b"k").value == b"v"
    assert _terminate(dsn, app) >= 1
    assert s.put("ns", b"k", b"v2", expected_version=1) == 2


def test_pg_unreachable_server_is_unavailable() -> None:
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="no database connection within 1 s"):
        PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test", timeout=1)
    assert time.monotonic() - t0 < 10


def test_pg_open_store_url_schema(postgres_dsn: str, pg_schema: str) -> None:
    sep = "&" if "?" in postgres_dsn else "?"
    with open_store(f"{postgres_dsn}{sep}schema={pg_schema}") as s:
        assert isinstance(s, PostgresStore) and s.schema == pg_schema
        s.put("ns", b"k", b"v", expected_version=0)
    with open_store(f"{postgres_dsn}{sep}options=-csearch_path%3D{pg_schema}") as s:
        assert s.schema == pg_schema and s.get("ns", b"k").value == b"v"
    with pytest.raises(ValueError, match="schema must match"):
        open_store(f"{postgres_dsn}{sep}schema=bad-name")


def test_sqlite_store_survives_fork(tmp_path) -> None:
    """A forked child opens its own connection; the parent's keeps working afterwards."""
    import os

    s = SqliteStore(tmp_path / "fork.db")
    try:
        s.put("ns", b"parent", b"p", expected_version=0)
        pid = os.fork()
        if pid == 0:  # child: use the inherited store object, then leave without cleanup
            code = 0
            try:
                s.put("ns", b"child", b"c", expected_version=0)
                s.close()
            except BaseException:  # noqa: BLE001 - reported through the exit code
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert s.get("ns", b"child").value == b"c"
        assert s.put("ns", b"parent", b"p2", expected_version=1) == 2
    finally:
        s.close()


def test_pg_without_checks_reads_retry_writes_do_not(postgres_dsn: str, pg_schema: str) -> None:
    """With connection checks off, a dead pooled connection is met by the operation itself:
    get/scan retry once on a fresh connection; put fails cleanly and writes nothing."""
    app = f"safehold-test-{uuid.uuid4().hex[:10]}"
    s = PostgresStore(
        postgres_dsn, schema=pg_schema, min_size=1, max_size=1, application_name=app, check_connections=False
    )
    try:
        s.put("ns", b"k", b"v", expected_version=0)
        assert _terminate(postgres_dsn, app) == 1
        assert s.get("ns", b"k").value == b"v"  # retried
        assert _terminate(postgres_dsn, app) == 1
        assert [r.key for r in s.scan("ns")] == [b"k"]  # retried
        assert _terminate(postgres_dsn, app) == 1
        with pytest.raises(StoreUnavailableError, match="connection dropped"):
            s.put("ns", b"new", b"x", expected_version=0)
        assert s.get("ns", b"new") is None
        assert s.put("ns", b"new", b"x", expected_version=0) == 1
    finally:
        s.close()


@pytest.mark.parametrize(
    ("column", "sql_value", "match"),
    [
        ("value", "'plain text'", "has a value of type str, not bytes"),
        ("value", "42", "has a value of type int, not bytes"),
        ("version", "'two'", "has an invalid version of type str"),
        ("key", "'textkey'", "has a key of type str, not bytes"),
    ],
)
def test_sqlite_wrongly_typed_columns_are_clear_errors(tmp_path, column, sql_value, match) -> None:
    """SQLite's flexible typing lets a file editor store TEXT where BLOBs belong: clear error."""
    p = tmp_path / "typed.db"
    with SqliteStore(p) as s:
        s.put("ns", b"k", b"secret-envelope", expected_version=0)
    raw = sqlite3.connect(p, isolation_level=None)
    raw.execute(f"UPDATE safehold_rows SET {column} = {sql_value}")
    raw.close()
    with SqliteStore(p) as s:
        with pytest.raises(StoreCorruptError, match=match) as ei:
            list(s.scan_all("ns"))
        assert "secret" not in str(ei.value)
        if column != "key":
            with pytest.raises(StoreCorruptError, match=match):
                s.get("ns", b"k")
        if column == "version":
            with pytest.raises(ConflictError, match="found an invalid version"):
                s.put("ns", b"k", b"v", expected_version=1)


def test_pg_wrongly_typed_columns_are_clear_errors(postgres_dsn: str, pg_schema: str) -> None:
    """Someone with DDL rights changes the value column to text: clear error, no TypeError."""
    with PostgresStore(postgres_dsn, schema=pg_schema) as s:
        s.put("ns", b"k", b"secret-envelope", expected_version=0)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(f'ALTER TABLE "{pg_schema}".safehold_rows ALTER COLUMN value TYPE text')
    with PostgresStore(postgres_dsn, schema=pg_schema) as s:
        with pytest.raises(StoreCorruptError, match="has a value of type str, not bytes"):
            s.get("ns", b"k")
