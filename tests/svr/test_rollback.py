"""Rollback: the operator restores an older copy of the SVR state (a SQLite file copy, a copy
of the PostgreSQL rows table), with the service stopped or running, or rolls back just the
backup's row. The FreshStore refuses every variant: no tries come back.
(The process test repeats the stopped and running cases with real anchor members.)"""

from __future__ import annotations

import pytest

from safehold.freshness.errors import RowRolledBackError, StoreRolledBackError
from safehold.svr.http import create_app, parse_access
from safehold.svr.protocol import ZERO_TOKEN, Status, backup_id
from tests.support.asgi import AsgiClient
from tests.support.svr import USER_TOKEN, access_list, open_service

BID = backup_id("patient-1", "default")
DATA, PIN, WRONG = b"\x01" * 40, b"\xaa" * 32, b"\xbb" * 32


def _ready(svc, tries=10):
    svc.svr2.backup(BID, DATA, PIN, tries, ZERO_TOKEN)
    svc.svr2.expose(BID, DATA)


def _guess(svc, n):
    for _ in range(n):
        assert svc.svr2.restore(BID, WRONG).status == Status.PIN_MISMATCH


def test_older_copy_restored_while_stopped_is_refused(engine, anchor):
    svc = open_service(engine.open(), anchor)
    _ready(svc)
    svc.close()
    old = engine.backup()  # the operator's copy with 10 tries
    svc = open_service(engine.open(), anchor)
    _guess(svc, 7)
    svc.close()
    newer = engine.backup()
    engine.restore_file(old)  # put the 10-tries copy back while the service is down
    svc = open_service(engine.open(), anchor)
    with pytest.raises(StoreRolledBackError, match="behind the anchor"):
        svc.svr2.query(BID)
    with pytest.raises(StoreRolledBackError):
        svc.svr2.restore(BID, PIN)  # not even the right PIN is served from the copy
    client = AsgiClient(create_app(svc, parse_access(access_list()))).as_role(USER_TOKEN)
    r = client.post("/v1/svr2/restore", json={"pin": "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqo="})
    assert r.status_code == 503 and r.json()["error"] == "not-fresh"
    assert client.get("/healthz").status_code == 503
    svc.close()
    engine.restore_file(newer)  # the current state: served again, 3 tries as charged
    svc = open_service(engine.open(), anchor)
    assert svc.svr2.query(BID).tries == 3
    svc.close()


def test_older_copy_restored_while_running_is_refused(engine, anchor):
    svc = open_service(engine.open(), anchor)
    _ready(svc)
    old = engine.backup()
    _guess(svc, 7)
    engine.restore(old)  # swap the rows under the running service
    with pytest.raises(RowRolledBackError):
        svc.svr2.query(BID)
    with pytest.raises(RowRolledBackError):
        svc.svr2.restore(BID, WRONG)
    client = AsgiClient(create_app(svc, parse_access(access_list()))).as_role(USER_TOKEN)
    r = client.post("/v1/svr2/query", json={})
    assert r.status_code == 409 and r.json()["error"] == "stale-data"
    assert "tries" not in r.json()["detail"]  # the refusal names a blind index and versions only
    svc.close()
    svc = open_service(engine.open(), anchor)  # and after a restart: behind the anchor
    with pytest.raises(StoreRolledBackError):
        svc.svr2.query(BID)
    svc.close()


def test_one_row_rolled_back_is_refused(engine, anchor):
    svc = open_service(engine.open(), anchor)
    _ready(svc)
    ns, key = "svr:svr2", svc.engine.row_index("svr2", BID.hex())
    with engine.open() as raw:
        before = raw.get(ns, key)
    _guess(svc, 7)
    engine.sql("UPDATE safehold_rows SET version = ?, value = ? WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
               (before.version, before.value, ns, key))
    with pytest.raises(RowRolledBackError, match="expected version"):
        svc.svr2.restore(BID, PIN)
    svc.close()
    svc = open_service(engine.open(), anchor)  # the journal is intact: start-up passes, the row does not
    svc.fresh.check()
    with pytest.raises(RowRolledBackError):
        svc.svr2.query(BID)
    svc.close()


def test_svr3_shares_rolled_back_are_refused(engine, anchor):
    from safehold.crypto import oprf
    from safehold.svr import db4

    svc = open_service(engine.open(), anchor)
    shares = db4.split(1)
    svc.svr3.create(BID, version=1, max_tries=5, oprf_share=shares.oprf_shares[0],
                    zero_share=shares.zero_shares[0], encryption_share=bytes(32),
                    auth_commitment=oprf.scalar_mult_base(oprf.random_scalar()), sealed=b"s" * 20,
                    token=ZERO_TOKEN)
    old = engine.backup()
    b = oprf.blind([b"x"]).elements[0]
    for _ in range(5):
        svc.svr3.restore1(BID, b)  # brute-forced: erased
    engine.restore(old)
    with pytest.raises(RowRolledBackError):
        svc.svr3.restore1(BID, b)
    svc.close()
