"""Freshness at the records service (issue 12), as processes: ``safehold up``'s stack (broker,
three attested anchor members, the records service) on a real SQLite file and on the real
PostgreSQL; the database operator edits rows with SQL, restores copies while the stack runs and
while it is stopped. Every attack is refused at the HTTP level with its named error; nothing is
served stale; the owner's re-anchoring is required and audited."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import httpx
import pytest

from safehold.devstack import prepare, start, stop, tokens
from tests.support.freshness import Owner, PostgresEngine, SqliteEngine
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow

NS = "records:patients"
SEARCH = "records:patients.search"


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
                got = c.execute("SELECT key, version, value FROM safehold_rows WHERE namespace = ?",
                                (ns,)).fetchall()
        else:
            import psycopg

            with psycopg.connect(self.engine.dsn) as c:
                c.execute(f'SET search_path TO "{self.engine.schema}"')
                got = c.execute("SELECT key, version, value FROM safehold_rows WHERE namespace = %s",
                                (ns,)).fetchall()
        return {bytes(k): (v, bytes(val)) for k, v, val in got}

    def put_back(self, ns: str, key: bytes, version: int, value: bytes) -> None:
        self.engine.sql("DELETE FROM safehold_rows WHERE namespace = ? AND key = ?", (ns, key))
        self.engine.sql("INSERT INTO safehold_rows (namespace, key, version, value) VALUES (?, ?, ?, ?)",
                        (ns, key, version, value))

    def delete(self, ns: str, key: bytes) -> None:
        self.engine.sql("DELETE FROM safehold_rows WHERE namespace = ? AND key = ?", (ns, key))


def _new_key(db: Db, ns: str, before: dict) -> bytes:
    (k,) = set(db.rows(ns)) - set(before)
    return k


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "data" / "records.db")
    dsn = request.getfixturevalue("postgres_dsn")
    return PostgresEngine(dsn, request.getfixturevalue("pg_schema"))


def _client(s) -> httpx.Client:
    tok = tokens(s.data_dir)["admin"]
    return httpx.Client(base_url=s.info["records_url"], verify=str(s.path("ca.pem")), timeout=30,
                        headers={"Authorization": f"Bearer {tok}"})


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    return body["detail"]


def test_records_freshness_attacks_over_http(engine, tmp_path):
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
        assert s.info["freshness"] == {"records": "initialised"}
        with _client(s) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            # 1. an acknowledged update undone by restoring the older row
            before = db.rows(NS)
            assert c.put("/v1/patients/a", json=_patient("Alpha")).status_code == 201
            ka = _new_key(db, NS, before)
            old = db.rows(NS)[ka]
            assert c.put("/v1/patients/a", json=_patient("Beta")).status_code == 200
            db.put_back(NS, ka, *old)
            d = _error(c.get("/v1/patients/a"), 409, "stale-data")
            assert ka.hex() in d and "expected version 2, found version 1" in d
            assert "Alpha" not in d and "Beta" not in d
            # 2. a deleted patient brought back
            before = db.rows(NS)
            assert c.put("/v1/patients/b", json=_patient("Bravo")).status_code == 201
            kb = _new_key(db, NS, before)
            row_b = db.rows(NS)[kb]
            assert c.delete("/v1/patients/b").status_code == 204
            db.put_back(NS, kb, *row_b)
            d = _error(c.get("/v1/patients/b"), 409, "stale-data")
            assert kb.hex() in d and "expected no row" in d
            # 3. a live row deleted by the DBA is not "never existed"
            before = db.rows(NS)
            assert c.put("/v1/patients/c", json=_patient("Charlie")).status_code == 201
            kc = _new_key(db, NS, before)
            db.delete(NS, kc)
            d = _error(c.get("/v1/patients/c"), 409, "stale-data")
            assert kc.hex() in d and "found no row" in d
            assert _error(c.get("/v1/patients/never-written"), 404, "not-found")
            # 4. search with a posting left out
            before = db.rows(SEARCH)
            assert c.put("/v1/patients/d", json=_patient("Delta")).status_code == 201
            new = sorted(set(db.rows(SEARCH)) - set(before))
            assert c.get("/v1/patients", params={"family": "Delta"}).json()["records"][0]["id"] == "d"
            for k in new:
                db.delete(SEARCH, k)
            d = _error(c.get("/v1/patients", params={"family": "Delta"}), 409, "stale-data")
            assert "posting group" in d or "postings" in d.lower()
            # 5. a list page with a row left out (c is gone from the database)
            _error(c.get("/v1/patients", params={"limit": 100}), 409, "stale-data")
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
    cp = json.loads(s.path("anchor-checkpoint.json").read_text())["ledgers"]["records"]
    s2 = prepare(tmp_path / "data", broker_port=free_port(), records_port=free_port(), scone_port=None,
                 store_url=url, package_root=str(pkg))
    start(s2)
    try:
        outcome = s2.info["freshness"]["records"]
        assert outcome.startswith("refused") and "older than the owner's checkpoint" in outcome, outcome
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
            signed = sign_owner_statement(statement, s2.path("owner.key").read_bytes())
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
