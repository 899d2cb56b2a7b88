"""The manifest's ``access`` secret: the data owner's table of who holds which role at a workload,
every identity pinned; the broker releases it only to the attested workload, and an operator
cannot write it (in process: the real broker over a real SQLite state)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import warnings
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.broker import protocol
from safehold.broker.http import create_app
from safehold.broker.manifest import manifest_from_dict
from safehold.broker.server import open_broker
from safehold.errors import ManifestError

KEY_PIN = "ab" * 32
OWNER_TOKEN = "owner-token-of-the-access-secret-test"
OPERATOR_TOKEN = "operator-token-of-the-access-secret-test"


def sha(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()


def manifest(wl: SimulatedAttester | None = None) -> dict:
    policy = {"allow_simulated": True, "accepted_tcb_statuses": ["Simulated"], "report_data": "key-binding",
              "reference_values": {"measurements": [wl.measurement.hex() if wl else "cd" * 48]}}
    if wl is not None:
        policy["simulated_root"] = str(wl.root_ca_path)
    return {
        "workloads": {"records": {"secrets": ["k", "records-access"], "policy": policy},
                      "other": {"secrets": ["k"], "policy": policy}},
        "secrets": {
            "k": {"type": "keyset"},
            "records-access": {"type": "access", "principals": {
                "alice": {"role": "admin", "public_key_sha256": KEY_PIN, "token_sha256": sha("alice-token")},
                "bob": {"role": "reader", "token_sha256": sha("bob-token")},
            }},
        },
        "users": {"owner": {"roles": ["owner"], "token_sha256": sha(OWNER_TOKEN)},
                  "olga": {"roles": ["operator"], "token_sha256": sha(OPERATOR_TOKEN)}},
    }


def test_access_secret_releases_pins_by_credential():
    spec = manifest_from_dict(manifest()).secrets["records-access"]
    doc = json.loads(spec.access_document())
    assert doc == {"keys": {KEY_PIN: {"name": "alice", "role": "admin"}},
                   "tokens": {sha("alice-token"): {"name": "alice", "role": "admin"},
                              sha("bob-token"): {"name": "bob", "role": "reader"}}}


def _with_principal(**entry) -> dict:
    m = manifest()
    m["secrets"]["records-access"]["principals"]["mallory"] = entry
    return m


@pytest.mark.parametrize("entry, message", [
    ({"role": "admin"}, "needs public_key_sha256 and/or token_sha256"),
    ({"public_key_sha256": "cd" * 32}, r"\.role: expected a name"),
    ({"role": "admin", "public_key_sha256": "xyz"}, "public_key_sha256: expected 64 hex digits"),
    ({"role": "admin", "token_sha256": "ab" * 31}, "token_sha256: expected 64 hex digits"),
    ({"role": "admin", "cn": "admin"}, "a certificate's CN grants nothing"),
    ({"role": "admin", "public_key_sha256": KEY_PIN}, "the same pin is already principal 'alice'"),
    ({"role": "admin", "token_sha256": sha("bob-token")}, "the same pin is already principal 'bob'"),
])
def test_access_secret_refuses_unpinned_ambiguous_or_named_identities(entry, message):
    with pytest.raises(ManifestError, match=message):
        manifest_from_dict(_with_principal(**entry))


def test_access_secret_takes_no_fields_of_other_types():
    m = manifest()
    m["secrets"]["records-access"]["max_bytes"] = 10
    with pytest.raises(ManifestError, match="not allowed for type 'access'"):
        manifest_from_dict(m)


@pytest.fixture
def broker(tmp_path: Path):
    warnings.simplefilter("ignore")
    wl = SimulatedAttester(tmp_path / "tee")
    (tmp_path / "m.json").write_text(json.dumps(manifest(wl)))
    b = open_broker(tmp_path / "b", manifest_path=tmp_path / "m.json")
    b.workload = wl
    yield b
    b.state.store.close()


def _call(b, steps):
    async def go():
        transport = httpx.ASGITransport(app=create_app(b))
        async with httpx.AsyncClient(transport=transport, base_url="https://broker.test") as c:
            return await steps(c)

    return asyncio.run(go())


def _fetch_access(b, workload: str):
    key = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(key)

    async def steps(c):
        r = await c.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                               "extra-params": {"workload": workload}})
        ev = b.workload.attest(protocol.report_data(r.json()["nonce"], jwk))
        r = await c.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()})
        assert r.status_code == 200, r.text
        return await c.get("/kbs/v0/resource/default/access/records-access")

    r = _call(b, steps)
    return r, (protocol.decrypt_response(r.json(), key) if r.status_code == 200 else None)


def test_the_attested_workload_receives_the_access_list_and_no_other_does(broker):
    r, plain = _fetch_access(broker, "records")
    assert r.status_code == 200, r.text
    assert plain == broker.manifest.secrets["records-access"].access_document()
    r, _ = _fetch_access(broker, "other")  # not among its secrets
    assert r.status_code == 403


def test_an_operator_cannot_write_the_access_list(broker):
    before = broker.manifest.digest
    forged = json.dumps({"keys": {"ef" * 32: {"name": "olga", "role": "admin"}}, "tokens": {}}).encode()

    async def steps(c):
        return await c.put("/admin/secrets/records-access", content=forged,
                           headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})

    r = _call(broker, steps)
    assert r.status_code == 400 and "only 'value' secrets" in r.json()["detail"], r.text
    assert broker.manifest.digest == before
    _, plain = _fetch_access(broker, "records")
    assert b"olga" not in plain


def test_only_a_signed_update_changes_the_access_list(broker):
    raw = copy.deepcopy(broker.manifest.raw)
    raw["secrets"]["records-access"]["principals"]["olga"] = {"role": "admin", "token_sha256": sha("x")}

    async def steps(c):
        return await c.post("/admin/manifest/update", json={"manifest": raw, "version": 2, "signer": "olga",
                                                            "signature": "AAAA"},
                            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})

    r = _call(broker, steps)
    assert r.status_code == 403, r.text  # an operator is no owner: it signs nothing that counts
    assert broker.manifest_version == 1
