"""Posting format 5 (records/search.py): 10-byte term prefixes in the namespace ``.postings``.

The upgrade of a real store holding format-4 postings (``.search``, 16-byte prefixes) under a
FreshStore, on SQLite and PostgreSQL: rebuilt once at the first start, the same search answers,
the freshness checks unchanged (no ConfigError for the old namespace, no rollback alarm, a clean
full audit, restarts from the journal and from a snapshot), no rebuild at the next start. Then
the DBA's edits of format-5 postings over a FreshStore (value edited, row moved under another
term, row deleted) are refused, and a prefix collision between two terms fails closed.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing

import pytest

from safehold.crypto.keyset import Keyset
from safehold.freshness.errors import JournalCorruptError, PostingsStaleError
from safehold.freshness.group import FreshGroupCommit
from safehold.freshness.store import FreshStore
from safehold.freshness.vmap import NamespacePolicy
from safehold.records.access_audit import AccessAuditLog
from safehold.records.errors import RecordCorruptedError
from safehold.records.fresh import POSTINGS_POLICY
from safehold.records.model import parse_record
from safehold.records.reindex import INDEX_FORMAT, ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.records.search import OLD_PREFIX_LEN, PREFIX_LEN
from safehold.store.migrations import ROWS_TABLE as T
from tests.support.freshness import InProcessAnchor, PostgresEngine, SqliteEngine, open_fresh
from tests.support.old_postings import write_old_marker, write_with_old_index

#: The policy of the code before format 5 (records/fresh.py then): only the old namespace.
FORMAT4_POLICY = NamespacePolicy({"*.search": 16})


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "records.db")
    return PostgresEngine(request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema"))


def _repo(fs: FreshStore, keyset: Keyset) -> PatientRepository:
    c = FreshGroupCommit(fs)
    return PatientRepository(fs, keyset, committer=c,
                             audit=AccessAuditLog(fs, c, mac_key=b"k" * 32, checkpointed=True))


def _patients() -> list[tuple[str, dict]]:
    rnd = random.Random(5)
    ids = [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(40)] + ["p0", "patient_3"]
    return [(rid, {"resourceType": "Patient", "name": [{"family": ("Meyer", "Graf", "Ng")[i % 3],
                                                        "given": [f"Ann{i % 4}"]}],
                   "birthDate": f"19{70 + i % 5}-0{1 + i % 9}-1{i % 10}"}) for i, rid in enumerate(ids)]


def test_a_format_4_store_under_a_fresh_store_is_rebuilt_once_and_stays_fresh(engine):
    anchor, keyset = InProcessAnchor(), Keyset.generate()
    # 1. the code before format 5: its policy, format-4 rows in ".search", its marker
    fs = open_fresh(engine.open(), anchor, policy=FORMAT4_POLICY)
    repo = _repo(fs, keyset)
    old = write_with_old_index(repo, 4)
    pats = _patients()
    terms: dict[str, frozenset[str]] = {}
    for rid, body in pats[:30]:
        rec = parse_record(rid, body)
        repo.put("t", rec)
        terms[rid] = rec.postings
    write_old_marker(repo, 4)
    assert fs.snapshotter.run(), fs.snapshotter.last_error  # ".search" in a snapshot ...
    for rid, body in pats[30:]:  # ... and in the journal after it
        rec = parse_record(rid, body)
        repo.put("t", rec)
        terms[rid] = rec.postings
    repo.delete("t", pats[0][0])  # the old code's deletes: journaled removals in ".search"
    del terms[pats[0][0]]
    before: dict[str, set[str]] = {}
    for rid, ts in terms.items():
        for t in ts:
            before.setdefault(t, set()).add(rid)
    assert all(old.lookup(t) == want for t, want in before.items())
    old_rows = fs.scan(old.ns, limit=10_000)
    assert old_rows and {len(r.key) for r in old_rows} == {OLD_PREFIX_LEN + 16}
    fs.close()

    # 2. the new code opens it: no ConfigError, no finding; the old groups still check out
    fs = open_fresh(engine.open(), anchor, initialise=False)
    assert fs.problem is None, fs.problem
    assert dict(fs.state.vmap.policy.postings) == POSTINGS_POLICY
    repo = _repo(fs, keyset)
    assert repo.old_index_ns == old.ns and repo.index.ns.endswith(".postings")
    assert ensure_search_index(repo) == len(terms)  # rebuilt once
    assert fs.scan(old.ns, limit=10_000) == []  # the old rows dropped through the FreshStore
    rows = fs.scan(repo.index.ns, limit=10_000)
    assert {len(r.key) for r in rows} == {PREFIX_LEN + 16}
    assert len(rows) == sum(len(ts) for ts in terms.values())
    for t, want in before.items():
        assert repo.index.lookup(t) == want, t
    assert {i for i, _ in repo.search("t", {"family": "meyer"})} == before["family=meyer"]
    assert fs.audit() == []  # the background audit's full scan: every namespace fresh
    assert repo.engine.get(f"{repo.ns}.meta", "search-index-format")[0] == INDEX_FORMAT
    fs.close()

    # 3. restarts: from the journal, then from a snapshot holding both posting namespaces
    for snapshot in (False, True):
        fs = open_fresh(engine.open(), anchor, initialise=False)
        assert fs.problem is None, fs.problem
        repo = _repo(fs, keyset)
        assert ensure_search_index(repo) == 0  # no second rebuild
        for t, want in before.items():
            assert repo.index.lookup(t) == want, t
        assert fs.audit() == []
        if snapshot:
            repo.put("t", parse_record("after", {"resourceType": "Patient", "name": [{"family": "Meyer"}]}))
            assert fs.snapshotter.run(), fs.snapshotter.last_error
        fs.close()
    fs = open_fresh(engine.open(), anchor, initialise=False)
    try:
        assert fs.problem is None, fs.problem
        repo = _repo(fs, keyset)
        assert ensure_search_index(repo) == 0
        assert repo.index.lookup("family=meyer") == before["family=meyer"] | {"after"}
        assert fs.audit() == []
    finally:
        fs.close()


def test_the_old_policy_alone_cannot_open_a_format_5_store(engine):
    """Why ``*.search`` stays in the policy and format 5 has a namespace of its own: the
    freshness layer refuses a posting namespace whose prefix length changed (a snapshot records
    each namespace's kind and prefix length)."""
    anchor, keyset = InProcessAnchor(), Keyset.generate()
    fs = open_fresh(engine.open(), anchor)
    repo = _repo(fs, keyset)
    repo.put("t", parse_record("p1", {"resourceType": "Patient", "name": [{"family": "Meyer"}]}))
    assert fs.snapshotter.run(), fs.snapshotter.last_error
    fs.close()
    fs = open_fresh(engine.open(), anchor, initialise=False,
                    policy=NamespacePolicy({"*.postings": OLD_PREFIX_LEN, "*.search": OLD_PREFIX_LEN}))
    try:
        with pytest.raises(JournalCorruptError, match="policy"):
            fs.check()
    finally:
        fs.close()


@pytest.fixture
def fresh_sqlite(tmp_path) -> Iterator[tuple[PatientRepository, SqliteEngine]]:
    eng = SqliteEngine(tmp_path / "f.db")
    fs = open_fresh(eng.open(), InProcessAnchor())
    yield _repo(fs, Keyset.generate()), eng
    fs.close()


def _rows(db, ns: str) -> dict[bytes, bytes]:
    with closing(sqlite3.connect(db)) as c:
        return {bytes(k): bytes(v) for k, v in c.execute(
            f"SELECT key, value FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?)",
            (ns,))}


def _put_two(repo: PatientRepository) -> None:
    for rid, fam in (("a1", "Meyer"), ("a2", "Graf")):
        repo.put("t", parse_record(rid, {"resourceType": "Patient", "name": [{"family": fam}]}))


def test_dba_edits_of_format_5_postings_are_refused_over_a_fresh_store(fresh_sqlite):
    repo, eng = fresh_sqlite
    _put_two(repo)
    idx = repo.index
    p = idx.prefix("family=meyer")
    assert idx.lookup("family=meyer") == {"a1"}
    (k, v), = [(k, v) for k, v in _rows(eng.path, idx.ns).items() if k[:PREFIX_LEN] == p]
    upd = (f"UPDATE {T} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) "
           "AND key = ?")
    # value edited: keys and versions unchanged, so only the AES-SIV check sees it: refused
    eng.sql(upd, (v[:-1] + bytes([v[-1] ^ 1]), idx.ns, k))
    with pytest.raises(RecordCorruptedError):
        idx.lookup("family=meyer")
    eng.sql(upd, (v, idx.ns, k))
    assert idx.lookup("family=meyer") == {"a1"}
    # the row moved under another term's prefix (authentic bytes, wrong group): the group's
    # count and multiset hash differ
    g = idx.prefix("family=graf")
    eng.sql(f"UPDATE {T} SET key = ? WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) "
            "AND key = ?", (g + k[PREFIX_LEN:], idx.ns, k))
    with pytest.raises(PostingsStaleError):
        idx.lookup("family=graf")
    with pytest.raises(PostingsStaleError):
        idx.lookup("family=meyer")
    # deleted: the group is short of a row
    eng.sql(f"DELETE FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
            (idx.ns, g + k[PREFIX_LEN:]))
    with pytest.raises(PostingsStaleError):
        idx.lookup("family=meyer")
    assert idx.lookup("family=graf") == {"a2"}


def test_a_prefix_collision_between_two_terms_fails_closed_over_a_fresh_store(fresh_sqlite):
    """Two terms whose 10-byte prefixes collide (forced here; ~T²/2^81 for T terms) share a
    group: each lookup meets the other term's rows, which do not authenticate under it, and
    is refused — never an answer with the other term's records or without its own."""
    repo, _ = fresh_sqlite
    idx = repo.index
    idx._prefixes["family=graf"] = idx.prefix("family=meyer")  # the collision
    _put_two(repo)
    for term in ("family=meyer", "family=graf"):
        with pytest.raises(RecordCorruptedError):
            idx.lookup(term)
