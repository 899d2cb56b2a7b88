"""PatientRepository over the real encrypted engine and a real SQLite file: search, audit, CAS,
tampering, concurrency. (The end-to-end tests with processes are in tests/records/test_server.py.)"""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError, RecordNotFoundError, RecordTamperedError
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.errors import AlreadyExistsError, InvalidRecordError, PreconditionFailedError
from safehold.records.model import encode_record, parse_batch, parse_record
from safehold.records.repository import PatientRepository
from safehold.records.scone import score
from safehold.records.search import PREFIX_LEN
from safehold.store import open_store
from safehold.store.migrations import ROWS_TABLE as T
from tests.support.sqlite_damage import duplicate_leaf_page


def put(repo, who, rid, record, **kw):
    """A write as every edge makes it: the record rules once, then the repository."""
    return repo.put(who, parse_record(rid, record), **kw)


def pat(rid, family, given="Ann", bd="1970-01-01"):
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family, "given": [given]}],
            "birthDate": bd, "gender": "female"}


def test_put_get_search_delete(repo):
    assert put(repo, "u", "a1", pat("a1", "Smith")).status == "created"
    put(repo, "u", "a2", pat("a2", "Smith", bd="1980-02-02"))
    put(repo, "u", "a3", pat("a3", "Jones"))
    rec, v = repo.get("u", "a1")
    assert rec == pat("a1", "Smith") and v == 1
    assert [i for i, _ in repo.search("u", {"family": "SMITH"})] == ["a1", "a2"]
    assert [i for i, _ in repo.search("u", {"family": "smith", "birthDate": "1980-02-02"})] == ["a2"]
    assert repo.search("u", {"family": "nobody"}) == []
    # rename: the old term stops matching
    assert put(repo, "u", "a1", pat("a1", "Brown")).status == "updated"
    assert [i for i, _ in repo.search("u", {"family": "smith"})] == ["a2"]
    assert [i for i, _ in repo.search("u", {"family": "brown"})] == ["a1"]
    assert put(repo, "u", "a1", pat("a1", "Brown"), skip_identical=True).status == "unchanged"
    repo.delete("u", "a1")
    with pytest.raises(RecordNotFoundError):
        repo.get("u", "a1")
    assert repo.search("u", {"family": "brown"}) == []
    with pytest.raises(InvalidRecordError):
        repo.search("u", {"address": "x"})
    # gender has no postings: alone it scans every record (and re-checks each)
    assert [i for i, _ in repo.search("u", {"gender": "female"})] == ["a2", "a3"]
    put(repo, "u", "m1", {**pat("m1", "Smith"), "gender": "male",
                         "identifier": [{"system": "urn:x", "value": "ID-9"}]})
    assert [i for i, _ in repo.search("u", {"family": "smith", "gender": "male"})] == ["m1"]
    assert [i for i, _ in repo.search("u", {"identifier": "urn:x|ID-9"})] == ["m1"]
    assert [i for i, _ in repo.search("u", {"identifier": "id-9"})] == ["m1"]
    assert repo.search("u", {"identifier": "urn:other|ID-9"}) == []
    repo.delete("u", "m1")
    with pytest.raises(InvalidRecordError):
        put(repo, "u", "bad id", {})
    ids, nxt = repo.list_ids("u", cursor=None, limit=1)
    ids2, nxt2 = repo.list_ids("u", cursor=nxt, limit=10)
    assert sorted(ids + ids2) == ["a2", "a3"] and nxt2 is None


def test_versions_and_create_only(repo):
    put(repo, "u", "x", {"a": 1})
    with pytest.raises(AlreadyExistsError):
        put(repo, "u", "x", {"a": 2}, create_only=True)
    with pytest.raises(PreconditionFailedError):
        put(repo, "u", "x", {"a": 2}, expected_version=5)
    assert put(repo, "u", "x", {"a": 2}, expected_version=1).version == 2
    assert score(encode_record({"a": 2})) == score(encode_record({"a": 2})) != score(encode_record({"a": 3}))
    assert 0 <= score(encode_record({"a": 2})) < 1


def test_database_holds_no_plaintext(repo):
    put(repo, "u", "patient-7f3a", {"fname": "Zebulon", "lname": "Quixotic", "ssn": "999-12-3456"})
    raw = repo.db_path.read_bytes() + (repo.db_path.parent / "r.db-wal").read_bytes()
    for s in (b"Zebulon", b"zebulon", b"Quixotic", b"quixotic", b"999-12-3456", b"patient-7f3a"):
        assert s not in raw


def test_tampered_row_fails_alone_and_audit_chain(repo):
    for i in range(3):
        put(repo, "u", f"p{i}", pat(f"p{i}", "Same"))
    conn = sqlite3.connect(repo.db_path)
    bi = repo.blind_index("p1")
    (val,) = conn.execute(f"SELECT value FROM {T} WHERE key = ?", (bi,)).fetchone()
    val = bytearray(val)
    val[-3] ^= 1
    conn.execute(f"UPDATE {T} SET value = ? WHERE key = ?", (bytes(val), bi))
    conn.commit()
    with pytest.raises(RecordTamperedError, match=bi.hex()):
        repo.get("u", "p1")
    assert repo.get("u", "p0")[0]["id"] == "p0"
    ids, _ = repo.list_ids("u", cursor=None, limit=100)
    assert sorted(ids) == ["p0", "p2"]
    n = repo.audit.verify()
    assert n > 5
    entries = list(repo.audit.entries())
    assert any(e.body["outcome"] == "tampered" and e.body["record"] == bi.hex() for e in entries)
    dump = b"".join(json.dumps(e.body).encode() for e in entries)
    assert b"p1" not in dump.replace(bi.hex().encode(), b"")
    # edit one audit entry in the database: verify names it
    key = (3).to_bytes(8, "big")
    (aval,) = conn.execute(f"SELECT value FROM {T} WHERE key = ? AND ns = (SELECT id "
                           f"FROM safehold_namespaces WHERE name = 'records.audit')",
                           (key,)).fetchone()
    assert b'"who":"u"' in aval
    conn.execute(f"UPDATE {T} SET value = ? WHERE key = ? AND ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit')",
                 (aval.replace(b'"who":"u"', b'"who":"x"'), key))
    conn.commit()
    with pytest.raises(AuditChainError, match="entry 3"):
        repo.audit.verify()


def test_concurrent_writers_lose_no_update(repo):
    put(repo, "u", "shared", {"writers": []})
    errors = []

    def writer(n):
        try:
            # each writer adds itself to one shared record (read-modify-write with CAS) and
            # creates its own record under a shared family name (contended search entry)
            put(repo, f"w{n}", f"own{n}", pat(f"own{n}", "Crowd"))
            for _ in range(200):
                rec, v = repo.get(f"w{n}", "shared")
                rec["writers"].append(n)
                try:
                    put(repo, f"w{n}", "shared", rec, expected_version=v)
                    return
                except PreconditionFailedError:
                    continue
            errors.append(n)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    rec, v = repo.get("u", "shared")
    assert sorted(rec["writers"]) == list(range(20)) and v == 21
    assert sorted(i for i, _ in repo.search("u", {"family": "crowd"})) == sorted(f"own{n}" for n in range(20))
    repo.audit.verify()


def test_postings_tamper_copy_and_rekey(repo):
    for i in range(30):  # ids long enough not to turn up in random ciphertext by chance
        put(repo, "u", f"hid-{i:04d}-posting", pat(f"hid-{i:04d}-posting", "Common", given=f"G{i}"))
    assert len(repo.search("u", {"family": "common"})) == 30
    idx = repo.index
    conn = sqlite3.connect(repo.db_path)
    rows = conn.execute(f"SELECT key, value FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                        f"WHERE name = ?)", (idx.ns,)).fetchall()
    assert rows and all(len(k) == PREFIX_LEN + 16 for k, _ in rows)
    assert not any(b"hid-0001-posting" in v or b"common" in v.lower() for _, v in rows)
    p = idx.prefix("family=common")
    fam = [(k, v) for k, v in rows if k[:PREFIX_LEN] == p]
    assert len(fam) == 30
    # flip a bit in one posting, and copy another posting's value onto a third's key
    (k0, v0), (k1, v1), (k2, _) = fam[:3]
    conn.execute(f"UPDATE {T} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = ?) AND key = ?",
                 (v0[:-1] + bytes([v0[-1] ^ 1]), idx.ns, k0))
    conn.execute(f"UPDATE {T} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = ?) AND key = ?", (v1, idx.ns, k2))
    conn.commit()
    hits = repo.search("u", {"family": "common"})
    assert len(hits) == 28  # the two damaged postings (edited, copied) are skipped
    assert all(r["name"][0]["family"] == "Common" for _, r in hits)
    # format 4: the value is the encoded id alone, here its UTF-8 text (not a UUID; AES-SIV, the
    # key's second half is its IV/tag)
    assert all(len(v) == len("hid-0000-posting") for k, v in fam)
    # rotation: postings are sealed under an index-key derivative, so nothing is re-sealed and
    # search is unchanged
    before = {i for i, _ in repo.search("u", {"family": "common"})}
    idx.keyset.add(primary=True)
    assert idx.rekey() == 0
    assert {i for i, _ in repo.search("u", {"family": "common"})} == before
    # a posting moved under another term's prefix does not authenticate there
    g = idx.prefix("given=g5")
    (kg, _), = [(k, v) for k, v in rows if k[:PREFIX_LEN] == g]
    (k3, v3) = fam[3]
    conn.execute(f"INSERT INTO {T} (ns, key, version, value) VALUES ((SELECT id FROM safehold_namespaces "
                 f"WHERE name = ?), ?, 1, ?)",
                 (idx.ns, g + k3[PREFIX_LEN:], v3))
    conn.commit()
    assert {i for i, _ in repo.search("u", {"given": "G5"})} == {"hid-0005-posting"}


def test_two_replicas_append_to_one_audit_chain(tmp_path):
    """Two service replicas (separate store connections) share one chain without forking it."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    s1, s2 = open_store(url), open_store(url)
    a1, a2 = AccessAuditLog(s1, mac_key=b"m" * 32), AccessAuditLog(s2, mac_key=b"m" * 32)
    errors = []

    def run(log, name):
        try:
            for i in range(40):
                log.append(name, "get", bytes([i]) * 16, "ok")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    pairs = ((1, a1), (2, a2), (1, a1), (2, a2))
    ts = [threading.Thread(target=run, args=(a, f"replica{n}")) for n, a in pairs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert a1.verify() == 160 == AccessAuditLog(s1, mac_key=b"m" * 32).verify()
    with pytest.raises(AuditChainError, match="MAC"):
        AccessAuditLog(s1, mac_key=b"x" * 32).verify()
    s1.close()
    s2.close()


@pytest.mark.parametrize("bad, what", [
    (("b", None), "item 1: record must be a JSON object, got null"),
    (("b", [1, 2]), "item 1: record must be a JSON object, got list"),
    (("", {"x": 1}), "item 1: id must be a non-empty string"),
    ((7, {"x": 1}), "item 1: id must be a non-empty string"),
])
def test_batch_with_a_malformed_item_writes_nothing(repo, bad, what):
    """A malformed item anywhere refuses the whole batch before any write (no TypeError, no
    half batch); the audit chain does not grow."""
    entries = repo.audit.verify()
    with pytest.raises(InvalidRecordError, match=what):
        repo.batch("u", parse_batch([("a", pat("a", "Smith")), bad, ("c", pat("c", "Jones"))]))
    for rid in ("a", "c"):
        with pytest.raises(RecordNotFoundError):
            repo.get("u", rid)
    assert repo.audit.verify() == entries + 2  # only the two failed reads above


def test_batch_per_item_results(repo):
    put(repo, "u", "same", pat("same", "Smith"))
    res = repo.batch("u", parse_batch([("new", pat("new", "Jones")), ("bad id", {"x": 1}),
                                       ("same", pat("same", "Smith")), ("big", {"x": "y" * (1 << 20)})]))
    assert [r["status"] for r in res] == ["created", "failed", "unchanged", "failed"]
    assert "record id" in res[1]["error"] and "over the limit" in res[3]["error"]
    assert repo.get("u", "new")[0] == pat("new", "Jones")
    with pytest.raises(InvalidRecordError, match="record must be a JSON object, got NoneType"):
        parse_record("n", None)  # a direct write: the same rule


def _audit_rows(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT key FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                            f"WHERE name = 'records.audit') ORDER BY key").fetchall()
    finally:
        conn.close()


def _delete_audit_tail(path, n):
    conn = sqlite3.connect(path)
    keys = conn.execute(f"SELECT key FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                        f"WHERE name = 'records.audit') "
                        "ORDER BY key DESC LIMIT ?", (n,)).fetchall()
    conn.executemany(f"DELETE FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                     f"WHERE name = 'records.audit') AND key = ?", keys)
    conn.commit()
    conn.close()


def test_audit_tail_cut_is_detected_by_the_authenticated_head(tmp_path):
    """Deleting the last audit entries leaves a valid shorter chain; the head names the cut,
    appends fail closed until an admin reseals, and the reseal entry records the problem."""
    db = tmp_path / "a.db"
    store = open_store(f"sqlite:///{db}")
    log = AccessAuditLog(store, mac_key=b"m" * 32)
    for i in range(10):
        log.append("u", "put", bytes([i]) * 16, "ok")
    assert log.verify() == 10 and log.check_head() == 10
    store.close()
    _delete_audit_tail(db, 3)  # "while stopped": the file alone, then a fresh process state
    store = open_store(f"sqlite:///{db}")
    log = AccessAuditLog(store, mac_key=b"m" * 32)
    cut = "audit log truncated: the authenticated head names entry 9 .* as the last one"
    with pytest.raises(AuditChainError, match=cut):
        log.check_head()
    with pytest.raises(AuditChainError, match=cut):
        log.verify()
    with pytest.raises(AuditChainError, match=cut):  # fail closed: no entry chains on the cut
        log.append("u", "get", None, "ok")
    assert len(_audit_rows(db)) == 7
    with pytest.raises(AuditChainError, match="MAC"):  # only the key holder may reseal
        AccessAuditLog(store, mac_key=b"x" * 32).reseal("admin")
    entry = log.reseal("admin")
    assert entry.seq == 7 and entry.body["op"] == "audit-reseal"
    assert "entry 9" in entry.body["outcome"] and "truncated" in entry.body["outcome"]
    log.append("u", "get", None, "ok")
    assert log.verify() == 9 == AccessAuditLog(store, mac_key=b"m" * 32).verify()
    store.close()


def test_audit_head_deleted_or_forged_is_refused(tmp_path):
    db = tmp_path / "h.db"
    store = open_store(f"sqlite:///{db}")
    log = AccessAuditLog(store, mac_key=b"m" * 32)
    for _ in range(3):
        log.append("u", "get", None, "ok")
    conn = sqlite3.connect(db)
    (head,) = conn.execute(f"SELECT value FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                           f"WHERE name = 'records.audit.head')").fetchone()
    assert json.loads(head)["seq"] == 2
    # forge: point the head at entry 1 (as if the log ended there) without the key
    forged = json.dumps({"seq": 1, "hash": json.loads(head)["hash"], "mac": "00" * 32}).encode()
    conn.execute(f"UPDATE {T} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit.head')", (forged,))
    conn.commit()
    with pytest.raises(AuditChainError, match="audit head: MAC missing or wrong"):
        AccessAuditLog(store, mac_key=b"m" * 32).verify()
    conn.execute(f"DELETE FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit.head')")
    conn.commit()
    conn.close()
    fresh = AccessAuditLog(store, mac_key=b"m" * 32)
    with pytest.raises(AuditChainError, match="audit head missing"):
        fresh.verify()
    with pytest.raises(AuditChainError, match="audit head missing"):
        fresh.append("u", "get", None, "ok")
    assert "audit head missing" in fresh.reseal("admin").body["outcome"]
    assert fresh.verify() == 4
    store.close()


def test_corrupt_index_pages_fail_fast_never_spin(tmp_path):
    """A scan over damaged index pages used to return keys out of order, so paging loops
    (``after = last key``) could go round forever; now the store says corrupt at once."""
    db = tmp_path / "c.db"
    store = open_store(f"sqlite:///{db}")
    log = AccessAuditLog(store, mac_key=b"m" * 32)
    with store.transaction():
        for i in range(1500):
            log.stage(AccessAuditLog.body("u", "get", bytes([i % 256]) * 16, "ok"))
    store.close()
    duplicate_leaf_page(db, b"records.audit")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]  # invisible to it
    assert conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    conn.close()
    store = open_store(f"sqlite:///{db}")
    out: list[object] = []

    def run():
        try:
            out.append(AccessAuditLog(store, mac_key=b"m" * 32).verify())
        except Exception as e:  # noqa: BLE001 - inspected below
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "verify hung on a corrupt store"
    from safehold.store.errors import StoreCorruptError

    assert isinstance(out[0], StoreCorruptError), out
    assert "returned keys out of order" in str(out[0]) and str(db) in str(out[0])
    store.close()


def test_sqlite_quick_check_names_a_damaged_page(tmp_path):
    db = tmp_path / "q.db"
    store = open_store(f"sqlite:///{db}")
    with store.transaction():
        for i in range(400):
            store.put("records:patients", i.to_bytes(16, "big"), b"v" * 300, expected_version=0)
    store.quick_check()
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(db.read_bytes())
    mid = (len(data) // 4096 // 2) * 4096  # 200 bytes in the middle of the file, page-aligned
    for j in range(200):
        data[mid + j] ^= 0x5A
    db.write_bytes(bytes(data))
    from safehold.store.errors import StoreCorruptError

    with pytest.raises(StoreCorruptError, match=r"is corrupt \(PRAGMA quick_check: .*restore it"):
        s2 = open_store(f"sqlite:///{db}")
        try:
            s2.quick_check()
        finally:
            s2.close()


@pytest.mark.parametrize("const", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_never_stored(repo, const):
    with pytest.raises(InvalidRecordError, match="non-finite number: .*RFC 8259"):
        put(repo, "u", "n1", {"resourceType": "Patient", "x": [1, {"y": const}]})
    with pytest.raises(RecordNotFoundError):
        repo.get("u", "n1")


def test_search_hits_carry_versions(repo):
    put(repo, "u", "v1", pat("v1", "Versioned"))
    put(repo, "u", "v1", pat("v1", "Versioned", given="Bo"))
    put(repo, "u", "v2", pat("v2", "Versioned"))
    assert [(i, v) for i, _, v in repo.search_hits("u", {"family": "versioned"})] == [("v1", 2), ("v2", 1)]


def test_group_commit_runs_units_on_one_thread_and_hands_back_errors(tmp_path):
    """Concurrent writers' units run on the one committer thread (one connection); a failing
    unit's caller gets its exception, the others' writes are durable and the chain verifies."""
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    log = AccessAuditLog(store, mac_key=b"m" * 32)
    ran_on: set[str] = set()
    errors: list[BaseException] = []

    def unit(i: int):
        def u() -> int:
            ran_on.add(threading.current_thread().name)
            if i % 5 == 4:
                store.put("t", bytes([i]) * 16, b"x", expected_version=0)
                raise ValueError(f"unit {i} fails")  # its row must be rolled back alone
            store.put("t", bytes([i]) * 16, b"x", expected_version=0)
            log.stage(AccessAuditLog.body("u", "put", bytes([i]) * 16, "ok"))
            return i
        return u

    def caller(i: int) -> None:
        try:
            assert log.committer.run(unit(i)) == i
        except ValueError as e:
            errors.append(e)

    ts = [threading.Thread(target=caller, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert sorted(str(e) for e in errors) == sorted(f"unit {i} fails" for i in (4, 9, 14, 19))
    assert ran_on == {"safehold-group-commit"}
    assert [store.get("t", bytes([i]) * 16) is None for i in range(20)] == [i % 5 == 4 for i in range(20)]
    assert log.verify() == 16
    store.close()


def test_a_lone_surrogate_is_refused_by_name():
    """JSON text may escape a lone surrogate (\\ud800); it is not Unicode, so not storable as UTF-8."""
    with pytest.raises(InvalidRecordError, match="not valid Unicode"):
        parse_record("s1", b'{"name": "\\ud800"}')


def test_the_repository_refuses_collaborators_on_another_store(tmp_path):
    """The committer and the audit log must write to the repository's store, through one
    committer (else audit appends would compete with record writes for SQLite's write lock)."""
    a = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    b = open_store(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        ks, ca = Keyset.generate(), GroupCommit(a)
        with pytest.raises(ValueError, match="another store"):
            PatientRepository(a, ks, committer=GroupCommit(b), audit=None)
        with pytest.raises(ValueError, match="share the repository's committer"):
            PatientRepository(a, ks, committer=ca, audit=AccessAuditLog(a, GroupCommit(a)))
        with pytest.raises(ValueError, match="another store"):
            AccessAuditLog(a, GroupCommit(b))
    finally:
        a.close()
        b.close()


def test_search_raw_matches_on_remembered_terms_exactly_and_boundedly(repo, monkeypatch):
    """The answer path (search_raw) re-checks each candidate on terms remembered per stored
    form: the same hits as the decoding path, a renamed record leaves the old name's hits,
    and the memo stays within its bound."""
    import safehold.records.repository as mod

    monkeypatch.setattr(mod, "TERMS_MEMO", 3)
    for i in range(5):
        put(repo, "u", f"s{i}", pat(f"s{i}", "Smith", bd=f"198{i}-01-01"))
    put(repo, "u", "j1", pat("j1", "Jones"))
    for crit in ({"family": "smith"}, {"family": "SMITH", "birthDate": "1982-01-01"}, {"gender": "female"},
                 {"family": "jones"}, {"family": "nobody"}):
        raw = repo.search_raw("u", crit, limit=100)
        assert [i for i, _, _ in raw] == [i for i, _ in repo.search("u", crit)], crit
        assert all(json.loads(b)["id"] == i for i, b, _ in raw)
    assert len(repo._terms) == 3  # noqa: SLF001 - the bound is the point
    repo.search_raw("u", {"family": "smith"}, limit=100)  # s0..s4 now remembered (last three)
    put(repo, "u", "s4", pat("s4", "Brown"))  # a new stored form: its old terms do not count
    assert [i for i, _, _ in repo.search_raw("u", {"family": "smith"}, limit=100)] == ["s0", "s1", "s2", "s3"]
    assert [i for i, _, _ in repo.search_raw("u", {"family": "brown"}, limit=100)] == ["s4"]
    # a stale posting (j1 posted under "smith", as an interrupted rename leaves one) adds nothing
    from safehold.records.tokens import native_term

    repo.index.add("j1", [native_term("family", "smith")])
    assert "j1" in repo.index.lookup(native_term("family", "smith"))
    assert [i for i, _, _ in repo.search_raw("u", {"family": "smith"}, limit=100)] == ["s0", "s1", "s2", "s3"]
