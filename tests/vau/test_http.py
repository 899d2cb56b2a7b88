"""The VAU routes over real HTTP on loopback: E-Rezept flow through the client SDK, outer errors,
certificate / OCSP / CertData endpoints, ePA 3 channel; and the server as a separate process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from safehold.client.errors import ErezeptResponseError, VauOuterError
from safehold.client.vau import EpaVauHttpClient, ErezeptClient, ErpVauClient
from safehold.crypto.keyset import Keyset
from safehold.erezept.tasks import TaskService
from safehold.erezept.tokens import AccessTokenVerifier
from safehold.records.engine import RecordEngine
from safehold.store.sqlite import SqliteStore
from safehold.vau.epa_keys import VauKeyTrust
from safehold.vau.epa_server import EpaVauServer
from safehold.vau.erp import seal_request
from safehold.vau.erp_server import ErpVau
from safehold.vau.http import VauState, cert_data
from safehold.vau.httpmsg import HttpRequest
from safehold.vau.server import ServerThread, build_app, build_erezept_app
from tests.support.idp import TestIdp
from tests.support.kbv import DRUGS, PATIENTS, TestSigner, build_bundle, dispense
from tests.support.shared import snapshot_package, vau_vector
from tests.support.vaukeys import (
    LIBVAU_NOW,
    erp_vau_identity,
    libvau_server_keys,
    libvau_signed_keys,
    libvau_signer,
)

PRAXIS, APO = "1-883110000092414", "3-883110000116873"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vau-http")
    store = SqliteStore(tmp / "erezept.sqlite")
    idp = TestIdp("BP256R1")
    verifier = AccessTokenVerifier([idp.public_key], issuer=idp.issuer)
    ident = erp_vau_identity()
    inner = build_erezept_app(TaskService(RecordEngine(store, Keyset.generate())), verifier)
    keys = libvau_server_keys()
    signed = libvau_signed_keys(keys)
    h, data = cert_data(libvau_signer()[1])
    state = VauState(
        erp=ErpVau([ident.key], token_verifier=verifier.claims),
        erp_certificate=ident.cert_der,
        erp_ocsp=ident.ocsp_der,
        erp_inner=inner,
        epa=EpaVauServer(keys, signed, clock=lambda: LIBVAU_NOW),
        epa_inner=inner,
        epa_cert_data={h: (1, data)},
    )
    srv = ServerThread(build_app(state))
    port = srv.start()
    yield {"url": f"http://127.0.0.1:{port}", "idp": idp, "ident": ident, "state": state}
    srv.stop()
    store.close()


def _client(stack) -> ErpVauClient:
    return ErpVauClient(
        stack["url"], pinned_certificates=[hashlib.sha256(stack["ident"].cert_der).hexdigest()]
    )


def _flow(client: ErezeptClient, idp: TestIdp, patient, drug, signer: TestSigner) -> str:
    doc, apo = idp.token("praxis", PRAXIS), idp.token("apotheke", APO)
    t = client.create(doc)
    tid, ac = t["id"], t["identifier"][1]["value"]
    assert (
        client.activate(doc, tid, ac, signer.sign_bundle(build_bundle(tid, patient, drug)))["status"]
        == "ready"
    )
    task = client.accept(apo, tid, ac)["entry"][0]["resource"]
    secret = task["identifier"][1]["value"]
    assert (
        client.close(apo, tid, secret, dispense(tid, patient, APO))["entry"][0]["resource"]["title"]
        == "Quittung"
    )
    return tid


def test_erezept_flow_through_the_vau(stack):
    client = ErezeptClient(_client(stack))
    idp, signer = stack["idp"], TestSigner()
    tid = _flow(client, idp, PATIENTS[3], DRUGS[3], signer)
    ins = idp.token("versicherter", PATIENTS[3].kvnr)
    assert [e["resource"]["id"] for e in client.tasks(ins)["entry"]] == [tid]
    assert client.vau.user_pseudonym(ins) != "0"  # A_20175: stored for the next request
    with pytest.raises(ErezeptResponseError) as e:
        client.create(ins)  # inner 403: an insured person cannot prescribe
    assert e.value.status == 403
    with pytest.raises(ErezeptResponseError) as e:
        client.accept(idp.token("apotheke", APO), tid, "0" * 64)
    assert e.value.status in (403, 409)


def test_outer_errors(stack):
    url, idp = stack["url"], stack["idp"]
    vau = stack["state"].erp
    tok = idp.token("praxis", PRAXIS)
    sealed = seal_request(vau.public_key, tok, HttpRequest("GET", "/Task", [("Host", "erp")]))
    post = lambda path, body, ct="application/octet-stream": httpx.post(  # noqa: E731
        url + path, content=body, headers={"Content-Type": ct}
    )
    assert post("/VAU/0", sealed.body).status_code == 200
    replay = post("/VAU/0", sealed.body)
    assert replay.status_code == 400 and "already used" in replay.text
    bad = bytearray(sealed.body)
    bad[-3] ^= 1
    assert post("/VAU/0", bytes(bad)).status_code == 400
    assert post("/VAU/0", b"\x02" + sealed.body[1:]).status_code == 400
    assert post("/VAU/0", sealed.body, "application/json").status_code == 415
    fresh = seal_request(vau.public_key, tok, HttpRequest("GET", "/Task", [("Host", "erp")]))
    r = post("/VAU/" + "ab" * 16 + "-" + "cd" * 16, fresh.body)
    assert r.status_code == 403 and "not issued by this VAU" in r.text
    other = TestIdp("BP256R1").token("praxis", PRAXIS)
    r = post("/VAU/0", seal_request(vau.public_key, other, HttpRequest("GET", "/Task", [("Host", "e")])).body)
    assert r.status_code == 403
    # wrong response key: the client's check fails, not the server's
    ok = post("/VAU/0", fresh.body)
    from safehold.vau.erp import SealedRequest
    from safehold.vau.errors import VauDecryptionError

    with pytest.raises(VauDecryptionError):
        SealedRequest(fresh.body, fresh.request_id, bytes(16)).open_response(ok.content)


def test_certificate_and_ocsp_endpoints_and_pinning(stack):
    r = httpx.get(stack["url"] + "/VAUCertificate")
    assert r.status_code == 200 and r.content == stack["ident"].cert_der
    o = ocsp.load_der_ocsp_response(httpx.get(stack["url"] + "/VAUCertificateOCSPResponse").content)
    assert o.certificate_status == ocsp.OCSPCertStatus.GOOD
    wrong = ErpVauClient(stack["url"], pinned_certificates=["00" * 32])
    from safehold.vau.errors import VauKeyVerificationError

    with pytest.raises(VauKeyVerificationError, match="not among the pinned"):
        wrong.vau_public_key()


def test_epa_channel_over_http(stack):
    cert = libvau_signer()[1]
    r = httpx.get(stack["url"] + f"/CertData.{hashlib.sha256(cert).hexdigest()}-1")
    assert r.status_code == 200 and cbor2.loads(r.content)["cert"] == cert
    assert httpx.get(stack["url"] + f"/CertData.{hashlib.sha256(cert).hexdigest()}-2").status_code == 404
    epa = EpaVauHttpClient(stack["url"], trust=VauKeyTrust([cert], clock=lambda: LIBVAU_NOW))
    idp = stack["idp"]
    ins = idp.token("versicherter", PATIENTS[0].kvnr)
    r = epa.request("GET", "/Task", headers=[("Authorization", "Bearer " + ins)])
    assert r.status == 200 and json.loads(r.body)["resourceType"] == "Bundle"
    cid = epa.cid
    r = epa.request("GET", "/Task", headers=[("Authorization", "Bearer " + ins)])
    assert r.status == 200 and epa.cid == cid and epa.channel.request_counter == 2
    dead = httpx.post(
        stack["url"] + "/VAU/epa/" + "0" * 32,
        content=b"\x02" * 80,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert dead.status_code == 404


@pytest.mark.slow
def test_vau_server_as_a_process(tmp_path):
    """``python -m safehold.vau.server`` from a package snapshot, keys handed over stdin only."""
    snap = tmp_path / "snap"
    snapshot_package(snap)
    idp = TestIdp("ES256")
    ident = erp_vau_identity()
    keyset = Keyset.generate()
    kid, key = keyset.primary_key()
    cfg = {
        "erp_vau_key": ident.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "erp_vau_certificate": ident.cert_der,
        "erp_ocsp": ident.ocsp_der,
        "idp_keys": [
            idp.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ],
        "idp_issuer": idp.issuer,
        "store": f"sqlite:///{tmp_path / 'erp.sqlite'}",
        "keyset": {"keys": {kid: key}, "primary": kid, "index_key": keyset.index_key},
        "epa_keys": vau_vector("lib-vau/vau_server_keys.cbor"),
        "epa_signing_key": vau_vector("lib-vau/vau-sig-key.der"),
        "epa_certificate": libvau_signer()[1],
        "epa_iat": int(time.time()) - 60,
        "epa_exp": int(time.time()) + 86400,
    }
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(snap)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold.vau.server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        proc.stdin.write(cbor2.dumps(cfg))
        proc.stdin.close()
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        url = f"http://127.0.0.1:{json.loads(line)['port']}"
        client = ErezeptClient(
            ErpVauClient(url, pinned_certificates=[hashlib.sha256(ident.cert_der).hexdigest()])
        )
        tid = _flow(client, idp, PATIENTS[1], DRUGS[2], TestSigner())
        assert client.tasks(idp.token("versicherter", PATIENTS[1].kvnr))["total"] == 1
        with pytest.raises(VauOuterError) as e:
            client.tasks(TestIdp().token("versicherter", PATIENTS[1].kvnr))
        assert e.value.status == 403
        blob = (tmp_path / "erp.sqlite").read_bytes()
        assert PATIENTS[1].kvnr.encode() not in blob and tid.encode() not in blob
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"BEGIN" not in cmdline and len(cmdline) < 200  # no key material on argv
    finally:
        proc.terminate()
        proc.wait(timeout=10)
