"""Benchmark: the gematik VAU channels against what a client would do without them.

* **E-Rezept VAU** — one server process serves, over HTTPS on loopback, both the outer VAU app
  (``POST /VAU/{pseudonym}``: ECIES brainpoolP256r1 + AES-128-GCM, access token checked by the
  VAU and again by the Fachdienst route, request-id replay cache, pseudonyms, response
  encryption) and — as the baseline — the same E-Rezept FHIR app directly. The client sends the
  *same inner request* both ways: ``GET /Task`` of an insured person with one Task (token
  verification, encrypted records engine on SQLite). One client thread, keep-alive connection;
  requests/s and p50/p99 latency. Target (issue 15): VAU p50 latency <= 1.5x plain HTTPS.
* **ePA 3 VAU** — full M1..M4 handshakes per second (client and VAU in this process, no HTTP:
  ECDH P-256 + Kyber768 R3 both ways, HKDF, AES-256-GCM, ES256 check of the signed VAU keys),
  and user-data throughput (client encrypts a 64 KiB request, the VAU decrypts it with the
  counter / KeyID checks) against raw AES-256-GCM encrypt + decrypt of the same buffer.

Usage: ``python bench/vau.py [--quick]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # the test helpers, as tests.support.*


def _tls_identity() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _server_ctx(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # ssl loads keys only from files: a throw-away benchmark key in a private dir, deleted at once
    with tempfile.TemporaryDirectory(prefix="bench-vau-") as d:
        os.chmod(d, 0o700)
        (Path(d) / "c.pem").write_bytes(cert_pem)
        fd = os.open(Path(d) / "k.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    return ctx


def serve() -> None:
    """Child process: read the config (CBOR on stdin), serve both apps over HTTPS, print ports."""
    from cryptography.hazmat.primitives import serialization

    from safehold.crypto.keyset import Keyset
    from safehold.erezept.tasks import TaskService
    from safehold.erezept.tokens import AccessTokenVerifier
    from safehold.records.engine import RecordEngine
    from safehold.store.sqlite import SqliteStore
    from safehold.vau.erp import load_vau_private_key
    from safehold.vau.erp_server import ErpVau
    from safehold.vau.http import VauState
    from safehold.vau.server import ServerThread, build_app, build_erezept_app

    cfg = cbor2.loads(sys.stdin.buffer.read())
    verifier = AccessTokenVerifier([serialization.load_der_public_key(cfg["idp_key"])], issuer=cfg["issuer"])
    store = SqliteStore(cfg["db"])
    inner = build_erezept_app(TaskService(RecordEngine(store, Keyset.generate())), verifier)
    state = VauState(
        erp=ErpVau([load_vau_private_key(cfg["vau_key"])], token_verifier=verifier.claims),
        erp_certificate=cfg["vau_cert"],
        erp_inner=inner,
    )
    ctx = _server_ctx(cfg["tls_cert"], cfg["tls_key"])
    servers = [ServerThread(build_app(state), ssl_context=ctx), ServerThread(inner, ssl_context=ctx)]
    ports = [s.start() for s in servers]
    print(json.dumps({"vau": ports[0], "plain": ports[1]}), flush=True)
    sys.stdin.close()
    while True:
        time.sleep(3600)


def _measure(fn, seconds: float) -> dict[str, float]:
    for _ in range(20):
        fn()  # warm-up
    lat: list[float] = []
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        s = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    lat.sort()
    return {
        "per_s": round(len(lat) / total, 1),
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3),
        "n": len(lat),
    }


def bench_erp(seconds: float) -> dict[str, dict[str, float]]:
    import httpx
    from cryptography.hazmat.primitives import serialization
    from tests.support.idp import TestIdp
    from tests.support.kbv import DRUGS, PATIENTS, TestSigner, build_bundle
    from tests.support.vaukeys import erp_vau_identity

    from safehold.client.vau import ErezeptClient, ErpVauClient

    idp = TestIdp("BP256R1")
    ident = erp_vau_identity()
    tls_cert, tls_key = _tls_identity()
    tmp = tempfile.mkdtemp(prefix="bench-vau-")
    cfg = {
        "idp_key": idp.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "issuer": idp.issuer,
        "db": str(Path(tmp) / "erp.sqlite"),
        "vau_key": ident.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "vau_cert": ident.cert_der,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
    }
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(cbor2.dumps(cfg))
        proc.stdin.close()
        ports = json.loads(proc.stdout.readline())
        verify = ssl.create_default_context(cadata=tls_cert.decode())
        vau_url, plain_url = (f"https://127.0.0.1:{ports[k]}" for k in ("vau", "plain"))
        http = httpx.Client(verify=verify, timeout=30)
        vau = ErpVauClient(
            vau_url, pinned_certificates=[hashlib.sha256(ident.cert_der).hexdigest()], http=http, user="v"
        )
        client = ErezeptClient(vau)
        doc = idp.token("praxis", "1-883110000092414", lifetime=3600)
        pat = PATIENTS[0]
        t = client.create(doc)
        client.activate(
            doc,
            t["id"],
            t["identifier"][1]["value"],
            TestSigner().sign_bundle(build_bundle(t["id"], pat, DRUGS[0])),
        )
        ins = idp.token("versicherter", pat.kvnr, lifetime=3600)
        headers = {"Authorization": "Bearer " + ins, "Accept": "application/fhir+json"}

        def via_vau() -> None:
            assert client.tasks(ins)["total"] == 1

        def plain() -> None:
            r = http.get(plain_url + "/Task", headers=headers)
            assert r.status_code == 200 and r.json()["total"] == 1

        res = {}
        for name, fn in (("plain_https", plain), ("erp_vau", via_vau)):
            res[name] = _measure(fn, seconds)
        res["plain_https_again"] = _measure(plain, seconds / 2)  # drift check
        return res
    finally:
        proc.terminate()
        proc.wait(10)


def bench_epa(seconds: float) -> dict[str, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from tests.support.vaukeys import LIBVAU_NOW, libvau_server_keys, libvau_signed_keys, libvau_signer

    from safehold.vau.epa_client import EpaVauClient
    from safehold.vau.epa_keys import VauKeyTrust
    from safehold.vau.epa_server import EpaVauServer

    keys = libvau_server_keys()
    signed = libvau_signed_keys(keys)
    srv = EpaVauServer(keys, signed, clock=lambda: LIBVAU_NOW, max_channels=1_000_000)
    trust = VauKeyTrust([libvau_signer()[1]], clock=lambda: LIBVAU_NOW)

    def handshake() -> tuple[EpaVauClient, str]:
        cl = EpaVauClient(trust)
        cid, m2 = srv.handle_m1(cl.message1())
        cl.handle_m4(srv.handle_m3(cid, cl.handle_m2(m2)))
        return cl, cid

    hs = _measure(handshake, seconds)
    cl, cid = handshake()
    buf = os.urandom(64 * 1024)

    def user_data() -> None:
        srv.open_request(cid, cl.encrypt_request(buf))

    key = os.urandom(32)
    aead = AESGCM(key)

    def raw() -> None:
        iv = os.urandom(12)
        aead.decrypt(iv, aead.encrypt(iv, buf, b"h" * 43), b"h" * 43)

    ud, rw = _measure(user_data, seconds), _measure(raw, seconds)
    mib = len(buf) / (1024 * 1024)
    return {
        "epa_handshakes_per_s": hs["per_s"],
        "epa_handshake_p50_ms": hs["p50_ms"],
        "epa_handshake_p99_ms": hs["p99_ms"],
        "epa_user_data_mib_s": round(ud["per_s"] * mib, 1),
        "raw_aes256gcm_mib_s": round(rw["per_s"] * mib, 1),
        "epa_user_data_vs_raw": round(ud["per_s"] / rw["per_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases (< 60 s in total)")
    args = ap.parse_args()
    seconds = 3.0 if args.quick else 15.0
    erp = bench_erp(seconds)
    epa = bench_epa(seconds / 2)
    for k, v in erp.items():
        print(
            f"{k:18s} {v['per_s']:8.1f} req/s  p50 {v['p50_ms']:7.3f} ms  "
            f"p99 {v['p99_ms']:7.3f} ms  (n={v['n']})"
        )
    for k, v in epa.items():
        print(f"{k:24s} {v}")
    v, p = erp["erp_vau"], erp["plain_https"]
    out = {
        "erp_vau_per_s": v["per_s"],
        "erp_vau_p50_ms": v["p50_ms"],
        "erp_vau_p99_ms": v["p99_ms"],
        "plain_https_per_s": p["per_s"],
        "plain_https_p50_ms": p["p50_ms"],
        "plain_https_p99_ms": p["p99_ms"],
        "plain_https_again_p50_ms": erp["plain_https_again"]["p50_ms"],
        "erp_vau_vs_https_p50": round(v["p50_ms"] / p["p50_ms"], 3),
        "erp_vau_vs_https_p99": round(v["p99_ms"] / p["p99_ms"], 3),
        "erp_vau_vs_https_per_s": round(v["per_s"] / p["per_s"], 3),
        "target_latency_ratio": 1.5,
        **epa,
        "seconds_per_phase": seconds,
    }
    out["met_latency"] = out["erp_vau_vs_https_p50"] <= 1.5
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve()
    else:
        main()
