"""Freshness at the records service (issue 12), as processes: ``safehold up``'s stack (broker,
three attested anchor members, the records service) on a real SQLite file and on the real
PostgreSQL; the database operator edits rows with SQL, restores copies while the stack runs and
while it is stopped. Every attack is refused at the HTTP level with its named error; nothing is
served stale; the owner's re-anchoring is required and audited."""

from __future__ import annotations

import datetime
import json
import sqlite3
import ssl
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from safehold.devstack import prepare, start, stop, tokens
from tests.support.freshness import Owner, PostgresEngine, SqliteEngine, sqlite_copy
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow

NS = "records:patients"
SEARCH = "records:patients.postings"


def _patient(family: str) -> dict:
    return {"resourceType": "Patient", "name": [{"family": family, "given": ["Erika"]}],
            "birthDate": "1980-01-01"}


class Db:
    """The operator's view of the store: rows by namespace, SQL, backups."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def rows(self, ns: str) -> dict[bytes, tuple[int, bytes]]:
        if isinstance(self.engine, SqliteEngine):
            with closing(sqlite3.connect(self.engine.path, timeout=10)) as c:
                got = c.execute("SELECT key, version, value FROM safehold_rows WHERE "
                                "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)",
                                (ns,)).fetchall()
        else:
            import psycopg

            with psycopg.connect(self.engine.dsn) as c:
                c.execute(f'SET search_path TO "{self.engine.schema}"')
                got = c.execute("SELECT key, version, value FROM safehold_rows WHERE "
                                "ns = (SELECT id FROM safehold_namespaces WHERE name = %s)",
                                (ns,)).fetchall()
        return {bytes(k): (v, bytes(val)) for k, v, val in got}

    def put_back(self, ns: str, key: bytes, version: int, value: bytes) -> None:
        self.engine.sql("DELETE FROM safehold_rows WHERE "
                        "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?", (ns, key))
        self.engine.sql("INSERT INTO safehold_rows (ns, key, version, value) "
                        "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, ?, ?)",
                        (ns, key, version, value))

    def delete(self, ns: str, key: bytes) -> None:
        self.engine.sql("DELETE FROM safehold_rows WHERE "
                        "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?", (ns, key))


def _new_key(db: Db, ns: str, before: dict) -> bytes:
    (k,) = set(db.rows(ns)) - set(before)
    return k


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "data" / "records.db")
    dsn = request.getfixturevalue("postgres_dsn")
    return PostgresEngine(dsn, request.getfixturevalue("pg_schema"))


def _client(s, url: str | None = None) -> httpx.Client:
    tok = tokens(s.data_dir, s.owner_dir)["admin"]
    return httpx.Client(base_url=url or s.info["records_url"], timeout=30,
                        verify=ssl.create_default_context(cafile=str(s.path("ca.pem"))),
                        headers={"Authorization": f"Bearer {tok}"})


def _copy_store(engine, tmp_path: Path) -> str:
    """The operator copies the live store (a second replica's database); its URL."""
    if isinstance(engine, SqliteEngine):
        dst = tmp_path / "replica.db"
        sqlite_copy(engine.path, dst)
        return f"sqlite:///{dst}"
    import psycopg

    copy = f"{engine.schema}r"
    with psycopg.connect(engine.dsn, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{copy}"')
        for t in ("safehold_namespaces", "safehold_rows", "safehold_schema_version"):
            c.execute(f'CREATE TABLE "{copy}".{t} (LIKE "{engine.schema}".{t} INCLUDING ALL)')
            c.execute(f'INSERT INTO "{copy}".{t} SELECT * FROM "{engine.schema}".{t}')
    return f"{engine.dsn}{'&' if '?' in engine.dsn else '?'}schema={copy}"


def _drop_copy(engine) -> None:
    if isinstance(engine, PostgresEngine):
        import psycopg

        with psycopg.connect(engine.dsn, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{engine.schema}r" CASCADE')


def _fork(s, engine, tmp_path: Path) -> None:
    """Two replicas of one ledger on two copies of the store: the first write through one makes
    the other refuse (its history forked from the anchor's)."""
    import subprocess

    from safehold.devstack import records_cmd, records_env, wait_records

    url = _copy_store(engine, tmp_path)
    env = records_env(s, port=free_port(), scone_port=None, store_url=url, ready="replica-ready.json")
    log = s.path("replica.log").open("ab")
    p = subprocess.Popen(records_cmd(s), env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    try:
        info = wait_records(s, p, s.path("replica-ready.json"), 120, s.path("replica.log"))
        with _client(s) as a, _client(s, info["records_url"]) as b:
            for _ in range(100):  # the replica compares with the anchor once the members answer
                if b.get("/healthz").status_code == 200:
                    break
                time.sleep(0.2)
            # same history so far: both serve (no request to b yet: reads are audited, so a read
            # through b would be a write that advances the anchor on b's copy first)
            assert b.get("/healthz").json() == {"status": "ok"}
            assert a.put("/v1/patients/f1", json=_patient("Foxtrot")).status_code == 201
            d = _error(b.put("/v1/patients/f2", json=_patient("Golf")), 503, "not-fresh")
            # b's write meets a's anchored entry (a fork), or b's head poll saw the anchor move
            # first and its copy lacks that entry (a rollback): which one comes first is timing
            kind = d.split(":")[0]
            assert kind in ("StoreForkedError", "StoreRolledBackError"), d
            _error(b.get("/v1/patients/d"), 503, "not-fresh")
            h = b.get("/healthz")
            assert h.status_code == 503 and kind.removesuffix("Error") in h.json()["reason"], h.text
            assert a.get("/v1/patients/f1").status_code == 200  # the first replica goes on
    finally:
        p.terminate()
        p.wait(30)
        _drop_copy(engine)


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    return body["detail"]


def _impostor_cannot_get_the_rollback_reanchored(s, monkeypatch) -> None:
    """Between the owner and the service, an impostor (the operator owns the data directory:
    ``up.json``, ``ca.pem``) shows a proposal newer than the checkpoint while the statement to
    sign sets the older head; or serves TLS under a CA of its own. Both are refused before
    anything is signed or any token is sent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    from safehold.devstack import anchor as anc
    from safehold.devstack.errors import StackError

    real = anc._service

    def lying(s_, url, ledger, method, path, body=None):
        r = real(s_, url, ledger, method, path, body)
        if path == "/proposal":  # the payload (what would be signed) is left as it is
            doc = r.json()
            doc["proposal"]["epoch"] += 1000
            return httpx.Response(200, json=doc)
        return r

    monkeypatch.setattr(anc, "_service", lying)
    with pytest.raises(StackError, match="what is shown must be what is signed"):
        anc.settle_ledger(s, s.records_url, "records")
    with pytest.raises(StackError, match="what is shown must be what is signed"):
        anc.reanchor(s.data_dir, "records", s.owner_path("owner.key").read_bytes())
    monkeypatch.undo()
    # the impostor's own CA in place of the workload CA: the owner's tools refuse to talk
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "impostor CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    files = [s.path("ca.pem"), s.path("broker") / "ca.pem"]
    saved = [f.read_bytes() for f in files]
    try:
        for f in files:
            f.write_bytes(cert.public_bytes(Encoding.PEM))
        with pytest.raises(StackError, match="not the one the owner pinned"):
            anc.proposal(s.data_dir, "records")
    finally:
        for f, b in zip(files, saved, strict=True):
            f.write_bytes(b)


def test_records_freshness_attacks_over_http(engine, tmp_path, monkeypatch):
    """Rolled-back, restored, DBA-deleted rows, omitted postings and list rows, a store restored
    while running and while stopped: each refused by name; re-anchoring needs the owner and is
    audited."""
    pkg = snapshot_package(tmp_path / "pkg")
    url = (f"sqlite:///{engine.path}" if isinstance(engine, SqliteEngine)
           else f"{engine.dsn}{'&' if '?' in engine.dsn else '?'}schema={engine.schema}")
    s = prepare(tmp_path / "data", broker_port=free_port(), records_port=free_port(), scone_port=None,
                store_url=url, package_root=str(pkg))
    db = Db(engine)
    start(s)
    try:
        assert s.info["freshness"] == {"broker": "initialised", "records": "initialised"}
        with _client(s) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.put("/v1/patients/d", json=_patient("Delta")).status_code == 201
        # 0. two replicas shown different histories (fork)
        _fork(s, engine, tmp_path)
        with _client(s) as c:
            # 1. an acknowledged update undone by restoring the older row
            before = db.rows(NS)
            assert c.put("/v1/patients/a", json=_patient("Alpha")).status_code == 201
            ka = _new_key(db, NS, before)
            old = db.rows(NS)[ka]
            assert c.put("/v1/patients/a", json=_patient("Beta")).status_code == 200
            db.put_back(NS, ka, *old)
            d = _error(c.get("/v1/patients/a"), 409, "stale-data")
            assert d.startswith("RowRolledBackError: ") and ka.hex() in d
            assert "expected version 2, found version 1" in d
            assert "Alpha" not in d and "Beta" not in d
            # 2. a deleted patient brought back
            before = db.rows(NS)
            assert c.put("/v1/patients/b", json=_patient("Bravo")).status_code == 201
            kb = _new_key(db, NS, before)
            row_b = db.rows(NS)[kb]
            assert c.delete("/v1/patients/b").status_code == 204
            db.put_back(NS, kb, *row_b)
            d = _error(c.get("/v1/patients/b"), 409, "stale-data")
            assert d.startswith("RowRestoredError: ") and kb.hex() in d and "expected no row" in d
            # 3. a live row deleted by the DBA is not "never existed"
            before = db.rows(NS)
            assert c.put("/v1/patients/c", json=_patient("Charlie")).status_code == 201
            kc = _new_key(db, NS, before)
            db.delete(NS, kc)
            d = _error(c.get("/v1/patients/c"), 409, "stale-data")
            assert d.startswith("RowDeletedError: ") and kc.hex() in d and "found no row" in d
            assert _error(c.get("/v1/patients/never-written"), 404, "not-found")
            # 4. search with a posting left out
            before = db.rows(SEARCH)
            assert c.put("/v1/patients/d", json=_patient("Delta Two")).status_code == 200
            new = sorted(set(db.rows(SEARCH)) - set(before))
            assert c.get("/v1/patients", params={"family": "Delta Two"}).json()["records"][0]["id"] == "d"
            for k in new:
                db.delete(SEARCH, k)
            d = _error(c.get("/v1/patients", params={"family": "Delta Two"}), 409, "stale-data")
            assert d.startswith("PostingsStaleError: "), d
            # 5. a list page with a row left out (c is gone from the database)
            d = _error(c.get("/v1/patients", params={"limit": 100}), 409, "stale-data")
            # (the page meets the first tampered row in key order: c missing, b restored, a old)
            assert d.split(":")[0] in ("RowsOmittedError", "RowDeletedError", "RowRestoredError",
                                       "RowRolledBackError"), d
            # 6. the whole store restored from an earlier copy while running
            token = engine.backup()
            before = db.rows(NS)
            assert c.put("/v1/patients/e", json=_patient("Echo")).status_code == 201
            ke = _new_key(db, NS, before)
            engine.restore(token)
            d = _error(c.get("/v1/patients/e"), 409, "stale-data")
            assert ke.hex() in d
    finally:
        stop(s)
    # 7. the same earlier copy put back while the stack is stopped: the members restarted with
    # it (lost mode); the checkpoint refuses the dev owner's automatic re-anchoring
    engine.restore(token)
    cp = json.loads(s.owner_path("anchor-checkpoint.json").read_text())["ledgers"]["records"]
    s2 = prepare(tmp_path / "data", broker_port=free_port(), records_port=free_port(), scone_port=None,
                 store_url=url, package_root=str(pkg))
    start(s2)
    try:
        outcome = s2.info["freshness"]["records"]
        assert outcome.startswith("refused") and "older than the owner's checkpoint" in outcome, outcome
        _impostor_cannot_get_the_rollback_reanchored(s2, monkeypatch)
        with _client(s2) as c:
            h = c.get("/healthz")
            assert h.status_code == 503 and "AnchorLost" in h.json()["reason"], h.text
            _error(c.get("/v1/patients/d"), 503, "not-fresh")
            st = c.get("/v1/freshness").json()
            assert not st["serving"] and st["committed_epoch"] < cp["epoch"]
            # 8. the owner step is required: the admin token alone, a statement signed by
            # another key, or one for another head are all refused
            doc = c.get("/v1/freshness/proposal").json()
            assert doc["action"] == "reanchor" and doc["proposal"]["epoch"] == st["committed_epoch"]
            assert doc["proposal"]["last_audit_entry"]["verified"] is False
            from safehold.freshness.anchor.statements import SignedOwnerStatement, sign_owner_statement

            unsigned = {"payload": doc["payload"], "signature": "AA"}
            statement = SignedOwnerStatement.from_json(unsigned).statement
            stranger = sign_owner_statement(statement, Owner().private_pem())
            _error(c.post("/v1/freshness/reanchor", json=stranger.to_json()), 409, "owner-statement-refused")
            _error(c.post("/v1/freshness/reanchor", json={"payload": doc["payload"], "signature": "AA"}),
                   409, "owner-statement-refused")
            _error(c.get("/v1/patients/d"), 503, "not-fresh")
            signed = sign_owner_statement(statement, s2.owner_path("owner.key").read_bytes())
            r = c.post("/v1/freshness/reanchor", json=signed.to_json())
            assert r.status_code == 200, r.text
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/v1/patients/d").status_code == 200
            assert c.get("/v1/patients/e").status_code == 404  # the owner accepted the older copy
            audits = [json.loads(v) for _, v in db.rows("records.audit").values()]
            assert any(a["op"] == "freshness-reanchor" and a["outcome"] == "ok" and a["who"] == "admin"
                       for a in audits), audits
            assert c.get("/v1/freshness").json()["serving"]
    finally:
        stop(s2)
