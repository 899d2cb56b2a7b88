"""Replayed Evidence at the KBS: 401 whether or not the Request names a workload, and no refusal
names a value of the manifest (in process: the real broker app over a real SQLite state)."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.broker import protocol
from safehold.broker.http import create_app
from safehold.broker.server import open_broker


class Kbs:
    """The broker app in process; every error body it sent is kept in :attr:`errors`."""

    def __init__(self, broker):
        self.broker = broker
        self.errors: list[str] = []

    def run(self, steps):
        async def go():
            transport = httpx.ASGITransport(app=create_app(self.broker))
            async with httpx.AsyncClient(transport=transport, base_url="https://broker.test") as c:
                return await steps(c)

        return asyncio.run(go())

    def attest(self, evidence_for, *, workload: str | None, jwk=None, bind_jwk=None):
        """auth (naming ``workload`` or not) then attest with ``evidence_for(report_data)``;
        returns (status, body) of the attest answer. ``bind_jwk``: the key the Evidence binds
        (default: the key sent)."""
        jwk = jwk or protocol.public_jwk(ECKey.generate_key("P-256"))

        async def steps(c):
            extra = {"workload": workload} if workload else {}
            r = await c.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                                   "extra-params": extra})
            assert r.status_code == 200, r.text
            ev = evidence_for(protocol.report_data(r.json()["nonce"], bind_jwk or jwk))
            return await c.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()})

        r = self.run(steps)
        if r.status_code != 200:
            self.errors.append(r.text)
        return r.status_code, r.json()


@pytest.fixture
def kbs(tmp_path: Path):
    warnings.simplefilter("ignore")  # simulated Evidence warns on every use
    tee = tmp_path / "tee"
    cfgs = {}
    for name in ("records", "billing", "lab"):
        cfgs[name] = tmp_path / f"{name}.toml"
        cfgs[name].write_text(f'workload = "{name}"\n')
    att = {name: SimulatedAttester(tee, workload_files=[cfg]) for name, cfg in cfgs.items()}

    def policy(a: SimulatedAttester, **extra) -> dict:
        return {"allow_simulated": True, "simulated_root": str(a.root_ca_path),
                "accepted_tcb_statuses": ["Simulated"], "report_data": "key-binding",
                "reference_values": {"measurements": [a.measurement.hex()]}, **extra}

    manifest = {
        "workloads": {"records": {"secrets": ["k"], "policy": policy(att["records"])},
                      "billing": {"secrets": ["k"], "policy": policy(att["billing"])},
                      "lab": {"secrets": ["k"], "policy": policy(att["lab"])}},
        "secrets": {"k": {"type": "keyset"}},
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    broker = open_broker(tmp_path / "b", manifest_path=tmp_path / "m.json")
    k = Kbs(broker)
    k.attesters = att
    k.reference_values = [a.measurement.hex() for a in att.values()]
    k.tmp = tmp_path
    yield k
    broker.state.store.close()


def _captured(kbs: Kbs, name: str = "records"):
    """Evidence the workload sent in a successful attestation (what an eavesdropper keeps)."""
    kept = {}

    def evidence_for(rd):
        kept["ev"] = kbs.attesters[name].attest(rd)
        return kept["ev"]

    assert kbs.attest(evidence_for, workload=name)[0] == 200
    return kept["ev"]


def test_replayed_evidence_without_a_named_workload_is_401_and_names_no_reference_value(kbs):
    old = _captured(kbs)
    status, body = kbs.attest(lambda rd: old, workload=None)
    assert status == 401, body
    assert "report_data" in body["detail"] and "replayed" in body["detail"]
    for value in kbs.reference_values:
        assert value not in json.dumps(body)


def test_replayed_evidence_with_a_named_workload_is_401_too(kbs):
    old = _captured(kbs)
    for workload in ("records", "billing"):  # its own workload, and another one
        status, body = kbs.attest(lambda rd: old, workload=workload)
        assert status == 401, body
        assert "report_data" in body["detail"]


def test_no_kbs_refusal_lists_a_reference_value_of_any_workload(kbs):
    old = _captured(kbs)
    stranger = SimulatedAttester(kbs.tmp / "tee", workload_files=[kbs.tmp / "m.json"])  # unapproved code
    debug = SimulatedAttester(kbs.tmp / "tee", workload_files=[kbs.tmp / "records.toml"], debug=True)
    other_key = protocol.public_jwk(ECKey.generate_key("P-256"))
    refusals = [
        (kbs.attest(lambda rd: old, workload=None), 401),                      # replay, unnamed
        (kbs.attest(lambda rd: old, workload="records"), 401),                 # replay, named
        (kbs.attest(stranger.attest, workload=None), 403),                     # unapproved, unnamed
        (kbs.attest(stranger.attest, workload="lab"), 403),                    # unapproved, named
        (kbs.attest(kbs.attesters["records"].attest, workload="billing"), 403),  # another workload's
        (kbs.attest(debug.attest, workload="records"), 403),                   # debug TEE
        (kbs.attest(kbs.attesters["records"].attest, workload=None, bind_jwk=other_key), 401),  # relay
    ]
    for (status, body), want in refusals:
        assert status == want, body
    assert len(kbs.errors) == len(refusals)
    for text in kbs.errors:
        for value in kbs.reference_values:
            assert value not in text, text
        assert "expected" not in json.loads(text)["detail"].replace("expected vs. got", "")
    named = json.loads(kbs.errors[3])["detail"]
    assert "workload 'lab'" in named and "measurement" in named
    unnamed = json.loads(kbs.errors[2])["detail"]
    assert "no workload" in unnamed and "records" not in unnamed and "billing" not in unnamed
    assert "debug" in json.loads(kbs.errors[5])["detail"]
    # the owner can still see why: the audit log keeps expected vs. got for every denial
    denied = [e for e in kbs.broker.audit_entries() if e["event"] == "attest"
              and e["detail"].get("verdict") == "denied"]
    logged = json.dumps(denied)
    assert all(v in logged for v in kbs.reference_values)
    assert stranger.measurement.hex() in logged
