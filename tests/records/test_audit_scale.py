"""Issue 17: reads are audited in batches (one entry per request, group-committed flushes with a
stated durability bound), a batch is one transaction, retention by sealed segments and a
checkpointed verify — over a real SQLite file, and over a FreshStore where it matters (one
journal entry per transaction)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError, AuditSegmentRefusedError, StoreUnavailableError
from safehold.freshness.group import FreshGroupCommit
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.model import parse_batch, parse_record
from safehold.records.repository import PatientRepository
from safehold.store import open_store
from safehold.store.migrations import ROWS_TABLE as T
from tests.support.freshness import InProcessAnchor, open_fresh


def pat(rid: str, family: str) -> dict:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family, "given": ["Ann"]}],
            "birthDate": "1970-01-01", "gender": "female"}


def make_repo(store, **audit_kw) -> PatientRepository:
    committer = GroupCommit(store)
    return PatientRepository(store, Keyset.generate(), committer=committer,
                             audit=AccessAuditLog(store, committer, mac_key=b"k" * 32, **audit_kw))


@pytest.fixture
def repo(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    r = make_repo(store)
    r.db_path = tmp_path / "r.db"
    yield r
    store.close()


def ops(repo) -> list[dict]:
    repo.audit.flush()
    return [e.body for e in repo.audit.entries()]


def test_one_entry_per_read_request_with_every_hit(repo):
    for i in range(5):
        repo.put("w", parse_record(f"s{i}", pat(f"s{i}", "Smith")))
    hits = repo.search("r", {"family": "smith"})
    assert len(hits) == 5
    repo.get("r", "s1")
    bodies = ops(repo)
    assert [b["op"] for b in bodies] == ["put"] * 5 + ["search", "get"]
    search = bodies[5]
    assert search["outcome"] == "ok:5" and search["record"] is None
    assert search["hits"] == [repo.blind_index(f"s{i}").hex() for i in range(5)]
    assert "Smith" not in json.dumps(bodies) and "s1" not in json.dumps([b["hits"] for b in bodies[5:6]])
    assert repo.audit.verify() == 7


def test_read_entries_are_durable_within_the_flush_interval(repo):
    repo.put("w", parse_record("a", pat("a", "Jones")))
    repo.audit.check_head()
    repo.get("r", "a")  # position known now: this read does not wait for its flush
    for _ in range(40):
        time.sleep(0.05)
        conn = sqlite3.connect(repo.db_path)
        n = conn.execute(f"SELECT count(*) FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                         f"WHERE name = 'records.audit')").fetchone()[0]
        conn.close()
        if n == 2:
            break
    assert n == 2  # flushed by the background thread, nobody called flush()


def test_reads_wait_for_a_stalled_flush_then_fail_closed(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    repo = make_repo(store, flush_seconds=0.02, max_lag=0.1, stall_timeout=0.5)
    try:
        repo.put("w", parse_record("a", pat("a", "Jones")))
        repo.get("r", "a")
        repo.audit.flush()
        release = threading.Event()
        stalled = threading.Thread(target=repo.committer.run, args=(release.wait,), daemon=True)
        stalled.start()  # the committer thread now blocks: no flush can commit
        try:
            time.sleep(0.05)
            t0 = time.monotonic()
            repo.get("r", "a")  # its entry is fresh: answered without waiting for the stall
            assert time.monotonic() - t0 < 0.45
            time.sleep(0.15)  # now the buffered entry is older than max_lag
            with pytest.raises(StoreUnavailableError, match="not durable"):
                repo.get("r", "a")
            assert time.monotonic() - t0 >= 0.5
        finally:
            release.set()
        stalled.join()
        repo.get("r", "a")  # the flush went through: reads are answered again
        assert [b["op"] for b in ops(repo)] == ["put", "get", "get", "get", "get"]
        assert repo.audit.verify() == 5
    finally:
        store.close()


def test_a_failed_flush_refuses_reads_until_resealed(repo):
    repo.put("w", parse_record("a", pat("a", "Jones")))
    repo.get("r", "a")
    repo.audit.flush()
    conn = sqlite3.connect(repo.db_path)  # the operator cuts the log's tail
    conn.execute(f"DELETE FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit') AND key = "
                 f"(SELECT max(key) FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit'))")
    conn.commit()
    conn.close()
    repo.audit.invalidate()
    with pytest.raises(AuditChainError, match="truncated"):
        repo.get("r", "a")
    with pytest.raises(AuditChainError):
        repo.get("r", "a")
    repo.audit.reseal("admin")
    repo.get("r", "a")
    assert ops(repo)[-1]["op"] == "get"
    repo.audit.verify()


def test_seal_export_and_checkpointed_verify(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    repo = make_repo(store, checkpointed=True)
    try:
        for i in range(10):
            repo.put("w", parse_record(f"p{i}", pat(f"p{i}", "Lee")))
        assert repo.audit.verify() == 10
        data, first, last, digest = repo.audit.export_segment(5)
        assert (first, last) == (0, 5) and len(data.splitlines()) == 6
        with pytest.raises(AuditSegmentRefusedError, match="not the one given"):
            repo.audit.seal("admin", 5, "0" * 64)
        rec = repo.audit.seal("admin", 5, digest)
        assert (rec.first, rec.last, rec.sha256) == (0, 5, digest)
        conn = sqlite3.connect(tmp_path / "r.db")
        live = conn.execute(f"SELECT count(*) FROM {T} WHERE ns = (SELECT id FROM safehold_namespaces "
                            f"WHERE name = 'records.audit')").fetchone()[0]
        assert live == 5  # 6..9 and the audit-seal entry
        assert repo.audit.verify(full=True) == 11
        assert repo.audit.verify() == 11
        assert repo.audit.verify_segment(data) == rec
        with pytest.raises(AuditChainError, match="no seal record"):
            repo.audit.verify_segment(data.replace(b'"who":"w"', b'"who":"x"', 1))
        refused = AuditSegmentRefusedError  # a retention mistake, not a broken chain
        with pytest.raises(refused, match=r"not sealable \(the newest entry \(10\) stays live"):
            repo.audit.export_segment(10)  # the newest entry stays live
        with pytest.raises(refused, match=r"not sealable \(entries before 6 are sealed already"):
            repo.audit.export_segment(3)
        # the base row is MAC'd: moving it to hide more entries is refused
        conn.execute(f"UPDATE {T} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                     f"WHERE name = 'records.audit.head') AND key = ?",
                     (json.dumps({"seq": 8, "hash": "0" * 64}).encode(), b"base"))
        conn.commit()
        with pytest.raises(AuditChainError, match="base"):
            repo.audit.verify(full=True)
        conn.close()
    finally:
        store.close()


def test_a_seal_overlapping_a_sealed_segment_names_the_oldest_live_entry(tmp_path):
    """An export 0..5 of which 0..2 were sealed meanwhile (through a copy cut after entry 2): its
    digest is not that of the live 3..5, and the refusal said only "seal the file `audit export
    --through 5` wrote" — which is this file."""
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    repo = make_repo(store)
    try:
        for i in range(8):
            repo.put("w", parse_record(f"p{i}", pat(f"p{i}", "Lee")))
        data, _, _, digest = repo.audit.export_segment(5)
        head = b"".join(data.splitlines(keepends=True)[:3])
        repo.audit.seal("admin", 2, hashlib.sha256(head).hexdigest())
        with pytest.raises(AuditSegmentRefusedError,
                           match=r"not the one given .*starts before 3, the oldest live entry; "
                                 r"seal the file `audit export --through 5` writes now"):
            repo.audit.seal("admin", 5, digest)
    finally:
        store.close()


def test_checkpointed_verify_reads_only_new_entries(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    repo = make_repo(store, checkpointed=True)
    try:
        for i in range(30):
            repo.put("w", parse_record(f"p{i}", pat(f"p{i}", "Lee")))
        assert repo.audit.verify() == 30
        seen: list[int] = []
        real = repo.audit.entries

        def counting(*, start: int = 0):
            for e in real(start=start):
                seen.append(e.seq)
                yield e

        repo.audit.entries = counting  # type: ignore[method-assign]
        repo.put("w", parse_record("q", pat("q", "Lee")))
        assert repo.audit.verify() == 31
        assert seen == [30]
        assert repo.audit.verify(full=True) == 31 and len(seen) == 32
    finally:
        store.close()


def test_a_batch_is_one_transaction_and_one_journal_entry(tmp_path):
    anchor = InProcessAnchor()
    fs = open_fresh(open_store(f"sqlite:///{tmp_path / 'f.db'}"), anchor)
    committer = FreshGroupCommit(fs)
    repo = PatientRepository(fs, Keyset.generate(), committer=committer,
                             audit=AccessAuditLog(fs, committer, mac_key=b"k" * 32, checkpointed=True))
    try:
        items = parse_batch([(f"b{i}", pat(f"b{i}", f"Fam{i % 3}")) for i in range(50)])
        e0 = fs.status()["committed_epoch"]
        res = repo.batch("w", items)
        assert [r["status"] for r in res] == ["created"] * 50
        assert fs.status()["committed_epoch"] == e0 + 1  # one transaction for 50 records
        again = parse_batch([(f"b{i}", pat(f"b{i}", "Other" if i == 7 else f"Fam{i % 3}"))
                             for i in range(50)] + [("b7", pat("b7", "Twice"))])
        res = repo.batch("w", again)
        assert [r["status"] for r in res].count("unchanged") == 49
        assert res[7] == {"id": "b7", "status": "updated", "version": 2}
        assert res[50]["status"] == "updated" and res[50]["version"] == 3  # redone alone
        assert repo.get("r", "b7")[0]["name"][0]["family"] == "Twice"
        assert [i for i, _ in repo.search("r", {"family": "fam1"})] == sorted(
            f"b{i}" for i in range(50) if i % 3 == 1 and i != 7)
        assert repo.audit.verify() == 1 + 3 + 2  # one entry per batch and outcome (+ get, search)
        puts = [e.body for e in repo.audit.entries() if e.body["op"] == "put"]
        assert [(b["outcome"], b["record"]) for b in puts] == [
            ("created:50", None), ("unchanged:49", None),
            ("updated", repo.blind_index("b7").hex()), ("updated", repo.blind_index("b7").hex())]
        assert puts[0]["hits"] == [repo.blind_index(f"b{i}").hex() for i in range(50)]
        assert sorted(puts[1]["hits"]) == sorted(repo.blind_index(f"b{i}").hex() for i in range(50) if i != 7)
    finally:
        fs.close()


def test_a_fhir_batch_writes_its_puts_in_one_transaction_per_repository(tmp_path):
    from safehold.records.fhir.core import FhirStore

    anchor = InProcessAnchor()
    fs = open_fresh(open_store(f"sqlite:///{tmp_path / 'f.db'}"), anchor)
    committer = FreshGroupCommit(fs)
    # a long flush interval: the batch's own reads are not flushed in between
    audit = AccessAuditLog(fs, committer, mac_key=b"k" * 32, flush_seconds=30, max_lag=30)
    repo = PatientRepository(fs, Keyset.generate(), committer=committer, audit=audit)
    fhir = FhirStore.beside(repo)
    try:
        repo.put("w", parse_record("first", pat("first", "Lee")))  # the chain position is known
        entries = [{"resource": pat(f"f{i}", "Batch"), "request": {"method": "PUT", "url": f"Patient/f{i}"}}
                   for i in range(30)]
        entries += [{"resource": {"resourceType": "Observation", "id": f"o{i}", "status": "final",
                                  "code": {"text": "x"}, "subject": {"reference": "Patient/f1"}},
                     "request": {"method": "PUT", "url": f"Observation/o{i}"}} for i in range(5)]
        entries.append({"request": {"method": "GET", "url": "Patient/first"}})
        entries.append({"resource": {"resourceType": "Patient", "id": "zz"},
                        "request": {"method": "PUT", "url": "Patient/other-id"}})  # refused alone
        e0 = fs.status()["committed_epoch"]
        out = fhir.batch("w", {"resourceType": "Bundle", "type": "batch", "entry": entries},
                         base="", can_write=True)
        assert fs.status()["committed_epoch"] == e0 + 2  # Patient and resources repositories
        assert [o.kind for o in out] == ["write"] * 35 + ["read", "error"]
        assert all(o.written is not None and o.written.created for o in out[:35])
        assert out[3].written.resource["meta"]["versionId"] == "1"
        again = fhir.batch("w", {"resourceType": "Bundle", "type": "batch", "entry": entries[:3]},
                           base="", can_write=True)
        assert [o.written.changed for o in again] == [False] * 3  # unchanged: nothing written
        assert fhir.read("r", "Patient", "f2")[0]["name"][0]["family"] == "Batch"
        audit.flush()
        # writes: the first put, then one entry per repository and outcome (created:30,
        # created:5); reads: 35 + 1 in the first batch (the refused entry read nothing), 3, 1
        assert audit.verify() == 3 + 36 + 3 + 1
    finally:
        fs.close()


def test_segment_and_seal_over_http(tmp_path):
    from fastapi.testclient import TestClient

    from tests.support.fhir_app import records_app

    ra = records_app(tmp_path)
    try:
        with TestClient(ra.app) as c:
            for i in range(6):
                assert c.put(f"/v1/patients/h{i}", json=pat(f"h{i}", "Web"),
                             headers=ra.headers("writer")).status_code == 201
            assert c.get("/v1/patients/h1", headers=ra.headers("reader")).status_code == 200
            assert c.get("/v1/audit/segment?through=3", headers=ra.headers("reader")).status_code == 403
            r = c.get("/v1/audit/segment?through=3", headers=ra.headers())
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            digest = r.headers["X-Safehold-Segment-SHA256"]
            assert r.headers["X-Safehold-Segment"] == "0-3" and len(r.content.splitlines()) == 4
            bad = c.post("/v1/audit/seal", json={"through": 3, "sha256": "0" * 64}, headers=ra.headers())
            assert bad.status_code == 409 and bad.json()["error"] == "audit-segment-refused"
            early = c.get("/v1/audit/segment?through=99", headers=ra.headers())
            assert early.status_code == 409 and early.json()["error"] == "audit-segment-refused"
            assert c.post("/v1/audit/seal", json={"through": 3}, headers=ra.headers()).status_code == 400
            ok = c.post("/v1/audit/seal", json={"through": 3, "sha256": digest}, headers=ra.headers())
            assert ok.status_code == 200 and ok.json() == {"first": 0, "last": 3, "sha256": digest}
            n = c.get("/v1/audit/verify", headers=ra.headers()).json()["entries"]
            assert n == c.get("/v1/audit/verify?full=true", headers=ra.headers()).json()["entries"]
            assert n >= 9  # 6 puts, the get, the seal entry (and the verify's own reads)
            assert ra.repo.audit.verify_segment(r.content).sha256 == digest
    finally:
        ra.store.close()
