"""Several writers of one ledger: two FreshStores (two replicas of one service) on one SQLite
file and on one PostgreSQL schema, writing concurrently, under the in-process anchor TEST
DOUBLE. Every acknowledged write is seen by both, no update is lost, and a rollback or a fork
is still detected with two writers."""

from __future__ import annotations

import threading
import time

import pytest

from safehold.errors import ConflictError
from safehold.freshness.errors import (
    AnchorUnavailableError,
    NotAnchoredError,
    RowDeletedError,
    RowRolledBackError,
    StoreForkedError,
)
from tests.support.freshness import PLEN, POSTINGS_NS, SqliteEngine, open_fresh

NS = "records:patients"
POST = POSTINGS_NS  # "records:patients.postings", PLEN-byte prefixes


def k(i: int) -> bytes:
    return b"row-%04d" % i


def _bump(fs, key: bytes) -> None:
    """Read-modify-write of a counter row with CAS, retried on a genuine conflict."""
    for _ in range(200):
        row = fs.get(NS, key)
        n = 0 if row is None else int(row.value)
        try:
            fs.put(NS, key, b"%d" % (n + 1), expected_version=0 if row is None else row.version)
            return
        except ConflictError:
            continue
    raise AssertionError("counter never committed")


def _notices_rollback_within_bound(fs, key: bytes, bound: float = 0.1 + 0.5) -> None:
    """``fs`` (a replica that did not write ``key``) refuses the rolled-back row within the
    staleness bound (sync_interval + a round trip)."""
    t0 = time.monotonic()
    while True:
        try:
            fs.get(NS, key)
        except RowRolledBackError:
            break
        assert time.monotonic() - t0 < 2.0, "the replica never noticed the rollback"
        time.sleep(0.01)
    assert time.monotonic() - t0 < bound


def run_two_writers(a, b, *, per_thread: int = 15, threads: int = 3) -> list[bytes]:
    """``threads`` writers on each store: own rows, postings and a shared counter."""
    errors: list[BaseException] = []
    acked: list[bytes] = []
    lock = threading.Lock()

    def work(fs, tag: int) -> None:
        try:
            for i in range(per_thread):
                key = b"w%02d-%04d" % (tag, i)
                with fs.transaction() as tx:
                    tx.put(NS, key, b"value %d/%d" % (tag, i), expected_version=0)
                    tx.put(POST, (b"family-%02d" % (i % 3)).ljust(PLEN, b".") + key, b"p",
                           expected_version=0)
                with lock:
                    acked.append(key)
                _bump(fs, b"counter")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    ts = [threading.Thread(target=work, args=(fs, t * 2 + j)) for t in range(threads)
          for j, fs in enumerate((a, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors[:3]
    return acked


def test_two_writers_on_one_database_concurrently(engine, anchor):
    a = open_fresh(engine.open(), anchor)
    b = open_fresh(engine.open(), anchor)
    acked = run_two_writers(a, b)
    for fs in (a, b):
        for key in acked:
            assert fs.get(NS, key) is not None
        assert int(fs.get(NS, b"counter").value) == len(acked)  # no lost update
        groups = [fs.scan_prefix(POST, (b"family-%02d" % g).ljust(PLEN, b".")) for g in range(3)]
        assert sum(len(g) for g in groups) == len(acked)
        assert fs.audit() == []
        assert fs.problem is None
    assert a.status()["caught_up"] > 0 and b.status()["caught_up"] > 0
    # both replicas end on the same anchored chain head
    a.sync()
    b.sync()
    assert a.state.anchored.same(b.state.anchored)
    assert a.state.committed.same(b.state.committed)
    a.close()
    b.close()
    c = open_fresh(engine.open(), anchor)  # a restart replays the interleaved journal
    c.check()
    assert int(c.get(NS, b"counter").value) == len(acked)
    c.close()


def test_a_replica_reads_what_the_other_acknowledged(engine, anchor):
    a = open_fresh(engine.open(), anchor, sync_interval=0)
    b = open_fresh(engine.open(), anchor, sync_interval=0)
    a.put(NS, k(1), b"one", expected_version=0)
    assert b.get(NS, k(1)).value == b"one"  # unknown row on b: caught up from the journal
    v = a.get(NS, k(1)).version
    a.put(NS, k(1), b"two", expected_version=v)
    assert b.get(NS, k(1)).value == b"two"
    assert [r.key for r in b.scan(NS)] == [k(1)]
    smith = b"smith".ljust(PLEN, b".")
    a.put(POST, smith + b"x1", b"p", expected_version=0)
    assert [r.key for r in b.scan_prefix(POST, smith)] == [smith + b"x1"]
    # a CAS on b with the version a wrote (b has not read it yet): caught up, accepted
    a.put(NS, k(2), b"a", expected_version=0)
    b.put(NS, k(2), b"b", expected_version=1)
    assert a.get(NS, k(2)).value == b"b"
    a.delete(NS, k(1))
    assert b.get(NS, k(1)) is None
    assert b.status()["caught_up"] >= 4
    a.close()
    b.close()


def test_rollback_is_detected_with_two_writers(engine, anchor):
    a = open_fresh(engine.open(), anchor, sync_interval=0.1)
    b = open_fresh(engine.open(), anchor, sync_interval=0)
    a.put(NS, k(1), b"old", expected_version=0)
    engine.sql("CREATE TABLE old_row AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    assert b.get(NS, k(1)).value == b"old"
    b.put(NS, k(1), b"new", expected_version=1)  # acknowledged by replica b
    # the database puts the old row back; replica a last saw the old row itself
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    engine.sql("INSERT INTO safehold_rows SELECT * FROM old_row")
    with pytest.raises(RowRolledBackError):
        b.get(NS, k(1))  # the writer knows at once
    _notices_rollback_within_bound(a, k(1))
    # and with the linearizable barrier, at once: a third replica that read the old row
    c = open_fresh(engine.open(), anchor, sync_interval=0)
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    with pytest.raises(RowDeletedError):
        c.sync()
        c.get(NS, k(1))
    for fs in (a, b, c):
        fs.close()


def test_a_writing_replica_skips_head_reads_and_still_notices_a_rollback(engine, anchor):
    """An accepted advance counts as a head read (docs/freshness.md, "Several writers"): a
    replica that commits more often than ``sync_interval`` reads no head, and still notices
    within the bound that the database serves it a row as it was before the other replica's
    acknowledged write (its next advance is refused, which makes it catch up)."""
    a = open_fresh(engine.open(), anchor, sync_interval=0.1)
    b = open_fresh(engine.open(), anchor, sync_interval=0)
    heads: list[float] = []
    real_head = anchor.head

    def counted_head(ledger: str):
        heads.append(time.monotonic())
        return real_head(ledger)

    anchor.head = counted_head
    a.put(NS, k(1), b"old", expected_version=0)
    engine.sql("CREATE TABLE old_row AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    stop = threading.Event()
    errors: list[BaseException] = []
    acked: list[float] = []  # when each of a's puts returned

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            try:
                a.put("records:other", b"own-%06d" % i, b"x", expected_version=0)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                return
            acked.append(time.monotonic())
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        time.sleep(0.2)
        quiet_from, acked_from = len(heads), len(acked)
        time.sleep(0.6)  # six sync intervals of writing: no head read was needed
        window = acked[max(acked_from - 1, 0):]
        # A loaded machine may stall the writer past its lease (2 * sync_interval); only then
        # may it read the head. Without such a stall, no head read is allowed at all.
        stalls = sum(1 for x, y in zip(window, window[1:]) if y - x > 2 * 0.1)
        assert len(window) >= 10, "the writing replica barely wrote: the test proves nothing"
        assert len(heads) - quiet_from <= stalls, "a replica that writes read the anchor's head"
        assert b.get(NS, k(1)).value == b"old"
        b.put(NS, k(1), b"new", expected_version=1)  # acknowledged by replica b
        engine.sql("DELETE FROM safehold_rows WHERE "
                   "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
        engine.sql("INSERT INTO safehold_rows SELECT * FROM old_row")
        _notices_rollback_within_bound(a, k(1))
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:1]
    for fs in (a, b):
        fs.close()


def test_a_frozen_replica_does_not_serve_a_row_older_than_the_other_replicas_write(engine, anchor):
    """The operator SIGSTOPs replica b past its head polls, has a acknowledge a write, then puts
    the row back as b last saw it. On waking, b's first read confirms the anchor's head first
    (its lease of ``2 * sync_interval`` ran out), catches up and refuses the row; before the
    lease, b served the old value with 200."""
    a = open_fresh(engine.open(), anchor, sync_interval=0.2)
    b = open_fresh(engine.open(), anchor, sync_interval=0.2)
    a.put(NS, k(1), b"v1", expected_version=0)
    b.sync()
    assert b.get(NS, k(1)).value == b"v1" and b.caught_up > 0
    engine.sql("CREATE TABLE v1_row AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    b.anchorer.stop()  # "frozen": no head poll, no advance from here on
    a.put(NS, k(1), b"v2", expected_version=1)  # acknowledged
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
    engine.sql("INSERT INTO safehold_rows SELECT * FROM v1_row")
    time.sleep(0.5)  # past b's lease; b's map still says v1
    with pytest.raises(RowRolledBackError):
        b.get(NS, k(1))
    # the anchor unreachable past the lease: nothing that may be stale is served
    c = open_fresh(engine.open(), anchor, sync_interval=0.2)
    a.put(NS, k(2), b"other", expected_version=0)
    c.sync()  # c has seen another writer's entry: the lease applies
    assert c.caught_up > 0
    c.anchorer.stop()
    cores = list(anchor.cores)
    anchor.cores = [None, None, cores[2]]
    time.sleep(0.5)
    try:
        with pytest.raises(AnchorUnavailableError, match="could not be confirmed"):
            c.get(NS, b"row-9999")
    finally:
        anchor.cores = cores
    for fs in (a, b, c):
        fs.close()


def test_after_the_owner_reanchors_through_one_writer_the_other_rejoins(engine, anchor):
    """The anchor loses the ledger (all members restarted): both writers stop serving; the
    owner re-anchors through a; b compares with the anchor again (``rejoin``: the records
    service does it every second) and serves, without a second owner statement."""
    from safehold.freshness.anchor.core import MemberCore
    from safehold.freshness.errors import AnchorLostError

    a = open_fresh(engine.open(), anchor, sync_interval=0.1)
    b = open_fresh(engine.open(), anchor, sync_interval=0.1)
    a.put(NS, k(1), b"v1", expected_version=0)
    b.sync()
    assert b.rejoin()  # fresh: nothing to do
    anchor.cores = [MemberCore(anchor.n, anchor.owner.public) for _ in range(anchor.n)]
    for i in range(anchor.n):  # every member restarted: ready in lost mode
        anchor.catch_up(i)
    for fs in (a, b):
        with pytest.raises(AnchorLostError):
            fs.sync()
    assert not b.rejoin()  # the anchor holds nothing yet: still not serving
    a.reanchor(anchor.sign_for(a, "reanchor"))
    assert a.get(NS, k(1)).value == b"v1"
    assert b.rejoin() and b.problem is None
    assert b.get(NS, k(1)).value == b"v1"
    b.put(NS, k(2), b"after", expected_version=0)
    a.sync()
    assert a.get(NS, k(2)).value == b"after"
    for fs in (a, b):
        fs.close()


def test_fork_is_detected_with_two_writers(engine, anchor, tmp_path):
    a = open_fresh(engine.open(), anchor)
    a.put(NS, k(1), b"x", expected_version=0)
    token = engine.backup()
    other = SqliteEngine(tmp_path / "copy.db")
    if engine.name == "sqlite":
        other.restore_file(token)
    else:
        import psycopg

        with psycopg.connect(engine.dsn) as conn:
            q = (f'SELECT n.name, b.key, b.version, b.value FROM "{engine.schema}".{token} b '
                 f'JOIN "{engine.schema}".safehold_namespaces n ON n.id = b.ns')
            rows = conn.execute(q).fetchall()
        other.open().close()
        for r in rows:  # the copy's namespace ids are its own: map by name
            other.sql("INSERT INTO safehold_namespaces (name) "
                      "VALUES (?) ON CONFLICT (name) DO NOTHING", (r[0],))
            other.sql("INSERT INTO safehold_rows "
                      "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, ?, ?)", tuple(r))
    b = open_fresh(engine.open(), anchor)  # a second writer on the same database: fine
    c = open_fresh(other.open(), anchor)  # a writer on a copy: another history
    a.put(NS, k(2), b"a", expected_version=0)
    with pytest.raises((StoreForkedError, NotAnchoredError)):  # same epoch, another entry
        c.put(NS, k(4), b"c", expected_version=0)
    with pytest.raises(StoreForkedError):
        c.check()
    b.put(NS, k(3), b"b", expected_version=0)
    assert a.problem is None and b.problem is None
    assert b.get(NS, k(2)).value == b"a" and a.get(NS, k(3)).value == b"b"
    c.close()
    for fs in (a, b):
        fs.close()


def test_catch_up_across_another_writers_snapshot(engine, anchor):
    a = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, sync_interval=0)
    b = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, sync_interval=0)
    b.get(NS, k(0))
    for i in range(30):
        a.put(NS, k(i), b"v%d" % i, expected_version=0)
    assert a.snapshotter.run()  # folds entries <= head into a snapshot, deletes them
    a.put(NS, k(99), b"after", expected_version=0)
    assert b.get(NS, k(5)).value == b"v5"  # b's entries were deleted: reloaded from the snapshot
    assert b.get(NS, k(99)).value == b"after"
    assert b.audit() == []
    b.put(NS, k(100), b"b", expected_version=0)
    assert a.get(NS, k(100)).value == b"b"
    a.close()
    b.close()
