"""Shared store suite: every test runs against SQLite (real file) and PostgreSQL (fresh schema)."""

from __future__ import annotations

import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.errors import ConflictError, StoreError
from safehold.store import Row, Store, open_store
from safehold.store.base import MAX_KEY, MAX_NAMESPACE
from safehold.store.errors import StoreClosedError, VersionConflictError
from safehold.store.sqlite import SqliteStore

ENGINES = ["sqlite", "postgres"]


def _make(engine: str, request: pytest.FixtureRequest, tmp_path) -> Store:
    if engine == "sqlite":
        return SqliteStore(tmp_path / "store.db", timeout=5)
    from safehold.store.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("pg_schema")
    return PostgresStore(dsn, schema=schema, max_size=4)


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path):
    s = _make(request.param, request, tmp_path)
    yield s
    s.close()


def test_get_missing_is_none(store: Store) -> None:
    assert store.get("ns", b"\x00nope") is None


def test_insert_update_cas(store: Store) -> None:
    assert store.put("ns", b"k1", b"v1", expected_version=0) == 1
    assert store.get("ns", b"k1") == Row("ns", b"k1", 1, b"v1")
    assert store.put("ns", b"k1", b"v2", expected_version=1) == 2
    assert store.get("ns", b"k1") == Row("ns", b"k1", 2, b"v2")
    # stale version and insert-over-existing both conflict, naming expected vs actual
    with pytest.raises(ConflictError, match=r"expected version 1, found version 2") as ei:
        store.put("ns", b"k1", b"v3", expected_version=1)
    assert isinstance(ei.value, VersionConflictError)
    assert (ei.value.expected, ei.value.actual, ei.value.key) == (1, 2, b"k1")
    with pytest.raises(ConflictError, match=r"expected no row \(insert\), found version 2"):
        store.put("ns", b"k1", b"v3", expected_version=0)
    # update of a missing row conflicts with actual 0
    with pytest.raises(ConflictError, match="found no row") as ei:
        store.put("ns", b"absent", b"x", expected_version=3)
    assert ei.value.actual == 0
    # nothing changed by the failed attempts
    assert store.get("ns", b"k1") == Row("ns", b"k1", 2, b"v2")
    assert store.get("ns", b"absent") is None


def test_conflict_message_has_no_value(store: Store) -> None:
    secret = b"PATIENT-SSN-123-45-6789"
    store.put("ns", b"k", secret, expected_version=0)
    with pytest.raises(ConflictError) as ei:
        store.put("ns", b"k", secret, expected_version=0)
    assert "SSN" not in str(ei.value) and secret.hex() not in str(ei.value)


def test_namespaces_are_separate(store: Store) -> None:
    store.put("a", b"k", b"in-a", expected_version=0)
    store.put("b", b"k", b"in-b", expected_version=0)
    assert store.get("a", b"k").value == b"in-a"
    assert store.get("b", b"k").value == b"in-b"
    assert [r.namespace for r in store.scan("a")] == ["a"]


def test_empty_and_binary_values(store: Store) -> None:
    store.put("ns", b"\x00", b"", expected_version=0)
    blob = bytes(range(256)) * 64
    store.put("ns", b"\xff" * MAX_KEY, blob, expected_version=0)
    assert store.get("ns", b"\x00").value == b""
    assert store.get("ns", b"\xff" * MAX_KEY).value == blob


def test_delete(store: Store) -> None:
    assert store.delete("ns", b"k") is False
    store.put("ns", b"k", b"v", expected_version=0)
    store.put("ns", b"k", b"v2", expected_version=1)
    with pytest.raises(ConflictError, match="expected version 1, found version 2"):
        store.delete("ns", b"k", expected_version=1)
    assert store.get("ns", b"k").version == 2
    assert store.delete("ns", b"k", expected_version=2) is True
    assert store.get("ns", b"k") is None
    with pytest.raises(ConflictError, match="found no row"):
        store.delete("ns", b"k", expected_version=2)
    # delete without version
    store.put("ns", b"k", b"again", expected_version=0)
    assert store.delete("ns", b"k") is True
    assert store.delete("ns", b"k") is False
    # re-insert after delete starts again at version 1
    assert store.put("ns", b"k", b"new", expected_version=0) == 1


def test_scan_paging_orders_by_bytes(store: Store) -> None:
    keys = [bytes([b]) + i.to_bytes(2, "big") for b in (0x00, 0x7F, 0x80, 0xFF) for i in range(13)]
    for k in reversed(keys):
        store.put("ns", k, k * 2, expected_version=0)
    store.put("other", b"\x01", b"x", expected_version=0)
    got: list[bytes] = []
    after = None
    pages = 0
    while True:
        page = store.scan("ns", after=after, limit=5)
        pages += 1
        assert len(page) <= 5
        got.extend(r.key for r in page)
        for r in page:
            assert r.value == r.key * 2 and r.version == 1 and r.namespace == "ns"
        if len(page) < 5:
            break
        after = page[-1].key
    assert got == sorted(keys)  # unsigned byte order: 0x80/0xff after 0x7f
    assert pages == len(keys) // 5 + 1
    assert [r.key for r in store.scan_all("ns", page=7)] == sorted(keys)
    assert store.scan("ns", after=b"\xff\xff\xff") == []
    assert store.scan("empty-ns") == []
    # after a key that is not stored: strictly greater ones follow
    assert store.scan("ns", after=b"\x7f\x00\x05\x00", limit=1)[0].key == b"\x7f\x00\x06"


def test_transaction_commits_atomically(store: Store) -> None:
    with store.transaction() as tx:
        for i in range(10):
            tx.put("ns", b"t%d" % i, b"v", expected_version=0)
        assert tx.get("ns", b"t3").version == 1
        assert len(tx.scan("ns")) == 10
    assert len(store.scan("ns")) == 10


def test_transaction_rolls_back_on_exception(store: Store) -> None:
    store.put("ns", b"keep", b"old", expected_version=0)
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.put("ns", b"keep", b"new", expected_version=1)
        tx.put("ns", b"fresh", b"x", expected_version=0)
        tx.delete("ns", b"keep", expected_version=2)
        raise RuntimeError("boom")
    assert store.get("ns", b"keep") == Row("ns", b"keep", 1, b"old")
    assert store.get("ns", b"fresh") is None


def test_transaction_conflict_rolls_back_all(store: Store) -> None:
    store.put("ns", b"a", b"a1", expected_version=0)
    with pytest.raises(ConflictError), store.transaction() as tx:
        tx.put("ns", b"new", b"n", expected_version=0)
        tx.put("ns", b"a", b"a2", expected_version=5)
    assert store.get("ns", b"new") is None
    assert store.get("ns", b"a").value == b"a1"


def test_nested_transaction_is_savepoint(store: Store) -> None:
    with store.transaction() as outer:
        outer.put("ns", b"outer", b"o", expected_version=0)
        with pytest.raises(ValueError, match="inner"), store.transaction() as inner:
            inner.put("ns", b"inner", b"i", expected_version=0)
            raise ValueError("inner")
        outer.put("ns", b"outer2", b"o", expected_version=0)
    assert store.get("ns", b"outer") is not None
    assert store.get("ns", b"outer2") is not None
    assert store.get("ns", b"inner") is None


def test_transaction_object_dead_after_exit(store: Store) -> None:
    with store.transaction() as tx:
        pass
    with pytest.raises(StoreError, match="transaction already ended"):
        tx.get("ns", b"k")


def test_threads_cas_exactly_one_wins(store: Store) -> None:
    store.put("ns", b"hot", b"0", expected_version=0)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            store.put("ns", b"hot", b"w%d" % i, expected_version=1)
            results.append("won")
        except ConflictError:
            results.append("conflict")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 3 + ["won"]
    assert store.get("ns", b"hot").version == 2


@pytest.mark.parametrize(
    ("ns", "key", "msg"),
    [
        ("", b"k", "namespace length"),
        ("x" * (MAX_NAMESPACE + 1), b"k", "namespace length"),
        ("bad space", b"k", "namespace contains ' '"),
        ("ünï", b"k", "namespace contains"),
        (b"ns", b"k", "namespace must be str"),
        ("ns", b"", "row key length"),
        ("ns", b"k" * (MAX_KEY + 1), "row key length"),
        ("ns", "k", "row key must be bytes"),
    ],
)
def test_bad_namespace_or_key(store: Store, ns, key, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        store.put(ns, key, b"v", expected_version=0)
    with pytest.raises(ValueError, match=msg):
        store.get(ns, key)
    with pytest.raises(ValueError, match=msg):
        store.delete(ns, key)


def test_bad_versions_and_limits(store: Store) -> None:
    with pytest.raises(ValueError, match="expected_version must be >= 0"):
        store.put("ns", b"k", b"v", expected_version=-1)
    with pytest.raises(ValueError, match="expected_version must be int"):
        store.put("ns", b"k", b"v", expected_version=True)
    with pytest.raises(ValueError, match="expected_version must be >= 1"):
        store.delete("ns", b"k", expected_version=0)
    with pytest.raises(ValueError, match="value must be bytes"):
        store.put("ns", b"k", "text", expected_version=0)
    with pytest.raises(ValueError, match="scan limit must be 1"):
        store.scan("ns", limit=0)
    with pytest.raises(ValueError, match="'after' must be bytes"):
        store.scan("ns", after="k")


def test_closed_store_refuses(store: Store) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        store.get("ns", b"k")


def test_open_store_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel.db") as s:
        assert isinstance(s, SqliteStore) and s.path.resolve() == (tmp_path / "rel.db").resolve()
    absolute = tmp_path / "abs.db"
    with open_store(f"sqlite:///{absolute}") as s:
        assert s.path == absolute
    with open_store(str(tmp_path / "plain.db")) as s:
        assert isinstance(s, SqliteStore)
    with pytest.raises(ValueError, match="unknown store URL scheme 'mysql'"):
        open_store("mysql://x/y")
    with pytest.raises(ValueError, match="empty"):
        open_store("")
    with pytest.raises(ValueError, match="must not name a host"):
        open_store("sqlite://host/x.db")


def test_threads_transactions_serialise_read_modify_write(store: Store) -> None:
    """Read-then-CAS in transactions from several threads: no lost update."""
    store.put("ns", b"counter", b"0", expected_version=0)
    per_thread, n_threads = 15, 3
    conflicts: list[int] = []

    def worker() -> None:
        done = 0
        while done < per_thread:
            try:
                with store.transaction() as tx:
                    row = tx.get("ns", b"counter")
                    assert row is not None
                    tx.put("ns", b"counter", b"%d" % (int(row.value) + 1), expected_version=row.version)
                done += 1
            except ConflictError:
                conflicts.append(1)  # lost the race: retry from a fresh read

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = store.get("ns", b"counter")
    assert int(row.value) == per_thread * n_threads
    assert row.version == per_thread * n_threads + 1


_keys = st.binary(min_size=1, max_size=MAX_KEY)
_values = st.binary(max_size=4096)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.dictionaries(_keys, _values, max_size=12), page=st.integers(1, 5))
def test_roundtrip_arbitrary_keys_and_values(store: Store, items: dict[bytes, bytes], page: int) -> None:
    ns = f"h{uuid.uuid4().hex[:12]}"  # fresh namespace per example (the store outlives examples)
    for k, v in items.items():
        assert store.put(ns, k, v, expected_version=0) == 1
    for k, v in items.items():
        assert store.get(ns, k) == Row(ns, k, 1, v)
    assert [(r.key, r.value) for r in store.scan_all(ns, page=page)] == sorted(items.items())
    for k in items:
        assert store.delete(ns, k, expected_version=1) is True
    assert store.scan(ns) == []


def test_store_calls_inside_transaction_join_it(store: Store) -> None:
    """On the thread holding a transaction, calls on the store itself are part of it (and
    cannot deadlock against it)."""
    store.put("ns", b"k", b"v1", expected_version=0)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.put("ns", b"k", b"v2", expected_version=1)
        assert store.get("ns", b"k").value == b"v2"  # sees the transaction's own write
        store.put("ns", b"k", b"v3", expected_version=2)
        raise RuntimeError("roll back")
    assert store.get("ns", b"k") == Row("ns", b"k", 1, b"v1")


def test_get_many_and_insert_new(store: Store) -> None:
    """The batched forms (issue 17) behave as get / put(expected_version=0) per row, inside and
    outside a transaction; an existing key is left alone and reported as not inserted."""
    store.put("ns", b"k2", b"old", expected_version=0)
    store.put("ns", b"k2", b"older", expected_version=1)
    assert store.get_many("ns", [b"k1", b"k2", b"k2"]) == [
        None, Row("ns", b"k2", 2, b"older"), Row("ns", b"k2", 2, b"older")]
    with store.transaction() as tx:
        assert tx.insert_new("ns", [(b"k1", b"a"), (b"k2", b"b"), (b"k3", b"c")]) == [True, False, True]
        assert tx.insert_new("ns", [(b"k4", b"d"), (b"k5", b"e")]) == [True, True]
        assert [r and r.value for r in tx.get_many("ns", [b"k1", b"k4"])] == [b"a", b"d"]
    assert store.insert_new("ns", [(b"k6", b"f"), (b"k1", b"x")]) == [True, False]  # no transaction
    got = {r.key: (r.version, r.value) for r in store.scan("ns", limit=10)}
    assert got == {b"k1": (1, b"a"), b"k2": (2, b"older"), b"k3": (1, b"c"), b"k4": (1, b"d"),
                   b"k5": (1, b"e"), b"k6": (1, b"f")}
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.insert_new("ns", [(b"k7", b"g"), (b"k8", b"h")])
            raise RuntimeError("rolled back")
    assert store.get_many("ns", [b"k7", b"k8"]) == [None, None]
