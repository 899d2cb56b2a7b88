"""Broker replicas working together (issue 18): two brokers on one store (a SQLite file; a
PostgreSQL schema). A KBS handshake started on one replica finishes on the other, a challenge
nonce is used once across replicas (also when both claim it at the same moment), and what a
database operator can do with the session rows gives nothing decryptable."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.broker import protocol
from safehold.broker.errors import BrokerError, NonceReplayedError
from safehold.broker.http import create_app
from safehold.broker.server import open_broker
from safehold.broker.sessions import SESSION_NAMESPACE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=["sqlite", "postgres"])
def replicas(request, tmp_path: Path):
    """Two broker replicas on one store, the workload's attester and the store URL."""
    warnings.simplefilter("ignore")
    if request.param == "sqlite":
        url = str(tmp_path / "shared.db")
    else:
        url = f"{request.getfixturevalue('postgres_dsn')}?schema={request.getfixturevalue('pg_schema')}"
    cfg = tmp_path / "records.toml"
    cfg.write_text('workload = "records"\n')
    att = SimulatedAttester(tmp_path / "tee", workload_files=[cfg])
    manifest = {"workloads": {"records": {"secrets": ["k"], "policy": {
        "allow_simulated": True, "simulated_root": str(att.root_ca_path),
        "accepted_tcb_statuses": ["Simulated"], "report_data": "key-binding",
        "reference_values": {"measurements": [att.measurement.hex()]}}}},
        "secrets": {"k": {"type": "keyset"}}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    a = open_broker(tmp_path / "b", url, manifest_path=tmp_path / "m.json")
    b = open_broker(tmp_path / "b", url)  # same sealing identity (same measurement), same store
    assert a.mode == b.mode == "ready"
    yield a, b, att, url
    for x in (a, b):
        x.state.store.close()


def _call(broker, method: str, path: str, *, cookie: str | None = None, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_app(broker))
        async with httpx.AsyncClient(transport=transport, base_url="https://broker.test") as c:
            if cookie:
                c.cookies.set("kbs-session-id", cookie)
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def _auth(broker) -> tuple[str, str]:
    r = _call(broker, "POST", "/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                                    "extra-params": {"workload": "records"}})
    assert r.status_code == 200, r.text
    return r.cookies["kbs-session-id"], r.json()["nonce"]


def test_a_handshake_started_on_one_replica_finishes_on_the_other(replicas):
    a, b, att, _ = replicas
    key = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(key)
    sid, nonce = _auth(a)
    ev = att.attest(protocol.report_data(nonce, jwk))
    r = _call(b, "POST", "/kbs/v0/attest", cookie=sid, json={"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()})
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    for broker, how in ((a, {"cookie": sid}), (b, {"headers": {"Authorization": f"Bearer {token}"}})):
        r = _call(broker, "GET", "/kbs/v0/resource/default/keyset/k", **how)
        assert r.status_code == 200, r.text
        assert protocol.decrypt_response(r.json(), key)
    # the nonce is spent on every replica
    r = _call(a, "POST", "/kbs/v0/attest", cookie=sid, json={"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()})
    assert r.status_code == 401 and "already used" in r.text


def test_one_nonce_claimed_by_two_replicas_at_once_is_used_once(replicas):
    a, b, _, _ = replicas
    for _ in range(10):
        sid, _ = _auth(a)
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def claim(broker, sid=sid, outcomes=outcomes, barrier=barrier):
            barrier.wait()
            try:
                broker.sessions.claim(sid, time.time())
                outcomes.append("won")
            except NonceReplayedError:
                outcomes.append("replay")

        ts = [threading.Thread(target=claim, args=(x,)) for x in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(outcomes) == ["replay", "won"]


def test_what_a_database_operator_can_do_with_session_rows(replicas):
    a, b, att, _ = replicas
    key = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(key)
    sid, nonce = _auth(a)
    store = a.state.store
    row_before = next(iter(store.scan(SESSION_NAMESPACE, limit=1000)))
    assert sid.encode() not in row_before.value and nonce.encode() not in row_before.value  # sealed
    assert all(sid.encode() not in r.key for r in store.scan(SESSION_NAMESPACE, limit=1000))
    ev = att.attest(protocol.report_data(nonce, jwk))
    body = {"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()}
    assert _call(b, "POST", "/kbs/v0/attest", cookie=sid, json=body).status_code == 200

    # 1. a forged or moved row does not authenticate: refused
    cur = store.get(SESSION_NAMESPACE, row_before.key)
    forged = bytearray(cur.value)
    forged[-1] ^= 1
    store.put(SESSION_NAMESPACE, row_before.key, bytes(forged), expected_version=cur.version)
    r = _call(a, "GET", "/kbs/v0/resource/default/keyset/k", cookie=sid)
    assert r.status_code == 401 and "does not authenticate" in r.text

    # 2. the old (unused-nonce) row put back: the recorded Evidence attests again, but the
    #    release is encrypted to the TEE's key, which the operator does not hold
    cur = store.get(SESSION_NAMESPACE, row_before.key)
    store.put(SESSION_NAMESPACE, row_before.key, row_before.value, expected_version=cur.version)
    r = _call(a, "POST", "/kbs/v0/attest", cookie=sid, json=body)
    assert r.status_code == 200  # the replayed nonce is accepted: the database forgot its use
    r = _call(a, "GET", "/kbs/v0/resource/default/keyset/k", cookie=sid)
    assert r.status_code == 200
    with pytest.raises(BrokerError, match="does not decrypt"):
        protocol.decrypt_response(r.json(), ECKey.generate_key("P-256"))
    assert protocol.decrypt_response(r.json(), key)  # only the TEE can
    #    and the recorded Evidence with the operator's own key is refused (binding)
    mine = protocol.public_jwk(ECKey.generate_key("P-256"))
    store.put(SESSION_NAMESPACE, row_before.key, row_before.value,
              expected_version=store.get(SESSION_NAMESPACE, row_before.key).version)
    r = _call(a, "POST", "/kbs/v0/attest", cookie=sid, json={"tee-pubkey": mine, "tee-evidence": ev.to_cmw()})
    assert r.status_code == 401 and "report_data" in r.text

    # 3. rows deleted: the workload attests again (availability only)
    for row in list(store.scan(SESSION_NAMESPACE, limit=1000)):
        store.delete(SESSION_NAMESPACE, row.key)
    r = _call(b, "GET", "/kbs/v0/resource/default/keyset/k", cookie=sid)
    assert r.status_code == 401


def test_expired_rows_are_collected(replicas):
    a, b, _, _ = replicas
    for _ in range(3):
        _auth(a)
    store = a.state.store
    assert len(store.scan(SESSION_NAMESPACE, limit=1000)) >= 3
    assert b.sessions.gc(time.time() + 10 * max(b.sessions.nonce_ttl, b.sessions.token_ttl)) >= 3
    assert store.scan(SESSION_NAMESPACE, limit=1000) == []
