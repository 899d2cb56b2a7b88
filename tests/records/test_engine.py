"""RecordEngine on both store engines: round trips, what the database sees, optimistic
concurrency, tampering through raw SQL, rotation and resumable rekey."""

from __future__ import annotations

import struct
import threading
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.crypto.envelope import envelope_key_id
from safehold.crypto.keyset import Keyset
from safehold.errors import ConflictError, RecordNotFoundError, RecordTamperedError, UnknownKeyError
from safehold.records.codec import UnsafePlainCodec
from safehold.records.engine import RecordEngine
from safehold.records.errors import (
    RecordConflictError,
    RecordCopiedError,
    RecordCorruptedError,
    RecordMovedError,
    RecordUnknownKeyError,
    RecordVersionMismatchError,
)
from safehold.records.rotation import RekeyCounts
from tests.support.engine_backends import Backend

NS = "patients"
SNS = "records:" + NS


@pytest.fixture
def engine(backend: Backend, keyset: Keyset) -> RecordEngine:
    return RecordEngine(backend.open(), keyset)


def _raw(backend: Backend, ns: str, key: bytes) -> tuple[int, bytes]:
    (row,) = backend.sql("SELECT version, value FROM {t} "
                         "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                         (ns, key))
    return row[0], row[1]


def _set_value(backend: Backend, ns: str, key: bytes, value: bytes) -> None:
    backend.sql("UPDATE {t} SET value = ? WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                (value, ns, key))


def _header_len(value: bytes) -> int:
    n = value[1]
    return 2 + n + 1 + value[2 + n] + 8


def _assert_no_plaintext(err: Exception, *secrets: object) -> None:
    msg = str(err)
    for s in secrets:
        text = s.decode("latin-1") if isinstance(s, bytes) else str(s)
        assert text not in msg, f"error message leaks {text!r}"


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_and_versions(engine: RecordEngine):
    assert engine.put(NS, "MRN-1", b"alice") == 1
    assert engine.get(NS, "MRN-1") == (b"alice", 1)
    assert engine.put(NS, "MRN-1", b"alice v2") == 2
    assert engine.get(NS, "MRN-1") == (b"alice v2", 2)
    assert engine.exists(NS, "MRN-1") and not engine.exists(NS, "MRN-2")
    assert engine.put(NS, "pati\u00ebnt \U0001f600", b"") == 1
    assert engine.get(NS, "pati\u00ebnt \U0001f600") == (b"", 1)
    big = bytes(range(256)) * 64
    engine.put(NS, "big", big)
    assert engine.get(NS, "big") == (big, 1)
    assert engine.list(NS) == sorted(["MRN-1", "pati\u00ebnt \U0001f600", "big"])
    assert engine.delete(NS, "MRN-1") is True
    assert engine.delete(NS, "MRN-1") is False
    with pytest.raises(RecordNotFoundError) as ei:
        engine.get(NS, "MRN-1")
    assert engine.row_index(NS, "MRN-1").hex() in str(ei.value)
    _assert_no_plaintext(ei.value, "MRN-1")
    assert engine.list("empty") == []
    assert sorted(k for k, _, _ in engine.items(NS)) == sorted(engine.list(NS))


def test_namespaces_are_separate(engine: RecordEngine):
    engine.put("a", "k", b"in a")
    engine.put("b", "k", b"in b")
    assert engine.get("a", "k") == (b"in a", 1)
    assert engine.get("b", "k") == (b"in b", 1)
    assert engine.row_index("a", "k") != engine.row_index("b", "k")
    assert engine.namespaces() == ["a", "b"]
    engine.delete("a", "k")
    assert engine.get("b", "k") == (b"in b", 1)


def test_prefixes_share_one_store(backend: Backend, keyset: Keyset):
    store = backend.open()
    e1 = RecordEngine(store, keyset, namespace_prefix="t1:")
    e2 = RecordEngine(store, keyset, namespace_prefix="t2:")
    e1.put(NS, "k", b"one")
    e2.put(NS, "k", b"two")
    assert e1.get(NS, "k")[0] == b"one" and e2.get(NS, "k")[0] == b"two"
    assert e1.namespaces() == [NS] == e2.namespaces()


def test_database_sees_no_record_key_or_value(backend: Backend, engine: RecordEngine):
    engine.put(NS, "MRN-000123", b"Alice Example, penicillin allergy")
    rows = backend.sql("SELECT n.name, r.key, r.version, r.value FROM {t} r JOIN {n} n ON n.id = r.ns "
                       "WHERE n.name = ?", (SNS,))
    assert len(rows) == 1
    ns, key, version, value = rows[0]
    assert key == engine.row_index(NS, "MRN-000123") and len(key) == 16
    assert version == 1
    assert b"MRN-000123" not in value and b"Alice" not in value and b"penicillin" not in value
    # every byte the database holds, in all tables
    everything = repr(backend.sql("SELECT * FROM {t}")).encode()
    assert b"MRN-000123" not in everything and b"Alice" not in everything


def test_bad_arguments(engine: RecordEngine):
    for ns in ("", "has space", "_reserved", "x" * 200):
        with pytest.raises(ValueError):
            engine.put(ns, "k", b"v")
    for key in ("", "\ud800", "x" * 5000):
        with pytest.raises(ValueError):
            engine.put(NS, key, b"v")
    with pytest.raises(ValueError):
        engine.put(NS, "k", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        engine.put(NS, "k", b"v", expected_version=-1)


def test_hypothesis_round_trip(engine: RecordEngine):
    seen: dict[str, bytes] = {}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(key=st.text(min_size=1, max_size=40), value=st.binary(max_size=2048))
    def check(key: str, value: bytes) -> None:
        version = engine.put(NS, key, value)
        seen[key] = value
        assert engine.get(NS, key) == (value, version)

    check()
    assert engine.list(NS) == sorted(seen)
    assert {k: engine.get(NS, k)[0] for k in seen} == seen


def test_plain_codec_round_trip_and_warns(backend: Backend, keyset: Keyset):
    with pytest.warns(UserWarning, match="benchmark baselines only"):
        codec = UnsafePlainCodec()
    eng = RecordEngine(backend.open(), keyset, namespace_prefix="plain:", codec=codec)
    eng.put(NS, "k", b"visible")
    assert eng.get(NS, "k") == (b"visible", 1)
    assert eng.list(NS) == ["k"]
    (row,) = backend.sql("SELECT value FROM {t} WHERE ns = (SELECT id FROM {n} WHERE name = ?)",
                         ("plain:" + NS,))
    assert b"visible" in row[0]  # the baseline really is unencrypted
    assert eng.rekey() == RekeyCounts()


# --- optimistic concurrency ------------------------------------------------------------------


def test_expected_version(engine: RecordEngine):
    assert engine.put(NS, "k", b"v1", expected_version=0) == 1
    with pytest.raises(RecordConflictError, match="expected no record, found version 1") as ei:
        engine.put(NS, "k", b"again", expected_version=0)
    assert isinstance(ei.value, ConflictError)
    assert ei.value.expected == 0 and ei.value.actual == 1
    assert engine.put(NS, "k", b"v2", expected_version=1) == 2
    with pytest.raises(ConflictError, match="expected version 1, found version 2") as ei:
        engine.put(NS, "k", b"zq-payload", expected_version=1)
    assert engine.row_index(NS, "k").hex() in str(ei.value)
    _assert_no_plaintext(ei.value, b"zq-payload")
    with pytest.raises(ConflictError, match="found no record"):
        engine.put(NS, "absent", b"x", expected_version=4)
    with pytest.raises(ConflictError):
        engine.delete(NS, "k", expected_version=1)
    assert engine.get(NS, "k") == (b"v2", 2)
    assert engine.delete(NS, "k", expected_version=2)


def test_two_writers_race_exactly_one_wins(backend: Backend, keyset: Keyset):
    """Two engines (as two replicas) on separate store objects race CAS writes on one record."""
    e1 = RecordEngine(backend.open(), keyset)
    e2 = RecordEngine(backend.open(), keyset)
    e1.put(NS, "shared", b"start")
    for _ in range(6):
        _, version = e1.get(NS, "shared")
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def write(name: str, eng: RecordEngine, version: int = version) -> None:
            barrier.wait()
            try:
                results[name] = eng.put(NS, "shared", name.encode(), expected_version=version)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                results[name] = e

        ts = [threading.Thread(target=write, args=(n, e)) for n, e in (("w1", e1), ("w2", e2))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wins = [n for n, r in results.items() if r == version + 1]
        losses = [r for r in results.values() if isinstance(r, RecordConflictError)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert e2.get(NS, "shared") == (wins[0].encode(), version + 1)


def test_concurrent_increments_lose_nothing(backend: Backend, keyset: Keyset):
    engines = [RecordEngine(backend.open(), keyset) for _ in range(2)]
    engines[0].put(NS, "counter", b"0")

    def bump(eng: RecordEngine, n: int) -> None:
        for _ in range(n):
            while True:
                value, version = eng.get(NS, "counter")
                try:
                    eng.put(NS, "counter", str(int(value) + 1).encode(), expected_version=version)
                    break
                except RecordConflictError:
                    continue

    ts = [threading.Thread(target=bump, args=(e, 10)) for e in engines]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert engines[0].get(NS, "counter") == (b"20", 21)


# --- tampering through the database ----------------------------------------------------------


def test_flipped_bits_are_refused(backend: Backend, engine: RecordEngine):
    engine.put(NS, "MRN-7", b"secret diagnosis")
    idx = engine.row_index(NS, "MRN-7")
    _, good = _raw(backend, SNS, idx)
    hl = _header_len(good)
    # one bit in: frame version, namespace, row key copy, version field, envelope key id,
    # nonce, ciphertext, tag
    for pos in (0, 3, hl - 12, hl - 1, hl + 2, hl + 8, hl + 20, len(good) - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x04
        _set_value(backend, SNS, idx, bytes(bad))
        with pytest.raises(RecordTamperedError) as ei:
            engine.get(NS, "MRN-7")
        err = ei.value
        # a bit in the key id yields "unknown key id"; everything else is "corrupted"
        assert isinstance(err, RecordCorruptedError | RecordUnknownKeyError), (pos, err)
        assert err.row_index == idx.hex() and idx.hex() in str(err)
        _assert_no_plaintext(err, "MRN-7", b"secret")
    _set_value(backend, SNS, idx, good)
    assert engine.get(NS, "MRN-7") == (b"secret diagnosis", 1)


def test_flipped_ciphertext_bit_is_corrupted(backend: Backend, engine: RecordEngine):
    engine.put(NS, "MRN-7", b"secret diagnosis")
    idx = engine.row_index(NS, "MRN-7")
    _, good = _raw(backend, SNS, idx)
    backend.sql(
        "UPDATE {t} SET value = ? WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
        (good[:-20] + bytes([good[-20] ^ 1]) + good[-19:], SNS, idx),
    )
    with pytest.raises(RecordCorruptedError, match="authentication failed") as ei:
        engine.get(NS, "MRN-7")
    assert ei.value.reason == "corrupted"
    with pytest.raises(RecordCorruptedError):
        engine.list(NS)
    with pytest.raises(RecordCorruptedError):
        engine.exists(NS, "MRN-7")


@pytest.mark.parametrize("cut", [0, 1, 5, 30, -1])
def test_truncated_value_is_corrupted(backend: Backend, engine: RecordEngine, cut: int):
    engine.put(NS, "k", b"value")
    idx = engine.row_index(NS, "k")
    _, good = _raw(backend, SNS, idx)
    _set_value(backend, SNS, idx, good[:cut])
    with pytest.raises(RecordCorruptedError) as ei:
        engine.get(NS, "k")
    assert idx.hex() in str(ei.value)


def test_planted_row_is_refused(backend: Backend, engine: RecordEngine):
    engine.put(NS, "real", b"x")  # registers the namespace
    idx = engine.row_index(NS, "planted")
    backend.sql("INSERT INTO {t} (ns, key, version, value) "
                "VALUES ((SELECT id FROM {n} WHERE name = ?), ?, 1, ?)",
                (SNS, idx, b"\x01garbage that is no envelope at all, long enough"))
    with pytest.raises(RecordCorruptedError):
        engine.exists(NS, "planted")


def test_value_copied_to_another_record(backend: Backend, engine: RecordEngine):
    engine.put(NS, "MRN-A", b"A's zq-chart")
    engine.put(NS, "MRN-B", b"B's zq-chart")
    ia, ib = engine.row_index(NS, "MRN-A"), engine.row_index(NS, "MRN-B")
    backend.sql(
        "UPDATE {t} SET value = (SELECT value FROM {t} "
        "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?) "
        "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
        (SNS, ia, SNS, ib),
    )
    with pytest.raises(RecordCopiedError) as ei:
        engine.get(NS, "MRN-B")
    err = ei.value
    assert err.reason == "copied-from-another-record" and err.row_index == ib.hex()
    assert ia.hex() in str(err)  # says where the value really belongs
    _assert_no_plaintext(err, "MRN-A", "MRN-B", b"zq-chart")
    with pytest.raises(RecordCopiedError):
        engine.list(NS)
    assert engine.get(NS, "MRN-A") == (b"A's zq-chart", 1)


def test_value_moved_to_another_namespace(backend: Backend, engine: RecordEngine):
    engine.put(NS, "MRN-1", b"patient data")
    engine.put("archive", "other", b"x")
    src = engine.row_index(NS, "MRN-1")
    dst = engine.row_index("archive", "MRN-1")
    # copy the row to where archive/MRN-1 would live
    backend.sql(
        "INSERT INTO {t} (ns, key, version, value) "
        "SELECT (SELECT id FROM {n} WHERE name = ?), ?, version, value FROM {t} "
        "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
        ("records:archive", dst, SNS, src),
    )
    with pytest.raises(RecordMovedError, match="sealed for store namespace 'records:patients'") as ei:
        engine.get("archive", "MRN-1")
    assert ei.value.reason == "moved-from-another-namespace" and ei.value.row_index == dst.hex()
    _assert_no_plaintext(ei.value, "MRN-1", b"patient data")
    # and a plain UPDATE of the row's namespace id is caught by list()
    backend.sql("UPDATE {t} SET ns = (SELECT id FROM {n} WHERE name = ?) "
                "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?", ("records:archive", SNS, src))
    with pytest.raises(RecordMovedError):
        engine.list("archive")


def test_changed_version_number(backend: Backend, engine: RecordEngine):
    engine.put(NS, "k", b"v1")
    engine.put(NS, "k", b"v2")
    idx = engine.row_index(NS, "k")
    backend.sql("UPDATE {t} SET version = version + 5 "
                "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?", (SNS, idx))
    with pytest.raises(RecordVersionMismatchError, match="sealed for version 2, row says 7") as ei:
        engine.get(NS, "k")
    assert ei.value.reason == "version-changed" and idx.hex() in str(ei.value)
    backend.sql("UPDATE {t} SET version = 1 WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                (SNS, idx))
    with pytest.raises(RecordVersionMismatchError, match="sealed for version 2, row says 1"):
        engine.get(NS, "k")


def test_unknown_key_id(backend: Backend, engine: RecordEngine, keyset: Keyset):
    engine.put(NS, "k", b"v")
    idx = engine.row_index(NS, "k")
    _, good = _raw(backend, SNS, idx)
    hl = _header_len(good)
    unknown = (keyset.primary_id % (2**32 - 1)) + 1
    forged = good[: hl + 1] + struct.pack(">I", unknown) + good[hl + 5 :]
    _set_value(backend, SNS, idx, forged)
    with pytest.raises(RecordUnknownKeyError, match=f"key id {unknown}") as ei:
        engine.get(NS, "k")
    assert isinstance(ei.value, UnknownKeyError) and isinstance(ei.value, RecordTamperedError)
    assert ei.value.key_id == unknown and ei.value.row_index == idx.hex()


def test_retired_key_without_rekey_is_unknown_key(engine: RecordEngine, keyset: Keyset):
    old = keyset.primary_id
    engine.put(NS, "k", b"v")
    keyset.add(primary=True)
    keyset.retire(old)
    with pytest.raises(RecordUnknownKeyError) as ei:
        engine.get(NS, "k")
    assert ei.value.key_id == old


def test_other_keyset_cannot_read(backend: Backend, engine: RecordEngine):
    engine.put(NS, "k", b"v")
    other = RecordEngine(backend.open(), Keyset.generate())
    with pytest.raises(RecordNotFoundError):  # different index key: different row address
        other.get(NS, "k")
    with pytest.raises(RecordTamperedError):
        other.list(NS)


# --- rotation and rekey ----------------------------------------------------------------------


def _fill(engine: RecordEngine, n: int, ns: str = NS) -> dict[str, bytes]:
    data = {f"MRN-{i:04d}": f"record {i}".encode() * (i % 5 + 1) for i in range(n)}
    for k, v in data.items():
        engine.put(ns, k, v)
    return data


def test_rotation_and_interrupted_rekey(backend: Backend, engine: RecordEngine, keyset: Keyset):
    old = keyset.primary_id
    data = _fill(engine, 25)
    data.update({f"x{i}": b"other ns" for i in range(5)})
    for i in range(5):
        engine.put("notes", f"x{i}", b"other ns")
    new = keyset.add(primary=True)
    engine.put(NS, "fresh", b"under new key")
    fresh = _raw(backend, SNS, engine.row_index(NS, "fresh"))[1]
    assert envelope_key_id(fresh[_header_len(fresh) :]) == new
    assert engine.key_usage() == {old: 30, new: 1}

    calls: list[RekeyCounts] = []

    class Interrupt(Exception):
        pass

    def progress(c: RekeyCounts) -> None:
        calls.append(c)
        if len(calls) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        engine.rekey(batch_size=7, progress=progress)
    # namespaces in order ("notes" then "patients"), counts cumulative
    assert calls[0] == RekeyCounts(namespace="notes", scanned=5, rekeyed=5)
    assert calls[1].namespace == NS and calls[1].scanned == 12 and calls[1].rekeyed >= 11
    usage = engine.key_usage()
    assert usage[new] > 1 and usage[old] > 0 and sum(usage.values()) == 31
    # everything still reads during the half-done rotation
    for k, v in data.items():
        assert engine.get("notes" if k.startswith("x") else NS, k)[0] == v

    final = engine.rekey(batch_size=7)
    assert final.namespace == "" and final.rekeyed == usage[old]
    assert final.scanned == 31 and final.already_current == 31 - usage[old]
    assert engine.key_usage() == {new: 31}
    keyset.retire(old)
    for k, v in data.items():
        assert engine.get("notes" if k.startswith("x") else NS, k)[0] == v
    assert engine.rekey().rekeyed == 0


def test_rekey_bumps_version_and_keeps_cas(engine: RecordEngine, keyset: Keyset):
    engine.put(NS, "k", b"v")
    keyset.add(primary=True)
    assert engine.rekey().rekeyed == 1
    assert engine.get(NS, "k") == (b"v", 2)
    with pytest.raises(RecordConflictError):
        engine.put(NS, "k", b"stale writer", expected_version=1)


def test_rekey_redoes_batch_after_concurrent_write(backend: Backend, engine: RecordEngine, keyset: Keyset):
    """A writer updates a row between rekey's read and its commit: the new value must win."""
    _fill(engine, 6)
    keyset.add(primary=True)
    other = RecordEngine(backend.open(), keyset)
    store = engine.store
    real_tx = store.transaction
    fired = []

    def racing_transaction():
        if not fired:
            fired.append(1)
            other.put(NS, "MRN-0003", b"written during rekey")
        return real_tx()

    store.transaction = racing_transaction  # type: ignore[method-assign]
    counts = engine.rekey(batch_size=100)
    assert counts.retried_batches == 1 and counts.rekeyed == 5  # MRN-0003 was already current
    assert engine.get(NS, "MRN-0003") == (b"written during rekey", 2)
    assert set(engine.key_usage()) == {keyset.primary_id}


def test_rekey_refuses_tampered_row_and_writes_nothing_of_its_batch(
    backend: Backend, engine: RecordEngine, keyset: Keyset
):
    _fill(engine, 5)
    old = keyset.primary_id
    keyset.add(primary=True)
    idx = engine.row_index(NS, "MRN-0002")
    backend.sql("UPDATE {t} SET version = version + 1 "
                "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                (SNS, idx))
    with pytest.raises(RecordVersionMismatchError):
        engine.rekey(batch_size=100)
    assert engine.key_usage() == {old: 5}


def test_rekey_argument_checks(engine: RecordEngine):
    with pytest.raises(ValueError):
        engine.rekey(batch_size=0)


def test_warning_free_default(engine: RecordEngine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.put(NS, "k", b"v")
        assert engine.get(NS, "k")[0] == b"v"


# --- paging and batches ----------------------------------------------------------------------


def test_list_page_walks_everything_and_can_skip_tampered(backend: Backend, engine: RecordEngine):
    data = _fill(engine, 23)
    got: list[str] = []
    after = None
    pages = 0
    while True:
        page = engine.list_page(NS, after=after, limit=5)
        got += page.keys
        pages += 1
        assert page.tampered == []
        if page.next_after is None:
            break
        after = page.next_after
    assert sorted(got) == sorted(data) and pages == 5
    bad = engine.row_index(NS, "MRN-0004")
    backend.sql("UPDATE {t} SET version = version + 1 "
                "WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                (SNS, bad))
    with pytest.raises(RecordVersionMismatchError):
        engine.list_page(NS, limit=100)
    page = engine.list_page(NS, limit=100, skip_tampered=True)
    assert "MRN-0004" not in page.keys and len(page.keys) == 22 and page.next_after is None
    assert [e.row_index for e in page.tampered] == [bad.hex()]


def test_put_many_is_atomic(backend: Backend, engine: RecordEngine):
    assert engine.put_many(NS, [("a", b"1", None), ("b", b"2", 0), ("c", b"3", None)]) == [1, 1, 1]
    assert engine.put_many(NS, [("a", b"1b", 1), ("d", b"4", None)]) == [2, 1]
    # one stale version: nothing of the batch is written
    with pytest.raises(RecordConflictError, match="expected version 1, found version 2"):
        engine.put_many(NS, [("e", b"5", None), ("a", b"stale", 1), ("b", b"2b", 1)])
    assert not engine.exists(NS, "e")
    assert engine.get(NS, "a") == (b"1b", 2) and engine.get(NS, "b") == (b"2", 1)
    assert engine.list(NS) == ["a", "b", "c", "d"]
    assert engine.put_many(NS, []) == []
    with pytest.raises(ValueError, match="twice"):
        engine.put_many(NS, [("x", b"", None), ("x", b"", None)])
    with pytest.raises(ValueError):
        engine.put_many(NS, [("x", "str", None)])  # type: ignore[list-item]


def test_sqlite_file_bytes_tampered_on_disk(tmp_path):
    """An attacker with the disk flips one bit of the ciphertext inside the database file."""
    import sqlite3

    from safehold.store.sqlite import SqliteStore

    path = tmp_path / "disk.db"
    ks = Keyset.generate()
    with SqliteStore(path) as store:
        engine = RecordEngine(store, ks)
        engine.put(NS, "MRN-9", b"on-disk secret " * 50)
        idx = engine.row_index(NS, "MRN-9")
        stored = store.get(SNS, idx).value
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    assert b"on-disk secret" not in data
    pos = data.find(stored[-48:])
    assert pos > 0 and data.count(stored[-48:]) == 1
    data[pos + 10] ^= 0x20
    path.write_bytes(bytes(data))
    with SqliteStore(path) as store:
        with pytest.raises(RecordCorruptedError, match="authentication failed") as ei:
            RecordEngine(store, ks).get(NS, "MRN-9")
        assert ei.value.row_index == idx.hex()
