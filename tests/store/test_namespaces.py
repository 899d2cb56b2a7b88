"""Schema version 2 (issue 17): the namespace dictionary and rows keyed by (ns INTEGER, key).

Real SQLite files and the real PostgreSQL server: the migration of a version-1 database, its
all-or-nothing transaction, ids created on first write only, concurrent creators, and the
database administrator editing the dictionary (the database is the adversary's).
"""

from __future__ import annotations

import threading

import pytest

from safehold.errors import StoreError
from safehold.store import migrations as mig
from safehold.store.errors import StoreCorruptError
from tests.store.test_failures import Engine

V1_ROWS = {
    "records:patients": [(b"\x00" * 16, 1, b"p0"), (b"\xff" * 16, 7, b"\x00\x01binary")],
    "records:patients.search": [(bytes([i]) * 32, 1, b"") for i in range(5)],
    "records.audit": [(i.to_bytes(8, "big"), 2, b"a%d" % i) for i in range(3)],
    "_fresh.snap": [(b"s", 3, b"snapshot" * 100)],
}


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path) -> Engine:
    return Engine(request.param, request, tmp_path)


def _make_v1(engine: Engine, rows: dict[str, list[tuple[bytes, int, bytes]]]) -> None:
    """A database as schema version 1 left it (what an older Safehold wrote)."""
    v1 = mig.MIGRATIONS[0]
    if engine.kind == "sqlite":
        for stmt in (mig.SQLITE_VERSION_DDL, *v1.sqlite):
            engine.sql(stmt)
    else:
        for stmt in (mig.POSTGRES_VERSION_DDL, *v1.postgres):
            engine.sql(stmt)
    engine.sql("INSERT INTO {schema}.safehold_schema_version (id, version) VALUES (1, 1)")
    for ns, rs in rows.items():
        for key, version, value in rs:
            engine.sql("INSERT INTO {schema}.safehold_rows (namespace, key, version, value) "
                       "VALUES (?, ?, ?, ?)", (ns, key, version, value))


def _dictionary(engine: Engine) -> dict[str, int]:
    return {name: i for i, name in engine.sql("SELECT id, name FROM {schema}.safehold_namespaces")}


def test_version_1_database_migrates_every_row(engine: Engine) -> None:
    _make_v1(engine, V1_ROWS)
    with engine.open() as s:
        assert s.schema_version() == mig.LATEST == 2
        for ns, rs in V1_ROWS.items():
            got = [(r.key, r.version, r.value) for r in s.scan_all(ns)]
            assert got == sorted(rs), ns
        assert sorted(_dictionary(engine)) == sorted(V1_ROWS)
        total = engine.sql("SELECT count(*) FROM {schema}.safehold_rows")[0][0]
        assert total == sum(len(rs) for rs in V1_ROWS.values())
        # the migrated rows take part in CAS as before, and new namespaces get new ids
        assert s.put("records:patients", b"\xff" * 16, b"p1", expected_version=7) == 8
        s.put("new.ns", b"k", b"v", expected_version=0)
        assert len(set(_dictionary(engine).values())) == len(V1_ROWS) + 1
    cols = (
        [r[1] for r in engine.sql("PRAGMA table_info(safehold_rows)")]
        if engine.kind == "sqlite"
        else [r[0] for r in engine.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? "
            "AND table_name = 'safehold_rows' ORDER BY ordinal_position", (engine.schema,))]
    )
    assert cols == ["ns", "key", "version", "value"]


def test_interrupted_migration_leaves_version_1_intact(engine: Engine) -> None:
    _make_v1(engine, V1_ROWS)
    # a table in the way of the copy step: the migration fails after it has created and filled
    # the dictionary; its one transaction must take all of that back
    engine.sql("CREATE TABLE {schema}.safehold_rows_v2 (x INTEGER)")
    with pytest.raises(StoreError):
        engine.open()
    assert engine.sql("SELECT version FROM {schema}.safehold_schema_version") == [(1,)]
    if engine.kind == "sqlite":
        left = engine.sql("SELECT name FROM sqlite_master WHERE name = 'safehold_namespaces'")
    else:
        left = engine.sql("SELECT to_regclass(?)::text", (f"{engine.schema}.safehold_namespaces",))
        left = [r for r in left if r[0] is not None]
    assert left == []
    rows = engine.sql("SELECT namespace, key, version, value FROM {schema}.safehold_rows")
    assert sorted((ns, bytes(k), v, bytes(val)) for ns, k, v, val in rows) == sorted(
        (ns, k, v, val) for ns, rs in V1_ROWS.items() for k, v, val in rs)
    engine.sql("DROP TABLE {schema}.safehold_rows_v2")
    with engine.open() as s:  # the obstacle gone, the migration runs
        assert [r.value for r in s.scan_all("records.audit")] == [b"a0", b"a1", b"a2"]


def test_reads_create_no_namespace_id(engine: Engine) -> None:
    with engine.open() as s:
        assert s.get("never", b"k") is None
        assert s.get_many("never", [b"a", b"b"]) == [None, None]
        assert s.scan("never") == []
        assert s.delete("never", b"k") is False
        with pytest.raises(StoreError, match="expected version 1, found no row"):
            s.put("never", b"k", b"v", expected_version=1)
        assert _dictionary(engine) == {}
        s.put("written", b"k", b"v", expected_version=0)
        assert list(_dictionary(engine)) == ["written"]


def test_rolled_back_namespace_id_is_not_reused_from_the_cache(engine: Engine) -> None:
    with engine.open() as s:
        with pytest.raises(RuntimeError), s.transaction() as tx:
            tx.put("ghost", b"k", b"never committed", expected_version=0)
            raise RuntimeError("roll back")
        assert _dictionary(engine) == {}
        with s.transaction() as tx:  # SQLite hands the rolled-back id out again
            tx.put("real", b"k", b"real row", expected_version=0)
        s.put("ghost", b"k2", b"ghost row", expected_version=0)
        assert [r.value for r in s.scan_all("real")] == [b"real row"]
        assert [r.value for r in s.scan_all("ghost")] == [b"ghost row"]
        # an inner savepoint rolled back: the outer transaction's ids stay, the inner one's go
        with s.transaction() as tx:
            tx.put("outer", b"k", b"o", expected_version=0)
            with pytest.raises(RuntimeError), s.transaction() as inner:
                inner.put("inner", b"k", b"i", expected_version=0)
                raise RuntimeError("roll back the savepoint")
        assert sorted(_dictionary(engine)) == ["ghost", "outer", "real"]
        s.put("inner", b"k", b"i2", expected_version=0)
        assert [r.value for r in s.scan_all("inner")] == [b"i2"]
        assert [r.value for r in s.scan_all("outer")] == [b"o"]


def test_concurrent_first_writers_share_one_id(engine: Engine) -> None:
    stores = [engine.open() for _ in range(4)]
    barrier = threading.Barrier(len(stores), timeout=60)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            with stores[i].transaction() as tx:
                tx.put("shared.ns", b"k%d" % i, b"v", expected_version=0)
            barrier.wait()
            stores[i].put(f"own.{i}", b"k", b"v", expected_version=0)  # another name, same next id
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        ids = _dictionary(engine)
        assert sorted(ids) == ["own.0", "own.1", "own.2", "own.3", "shared.ns"]
        assert sorted(ids.values()) == [1, 2, 3, 4, 5]
        for s in stores:
            assert [r.key for r in s.scan_all("shared.ns")] == [b"k0", b"k1", b"k2", b"k3"]
    finally:
        for s in stores:
            s.close()


# --- the DBA edits the dictionary ------------------------------------------------------------


def _two_namespaces(s) -> None:  # noqa: ANN001
    s.put("A", b"k", b"a-row", expected_version=0)
    s.put("B", b"k", b"b-row", expected_version=0)
    s.put("B", b"only-b", b"b2", expected_version=0)


def test_dba_swaps_two_ids(engine: Engine) -> None:
    with engine.open() as s:
        _two_namespaces(s)
        ids = _dictionary(engine)
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'tmp' WHERE name = 'A'")
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'A' WHERE name = 'B'")
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'B' WHERE name = 'tmp'")
        assert _dictionary(engine) == {"A": ids["B"], "B": ids["A"]}
        # this store's cached ids now name the other namespace: refused, not read or written
        with pytest.raises(StoreCorruptError, match="namespace dictionary .* edited or corrupt"):
            s.get("A", b"k")
        with pytest.raises(StoreCorruptError):
            s.put("B", b"k", b"overwrite", expected_version=1)
        with pytest.raises(StoreCorruptError):
            s.scan("B")
        with pytest.raises(StoreCorruptError):
            s.get_many("B", [b"k"])
        with pytest.raises(StoreCorruptError):
            s.delete("B", b"only-b")
        assert sorted(bytes(v) for (v,) in engine.sql("SELECT value FROM {schema}.safehold_rows")) == [
            b"a-row", b"b-row", b"b2"]  # nothing written
    # a store that never cached them reads what the database now says: the same as the DBA
    # swapping the rows' namespace names in a version-1 table (the sealed layers above refuse
    # values moved to another namespace: RecordMovedError)
    with engine.open() as s:
        assert [r.value for r in s.scan_all("A")] == [b"b-row", b"b2"]


def test_dba_deletes_an_entry_then_the_id_is_reused(engine: Engine) -> None:
    with engine.open() as s:
        _two_namespaces(s)
        engine.sql("DELETE FROM {schema}.safehold_namespaces WHERE name = 'B'")
        with pytest.raises(StoreCorruptError, match="has no dictionary entry"):
            s.get("B", b"k")
        with pytest.raises(StoreCorruptError):
            s.put("B", b"new", b"v", expected_version=0)  # not into the orphaned id
        # a new name given B's old id: this store refuses it rather than read B's rows as C's
        engine.sql("INSERT INTO {schema}.safehold_namespaces (id, name) SELECT max(id) + 1, 'C' "
                   "FROM {schema}.safehold_namespaces")
        engine.sql("UPDATE {schema}.safehold_namespaces SET id = id + 100 WHERE name = 'A'")
        with pytest.raises(StoreCorruptError):
            s.get("A", b"k")
    # a fresh store sees no B (the rows are orphans: as if the DBA had deleted them)
    with engine.open() as s:
        assert s.get("B", b"k") is None


def test_dba_gives_two_names_one_id(engine: Engine) -> None:
    with engine.open() as s:
        _two_namespaces(s)
        a_id = _dictionary(engine)["A"]
        # only possible after dropping the dictionary's constraints
        if engine.kind == "sqlite":
            engine.sql("CREATE TABLE loose AS SELECT id, name FROM safehold_namespaces")
            engine.sql("DROP TABLE safehold_namespaces")
            engine.sql("ALTER TABLE loose RENAME TO safehold_namespaces")
        else:
            engine.sql("ALTER TABLE {schema}.safehold_namespaces DROP CONSTRAINT safehold_namespaces_pkey")
        engine.sql("UPDATE {schema}.safehold_namespaces SET id = ? WHERE name = 'B'", (a_id,))
        with pytest.raises(StoreCorruptError):
            s.get("A", b"k")  # the entry read back names B as well
        with pytest.raises(StoreCorruptError):
            s.scan("B")
    with engine.open() as s:  # a store that never cached them: every statement sees both names
        with pytest.raises(StoreCorruptError, match="is now the id of another name"):
            s.get("B", b"k")
        with pytest.raises(StoreCorruptError):
            s.put("A", b"new", b"v", expected_version=0)
    with engine.open() as s:  # ids learned one after the other: the second claims a known id
        s._ns.commit({"A": a_id})
        with pytest.raises(StoreCorruptError, match="has the id this store knows as namespace 'A'"):
            s.scan("B")


def test_dba_swaps_ids_then_a_batched_insert_is_refused(engine: Engine) -> None:
    """``insert_new`` checks the dictionary entry once per batch (SQLite: after its rows, in the
    same transaction): an entry naming another namespace undoes the rows and raises."""
    with engine.open() as s:
        _two_namespaces(s)
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'tmp' WHERE name = 'A'")
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'A' WHERE name = 'B'")
        engine.sql("UPDATE {schema}.safehold_namespaces SET name = 'B' WHERE name = 'tmp'")
        with pytest.raises(StoreCorruptError), s.transaction() as tx:
            tx.insert_new("B", [(b"n1", b"x"), (b"n2", b"y"), (b"n3", b"z")])
        assert sorted(bytes(v) for (v,) in engine.sql("SELECT value FROM {schema}.safehold_rows")) == [
            b"a-row", b"b-row", b"b2"]  # nothing written
