"""Free pages go back to the file system (issue 17, docs/storage.md "Free pages"): a new SQLite
file has ``auto_vacuum = INCREMENTAL`` and :meth:`SqliteStore.reclaim` shrinks it in bounded
transactions without changing a row; a file created without the mode keeps working and is
left alone until an offline ``VACUUM`` switches it; a process SIGKILLed in the middle of a
reclaim step loses nothing. All on real files; PostgreSQL's reclaim is a no-op."""

from __future__ import annotations

import logging
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from safehold.errors import StoreError
from safehold.store import Row, Store
from safehold.store.sqlite import SqliteStore
from tests.support.processes import kill_when_paused

NS = "records:patients"
VALUE = 3000  # bytes: a few rows per 16 KiB page, so deleting rows frees whole pages


def k(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def _fill(store: Store, n: int = 400) -> None:
    with store.transaction() as tx:
        for i in range(n):
            tx.put(NS, k(i), bytes([i % 251]) * VALUE, expected_version=0)


def _delete_most(store: Store, n: int = 400) -> None:
    with store.transaction() as tx:
        for i in range(n):
            if i % 10:
                tx.delete(NS, k(i))


def _rows(store: Store) -> list[Row]:
    return list(store.scan_all(NS))


def _pragma(path: Path, name: str) -> int:
    with closing(sqlite3.connect(path)) as c:
        return int(c.execute(f"PRAGMA {name}").fetchone()[0])


def _checkpoint(path: Path) -> None:
    with closing(sqlite3.connect(path)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def test_new_file_is_incremental_and_reclaim_shrinks_it_without_changing_a_row(tmp_path):
    path = tmp_path / "r.db"
    s = SqliteStore(path)
    try:
        assert s.auto_vacuum == "incremental" and _pragma(path, "auto_vacuum") == 2
        _fill(s)
        _delete_most(s)
        kept = _rows(s)
        _checkpoint(path)
        free, size = s.free_pages(), path.stat().st_size
        assert free > 50 and _pragma(path, "freelist_count") == free
        assert s.reclaim() == free
        assert s.free_pages() == 0 and s.reclaim() == 0
        _checkpoint(path)  # WAL mode: the file is cut when the WAL is copied back
        page = _pragma(path, "page_size")
        assert path.stat().st_size <= size - free * page
        assert _rows(s) == kept
        with closing(sqlite3.connect(path)) as c:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        s.put(NS, k(10), b"after", expected_version=1)  # the store keeps working
        assert s.get(NS, k(10)) == Row(NS, k(10), 2, b"after")
    finally:
        s.close()


def test_reclaim_is_bounded(tmp_path):
    s = SqliteStore(tmp_path / "r.db")
    try:
        _fill(s)
        _delete_most(s)
        free = s.free_pages()
        assert free > 20
        assert s.reclaim(7, step=3) == 7  # three transactions: 3 + 3 + 1 pages
        assert s.free_pages() == free - 7
        assert s.reclaim(0) == 0 and s.free_pages() == free - 7
        assert s.reclaim(step=5) == free - 7 and s.free_pages() == 0
        for bad in (-1, True):
            with pytest.raises(ValueError, match="max_pages"):
                s.reclaim(bad)
        with pytest.raises(ValueError, match="step"):
            s.reclaim(step=0)
    finally:
        s.close()


def test_reclaim_inside_a_transaction_is_refused(tmp_path):
    s = SqliteStore(tmp_path / "r.db")
    try:
        _fill(s, 20)
        with s.transaction() as tx:
            tx.delete(NS, k(1))
            with pytest.raises(StoreError, match="inside a transaction"):
                s.reclaim()
        assert s.get(NS, k(1)) is None  # the transaction itself went on and committed
    finally:
        s.close()


def test_file_without_auto_vacuum_keeps_working_until_an_offline_vacuum_switches_it(tmp_path, caplog):
    path = tmp_path / "old.db"
    s = SqliteStore(path)
    _fill(s)
    s.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as c:  # as files before issue 17
        c.execute("PRAGMA auto_vacuum = NONE")
        c.execute("VACUUM")
    assert _pragma(path, "auto_vacuum") == 0

    with caplog.at_level(logging.WARNING, logger="safehold.store"):
        s = SqliteStore(path)
    try:
        assert s.auto_vacuum == "none" and "created without auto_vacuum" in caplog.text
        _delete_most(s)
        free = s.free_pages()
        assert free > 50
        assert s.reclaim() == 0 and s.free_pages() == free  # left alone, not switched
        assert _pragma(path, "auto_vacuum") == 0
        more = [(k(1000 + i), b"n" * VALUE) for i in range(30)]
        with s.transaction() as tx:  # free pages are reused as before
            assert tx.insert_new(NS, more) == [True] * 30
        assert s.free_pages() < free
        kept = _rows(s)
    finally:
        s.close()

    # the documented offline step (docs/storage.md, service stopped)
    with closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("PRAGMA auto_vacuum = INCREMENTAL")
        c.execute("VACUUM")
    s = SqliteStore(path)
    try:
        assert s.auto_vacuum == "incremental" and s.free_pages() == 0
        assert _rows(s) == kept
        with s.transaction() as tx:
            for key, _ in more:
                tx.delete(NS, key)
        assert s.free_pages() > 0 and s.reclaim() > 0 and s.free_pages() == 0
    finally:
        s.close()


# The child reclaims with a trace hook that stops it in the middle of its second step (after
# the first step committed, with part of the second one's pages moved) and says so; the
# parent then SIGKILLs it. No timing: the kill lands exactly there.
_CHILD = """
import sys
from safehold.store.sqlite import SqliteStore

path, step = sys.argv[1], int(sys.argv[2])
store = SqliteStore(path)
seen = 0

def trace(sql):
    global seen
    if sql.startswith("PRAGMA incremental_vacuum"):
        seen += 1
        if seen == step + step // 2:
            print("paused", flush=True)
            sys.stdin.read()  # until killed

store._connection().set_trace_callback(trace)
store.reclaim(step=step)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_reclaim_step_loses_nothing(tmp_path):
    path = tmp_path / "kill.db"
    s = SqliteStore(path)
    _fill(s)
    _delete_most(s)
    kept, free = _rows(s), s.free_pages()
    s.close()
    step = 10
    assert free > 2 * step

    def committed_first_step_only() -> None:
        # the first step is committed, the second is not: other connections see exactly that
        assert _pragma(path, "freelist_count") == free - step

    kill_when_paused([sys.executable, "-c", _CHILD, str(path), str(step)], committed_first_step_only)
    s = SqliteStore(path)
    try:
        with closing(sqlite3.connect(path)) as c:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert s.free_pages() == free - step  # the killed step rolled back whole
        assert _rows(s) == kept
        assert s.reclaim() == free - step and s.free_pages() == 0
        assert _rows(s) == kept
    finally:
        s.close()


def test_postgres_reclaim_is_a_no_op(request, tmp_path):
    from safehold.store.postgres import PostgresStore

    s = PostgresStore(
        request.getfixturevalue("postgres_dsn"), schema=request.getfixturevalue("pg_schema"), max_size=2
    )
    try:
        _fill(s, 20)
        _delete_most(s, 20)
        kept = _rows(s)
        assert s.reclaim() == 0 and _rows(s) == kept
    finally:
        s.close()


def test_a_free_page_list_edited_to_point_at_live_pages_is_corruption(tmp_path: Path) -> None:
    """The DBA points the header's first free-list trunk page (offset 32, SQLite file format
    §1.3) at a live page: reclaim refuses with StoreCorruptError instead of freeing live data."""
    import struct

    from safehold.store.errors import StoreCorruptError

    path = tmp_path / "s.db"
    store = SqliteStore(path)
    _fill(store)
    _delete_most(store)
    assert store.free_pages() > 0
    store.close()
    with closing(sqlite3.connect(path)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    assert struct.unpack(">I", raw[32:36])[0] > 2  # a trunk page exists
    raw[32:36] = struct.pack(">I", 2)
    path.write_bytes(bytes(raw))
    store = SqliteStore(path)
    try:
        with pytest.raises(StoreCorruptError, match="corrupt"):
            store.reclaim()
    finally:
        store.close()
