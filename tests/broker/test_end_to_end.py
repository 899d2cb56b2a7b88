"""Key broker end to end: the broker runs as a real process on a loopback port; workloads attest
with the simulated TEE (the only TEE that exists here).

The module's broker keeps its state in SQLite. The store contract is tested on both engines in
tests/store/; one smoke test here runs a broker process over PostgreSQL end to end (attest,
resource release, restart, offline audit check). HTTP status codes and error shapes are tested
in-process in tests/broker/test_http.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.result import generate_signing_key, issue_ear
from safehold.attestation.verifier import Appraisal
from safehold.broker import protocol
from safehold.client.broker import BrokerClient
from safehold.client.errors import BrokerRefusedError
from safehold.freshness.anchor.core import ATTESTED_WORKLOAD_EKU, ledger_writer
from tests.support.broker_process import (
    broker_launch,
    manifest_dict,
    start_broker,
    write_keys,
    write_manifest,
)
from tests.support.shared import ROOT, free_port

pytestmark = pytest.mark.slow  # starts processes on loopback

SRC = ROOT / "src"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safehold.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=str(ROOT), timeout=120)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """This module's broker store: a SQLite file."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("db") / "broker.db")


@pytest.fixture
def pg_store_url(postgres_dsn: str, pg_schema: str) -> str:
    """A broker store URL for a fresh PostgreSQL schema."""
    sep = "&" if "?" in postgres_dsn else "?"
    return f"{postgres_dsn}{sep}schema={pg_schema}"


@pytest.fixture(scope="module")
def env(tmp_path_factory, store_url, snap):
    """A running broker with the test manifest, the workload's attester and the keys."""
    t = tmp_path_factory.mktemp("broker")
    wl = SimulatedAttester(t / "workload")
    keys = write_keys(t / "keys")
    m = manifest_dict(measurement=wl.measurement.hex(), simulated_root=str(wl.root_ca_path), keys=keys)
    mp = write_manifest(t / "manifest.json", m)
    penv = {"PYTHONPATH": snap["PYTHONPATH"]}
    b = start_broker(t / "broker", manifest=mp, store=store_url, env=penv)
    d = {"t": t, "wl": wl, "keys": keys, "manifest": m, "manifest_path": mp, "broker": b,
         "store_url": store_url, "penv": penv, "snap": snap["root"]}
    yield d
    b.stop()
    d["broker"].stop()  # a test may have replaced it (restart, recovery)


def _client(env, attester=None, **kw) -> BrokerClient:
    b = env["broker"]
    return BrokerClient(b.url, attester or env["wl"], verify=b.cacert, workload=kw.pop("workload", "records"),
                        **kw)


# --- release ----------------------------------------------------------------------------------


def test_release_to_matching_workload(env):
    b = env["broker"]
    with _client(env) as c:
        token = c.attest()
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["submods"]["records"]["ear.status"] == "warning"  # simulated, never "affirming"
        ks = c.get_keyset("records-keyset")
        assert len(ks.primary_key()[1]) == 32
        # the same resource again through the EAR token as bearer (no cookie)
        ks2 = c.get_resource("default/keyset/records-keyset", use_token=True)
        assert json.loads(ks2)["primary"] == ks.primary_id
        cert_pem, ca_pem = c.get_certificate("records-tls")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().public_numbers() == c.private_key().public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"api", "localhost"}
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    # issued after appraisal: the key purpose that lets the anchor members accept it as the
    # writer of ledger "records" (its CN)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ATTESTED_WORKLOAD_EKU in eku and ledger_writer(cert) == "records"
    with b.client() as h:
        assert h.get("/ca").text == ca_pem == Path(b.cacert).read_text()
        v = h.get("/v1/values/session=safehold-test").json()
        assert v == {"values": {"api_ca_cert": {"value": ca_pem}}}
        assert h.get("/v1/values/session=nope").status_code == 404


def test_certificate_carries_requested_evidence_extension(env):
    with _client(env) as c:
        c.attest()
        ext_value = b"\xd9\x01\x00" + os.urandom(40)  # opaque bytes: the broker copies, never parses
        cert_pem, _ = c.get_certificate("records-tls", extensions=[("2.23.133.5.4.9", ext_value)])
        ext = x509.load_pem_x509_certificate(cert_pem.encode()).extensions.get_extension_for_oid(
            x509.ObjectIdentifier("2.23.133.5.4.9"))
        assert not ext.critical and ext.value.value == ext_value
        with pytest.raises(BrokerRefusedError) as e:
            c.get_certificate("records-tls", extensions=[("1.2.3.4", b"x")])
        assert e.value.status == 400 and "not allowed" in e.value.detail


def test_operator_value_then_release(env):
    b, keys = env["broker"], env["keys"]
    with b.client() as h:
        assert h.put("/admin/secrets/db-password", content=b"pw").status_code == 401
        r = h.put("/admin/secrets/db-password", content=b"pw",
                  headers={"Authorization": f"Bearer {keys['reader_token']}"})
        assert r.status_code == 403 and "reader" in r.json()["detail"]
        r = h.put("/admin/secrets/db-password", content=b"x" * 300,
                  headers={"Authorization": f"Bearer {keys['operator_token']}"})
        assert r.status_code == 400 and "max_bytes" in r.json()["detail"]
        r = h.put("/admin/secrets/db-password", content=b"s3cret-value",
                  headers={"Authorization": f"Bearer {keys['operator_token']}"})
        assert r.status_code == 200, r.text
    with _client(env) as c:
        c.attest()
        assert c.get_value("db-password") == b"s3cret-value"


def test_client_certificates_for_users(env, tmp_path):
    b, keys = env["broker"], env["keys"]
    out = tmp_path / "alice"
    r = _cli("broker", "client-cert", "--name", "alice", "--out", str(out), "--url", b.url,
             "--cacert", b.cacert, env={"SAFEHOLD_BROKER_TOKEN": keys["operator_token"]})
    assert r.returncode == 0, r.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "alice.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(b.cacert).read_bytes()))
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.ExtendedKeyUsageOID.CLIENT_AUTH] and ledger_writer(cert) is None
    assert oct((tmp_path / "alice.key").stat().st_mode & 0o777) == "0o600"
    r = _cli("broker", "client-cert", "--name", "bob", "--out", str(tmp_path / "bob"), "--url", b.url,
             "--cacert", b.cacert, env={"SAFEHOLD_BROKER_TOKEN": keys["reader_token"]})
    assert r.returncode == 1 and "403" in r.stderr and not (tmp_path / "bob.key").exists()
    with b.client() as h:
        auth = {"Authorization": f"Bearer {keys['owner_token']}"}
        for body in ({"csr": "garbage"}, {}, {"csr": (tmp_path / "alice.pem").read_text()},
                     {"csr": "x", "validity_days": 0}):
            r = h.post("/admin/client-certificates", json=body, headers=auth)
            assert r.status_code == 400, (body, r.text)



def _csr(cn: str, *, eku: list[x509.ObjectIdentifier] | None = None) -> str:
    from cryptography.hazmat.primitives import hashes

    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


def test_operator_client_certificate_named_like_a_workload_or_ledger_refused(env):
    """Defence in depth for the anchor members' writer rule: the broker issues no admin client
    certificate whose CN names a manifest workload ("records") or its own ledger ("broker"),
    and none that carries the attested-workload key purpose, whatever the CSR asks for."""
    b, keys = env["broker"], env["keys"]
    with b.client() as h:
        auth = {"Authorization": f"Bearer {keys['operator_token']}"}
        for cn in ("records", "other", "broker"):
            r = h.post("/admin/client-certificates", json={"csr": _csr(cn)}, headers=auth)
            assert r.status_code == 403 and "workload or freshness ledger" in r.json()["detail"], r.text
        r = h.post("/admin/client-certificates", headers=auth, json={
            "csr": _csr("olga", eku=[x509.ExtendedKeyUsageOID.CLIENT_AUTH, ATTESTED_WORKLOAD_EKU])})
        assert r.status_code == 403 and "attested-workload key purpose" in r.json()["detail"], r.text
        # a CSR's other extensions are never copied: the certificate is clientAuth only
        r = h.post("/admin/client-certificates", headers=auth, json={
            "csr": _csr("olga", eku=[x509.ExtendedKeyUsageOID.SERVER_AUTH])})
        assert r.status_code == 201, r.text
        cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.ExtendedKeyUsageOID.CLIENT_AUTH] and ledger_writer(cert) is None
        audit = h.get("/admin/audit", headers={"Authorization": f"Bearer {keys['owner_token']}"})
        cns = [e["detail"]["cn"] for e in audit.json()["entries"] if e["event"] == "client-certificate"]
        assert "records" not in cns and "broker" not in cns


def test_cli_commands(env, tmp_path):
    b, keys = env["broker"], env["keys"]
    common = ["--url", b.url, "--cacert", b.cacert]
    r = _cli("broker", "keygen", "--kind", "owner", "--out", str(tmp_path / "own"))
    assert r.returncode == 0 and (tmp_path / "own.key").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "own.pub").read_bytes()
    r = _cli("broker", "keygen", "--kind", "token")
    tok = json.loads(r.stdout)
    assert hashlib.sha256(tok["token"].encode()).hexdigest() == tok["token_sha256"]
    r = _cli("broker", "manifest", "check", str(env["manifest_path"]))
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    r = _cli("broker", "status", *common)
    assert r.returncode == 0 and json.loads(r.stdout)["mode"] == "ready"
    fp = json.loads(r.stdout)["master_fingerprint"]
    tok_env = {"SAFEHOLD_BROKER_TOKEN": keys["reader_token"]}
    r = _cli("broker", "manifest", "show", *common, env=tok_env)
    assert r.returncode == 0 and json.loads(r.stdout)["manifest"]["name"] == "safehold-test"
    r = _cli("broker", "audit", "show", *common, env=tok_env)
    first, second = (json.loads(x) for x in r.stdout.splitlines()[:2])
    assert r.returncode == 0 and first["event"] == "init" and second["event"] == "manifest"
    assert first["detail"]["master_fingerprint"] == fp  # recorded at first start
    r = _cli("broker", "audit", "verify", *common, env=tok_env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    val = tmp_path / "v.bin"
    val.write_bytes(b"from-cli")
    r = _cli("broker", "set-value", "db-password", "--file", str(val), *common,
             env={"SAFEHOLD_BROKER_TOKEN": keys["operator_token"]})
    assert r.returncode == 0, r.stderr
    r = _cli("broker", "manifest", "set", str(env["manifest_path"]), *common)
    assert r.returncode == 0  # the same manifest again: accepted as a no-op
    other = write_manifest(tmp_path / "other.json", {**env["manifest"], "name": "changed"})
    r = _cli("broker", "manifest", "set", str(other), *common)
    assert r.returncode == 1 and "already set" in r.stderr and "Traceback" not in r.stderr
    r = _cli("broker", "status", "--url", "https://127.0.0.1:1", "--insecure")
    assert r.returncode == 1 and "cannot reach the broker at https://127.0.0.1:1" in r.stderr


def test_admin_by_client_certificate(env, tmp_path):
    """mTLS: a CA-issued client certificate for the owner's manifest key authenticates as alice;
    one for any other key does not."""
    b, keys = env["broker"], env["keys"]
    tok = {"SAFEHOLD_BROKER_TOKEN": keys["operator_token"]}
    r = _cli("broker", "client-cert", "--name", "alice", "--key", str(keys["owner_key"]), "--out",
             str(tmp_path / "alice"), "--url", b.url, "--cacert", b.cacert, env=tok)
    assert r.returncode == 0, r.stderr
    r = _cli("broker", "client-cert", "--name", "mallory", "--out", str(tmp_path / "mal"), "--url", b.url,
             "--cacert", b.cacert, env=tok)
    assert r.returncode == 0, r.stderr

    def get(cert, key):
        ctx = ssl.create_default_context(cafile=b.cacert)
        ctx.load_cert_chain(str(cert), str(key))
        with httpx.Client(base_url=b.url, verify=ctx) as h:
            return h.get("/admin/manifest")

    r = get(tmp_path / "alice.pem", keys["owner_key"])
    assert r.status_code == 200 and r.json()["manifest"]["name"] == "safehold-test"
    r = get(tmp_path / "mal.pem", tmp_path / "mal.key")
    assert r.status_code == 401 and "client certificate" in r.json()["detail"]


# --- denial -----------------------------------------------------------------------------------


def test_wrong_measurement_is_refused_naming_the_claim(env, tmp_path):
    cfg = tmp_path / "changed.toml"
    cfg.write_text("x = 1\n")
    other = SimulatedAttester(env["t"] / "workload", workload_files=[cfg])  # same platform, new code
    assert other.measurement.hex() != env["wl"].measurement.hex()
    with _client(env, other) as c, pytest.raises(BrokerRefusedError) as e:
        c.attest()
    assert e.value.status == 403
    # the claim is named; values (reference or Evidence) only in the audit log
    assert "measurement" in e.value.detail and other.measurement.hex() not in e.value.detail


def test_debug_evidence_is_refused(env):
    dbg = SimulatedAttester(env["t"] / "workload", debug=True)
    with _client(env, dbg) as c, pytest.raises(BrokerRefusedError) as e:
        c.attest()
    assert e.value.status == 403 and "debug" in e.value.detail


def test_workload_not_named_is_tried_against_all(env):
    with _client(env, workload=None) as c:
        c.attest()
        assert c.get_keyset("records-keyset") is not None


def _auth(h: httpx.Client, **extra) -> str:
    r = h.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                     "extra-params": {"workload": "records", **extra}})
    assert r.status_code == 200, r.text
    return r.json()["nonce"]


def _jwk():
    from joserfc.jwk import ECKey

    k = ECKey.generate_key("P-256")
    return k, protocol.public_jwk(k)


def test_replayed_nonce_and_evidence_for_another_nonce(env):
    wl, b = env["wl"], env["broker"]
    with b.client() as h:
        nonce = _auth(h)
        k, jwk = _jwk()
        ev = wl.attest(protocol.report_data(nonce, jwk)).to_cmw()
        r = h.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev})
        assert r.status_code == 200, r.text
        # the same Attestation again on the same session: the nonce is single-use
        r = h.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev})
        assert r.status_code == 401 and "already used" in r.json()["detail"]
    with b.client() as h2:
        _auth(h2)  # new session, new nonce; replay the old Evidence
        r = h2.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev})
        assert r.status_code == 401 and "report_data" in r.json()["detail"]
    with b.client() as h3:
        nonce3 = _auth(h3)
        _, other_jwk = _jwk()  # Evidence binds another key (relay)
        ev3 = wl.attest(protocol.report_data(nonce3, other_jwk)).to_cmw()
        r = h3.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev3})
        assert r.status_code == 401
        r = h3.get("/kbs/v0/resource/default/keyset/records-keyset")
        assert r.status_code == 401


def test_token_from_another_broker_and_garbage_token(env):
    wl = env["wl"]
    with _client(env) as c:
        c.attest()
        good = c.token
    # a correctly shaped EAR for the same key, signed by another Verifier/broker key
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier

    pol = AppraisalPolicy.from_dict({"allow_simulated": True, "simulated_root": str(wl.root_ca_path),
                                     "accepted_tcb_statuses": ["UpToDate", "Simulated"],
                                     "reference_values": {"measurements": [wl.measurement.hex()]},
                                     "report_data": "any"})
    appraisal: Appraisal = Verifier(pol).appraise(wl.attest(b"\0" * 64))
    claims = json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "=="))
    nonce = base64.urlsafe_b64decode(claims["eat_nonce"] + "==")
    forged = issue_ear(appraisal, generate_signing_key(), submod="records", nonce=nonce)
    url = env["broker"].url + "/kbs/v0/resource/default/keyset/records-keyset"
    ctx = ssl.create_default_context(cafile=env["broker"].cacert)
    for tok in (forged, "garbage", good[:-4] + "AAAA"):
        r = httpx.get(url, headers={"Authorization": f"Bearer {tok}"}, verify=ctx)
        assert r.status_code == 401, (tok[:20], r.text)
        assert "EAR token refused" in r.json()["detail"]
    r = httpx.get(url, headers={"Authorization": f"Bearer {good}"}, verify=ctx)
    assert r.status_code == 200


def test_unknown_and_forbidden_resources(env):
    with _client(env) as c:
        c.attest()
        for path in ("default/keyset/nope", "other-repo/keyset/records-keyset",
                     "default/value/records-keyset"):
            with pytest.raises(BrokerRefusedError) as e:
                c.get_resource(path)
            assert e.value.status == 404, path
        with pytest.raises(BrokerRefusedError) as e:
            c.get_resource("default/keyset/other-key")
        assert e.value.status == 403 and "records" in e.value.detail
    with env["broker"].client() as h:
        assert h.get("/kbs/v0/resource/default/keyset/records-keyset").status_code == 401


def test_oversized_bodies_over_the_network_get_the_413(env):
    """Over a real connection the client reads the 413 for a declared and for a chunked body,
    and the broker keeps serving. (Every KBS input refusal is tested in-process in
    tests/broker/test_http.py.)"""
    with env["broker"].client() as h:
        assert h.post("/kbs/v0/auth", content=b"x" * (1024 * 1024 + 1)).status_code == 413

        def gen():
            for _ in range(20):
                yield b"y" * 65536

        assert h.post("/kbs/v0/attest", content=gen()).status_code == 413
        assert h.get("/status").status_code == 200


def test_expired_token_and_nonce(tmp_path, env):
    t = tmp_path
    b = start_broker(t / "short", manifest=env["manifest_path"],
                     extra=["--token-ttl", "1", "--nonce-ttl", "1"], env=env["penv"])
    try:
        with BrokerClient(b.url, env["wl"], verify=b.cacert, workload="records") as c:
            c.attest()
            c.get_keyset("records-keyset")
            time.sleep(2.2)
            with pytest.raises(BrokerRefusedError) as e:
                c.get_keyset("records-keyset")
            assert e.value.status == 401 and "expired" in e.value.detail
            with pytest.raises(BrokerRefusedError) as e:
                c.get_resource("default/keyset/records-keyset", use_token=True)
            assert e.value.status == 401 and "exp" in e.value.detail
        with b.client() as h:
            nonce = _auth(h)
            k, jwk = _jwk()
            ev = env["wl"].attest(protocol.report_data(nonce, jwk)).to_cmw()
            time.sleep(1.5)
            r = h.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev})
            assert r.status_code == 401 and "expired" in r.json()["detail"]
    finally:
        b.stop()


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_set_once_signed_update_and_log(env, tmp_path):
    b, keys, m = env["broker"], env["keys"], env["manifest"]
    with b.client() as h:
        r = h.post("/admin/manifest", json={**m, "name": "other-name"})
        assert r.status_code == 403 and "already set" in r.json()["detail"]
        st0 = h.get("/status").json()
        cur = st0["manifest_version"]
    new = {**m, "secrets": {**m["secrets"], "extra": {"type": "keyset"}}}
    new["workloads"] = {**m["workloads"], "records": {**m["workloads"]["records"],
                        "secrets": [*m["workloads"]["records"]["secrets"], "extra"]}}
    p = write_manifest(tmp_path / "m2.json", new)
    tok = {"SAFEHOLD_BROKER_TOKEN": keys["owner_token"]}
    # a key that is not the owner's → refused, nothing installed
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    r = _cli("broker", "manifest", "update", str(p), "--signer", "alice", "--key", str(bad_key),
             "--url", b.url, "--cacert", b.cacert, env=tok)
    assert r.returncode == 1 and "does not verify" in r.stderr
    r = _cli("broker", "manifest", "update", str(p), "--signer", "rita", "--key", str(keys["owner_key"]),
             "--url", b.url, "--cacert", b.cacert, env=tok)
    assert r.returncode == 1 and "expected owner" in r.stderr
    # the owner's real signature, but made for another broker (staging) or on top of another
    # previous manifest: both refused, nothing installed
    from safehold.broker.manifest import manifest_from_dict, sign_update

    m2 = manifest_from_dict(json.loads(p.read_text()))
    owner_pem = keys["owner_key"].read_bytes()
    staging = sign_update(m2, cur + 1, owner_pem, broker_id="5a" * 16, previous_sha256=st0["manifest_digest"])
    forked = sign_update(m2, cur + 1, owner_pem, broker_id=st0["broker_id"], previous_sha256="00" * 32)
    with b.client() as h:
        for sig in (staging, forked):
            r = h.post("/admin/manifest/update", json={"manifest": m2.raw, "version": cur + 1,
                                                       "signer": "alice", "signature": sig})
            assert r.status_code == 403 and "does not verify" in r.json()["detail"], r.text
        assert h.get("/status").json()["manifest_version"] == cur
    r = _cli("broker", "manifest", "update", str(p), "--signer", "alice", "--key", str(keys["owner_key"]),
             "--url", b.url, "--cacert", b.cacert, env=tok)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == cur + 1
    with b.client() as h:
        auth = {"Authorization": f"Bearer {keys['reader_token']}"}
        newest = h.get("/admin/manifest", headers=auth).json()
        assert newest["version"] == cur + 1 and newest["signer"] == "alice"
        old = h.get("/admin/manifest", params={"version": cur}, headers=auth).json()
        assert "extra" not in old["manifest"]["secrets"]
        assert h.get("/admin/manifest", params={"version": 99}, headers=auth).status_code == 404
        assert h.get("/admin/manifest").status_code == 401
        # replaying the signed update is refused (version already used)
        sig = sign_update(m2, cur + 1, owner_pem, broker_id=st0["broker_id"],
                          previous_sha256=st0["manifest_digest"])
        r = h.post("/admin/manifest/update", json={"manifest": json.loads(p.read_text()), "version": cur + 1,
                                                   "signer": "alice", "signature": sig})
        assert r.status_code == 409
        # a malformed manifest in an update is a 400 naming the field
        r = h.post("/admin/manifest/update", json={"manifest": {**m, "secrets": {"x": {"type": "bogus"}}},
                                                   "version": cur + 2, "signer": "alice", "signature": sig})
        assert r.status_code == 400 and "secrets.x.type" in r.json()["detail"]
    with _client(env) as c:
        c.attest()
        assert c.get_keyset("extra") is not None


def _signed_update(env, new: dict) -> int:
    """Install ``new`` as the next version, signed by the owner (binding broker id and the
    current manifest's digest as `safehold broker manifest update` does)."""
    from safehold.broker.manifest import manifest_from_dict, sign_update

    with env["broker"].client() as h:
        st = h.get("/status").json()
        v = st["manifest_version"] + 1
        sig = sign_update(manifest_from_dict(new), v, env["keys"]["owner_key"].read_bytes(),
                          broker_id=st["broker_id"], previous_sha256=st["manifest_digest"])
        r = h.post("/admin/manifest/update", json={"manifest": new, "version": v, "signer": "alice",
                                                   "signature": sig})
        assert r.status_code in (200, 201), r.text
    return v


def test_manifest_update_ends_attestations_made_under_the_old_one(env):
    """An attestation used to keep releasing secrets after the owner's signed update revoked
    its measurement. Now, after a signed update an attestation made under an older version no
    longer releases anything (not even newly granted secrets); a removed workload gives 401,
    not 500."""
    import copy

    b, keys = env["broker"], env["keys"]
    with b.client() as h:
        cur = h.get("/admin/manifest", headers={"Authorization": f"Bearer {keys['reader_token']}"}).json()
    base, v0 = cur["manifest"], cur["version"]
    try:
        with _client(env) as c1:
            c1.attest()
            assert c1.get_keyset("records-keyset") is not None
            # the owner revokes the workload's measurement and (in the same update) grants it more
            revoked = copy.deepcopy(base)
            rec = revoked["workloads"]["records"]
            rec["policy"]["reference_values"]["measurements"] = ["cd" * 48]
            rec["secrets"] = [*rec["secrets"], "other-key"]
            assert _signed_update(env, revoked) == v0 + 1
            for fetch in (lambda: c1.get_keyset("records-keyset"),
                          lambda: c1.get_keyset("other-key"),
                          lambda: c1.get_resource("default/keyset/records-keyset", use_token=True),
                          lambda: c1.get_certificate("records-tls")):
                with pytest.raises(BrokerRefusedError) as e:
                    fetch()
                assert e.value.status == 401, e.value.detail
                assert f"attested under manifest version {v0}, current is {v0 + 1}" in e.value.detail
        with _client(env) as c2, pytest.raises(BrokerRefusedError) as e:
            c2.attest()  # attesting again: the new policy refuses the old measurement
        assert e.value.status == 403 and "measurement" in e.value.detail
        assert _signed_update(env, base) == v0 + 2
        with _client(env) as c3:
            c3.attest()
            assert c3.get_keyset("records-keyset") is not None
            removed = copy.deepcopy(base)
            del removed["workloads"]["records"]
            assert _signed_update(env, removed) == v0 + 3
            for fetch in (lambda: c3.get_keyset("records-keyset"),
                          lambda: c3.get_resource("default/keyset/records-keyset", use_token=True),
                          lambda: c3.get_certificate("records-tls")):
                with pytest.raises(BrokerRefusedError) as e:
                    fetch()
                assert e.value.status == 401, e.value.detail
    finally:
        _signed_update(env, base)  # the other tests of this module use the records workload
    with _client(env) as c4:
        c4.attest()
        assert c4.get_keyset("records-keyset") is not None


def test_malformed_manifest_refused_at_start(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[workloads.w]\nsecrets = ["missing"]\n[workloads.w.policy]\nallow_simulated = true\n'
                   f'[workloads.w.policy.reference_values]\nmeasurements = ["{"ab" * 48}"]\n')
    port = str(free_port())
    r = _cli("broker", "serve", "--data-dir", str(tmp_path / "d"), "--manifest", str(bad), "--port", port)
    assert r.returncode == 1
    assert "workloads.w.secrets" in r.stderr and "Traceback" not in r.stderr


# --- restart, recovery, audit -----------------------------------------------------------------


def _changed_package(snapshot: Path, tmp: Path) -> Path:
    """A copy of the broker's package with one changed byte: the broker's code changed."""
    dst = tmp / "pkg"
    shutil.copytree(snapshot / "safehold", dst / "safehold", ignore=shutil.ignore_patterns("__pycache__"))
    f = dst / "safehold" / "broker" / "__init__.py"
    f.write_text(f.read_text() + "\n# changed\n")
    return dst


def _tamper_audit_row(store_url: str, seq: int) -> None:
    key = seq.to_bytes(8, "big")
    if store_url.startswith("sqlite"):
        path = store_url[len("sqlite:///"):]
        with sqlite3.connect(path) as db:
            (val,) = db.execute("SELECT value FROM safehold_rows WHERE "
                                "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                                ("safehold.broker.audit", key)).fetchone()
            val = bytearray(val)
            val[30] ^= 1
            db.execute("UPDATE safehold_rows SET value=? WHERE "
                       "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                       (bytes(val), "safehold.broker.audit", key))
        return
    import psycopg

    dsn, _, schema = store_url.rpartition("schema=")
    dsn = dsn.rstrip("?&")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{schema}".safehold_rows SET value = overlay(value placing '
            "decode(lpad(to_hex(get_byte(value, 30) # 1), 2, '0'), 'hex') from 31 for 1) "
            f'WHERE ns = (SELECT id FROM "{schema}".safehold_namespaces WHERE name = %s) AND key = %s',
            ("safehold.broker.audit", key))


def test_restart_recovery_and_audit(env, tmp_path):
    """Restart keeps every secret; a changed broker measurement → recovery mode; k-1 shares fail,
    k restore; the audit log verifies, and one edited row is named."""
    b, keys, store_url = env["broker"], env["keys"], env["store_url"]
    with b.client() as h:
        r = h.put("/admin/secrets/db-password", content=b"kept-across-restarts",
                  headers={"Authorization": f"Bearer {keys['operator_token']}"})
        assert r.status_code == 200
        status_before = h.get("/status").json()
    fp = status_before["master_fingerprint"]
    assert len(fp) == 32 and status_before["broker_id"]
    with _client(env) as c:
        c.attest()
        ks_before = c.get_resource("default/keyset/records-keyset")
        cert_before = x509.load_pem_x509_certificate(c.get_certificate("records-tls")[0].encode())
    ca_before = Path(b.cacert).read_text()
    b.stop()

    # 1. plain restart: same secrets, same CA, manifest still there
    b = env["broker"] = start_broker(b.data_dir, store=store_url, env=env["penv"])
    try:
        with _client(env) as c:
            c.attest()
            assert c.get_resource("default/keyset/records-keyset") == ks_before
            assert c.get_value("db-password") == b"kept-across-restarts"
            cert = x509.load_pem_x509_certificate(c.get_certificate("records-tls")[0].encode())
            cert.verify_directly_issued_by(cert_before_issuer := x509.load_pem_x509_certificate(
                ca_before.encode()))
            assert cert.issuer == cert_before.issuer == cert_before_issuer.subject
        assert Path(b.cacert).read_text() == ca_before
        with b.client() as h:
            st = h.get("/status").json()
            assert st["manifest_version"] == status_before["manifest_version"]
            assert st["manifest_digest"] == status_before["manifest_digest"]
            assert st["master_fingerprint"] == fp and st["broker_id"] == status_before["broker_id"]
    finally:
        b.stop()

    # 2. the broker's own code changed → recovery mode, serving only status and recovery
    pkg = _changed_package(env["snap"], tmp_path)
    penv = {"PYTHONPATH": str(pkg)}
    b = env["broker"] = start_broker(b.data_dir, store=store_url, env=penv, expect_mode="recovery")
    try:
        with httpx.Client(base_url=b.url, verify=False) as h:
            st = h.get("/status").json()
            assert st["mode"] == "recovery" and "measurement" in st["reason"]
            assert "master_fingerprint" not in st
            assert h.get("/ca").status_code == 503
            assert h.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated"}).status_code == 503
            assert h.post("/recovery", json={"shares": ["x"]}).status_code == 400
        new_meas = broker_launch(pkg).closure().hex()
        assert st["broker_measurement"] == new_meas
        pol = tmp_path / "broker-policy.toml"
        pol.write_text(f'allow_simulated = true\nsimulated_root = "{b.data_dir}/simulated-tee/root-ca.pem"\n'
                       'accepted_tcb_statuses = ["UpToDate", "Simulated"]\nreport_data = "key-binding"\n'
                       f'[reference_values]\nmeasurements = ["{new_meas}"]\n')
        r0 = keys["recovery"][0][0]
        r2 = keys["recovery"][2][0]
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--policy", str(pol),
                   "--expect-fingerprint", fp)
        assert res.returncode == 1 and "distinct shares" in res.stderr  # k-1 = 1 share
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--key", str(r2), "--policy",
                   str(pol))
        assert res.returncode == 2 and "--expect-fingerprint" in res.stderr  # required
        # the right shares, but a fingerprint the holders did not record: nothing is sent
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--key", str(r2), "--policy",
                   str(pol), "--expect-fingerprint", "ab" * 16)
        assert res.returncode == 1 and "nothing sent" in res.stderr and f"fingerprint {fp}" in res.stderr
        # a policy that does not match the broker's Evidence: no share leaves the client
        badpol = tmp_path / "bad-policy.toml"
        badpol.write_text(pol.read_text().replace(new_meas, "cd" * 48))
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--key", str(r2), "--policy",
                   str(badpol), "--expect-fingerprint", fp)
        assert res.returncode == 1 and "measurement" in res.stderr
        with httpx.Client(base_url=b.url, verify=False) as h:
            assert h.get("/status").json()["mode"] == "recovery"
        grouped = "-".join(fp[i:i + 8] for i in range(0, 32, 8))  # as written down: separators ok
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--key", str(r2),
                   "--policy", str(pol), "--expect-fingerprint", grouped)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["mode"] == "ready"
        with _client(env) as c:  # serving again at once, same secrets
            c.attest()
            assert c.get_resource("default/keyset/records-keyset") == ks_before
        with b.client() as h:
            assert h.get("/status").json()["master_fingerprint"] == fp
    finally:
        b.stop()

    # 3. re-sealed to the new identity: a restart of the changed broker needs no recovery
    b = start_broker(b.data_dir, store=store_url, env=penv)
    b.stop()

    # 4. audit log: verifies offline with the (changed) broker identity; an edited row is named
    ok = _cli("broker", "audit", "verify", "--data-dir", str(b.data_dir), "--store", store_url, env=penv)
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout)
    assert res["ok"] and res["entries"] >= 10
    _tamper_audit_row(store_url, 5)
    bad = _cli("broker", "audit", "verify", "--data-dir", str(b.data_dir), "--store", store_url, env=penv)
    assert bad.returncode == 1
    assert "audit entry #5" in bad.stderr and "Traceback" not in bad.stderr

    # the running-broker path names it too
    b = env["broker"] = start_broker(b.data_dir, store=store_url, env=penv)
    try:
        with b.client() as h:
            r = h.get("/admin/audit/verify", headers={"Authorization": f"Bearer {keys['reader_token']}"})
            assert r.json() == {"ok": False, "error": r.json()["error"]}
            assert "#5" in r.json()["error"]
    finally:
        b.stop()


@pytest.mark.postgres
def test_broker_process_over_postgresql(tmp_path, snap, pg_store_url, postgres_dsn, pg_schema):
    """The broker's life on PostgreSQL, as a process: first start, attestation and release of a
    keyset, a value and a certificate; a restart that keeps all of them (same master key, same
    CA); the schema holds no secret in plaintext; the audit log verifies offline from the
    schema, and one edited row is named."""
    import psycopg

    wl = SimulatedAttester(tmp_path / "workload")
    keys = write_keys(tmp_path / "keys")
    mp = write_manifest(tmp_path / "m.json", manifest_dict(
        measurement=wl.measurement.hex(), simulated_root=str(wl.root_ca_path), keys=keys))
    penv = {"PYTHONPATH": snap["PYTHONPATH"]}
    value = b"value-kept-in-postgresql"

    def release(b) -> tuple[bytes, x509.Certificate]:
        with BrokerClient(b.url, wl, verify=b.cacert, workload="records") as c:
            c.attest()
            assert c.get_value("db-password") == value
            cert_pem, ca_pem = c.get_certificate("records-tls")
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem.encode()))
            return c.get_resource("default/keyset/records-keyset"), cert

    b = start_broker(tmp_path / "broker", manifest=mp, store=pg_store_url, env=penv)
    try:
        with b.client() as h:
            r = h.put("/admin/secrets/db-password", content=value,
                      headers={"Authorization": f"Bearer {keys['operator_token']}"})
            assert r.status_code == 200, r.text
            before = h.get("/status").json()
        keyset, cert = release(b)
    finally:
        b.stop()
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f'SELECT n.name, r.value FROM "{pg_schema}".safehold_rows r '
                            f'JOIN "{pg_schema}".safehold_namespaces n ON n.id = r.ns').fetchall()
    assert {ns for ns, _ in rows} >= {"safehold.broker", "safehold.broker.audit"}
    dump = b"".join(bytes(v) for _, v in rows)
    assert value not in dump and keyset not in dump

    b = start_broker(tmp_path / "broker", store=pg_store_url, env=penv)  # no --manifest: from the store
    try:
        with b.client() as h:
            after = h.get("/status").json()
        for k in ("master_fingerprint", "broker_id", "manifest_version", "manifest_digest"):
            assert after[k] == before[k], k
        keyset2, cert2 = release(b)
        assert keyset2 == keyset and cert2.issuer == cert.issuer
    finally:
        b.stop()

    ok = _cli("broker", "audit", "verify", "--data-dir", str(b.data_dir), "--store", pg_store_url, env=penv)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] and json.loads(ok.stdout)["entries"] >= 4
    _tamper_audit_row(pg_store_url, 2)
    bad = _cli("broker", "audit", "verify", "--data-dir", str(b.data_dir), "--store", pg_store_url, env=penv)
    assert bad.returncode == 1
    assert "audit entry #2" in bad.stderr and "Traceback" not in bad.stderr


def test_recover_refuses_a_recovery_record_forged_in_the_store(tmp_path, snap):
    """The database operator writes a whole fresh state under a master key of
    their own, with shares to the same (public) recovery keys, and breaks the sealed row. The
    holders' shares decrypt and combine, but not to the fingerprint they recorded at first
    start: the CLI refuses before sending, and the broker refuses such shares too."""
    from joserfc.jwk import ECKey

    from safehold.broker.state import NAMESPACE, BrokerState, SealingIdentity
    from safehold.store.sqlite import SqliteStore

    wl = SimulatedAttester(tmp_path / "workload")
    keys = write_keys(tmp_path / "keys")
    mp = write_manifest(tmp_path / "m.json", manifest_dict(
        measurement=wl.measurement.hex(), simulated_root=str(wl.root_ca_path), keys=keys))
    db = tmp_path / "broker.db"
    penv = {"PYTHONPATH": snap["PYTHONPATH"]}
    b = start_broker(tmp_path / "broker", manifest=mp, store=f"sqlite:///{db}", env=penv)
    try:
        with b.client() as h:
            recorded = h.get("/status").json()["master_fingerprint"]
        assert f"master-key fingerprint {recorded}" in b.log()  # printed at first start
    finally:
        b.stop()
    b.log_path.unlink()
    # the operator's forgery: fresh state, their own master key, shares to the real recovery keys
    store = SqliteStore(db)
    for row in list(store.scan_all(NAMESPACE)):
        store.delete(NAMESPACE, row.key)
    forged = BrokerState.open(store, SealingIdentity(os.urandom(32), b"\x09" * 48))
    forged_fp = forged.master_fingerprint()
    forged.write_recovery_shares({f"r{i}": pub for i, (_, pub) in enumerate(keys["recovery"])}, 2)
    store.close()
    assert forged_fp != recorded

    b = start_broker(tmp_path / "broker", store=f"sqlite:///{db}", env=penv, expect_mode="recovery")
    try:
        meas = broker_launch(snap["PYTHONPATH"]).closure().hex()
        pol = tmp_path / "broker-policy.toml"
        pol.write_text(f'allow_simulated = true\nsimulated_root = "{b.data_dir}/simulated-tee/root-ca.pem"\n'
                       'accepted_tcb_statuses = ["UpToDate", "Simulated"]\nreport_data = "key-binding"\n'
                       f'[reference_values]\nmeasurements = ["{meas}"]\n')
        r0, r1 = keys["recovery"][0][0], keys["recovery"][1][0]
        res = _cli("broker", "recover", "--url", b.url, "--key", str(r0), "--key", str(r1), "--policy",
                   str(pol), "--expect-fingerprint", recorded)
        assert res.returncode == 1, res.stderr
        assert "nothing sent" in res.stderr and f"fingerprint {forged_fp}, expected {recorded}" in res.stderr
        # a client that skips the local check: the broker compares with the fingerprint it is told
        from safehold.broker.shares import decrypt_share

        with httpx.Client(base_url=b.url, verify=False) as h:
            info = h.get("/recovery").json()
            bkey = ECKey.import_key(info["broker_key"])
            shares = [protocol.encrypt_response(decrypt_share(info["shares"][f"r{i}"], k.read_bytes()), bkey)
                      for i, k in ((0, r0), (1, r1))]
            r = h.post("/recovery", json={"shares": shares, "expect_fingerprint": recorded})
            assert r.status_code == 400 and f"expected {recorded}" in r.json()["detail"], r.text
            r = h.post("/recovery", json={"shares": shares})  # no fingerprint: refused as well
            assert r.status_code == 400 and "expect_fingerprint" in r.json()["detail"], r.text
            assert h.get("/status").json()["mode"] == "recovery"
    finally:
        b.stop()
