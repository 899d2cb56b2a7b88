"""Row-level attacks by the database operator, on a real SQLite file and the real PostgreSQL
server: every one is refused with its own error naming the row's blind index, while running and
after a restart."""

from __future__ import annotations

import pytest

from safehold.errors import ConflictError
from safehold.freshness.errors import (
    PostingsStaleError,
    RowDeletedError,
    RowRestoredError,
    RowRolledBackError,
    RowsOmittedError,
)
from tests.support.freshness import PLEN, POSTINGS_NS, open_fresh

NS = "records:patients"
SEARCH = POSTINGS_NS  # "records:patients.postings", PLEN-byte prefixes


def key(i: int) -> bytes:
    return i.to_bytes(2, "big") * 8


def posting(term: int, rec: int) -> bytes:
    return bytes([term]) * PLEN + key(rec)


@pytest.fixture
def fresh(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    yield fs
    fs.close()


def _reopen(fs, engine, anchor):
    fs.close()
    return open_fresh(engine.open(), anchor)


def test_row_rolled_back_to_an_older_valid_version(engine, anchor, fresh):
    fresh.put(NS, key(1), b"allergy: none", expected_version=0)
    engine.sql("CREATE TABLE old_row AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients')")
    fresh.put(NS, key(1), b"allergy: penicillin", expected_version=1)
    assert fresh.get(NS, key(1)).value == b"allergy: penicillin"
    # the DBA puts back the older (value, version) pair, authentic in every byte
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients')")
    engine.sql("INSERT INTO safehold_rows SELECT * FROM old_row")
    with pytest.raises(RowRolledBackError) as e:
        fresh.get(NS, key(1))
    assert key(1).hex() in str(e.value) and "expected version 2, found version 1" in str(e.value)
    assert b"penicillin" not in str(e.value).encode()
    with pytest.raises(RowRolledBackError):
        fresh.scan(NS)
    with pytest.raises(RowRolledBackError):  # a write over the stale row is refused too
        fresh.put(NS, key(1), b"x", expected_version=1)
    fresh = _reopen(fresh, engine, anchor)  # across a restart: the map comes from the journal
    with pytest.raises(RowRolledBackError):
        fresh.get(NS, key(1))
    fresh.close()


def test_same_version_with_another_value(engine, fresh):
    fresh.put(NS, key(1), b"a", expected_version=0)
    fresh.put(NS, key(2), b"b", expected_version=0)
    engine.sql("UPDATE safehold_rows SET value = (SELECT value FROM safehold_rows WHERE key = ?) "
               "WHERE key = ?", (key(2), key(1)))
    with pytest.raises(RowRolledBackError, match="same version, another value"):
        fresh.get(NS, key(1))


def test_deleted_row_restored(engine, anchor, fresh):
    fresh.put(NS, key(3), b"patient", expected_version=0)
    engine.sql("CREATE TABLE keep AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients')")
    assert fresh.delete(NS, key(3))
    assert fresh.get(NS, key(3)) is None
    engine.sql("INSERT INTO safehold_rows SELECT * FROM keep")
    with pytest.raises(RowRestoredError) as e:
        fresh.get(NS, key(3))
    assert "expected no row" in str(e.value) and key(3).hex() in str(e.value)
    with pytest.raises(RowRestoredError):
        fresh.scan(NS)
    with pytest.raises(RowRestoredError):  # not silently "healed" by deleting it again
        fresh.delete(NS, key(3))
    fresh = _reopen(fresh, engine, anchor)
    with pytest.raises(RowRestoredError):
        fresh.get(NS, key(3))
    fresh.close()


def test_never_written_row_is_refused(engine, fresh):
    # the namespace was never written: the DBA names it in the dictionary first
    engine.name_namespace(NS)
    engine.sql("INSERT INTO safehold_rows (ns, key, version, value) "
               "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, 1, ?)"
               if engine.name == "sqlite" else
               "INSERT INTO safehold_rows (ns, key, version, value) "
               "VALUES ((SELECT id FROM safehold_namespaces WHERE name = %s), %s, 1, %s)",
               (NS, key(9), b"planted"))
    with pytest.raises(RowRestoredError):
        fresh.get(NS, key(9))


def test_live_row_deleted_by_the_dba_is_not_a_plain_none(engine, anchor, fresh):
    fresh.put(NS, key(4), b"x", expected_version=0)
    assert fresh.get(NS, key(5)) is None  # never existed: None
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients')")
    with pytest.raises(RowDeletedError) as e:
        fresh.get(NS, key(4))
    assert "deleted in the store" in str(e.value) and "expected version 1, found no row" in str(e.value)
    with pytest.raises(RowsOmittedError):
        fresh.scan(NS)
    with pytest.raises(RowDeletedError):  # an update of the vanished row is refused
        fresh.put(NS, key(4), b"y", expected_version=1)
    fresh = _reopen(fresh, engine, anchor)
    with pytest.raises(RowDeletedError):
        fresh.get(NS, key(4))
    fresh.close()


def test_page_with_rows_omitted(engine, fresh):
    with fresh.transaction() as tx:
        for i in range(30):
            tx.put(NS, key(i), b"r%d" % i, expected_version=0)
    first = fresh.scan(NS, limit=10)
    assert [r.key for r in first] == [key(i) for i in range(10)]
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients') "
               "AND key = ?", (key(14),))
    with pytest.raises(RowsOmittedError) as e:
        fresh.scan(NS, after=first[-1].key, limit=10)
    assert key(14).hex() in str(e.value)
    assert len(fresh.scan(NS, after=key(15), limit=100)) == 14  # pages not touching it still verify
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = 'records:patients') "
               "AND key = ?", (key(29),))
    with pytest.raises(RowsOmittedError, match="ended early") as e:
        fresh.scan(NS, after=key(25), limit=100)
    assert key(29).hex() in str(e.value)


def test_posting_group_omitted_restored_and_generic_scan(engine, anchor, fresh):
    with fresh.transaction() as tx:
        for rec in range(5):
            tx.put(SEARCH, posting(7, rec), b"id", expected_version=0)
            tx.put(SEARCH, posting(8, rec), b"id", expected_version=0)
    assert len(fresh.scan_prefix(SEARCH, bytes([7]) * PLEN)) == 5
    assert len(fresh.scan(SEARCH, limit=3)) == 3  # a generic page verifies whole groups
    assert len(fresh.scan(SEARCH, after=posting(7, 3), limit=100)) == 6
    engine.sql("CREATE TABLE gone AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (SEARCH,))
    with fresh.transaction() as tx:  # the record changed: its posting under term 7 goes away
        tx.delete(SEARCH, posting(7, 2))
    assert len(fresh.scan_prefix(SEARCH, bytes([7]) * PLEN)) == 4
    # the DBA puts the stale posting back
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (SEARCH,))
    engine.sql("INSERT INTO safehold_rows SELECT * FROM gone")
    with pytest.raises(PostingsStaleError) as e:
        fresh.scan_prefix(SEARCH, bytes([7]) * PLEN)
    assert "stale rows restored" in str(e.value) and (bytes([7]) * PLEN).hex() in str(e.value)
    with pytest.raises(PostingsStaleError):
        fresh.scan(SEARCH, limit=100)
    with pytest.raises(PostingsStaleError):
        fresh.get(SEARCH, posting(7, 2))
    # and a group hidden entirely
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (SEARCH,))
    with pytest.raises(PostingsStaleError, match="rows omitted"):
        fresh.scan_prefix(SEARCH, bytes([8]) * PLEN)
    with pytest.raises((PostingsStaleError, RowsOmittedError)):
        fresh.scan(SEARCH, limit=100)
    fresh = _reopen(fresh, engine, anchor)
    with pytest.raises(PostingsStaleError):
        fresh.scan_prefix(SEARCH, bytes([8]) * PLEN)
    fresh.close()


def test_posting_of_an_older_version(engine, fresh):
    fresh.put(SEARCH, posting(1, 1), b"old seal", expected_version=0)
    engine.sql("CREATE TABLE v1 AS SELECT * FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (SEARCH,))
    fresh.put(SEARCH, posting(1, 1), b"resealed", expected_version=1)  # rekey
    engine.sql("DELETE FROM safehold_rows WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (SEARCH,))
    engine.sql("INSERT INTO safehold_rows SELECT * FROM v1")
    with pytest.raises(PostingsStaleError, match="same count"):
        fresh.scan_prefix(SEARCH, bytes([1]) * PLEN)


def test_honest_use_raises_nothing_and_conflicts_stay_conflicts(engine, anchor, fresh):
    with fresh.transaction() as tx:
        for i in range(50):
            tx.put(NS, key(i), b"v", expected_version=0)
            tx.put(SEARCH, posting(i % 3, i), b"id", expected_version=0)
    for i in range(0, 50, 2):
        fresh.put(NS, key(i), b"w", expected_version=1)
    for i in range(0, 50, 5):
        fresh.delete(NS, key(i))
        fresh.delete(SEARCH, posting(i % 3, i))
    with pytest.raises(ConflictError):  # a stale caller gets a plain CAS conflict
        fresh.put(NS, key(1), b"z", expected_version=7)
    with pytest.raises(ConflictError):
        fresh.put(SEARCH, posting(1, 1), b"id", expected_version=0)
    assert fresh.audit() == []
    after, n = None, 0
    while True:
        page = fresh.scan(NS, after=after, limit=7)
        n += len(page)
        if len(page) < 7:
            break
        after = page[-1].key
    assert n == 40
    assert sum(len(fresh.scan_prefix(SEARCH, bytes([t]) * PLEN)) for t in range(3)) == 40
    fresh = _reopen(fresh, engine, anchor)
    assert fresh.audit() == [] and fresh.get(NS, key(2)).version == 2
    fresh.close()


def test_audit_finds_what_nobody_read(engine, fresh):
    with fresh.transaction() as tx:
        for i in range(20):
            tx.put(NS, key(i), b"v", expected_version=0)
    engine.sql("UPDATE safehold_rows SET version = 9 WHERE key = ?", (key(17),))
    engine.sql("DELETE FROM safehold_rows WHERE key = ?", (key(3),))
    found = fresh.audit()
    assert sorted(type(f).__name__ for f in found) == ["RowDeletedError", "RowRolledBackError"]
    assert {f.key for f in found} == {key(3), key(17)}


def test_posting_group_read_is_sized_by_the_map_and_still_sees_every_added_row(engine, fresh):
    """The first page of a group read is the map's row count + 2 (not 500 rows past the group);
    rows a DBA adds beyond it are still read and refused, and a group larger than a page is
    read whole."""
    with fresh.transaction() as tx:
        for rec in range(3):
            tx.put(SEARCH, posting(5, rec), b"id", expected_version=0)
        for rec in range(1200):  # a neighbour group bigger than one page (500 rows)
            tx.put(SEARCH, posting(6, rec), b"id", expected_version=0)
    scans: list[int] = []
    real_scan = fresh.inner.scan

    def counting_scan(ns, after=None, limit=100):  # every scan the FreshStore asks of the database
        scans.append(limit)
        return real_scan(ns, after=after, limit=limit)

    fresh.inner.scan = counting_scan
    try:
        assert len(fresh.scan_prefix(SEARCH, bytes([5]) * PLEN)) == 3
        assert len(fresh.scan_prefix(SEARCH, bytes([6]) * PLEN)) == 1200
    finally:
        del fresh.inner.scan
    assert scans and scans[0] == 5, scans  # 3 rows + 2: one small read, not a 500-row page
    # the DBA copies ten of group 6's rows into group 5 (authentic bytes, wrong place), more
    # than the first page of a group read holds
    rows = fresh.inner.scan(SEARCH, after=posting(6, 99), limit=10)  # the raw rows, unchecked
    assert [r.key for r in rows] == [posting(6, rec) for rec in range(100, 110)]
    for k, v, val in [(r.key, r.version, r.value) for r in rows]:
        engine.sql("INSERT INTO safehold_rows (ns, key, version, value) "
                   "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, ?, ?)",
                   (SEARCH, bytes([5]) * PLEN + k[PLEN:], v, val))
    with pytest.raises(PostingsStaleError) as e:
        fresh.scan_prefix(SEARCH, bytes([5]) * PLEN)
    assert (bytes([5]) * PLEN).hex() in str(e.value)
