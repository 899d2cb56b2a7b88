"""The broker's HTTP contract, in process (httpx.ASGITransport against the real app and a real
broker on SQLite): every refusal is an RFC 7807 problem document with the status and ``type``
the KBS protocol and docs/broker.md give, whatever layer raised it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.broker import protocol
from safehold.broker.core import Broker
from safehold.broker.http import DEFAULT_MAX_BODY, create_app
from safehold.broker.server import open_broker
from safehold.broker.state import AUDIT_NAMESPACE, NAMESPACE, BrokerState, SealingIdentity
from tests.support.asgi import AsgiClient

TOKEN = "reader-token-for-the-contract-test"
PROBLEM = "https://safehold.dev/errors/"
MAX_BODY = 4096
AUTH = {"version": "0.1.0", "tee": "simulated"}


def _flip_last_bit(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


def _manifest(wl: SimulatedAttester) -> dict:
    return {"name": "contract",
            "workloads": {"w": {"secrets": ["k"], "policy": {
                "allow_simulated": True, "simulated_root": str(wl.root_ca_path),
                "accepted_tcb_statuses": ["UpToDate", "Simulated"], "report_data": "key-binding",
                "reference_values": {"measurements": [wl.measurement.hex()]}}}},
            "secrets": {"k": {"type": "keyset"}},
            "users": {"rita": {"roles": ["reader"],
                               "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}}}


@pytest.fixture
def ready(tmp_path: Path):
    import warnings

    warnings.simplefilter("ignore")
    wl = SimulatedAttester(tmp_path / "wl")
    mp = tmp_path / "m.json"
    mp.write_text(json.dumps(_manifest(wl)))
    b = open_broker(tmp_path / "b", manifest_path=mp)
    yield b
    b.state.store.close()


def _call(b: Broker, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(b, max_body=MAX_BODY))
        async with httpx.AsyncClient(transport=transport, base_url="https://broker.test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def _problem(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == PROBLEM + kind and body["title"] == kind.replace("-", " ")
    assert body["status"] == status and isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


def test_refusals_map_to_status_and_problem_type(ready):
    b = ready
    assert "not valid JSON" in _problem(_call(b, "POST", "/kbs/v0/auth", content=b"{nope"),
                                        400, "bad-request")
    assert "tee" in _problem(_call(b, "POST", "/kbs/v0/auth", json={"version": "0.1.0", "tee": "x"}),
                             400, "bad-request")
    assert "no session" in _problem(_call(b, "POST", "/kbs/v0/attest", json={}), 401, "unauthorized")
    assert "unknown user token" in _problem(
        _call(b, "GET", "/admin/audit", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    other = {**b.manifest.raw, "name": "another"}
    assert "already set" in _problem(_call(b, "POST", "/admin/manifest", json=other), 403, "forbidden")
    assert "needs one of" in _problem(_call(b, "PUT", "/admin/secrets/k", content=b"v",
                                            headers={"Authorization": f"Bearer {TOKEN}"}), 403, "forbidden")
    assert "not known" in _problem(_call(b, "GET", "/v1/values/session=nope"), 404, "not-found")
    assert "does not exist" in _problem(_call(b, "GET", "/admin/manifest", params={"version": 9},
                                              headers={"Authorization": f"Bearer {TOKEN}"}), 404, "not-found")
    upd = {"manifest": b.manifest.raw, "version": 7, "signer": "rita", "signature": "AA"}
    assert "version expected 2" in _problem(_call(b, "POST", "/admin/manifest/update", json=upd),
                                            409, "conflict")
    assert "expected {manifest" in _problem(_call(b, "POST", "/admin/manifest/update", json=[1]),
                                            400, "bad-request")
    assert "not in recovery mode" in _problem(_call(b, "GET", "/recovery"), 409, "conflict")
    # a query parameter FastAPI cannot parse keeps FastAPI's own answer
    assert _call(b, "GET", "/admin/manifest", params={"version": "x"}).status_code == 422


def test_kbs_auth_sets_a_strict_session_cookie(ready):
    r = _call(ready, "POST", "/kbs/v0/auth", json=AUTH)
    assert r.status_code == 200 and len(json.loads(r.text)["nonce"]) == 43
    cookie = r.headers["set-cookie"].lower()
    ttl = ready.config.nonce_ttl + ready.config.token_ttl + 60
    assert cookie.startswith("kbs-session-id=") and "httponly" in cookie and "samesite=strict" in cookie
    assert f"max-age={ttl}" in cookie


def test_body_limit_declared_and_streamed(ready):
    detail = _problem(_call(ready, "POST", "/kbs/v0/auth", content=b"x" * (MAX_BODY + 1)),
                      413, "body-too-large")
    assert f"limit {MAX_BODY}" in detail

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: the limit counts what arrives
        for _ in range(4):
            yield b"x" * (MAX_BODY // 2)

    detail = _problem(_call(ready, "POST", "/kbs/v0/auth", content=chunks()), 413, "body-too-large")
    assert f"exceeds {MAX_BODY} bytes" in detail
    assert _call(ready, "GET", "/status").status_code == 200


def test_state_and_audit_tampering_answer_503_and_409(ready):
    b = ready
    store = b.state.store
    first = (1).to_bytes(8, "big")
    row = store.get(AUDIT_NAMESPACE, first)
    store.put(AUDIT_NAMESPACE, first, _flip_last_bit(row.value), expected_version=row.version)
    detail = _problem(_call(b, "GET", "/admin/audit", headers={"Authorization": f"Bearer {TOKEN}"}),
                      409, "conflict")
    assert "audit entry #1" in detail
    head = store.get(NAMESPACE, b"m/head")
    store.put(NAMESPACE, b"m/head", _flip_last_bit(head.value), expected_version=head.version)
    upd = {"manifest": b.manifest.raw, "version": 2, "signer": "rita", "signature": "AA"}
    detail = _problem(_call(b, "POST", "/admin/manifest/update", json=upd), 503, "unavailable")
    assert "m/head fails authentication" in detail


def test_recovery_mode_answers_503_and_recovery_failed(ready, tmp_path):
    """The same store opened under another sealing identity: the master key stays sealed."""
    store = ready.state.store
    sealed = Broker(BrokerState.open(store, SealingIdentity(b"z" * 32, b"\x02" * 48)),
                    SimulatedAttester(tmp_path / "other"))
    assert sealed.mode == "recovery"
    assert "recovery mode" in _problem(_call(sealed, "GET", "/ca"), 503, "unavailable")
    assert "recovery mode" in _problem(_call(sealed, "POST", "/kbs/v0/auth", json=AUTH), 503, "unavailable")
    assert "no recovery shares" in _problem(
        _call(sealed, "POST", "/recovery", json={"shares": [], "expect_fingerprint": "00" * 16}),
        400, "recovery-failed")
    assert "expected {\"shares\"" in _problem(_call(sealed, "POST", "/recovery", json={}), 400, "bad-request")
    assert _call(sealed, "GET", "/status").json()["mode"] == "recovery"


def test_no_manifest_yet_is_503(tmp_path):
    b = open_broker(tmp_path / "fresh")
    try:
        assert "no manifest" in _problem(_call(b, "POST", "/kbs/v0/auth", json=AUTH), 503, "unavailable")
    finally:
        b.state.store.close()


def _jwk() -> dict:
    from joserfc.jwk import ECKey

    return protocol.public_jwk(ECKey.generate_key("P-256"))


def test_kbs_bad_input_is_a_4xx_problem_and_the_broker_keeps_serving(ready, tmp_path):
    """Malformed KBS requests against the app as ``safehold broker serve`` builds it (default
    body limit): each is a 4xx problem document naming what was wrong; one session is reused
    throughout, and the broker still answers afterwards."""
    wl = SimulatedAttester(tmp_path / "wl")  # the manifest's workload (same keys and measurement)
    client = AsgiClient(create_app(ready), "https://broker.test")

    async def auth(c: httpx.AsyncClient) -> str:
        r = await c.post("/kbs/v0/auth", json={**AUTH, "extra-params": {"workload": "w"}})
        assert r.status_code == 200, r.text
        return r.json()["nonce"]

    async def go(c: httpx.AsyncClient) -> None:
        r = await c.post("/kbs/v0/auth", content=b"x" * (DEFAULT_MAX_BODY + 1))
        assert f"limit {DEFAULT_MAX_BODY}" in _problem(r, 413, "body-too-large")
        _problem(await c.post("/kbs/v0/auth", content=b"{not json"), 400, "bad-request")
        _problem(await c.post("/kbs/v0/auth", json=[1]), 400, "bad-request")
        assert "tee" in _problem(await c.post("/kbs/v0/auth", json={**AUTH, "tee": "nope"}),
                                 400, "bad-request")
        assert "version" in _problem(await c.post("/kbs/v0/auth", json={**AUTH, "version": "9.0"}),
                                     400, "bad-request")
        assert "ghost" in _problem(await c.post("/kbs/v0/auth", json={
            **AUTH, "extra-params": {"workload": "ghost"}}), 400, "bad-request")
        _problem(await c.post("/kbs/v0/attest", json={}), 401, "unauthorized")  # no session yet
        sim = '["application/vnd.safehold.simulated-report+cbor",'
        cases = [
            {"tee-pubkey": {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}, "tee-evidence": "[]"},
            {"tee-pubkey": {**_jwk(), "d": "AAAA"}, "tee-evidence": "[]"},  # a private key
            {"tee-pubkey": {"kty": "oct", "k": "AAAA"}, "tee-evidence": "[]"},
            {"tee-pubkey": _jwk(), "tee-evidence": sim + '"!!"]'},
            {"tee-pubkey": _jwk(), "tee-evidence": "not a cmw"},
            {"tee-pubkey": _jwk(), "tee-evidence": 5},
            {"tee-pubkey": _jwk(), "tee-evidence": sim + '"AAEC"]'},
        ]
        for body in cases:
            await auth(c)
            r = await c.post("/kbs/v0/attest", json=body)
            assert r.status_code in (400, 401), (body, r.status_code, r.text)
            _problem(r, r.status_code, "bad-request" if r.status_code == 400 else "unauthorized")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
            for _ in range(20):
                yield b"y" * 65536

        _problem(await c.post("/kbs/v0/attest", content=chunks()), 413, "body-too-large")
        # the session still works: a well-formed attestation passes after all of the above
        nonce = await auth(c)
        jwk = _jwk()
        ev = wl.attest(protocol.report_data(nonce, jwk)).to_cmw()
        r = await c.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev})
        assert r.status_code == 200, r.text
        assert (await c.get("/status")).json()["mode"] == "ready"

    client.session(go)
