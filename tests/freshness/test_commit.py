"""Transactions, group commit and snapshots of a FreshStore, on both engines."""

from __future__ import annotations

import threading
import time

import pytest

from safehold.errors import ConfigError, ConflictError
from safehold.freshness.errors import JournalCorruptError, RowRolledBackError
from safehold.freshness.group import FreshGroupCommit
from safehold.freshness.journal import JOURNAL_NS, SNAP_NS
from safehold.freshness.vmap import NamespacePolicy
from safehold.records.commit import GroupCommit
from tests.support.freshness import PLEN, POSTINGS_NS, open_fresh

NS = "records:patients"
SEARCH = POSTINGS_NS  # "records:patients.postings", PLEN-byte prefixes


def k(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def journal(fs) -> list:
    return list(fs.inner.scan_all(JOURNAL_NS))


def test_one_entry_per_transaction_savepoints_and_rollback(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    n0 = len(journal(fs))
    with fs.transaction() as tx:
        tx.put(NS, k(1), b"a", expected_version=0)
        with pytest.raises(RuntimeError):
            with fs.transaction():  # a failing savepoint: its write is not journaled
                fs.put(NS, k(2), b"b", expected_version=0)
                raise RuntimeError("unit failed")
        with fs.transaction():
            fs.put(NS, k(3), b"c", expected_version=0)
        assert fs.get(NS, k(3)).value == b"c"  # reads see the transaction's own writes
        assert fs.get(NS, k(2)) is None
    assert len(journal(fs)) == n0 + 1
    with pytest.raises(ValueError):
        with fs.transaction() as tx:
            tx.put(NS, k(4), b"d", expected_version=0)
            raise ValueError("body failed")
    with fs.transaction() as tx:  # read-only: no entry
        tx.get(NS, k(1))
    assert len(journal(fs)) == n0 + 1
    assert fs.get(NS, k(4)) is None and fs.audit() == []
    with pytest.raises(ValueError, match="reserved"):
        fs.get(JOURNAL_NS, b"x")
    fs.close()


@pytest.mark.parametrize("committer", [GroupCommit, FreshGroupCommit])
def test_group_commit_of_concurrent_writers(engine, anchor, committer):
    fs = open_fresh(engine.open(), anchor)
    gc = committer(fs)
    errors = []

    def client(c: int) -> None:
        try:
            for i in range(25):
                rid = c * 1000 + i

                def unit(rid: int = rid) -> int:
                    fs.put(NS, k(rid), b"record %d" % rid, expected_version=0)
                    for t in range(3):
                        fs.put(SEARCH, bytes([t]) * PLEN + k(rid), b"id", expected_version=0)
                    return rid

                assert gc.run(unit) == rid
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(journal(fs)) < 200  # batches: fewer entries than the 200 transactions
    assert sum(len(fs.scan_prefix(SEARCH, bytes([t]) * PLEN)) for t in range(3)) == 600
    assert fs.audit() == []
    fs.close()
    fs = open_fresh(engine.open(), anchor)
    assert fs.get(NS, k(7024)).value == b"record 7024"
    fs.close()


def test_concurrent_transactions_no_false_alarm(engine, anchor):
    """Readers and writers on several threads (PostgreSQL runs them truly in parallel)."""
    fs = open_fresh(engine.open(), anchor)
    with fs.transaction() as tx:
        for i in range(20):
            tx.put(NS, k(i), b"0", expected_version=0)
    stop, errors = threading.Event(), []

    def writer(w: int) -> None:
        try:
            for n in range(40):
                i = (w * 7 + n) % 20
                row = fs.get(NS, k(i))
                try:
                    fs.put(NS, k(i), b"%d" % n, expected_version=row.version)
                except Exception as e:  # noqa: BLE001
                    if "conflict" not in str(e):
                        raise
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                fs.scan(NS, limit=20)
                fs.get(NS, k(3))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    rs = [threading.Thread(target=reader) for _ in range(2)]
    ws = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in rs + ws:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    for t in rs:
        t.join()
    assert errors == []
    assert fs.audit() == []
    fs.close()


def test_snapshot_gc_and_rebuild(engine, anchor):
    fs = open_fresh(engine.open(), anchor, snapshot_every=0)
    with fs.transaction() as tx:
        for i in range(300):
            tx.put(NS, k(i), b"v", expected_version=0)
            tx.put(SEARCH, bytes([i % 5]) * PLEN + k(i), b"id", expected_version=0)
    for i in range(10):
        fs.put(NS, k(i), b"w", expected_version=1)
    assert fs.snapshotter.run()
    rows = journal(fs)
    assert len(rows) == 1 and list(fs.inner.scan_all(SNAP_NS))[0].value != b""  # only the reference entry
    fs.put(NS, k(1), b"x", expected_version=2)
    fs.close()
    fs = open_fresh(engine.open(), anchor)
    fs.check()
    assert fs.get(NS, k(1)).value == b"x" and fs.get(NS, k(299)).version == 1
    assert len(fs.scan_prefix(SEARCH, bytes([2]) * PLEN)) == 60
    assert fs.audit() == []
    assert fs.snapshotter.run()  # a second snapshot replaces the first
    assert {r.key[:8] for r in fs.inner.scan_all(SNAP_NS)} == {fs.snapshotter.base.to_bytes(8, "big")}
    fs.close()
    engine.sql("UPDATE safehold_rows SET value = ? WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = '_fresh.snap')", (b"garbage",))
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(JournalCorruptError, match="snapshot"):
        fs.check()
    fs.close()


def test_snapshot_when_the_journal_outgrows_the_map(engine, anchor):
    """Large transactions (a batch import) trigger a snapshot by journal bytes: the journal left
    in the database stays about the map's size, and a restart replays it to the same state."""
    fs = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, snapshot_bytes=4096)
    for b in range(40):
        with fs.transaction() as tx:
            for i in range(b * 25, b * 25 + 25):
                tx.put(NS, k(i), b"v", expected_version=0)
                tx.put(SEARCH, bytes([i % 5]) * PLEN + k(i), b"id", expected_version=0)
    fs.sync()
    fs.put(NS, k(5000), b"v", expected_version=0)  # an anchor advance after any snapshot running
    fs.sync()
    deadline = time.monotonic() + 10
    while True:
        left = sum(len(r.value) for r in journal(fs))
        bound = max(4096, fs.snapshotter.size) + 2 * max(len(r.value) for r in journal(fs))
        if fs.snapshotter.base > 0 and not fs.snapshotter._busy.locked() and left <= bound:
            break
        assert time.monotonic() < deadline, f"journal not bounded by snapshots: {left} > {bound} bytes"
        time.sleep(0.02)
    assert fs.snapshotter.last_error is None and fs.snapshotter.size > 0
    assert left < fs.journal_bytes / 4, (left, fs.journal_bytes)
    fs.close()
    fs = open_fresh(engine.open(), anchor, snapshot_bytes=0)
    fs.check()
    assert fs.history.snapshot > 0 and fs.history.journal_bytes == left
    assert fs.get(NS, k(5000)).version == 1 and len(fs.scan_prefix(SEARCH, bytes([3]) * PLEN)) == 200
    assert fs.audit() == []
    fs.close()


def test_no_snapshot_by_bytes_when_turned_off(engine, anchor):
    fs = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, snapshot_bytes=0)
    before = len(journal(fs))
    for b in range(10):
        with fs.transaction() as tx:
            for i in range(b * 25, b * 25 + 25):
                tx.put(NS, k(i), b"v", expected_version=0)
    fs.sync()
    time.sleep(0.2)
    assert fs.snapshotter.base == 0 and len(journal(fs)) == before + 10
    fs.close()


def test_journal_edits_are_refused(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    for i in range(4):
        fs.put(NS, k(i), b"v", expected_version=0)
    third = journal(fs)[2]
    fs.close()
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = '_fresh.journal') AND key = ?",
               (third.key,))
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(JournalCorruptError, match="entry 3 is missing"):
        fs.get(NS, k(1))
    fs.close()
    engine.sql("INSERT INTO safehold_rows VALUES "
               "((SELECT id FROM safehold_namespaces WHERE name = '_fresh.journal'), ?, 1, ?)",
               (third.key, third.value))
    fs = open_fresh(engine.open(), anchor)
    fs.check()  # put back exactly: fine again
    fs.close()
    engine.sql("UPDATE safehold_rows SET value = ? WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = '_fresh.journal') AND key = ?",
               (b"\x00" * 200, (2).to_bytes(8, "big")))
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(JournalCorruptError, match="MAC does not verify"):
        fs.check()
    fs.close()


def test_policy_must_not_change(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    fs.put(SEARCH, b"p" * 32, b"id", expected_version=0)
    fs.close()
    fs = open_fresh(engine.open(), anchor, policy=NamespacePolicy())
    with pytest.raises(JournalCorruptError, match="policy"):
        fs.check()
    fs.close()
    with pytest.raises(ConfigError):
        NamespacePolicy({"*.search": 0})


def test_tampered_row_is_not_overwritten_blindly(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    fs.put(NS, k(1), b"a", expected_version=0)
    fs.put(NS, k(1), b"b", expected_version=1)
    engine.sql("UPDATE safehold_rows SET version = 1 WHERE key = ?", (k(1),))
    with pytest.raises(RowRolledBackError):
        fs.put(NS, k(1), b"c", expected_version=1)  # the CAS would succeed on the stale row
    assert engine.name and fs.status()["committed_epoch"] == 3  # nothing was journaled
    fs.close()


def test_background_audit_reports_findings(engine, anchor):
    import time

    from safehold.freshness.audit import AuditThread

    fs = open_fresh(engine.open(), anchor)
    with fs.transaction() as tx:
        for i in range(10):
            tx.put(NS, k(i), b"v", expected_version=0)
    seen: list = []
    audit = AuditThread(fs, 0.05, seen.extend).start()
    try:
        engine.sql("UPDATE safehold_rows SET version = 5 WHERE key = ?", (k(6),))
        end = time.monotonic() + 10
        while not seen and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        audit.stop()
    assert seen and seen[0].key == k(6) and isinstance(seen[0], RowRolledBackError)
    fs.close()


def test_fresh_group_commit_failing_unit_is_alone(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    gc = FreshGroupCommit(fs)
    fs.put(NS, k(1), b"a", expected_version=0)
    with pytest.raises(ConflictError):
        gc.run(lambda: fs.put(NS, k(1), b"b", expected_version=0))
    assert gc.run(lambda: fs.put(NS, k(2), b"c", expected_version=0)) == 1
    assert fs.get(NS, k(1)).value == b"a" and fs.audit() == []
    fs.close()


def test_batched_reads_and_posting_inserts_are_checked(engine, anchor):
    """``insert_new`` journals exactly the rows it inserted (the posting group's count and hash
    match afterwards) and ``get_many`` refuses a rolled-back row as ``get`` does (issue 17)."""
    fs = open_fresh(engine.open(), anchor)
    p = bytes([7]) * PLEN
    with fs.transaction() as tx:
        assert tx.insert_new(SEARCH, [(p + k(1), b"a"), (p + k(2), b"b")]) == [True, True]
        tx.put(NS, k(1), b"v1", expected_version=0)
        tx.put(NS, k(2), b"w1", expected_version=0)
    with fs.transaction() as tx:  # an existing posting is left alone and not journaled again
        assert tx.insert_new(SEARCH, [(p + k(2), b"x"), (p + k(3), b"c")]) == [False, True]
        tx.put(NS, k(1), b"v2", expected_version=1)
    assert [r.key for r in fs.scan_prefix(SEARCH, p)] == [p + k(1), p + k(2), p + k(3)]
    assert [r and r.value for r in fs.get_many(NS, [k(1), k(2), k(9)])] == [b"v2", b"w1", None]
    # the database serves version 1 of k(1) again: get_many refuses it like get
    engine.sql("UPDATE safehold_rows SET version = 1, value = ? WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
               (b"v1", NS, k(1)))
    with pytest.raises(RowRolledBackError):
        fs.get_many(NS, [k(2), k(1)])
    with pytest.raises(RowRolledBackError):
        fs.get(NS, k(1))
    fs.close()


def test_sqlite_vacuum_while_stopped_changes_nothing_the_checks_see(tmp_path, anchor):
    """docs/records.md: compaction is SQLite's VACUUM with the service stopped; it rewrites the
    pages, not the rows, so the journal, the anchor and every row check agree afterwards."""
    import sqlite3
    from contextlib import closing

    from safehold.store.sqlite import SqliteStore

    path = tmp_path / "v.db"
    fs = open_fresh(SqliteStore(path), anchor)
    with fs.transaction() as tx:
        for i in range(400):
            tx.put(NS, k(i), b"v" * 200, expected_version=0)
            tx.put(SEARCH, bytes([i % 7]) * PLEN + k(i), b"id", expected_version=0)
    for i in range(0, 400, 2):
        fs.delete(NS, k(i), expected_version=1)
    fs.close()
    before = path.stat().st_size
    with closing(sqlite3.connect(path)) as c:
        c.execute("VACUUM")
    assert path.stat().st_size < before
    fs = open_fresh(SqliteStore(path), anchor, initialise=False)
    fs.check()
    assert fs.get(NS, k(1)).value == b"v" * 200 and fs.get(NS, k(2)) is None
    assert len(fs.scan_prefix(SEARCH, bytes([3]) * PLEN)) == len(range(3, 400, 7))
    assert fs.audit() == []
    fs.close()
