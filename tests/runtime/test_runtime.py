"""The workload runtime (``safehold.runtime``): attest to a real broker process, fetch secrets by
name and a workload certificate into memory, build TLS contexts from memory, serve."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import warnings
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.errors import SimulatedTEEWarning
from safehold.errors import ConfigError
from safehold.runtime import (
    BrokerIdentityError,
    NoKeysError,
    attest_and_fetch,
    ca_sha256,
    memory_server_context,
    pinned_ca,
)
from safehold.runtime.server import Listener, serve
from tests.support.broker_process import manifest_dict, start_broker, write_keys, write_manifest


def _self_signed() -> tuple[bytes, bytes]:
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_memory_server_context_serves_tls_and_writes_no_file(tmp_path: Path, monkeypatch) -> None:
    cert, key = _self_signed()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a temp file would land here
    ctx = memory_server_context(cert, key)
    assert list(tmp_path.iterdir()) == []

    async def app(scope, receive, send):  # minimal ASGI app
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    ports: list[int] = []
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        def on_ready(p: list[int]) -> None:
            ports.extend(p)
            ready.set()

        loop.run_until_complete(serve([Listener(app, "127.0.0.1", 0, ctx)], on_ready=on_ready, stop=stop))

    t = threading.Thread(target=run)
    t.start()
    try:
        assert ready.wait(30)
        client = ssl.create_default_context(cadata=cert.decode())
        r = httpx.get(f"https://localhost:{ports[0]}/", verify=client, timeout=10)
        assert r.status_code == 200 and r.text == "ok"
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(30)


def test_memory_server_context_fails_closed_without_memfd(monkeypatch) -> None:
    cert, key = _self_signed()
    monkeypatch.delattr(os, "memfd_create")
    with pytest.raises(ConfigError, match="memfd_create"):
        memory_server_context(cert, key)


def test_memory_server_context_mismatched_key_is_a_config_error() -> None:
    cert, _ = _self_signed()
    _, other = _self_signed()
    with pytest.raises(ConfigError, match="does not load"):
        memory_server_context(cert, other)


def test_pinned_ca_names_expected_and_got(tmp_path: Path) -> None:
    cert, _ = _self_signed()
    f = tmp_path / "ca.pem"
    f.write_bytes(cert)
    assert pinned_ca(f, ca_sha256(cert)) == cert
    with pytest.raises(BrokerIdentityError, match=f"expected {'ab' * 32}, got {ca_sha256(cert)}"):
        pinned_ca(f, "ab" * 32)
    with pytest.raises(BrokerIdentityError, match="no broker CA file"):
        pinned_ca(None, "ab" * 32)


@pytest.mark.slow  # a broker process
def test_attest_and_fetch_against_a_broker_process(tmp_path: Path) -> None:
    """Keysets and values by name, a workload certificate for the in-memory key with RA-TLS
    Evidence; a missing resource names it; an unapproved workload gets NoKeysError."""
    wl = SimulatedAttester(tmp_path / "tee")
    keys = write_keys(tmp_path / "keys")
    m = manifest_dict(measurement=wl.measurement.hex(), simulated_root=str(wl.root_ca_path), keys=keys)
    b = start_broker(tmp_path / "broker", manifest=write_manifest(tmp_path / "m.json", m))
    try:
        with b.client() as h:
            r = h.put("/admin/secrets/db-password", content=b"pw-1",
                      headers={"Authorization": f"Bearer {keys['operator_token']}"})
            assert r.status_code == 200, r.text
        ca = Path(b.cacert).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulatedTEEWarning)
            p = attest_and_fetch(b.url, ca, workload="records", attester=wl,
                                 keysets={"main": "default/keyset/records-keyset"},
                                 secrets={"db": "default/value/db-password"},
                                 certificate="default/certificate/records-tls",
                                 broker_ca_sha256=ca_sha256(ca), wait=5)
            assert set(p.keysets) == {"main"} and p.secrets == {"db": b"pw-1"}
            assert p.measurement == wl.measurement.hex()
            assert p.cert_pem is not None
            leaf = x509.load_pem_x509_certificate(p.cert_pem)
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            assert (leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
                    == p.key.public_key().public_bytes(serialization.Encoding.DER, spki))
            assert any(e.oid.dotted_string == "2.23.133.5.4.9" for e in leaf.extensions)
            assert isinstance(p.server_context(), ssl.SSLContext)
            with pytest.raises(ConfigError, match="default/value/nope"):
                attest_and_fetch(b.url, ca, workload="records", attester=wl,
                                 secrets={"x": "default/value/nope"})
            with pytest.raises(NoKeysError, match="measurement"):
                attest_and_fetch(b.url, ca, workload="other", attester=wl,
                                 keysets={"k": "default/keyset/other-key"})
            # another broker CA: refused before anything is exchanged
            cert, _ = _self_signed()
            with pytest.raises(BrokerIdentityError, match="not the pinned broker"):
                attest_and_fetch(b.url, cert, workload="records", attester=wl)
    finally:
        b.stop()


def test_wait_for_port_gives_up_after_the_deadline() -> None:
    from safehold.runtime.core import _wait_for_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        import time

        t0 = time.monotonic()
        _wait_for_port(f"https://127.0.0.1:{port}", 0.5)
        assert 0.3 < time.monotonic() - t0 < 3
