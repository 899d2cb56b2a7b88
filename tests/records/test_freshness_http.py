"""The records service's freshness wiring in process (``assemble_apps`` over a FreshStore on a
real SQLite file; the anchor is the :class:`~tests.support.freshness.InProcessAnchor` TEST
DOUBLE): the HTTP mapping of every finding, ``/healthz`` with the reason, the owner routes
before and after initialisation, the deferred start-up, the background audit's alarm. The same
attacks against the real processes: ``test_freshness_service.py`` (slow)."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

from safehold.crypto.keyset import Keyset
from safehold.freshness.errors import AnchorUnavailableError
from safehold.freshness.store import FreshStore
from safehold.records.fresh import FRESHNESS_PURPOSE, POSTINGS_POLICY, Freshness
from safehold.records.server import assemble_apps
from safehold.store import open_store
from tests.support.freshness import InProcessAnchor
from tests.support.records_app import RecordsApp, role_access


def _app(tmp_path, anchor, keyset) -> tuple[RecordsApp, Freshness]:
    from safehold.crypto.kdf import derive_key
    from safehold.freshness.vmap import NamespacePolicy

    fs = FreshStore(open_store(f"sqlite:///{tmp_path / 'records.db'}"), ledger="records",
                    mac_key=derive_key(keyset.index_key, purpose=FRESHNESS_PURPOSE), anchor=anchor,
                    policy=NamespacePolicy(POSTINGS_POLICY))
    fresh = Freshness(fs)
    native, _, repo = assemble_apps(fs, keyset, role_access(), scone_auth=None, freshness=fresh)
    return RecordsApp(native, repo), fresh


def _patient(family: str) -> dict:
    return {"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1970-02-03"}


def _rows(db, ns: str) -> dict[bytes, tuple[int, bytes]]:
    with closing(sqlite3.connect(db)) as c:
        return {bytes(k): (v, bytes(val)) for k, v, val in
                c.execute("SELECT key, version, value FROM safehold_rows WHERE "
                          "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (ns,))}


def _sql(db, stmt: str, params: tuple) -> None:
    with closing(sqlite3.connect(db)) as c, c:
        c.execute(stmt, params)


def test_new_ledger_waits_for_the_owner_then_serves_and_maps_findings(tmp_path):
    anchor, keyset = InProcessAnchor(), Keyset.generate()
    app, fresh = _app(tmp_path, anchor, keyset)
    # a new ledger: not serving, /healthz says why, records refused, the owner routes answer
    h = app.request("GET", "/healthz", role=None)
    assert h.status_code == 503 and h.json()["reason"].startswith("LedgerUninitialisedError")
    r = app.request("GET", "/v1/patients/x", role="reader")
    assert r.status_code == 503 and r.json()["error"] == "not-fresh"
    # a writer is refused; while not fresh even the denial cannot be audited: 503, fail closed
    r = app.request("GET", "/v1/freshness/proposal", role="writer")
    assert r.status_code == 503 and r.json()["error"] == "not-fresh"
    doc = app.request("GET", "/v1/freshness/proposal").json()
    assert doc["action"] == "initialise" and doc["proposal"]["epoch"] == 0
    # a statement not signed by the pinned owner key is refused
    from safehold.freshness.anchor.statements import SignedOwnerStatement, sign_owner_statement
    from tests.support.freshness import Owner

    st = SignedOwnerStatement.from_json({"payload": doc["payload"], "signature": "AA"}).statement
    bad = sign_owner_statement(st, Owner().private_pem())
    r = app.request("POST", "/v1/freshness/reanchor", json=bad.to_json())
    assert r.status_code == 409 and r.json()["error"] == "owner-statement-refused"
    good = sign_owner_statement(st, anchor.owner.private_pem())
    r = app.request("POST", "/v1/freshness/reanchor", json=good.to_json())
    assert r.status_code == 200, r.text
    assert app.request("GET", "/healthz", role=None).json() == {"status": "ok"}
    audit = [e.body for e in app.repo.audit.entries()]
    assert [a["op"] for a in audit if a["op"] == "freshness-reanchor"] == ["freshness-reanchor"]
    # serving: a write, then the DBA's edits, each refused by name over HTTP
    db = tmp_path / "records.db"
    before = _rows(db, "records:patients")
    assert app.request("PUT", "/v1/patients/p1", role="writer", json=_patient("Alpha")).status_code == 201
    (k,) = set(_rows(db, "records:patients")) - set(before)
    old = _rows(db, "records:patients")[k]
    assert app.request("PUT", "/v1/patients/p1", role="writer", json=_patient("Beta")).status_code == 200
    _sql(db, "UPDATE safehold_rows SET version = ?, value = ? WHERE "
             "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
         (old[0], old[1], "records:patients", k))
    r = app.request("GET", "/v1/patients/p1", role="reader")
    assert r.status_code == 409 and r.json()["error"] == "stale-data"
    assert r.json()["detail"].startswith("RowRolledBackError") and k.hex() in r.json()["detail"]
    _sql(db, "DELETE FROM safehold_rows WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) "
             "AND key = ?", ("records:patients", k))
    r = app.request("GET", "/v1/patients/p1", role="reader")
    assert r.status_code == 409 and r.json()["detail"].startswith("RowDeletedError")
    assert app.request("GET", "/v1/patients/nobody", role="reader").status_code == 404
    # the background audit finds what nobody read: /healthz 503 naming it
    _sql(db, "DELETE FROM safehold_rows WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) "
             "AND key IN (SELECT key FROM safehold_rows "
             "WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?) LIMIT 1)",
         ("records:patients.postings", "records:patients.postings"))
    fresh.start_background(audit_seconds=0.2)
    try:
        for _ in range(100):
            if fresh.current_findings():
                break
            time.sleep(0.05)
        h = app.request("GET", "/healthz", role=None)
        assert h.status_code == 503 and "audit found" in h.json()["reason"], h.text
        st = app.request("GET", "/v1/freshness").json()
        assert st["serving"] and st["audit_findings"]
    finally:
        fresh.close()
        fresh.fs.close()


class FlakyAnchor(InProcessAnchor):
    """TEST DOUBLE (as InProcessAnchor) whose members can all be unreachable at once, keeping
    their state (a network partition)."""

    down = False

    def _each(self, fn):
        if self.down:
            return [AnchorUnavailableError("member unreachable")] * self.n
        return super()._each(fn)


def test_anchor_unavailable_at_start_recovers_and_runs_the_deferred_start_up(tmp_path):
    anchor, keyset = FlakyAnchor(), Keyset.generate()
    app, fresh = _app(tmp_path, anchor, keyset)
    fresh.reanchor(anchor.sign_for(fresh.fs).to_json())
    assert app.request("PUT", "/v1/patients/a", role="writer", json=_patient("Gamma")).status_code == 201
    fresh.fs.close()
    anchor.down = True
    app, fresh = _app(tmp_path, anchor, keyset)
    try:
        h = app.request("GET", "/healthz", role=None)
        assert h.status_code == 503 and h.json()["reason"].startswith("AnchorUnavailableError")
        r = app.request("GET", "/v1/patients/a", role="reader")
        assert r.status_code == 503 and r.json()["error"] == "anchor-unavailable"
        fresh.start_background(audit_seconds=0, retry_seconds=0.05)
        anchor.down = False
        for _ in range(100):
            if app.request("GET", "/healthz", role=None).status_code == 200:
                break
            time.sleep(0.05)
        assert app.request("GET", "/v1/patients/a", role="reader").status_code == 200
        assert fresh.status()["serving"]
    finally:
        fresh.close()
        fresh.fs.close()


def test_a_posting_value_edited_by_the_dba_is_refused_not_skipped(tmp_path):
    """DBA attack: a posting row's *value* is not in the group's multiset hash (keys and versions
    are; the value is the AES-SIV ciphertext of the id). Flipping one byte of it kept the group's
    count and hash, the row failed authentication and was skipped: a search by family answered
    200 with no records — the patient hidden from search, undetected (deleting the same posting
    is a 409 ``PostingsStaleError``). Over a FreshStore the search is now refused (409)."""
    from safehold.freshness.anchor.statements import SignedOwnerStatement, sign_owner_statement

    anchor, keyset = InProcessAnchor(), Keyset.generate()
    app, fresh = _app(tmp_path, anchor, keyset)
    try:
        doc = app.request("GET", "/v1/freshness/proposal").json()
        st = SignedOwnerStatement.from_json({"payload": doc["payload"], "signature": "AA"}).statement
        good = sign_owner_statement(st, anchor.owner.private_pem())
        assert app.request("POST", "/v1/freshness/reanchor", json=good.to_json()).status_code == 200
        db, ns = tmp_path / "records.db", "records:patients.postings"
        before = _rows(db, ns)
        r = app.request("PUT", "/v1/patients/p1", role="writer", json=_patient("Hidden"))
        assert r.status_code == 201
        r = app.request("GET", "/v1/patients", role="reader", params={"family": "Hidden"})
        assert r.status_code == 200 and [x["id"] for x in r.json()["records"]] == ["p1"]
        for k in set(_rows(db, ns)) - set(before):  # every new posting of p1: value edited
            _, value = _rows(db, ns)[k]
            _sql(db, "UPDATE safehold_rows SET value = ? WHERE "
                     "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
                 (value[:-1] + bytes([value[-1] ^ 1]), ns, k))
        r = app.request("GET", "/v1/patients", role="reader", params={"family": "Hidden"})
        assert r.status_code == 409, r.text  # was 200 {"records": []}
        assert r.json()["error"] == "record-tampered"
    finally:
        fresh.close()
        fresh.fs.close()
