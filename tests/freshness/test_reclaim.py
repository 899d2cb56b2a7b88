"""Step 5 of a snapshot (docs/freshness.md "Snapshots"): the pages the deleted journal freed go
back to the file system (SQLite ``incremental_vacuum``; PostgreSQL: nothing to do), and nothing
the freshness checks read changes — rows, versions, values, the journal head and the anchor —
also when the process is SIGKILLed in the middle of a reclaim step (real SQLite file)."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing

import pytest

from safehold.freshness.journal import JOURNAL_NS
from tests.support.freshness import PLEN, POSTINGS_NS, open_fresh
from tests.support.processes import kill_when_paused

NS = "records:patients"
SEARCH = POSTINGS_NS  # "records:patients.postings", PLEN-byte prefixes
NO_AUTO = {"snapshot_every": 0, "snapshot_seconds": 0, "snapshot_bytes": 0}


def k(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def _write(fs, n: int = 300) -> None:
    for j in range(0, n, 50):  # several journal entries of ~50 records each
        with fs.transaction() as tx:
            for i in range(j, j + 50):
                tx.put(NS, k(i), bytes([i % 251]) * 1500, expected_version=0)
                tx.insert_new(SEARCH, [(bytes([i % 5]) * PLEN + k(i), b"id")])


def _everything(fs) -> dict:
    """What a reader sees, through the verifying store."""
    return {
        "rows": [(r.key, r.version, r.value) for r in fs.scan_all(NS)],
        "postings": [[r.key for r in fs.scan_prefix(SEARCH, bytes([t]) * PLEN)] for t in range(5)],
        "head": fs.state.committed,
    }


def test_reclaim_after_a_snapshot_changes_nothing_the_checks_see(engine, anchor, monkeypatch):
    fs = open_fresh(engine.open(), anchor, **NO_AUTO)
    try:
        _write(fs)
        for i in range(200):  # whole pages of record rows freed
            fs.delete(NS, k(i), expected_version=1)
        monkeypatch.setattr(type(fs.inner), "reclaim", lambda self, max_pages=None, **kw: 0)
        assert fs.snapshotter.run() is True, fs.snapshotter.last_error
        assert len(list(fs.inner.scan_all(JOURNAL_NS))) == 1  # the snapshot's own entry
        monkeypatch.undo()
        fs.sync()
        before = _everything(fs)
        free = fs.inner.free_pages() if engine.name == "sqlite" else 0
        assert engine.name != "sqlite" or free > 20
        assert fs.reclaim() == free  # PostgreSQL: nothing to do (autovacuum)
        if engine.name == "sqlite":
            assert fs.inner.free_pages() == 0
        fs.check()
        assert _everything(fs) == before  # rows, versions, values, postings, journal head
        assert fs.audit() == []
    finally:
        fs.close()
    fs = open_fresh(engine.open(), anchor, initialise=False, **NO_AUTO)
    try:
        assert fs.problem is None, fs.problem
        assert _everything(fs) == before and fs.audit() == []
        # the snapshotter does it itself (step 5) after deleting the journal it covers
        for i in range(200, 300):
            fs.delete(NS, k(i), expected_version=1)
        assert fs.snapshotter.run() is True, fs.snapshotter.last_error
        if engine.name == "sqlite":
            assert fs.inner.free_pages() == 0
        assert list(fs.scan_all(NS)) == []
        assert fs.audit() == []
    finally:
        fs.close()


def test_a_failing_reclaim_leaves_the_snapshot_done(tmp_path, anchor, monkeypatch, caplog):
    from safehold.errors import StoreUnavailableError
    from safehold.store.sqlite import SqliteStore

    fs = open_fresh(SqliteStore(tmp_path / "f.db"), anchor, **NO_AUTO)
    try:
        _write(fs, 100)

        def locked(self, max_pages=None, **kw):  # noqa: ANN001, ANN202
            raise StoreUnavailableError("database stayed locked")

        monkeypatch.setattr(SqliteStore, "reclaim", locked)
        assert fs.snapshotter.run() is True and fs.snapshotter.last_error is None
        assert "giving free pages back to the file system failed" in caplog.text
        assert fs.inner.free_pages() > 0  # still free, reused by later writes
        monkeypatch.undo()
        fs.put(NS, k(999), b"w", expected_version=0)
        assert fs.snapshotter.run() is True and fs.inner.free_pages() == 0  # the next one retries
        fs.check()
        assert fs.audit() == []
    finally:
        fs.close()


# A child process reclaims the FreshStore's file (the store under it, as the snapshotter does),
# stopped by a trace hook in the middle of its second step, then SIGKILLed by the parent.
_CHILD = """
import sys
from safehold.store.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
seen = 0

def trace(sql):
    global seen
    if sql.startswith("PRAGMA incremental_vacuum"):
        seen += 1
        if seen == 15:
            print("paused", flush=True)
            sys.stdin.read()  # until killed

store._connection().set_trace_callback(trace)
store.reclaim(step=10)
"""


@pytest.mark.slow
def test_sigkill_during_reclaim_changes_nothing_the_checks_see(tmp_path, anchor):
    from safehold.store.sqlite import SqliteStore

    path = tmp_path / "kill.db"
    fs = open_fresh(SqliteStore(path), anchor, **NO_AUTO)
    _write(fs)
    for i in range(200):  # whole pages of record rows freed
        fs.delete(NS, k(i), expected_version=1)
    fs.sync()
    before = _everything(fs)
    free = fs.inner.free_pages()
    assert free > 15  # the child stops after 15 pages, 10 of them committed
    fs.close()
    kill_when_paused([sys.executable, "-c", _CHILD, str(path)])
    with closing(sqlite3.connect(path)) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert c.execute("PRAGMA freelist_count").fetchone()[0] == free - 10  # step 1 only
    fs = open_fresh(SqliteStore(path), anchor, initialise=False, **NO_AUTO)
    try:
        assert fs.problem is None, fs.problem
        fs.check()
        assert _everything(fs) == before
        assert fs.audit() == []
        assert fs.reclaim() == free - 10 and fs.inner.free_pages() == 0
        assert _everything(fs) == before and fs.audit() == []
        fs.put(NS, k(1000), b"after", expected_version=0)
    finally:
        fs.close()
    fs = open_fresh(SqliteStore(path), anchor, initialise=False)
    try:
        assert fs.problem is None and fs.get(NS, k(1000)).value == b"after"
    finally:
        fs.close()


def test_corruption_found_by_reclaim_is_logged_as_error_and_in_status(tmp_path, anchor, monkeypatch, caplog):
    """Fault injection (the real StoreCorruptError of an edited free-page list is shown in
    tests/store/test_reclaim.py): the snapshot stays done, the log says ERROR and names the
    corruption, the health status carries it, and the next good round clears it."""
    import logging

    from safehold.store.errors import StoreCorruptError
    from safehold.store.sqlite import SqliteStore

    fs = open_fresh(SqliteStore(tmp_path / "f.db"), anchor, **NO_AUTO)
    try:
        _write(fs, 100)

        def corrupt(self, max_pages=None, **kw):  # noqa: ANN001, ANN202
            raise StoreCorruptError("incremental_vacuum: database disk image is malformed")

        monkeypatch.setattr(SqliteStore, "reclaim", corrupt)
        with caplog.at_level(logging.ERROR):
            assert fs.snapshotter.run() is True
        assert any(r.levelno == logging.ERROR and "corrupt" in r.getMessage() for r in caplog.records)
        assert "malformed" in fs.status()["snapshot_error"]
        monkeypatch.undo()
        fs.put(NS, k(999), b"w", expected_version=0)
        assert fs.snapshotter.run() is True and fs.status()["snapshot_error"] is None
    finally:
        fs.close()
