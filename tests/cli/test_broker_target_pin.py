"""Operator attack on the broker CLI's ``up.json`` default (operator-attack review, 7 Dec 2026).

The operator owns the data directory: it can rewrite ``up.json`` (``broker_url``, ``ca``) and
replace ``ca.pem``. With no ``--url``, the broker CLI must only talk to a broker whose TLS
chains to the workload CA the *owner* pinned (``<owner dir>/pins.json``), as the owner's
freshness tools do (docs/threat-model.md): otherwise ``safehold broker manifest update`` sends
the broker token and an owner-signed manifest to the operator's server.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.cli.broker import broker_target
from safehold.cli.main import cli
from safehold.errors import ConfigError
from tests.support.certs import self_signed_ca


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return self_signed_ca(cn)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pin(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@contextlib.contextmanager
def _recording_broker(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A server of the operator's that records every request's headers and answers like a
    broker's ``GET``; HTTPS with ``tls``, else plain HTTP. Yields (base URL, requests seen)."""
    seen: list[dict[str, str]] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            body = json.dumps({"version": 1, "signer": "x", "manifest": {}, "mode": "ready"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[tuple[str, bytes, list[dict[str, str]]]]:
    """An HTTPS server of the operator's (its own CA, a leaf for 127.0.0.1) that records every
    request's headers and answers like a broker. Yields (url, CA PEM, requests seen)."""
    ca_key, ca = _ca("operator CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "imp.crt").write_bytes(_pem(leaf) + _pem(ca))
    (tmp_path / "imp.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "imp.crt", tmp_path / "imp.key")
    with _recording_broker(ctx) as (url, seen):
        yield url, _pem(ca), seen


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, x509.Certificate]:
    """A data directory whose workload CA the owner pinned (as ``safehold up`` does)."""
    d = tmp_path / "data"
    d.mkdir()
    _, real = _ca("workload CA")
    (d / "ca.pem").write_bytes(_pem(real))
    owner = tmp_path / "data.owner"
    owner.mkdir()
    (owner / "pins.json").write_text(json.dumps({str(d.resolve()): {"workload_ca_sha256": _pin(real)}}))
    monkeypatch.setenv("SAFEHOLD_DATA_DIR", str(d))
    monkeypatch.delenv("SAFEHOLD_BROKER_URL", raising=False)
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    return d, real


@pytest.mark.parametrize("where", ["up.json names the operator's CA file", "ca.pem replaced"])
def test_operator_rewriting_up_json_gets_no_broker_token(stack, impostor, tmp_path, where) -> None:
    d, _ = stack
    url, ca_pem, seen = impostor
    if where == "ca.pem replaced":
        (d / "ca.pem").write_bytes(ca_pem)
        ca = d / "ca.pem"
    else:
        ca = tmp_path / "operator-ca.pem"
        ca.write_bytes(ca_pem)
    (d / "up.json").write_text(json.dumps({"broker_url": url, "ca": str(ca)}))
    r = CliRunner().invoke(cli, ["broker", "manifest", "show"], env={"SAFEHOLD_BROKER_TOKEN": "owner-secret",
                                                                    "SAFEHOLD_DATA_DIR": str(d)})
    sent = any("owner-secret" in v for h in seen for v in h.values())
    assert not sent, "token sent to the operator's server"
    assert seen == []
    assert r.exit_code != 0
    if where == "ca.pem replaced":
        assert "not the one the owner pinned" in r.output, r.output
    else:  # the pinned CA is used: the operator's server fails TLS before any request
        assert "CERTIFICATE_VERIFY_FAILED" in r.output, r.output


def test_the_pinned_ca_is_used_not_the_file_up_json_names(stack, tmp_path) -> None:
    d, real = stack
    up = {"broker_url": "https://127.0.0.1:4711", "ca": str(tmp_path / "x.pem")}
    (d / "up.json").write_text(json.dumps(up))
    url, verify = broker_target(None, None)
    assert url == "https://127.0.0.1:4711"
    assert isinstance(verify, ssl.SSLContext)  # the pinned PEM, loaded once (no path re-read later)
    assert [c["subject"] for c in verify.get_ca_certs()] == [((("commonName", "workload CA"),),)]


def test_no_pin_for_the_data_directory_refuses_the_default(stack) -> None:
    d, _ = stack
    (d / "up.json").write_text(json.dumps({"broker_url": "https://127.0.0.1:4711", "ca": str(d / "ca.pem")}))
    (d.parent / "data.owner" / "pins.json").unlink()
    with pytest.raises(ConfigError, match=r"pins no workload CA.*--url"):
        broker_target(None, None)


def test_an_explicit_cacert_still_wins(stack, tmp_path) -> None:
    d, _ = stack
    (d / "up.json").write_text(json.dumps({"broker_url": "https://127.0.0.1:4711", "ca": str(d / "ca.pem")}))
    assert broker_target(None, "/my/ca.pem") == ("https://127.0.0.1:4711", "/my/ca.pem")


def test_the_groups_data_dir_option_names_the_stack(stack, impostor, tmp_path) -> None:
    """``safehold broker --data-dir D …`` reads D's up.json (not $SAFEHOLD_DATA_DIR's) and still
    checks TLS only against the CA the owner pinned for D."""
    d, _ = stack
    url, _, seen = impostor
    (d / "up.json").write_text(json.dumps({"broker_url": url}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = CliRunner().invoke(cli, ["broker", "--data-dir", str(d), "manifest", "show"],
                           env={"SAFEHOLD_BROKER_TOKEN": "owner-secret", "SAFEHOLD_DATA_DIR": str(elsewhere)})
    assert r.exit_code != 0 and seen == []
    assert url in r.output and "CERTIFICATE_VERIFY_FAILED" in r.output, r.output
    assert broker_target(None, None, str(d))[0] == url
    assert broker_target(None, None, str(elsewhere))[0] == "https://127.0.0.1:8443"  # no up.json there


@pytest.fixture
def plain_impostor() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A plain-HTTP server of the operator's that records every request's headers."""
    with _recording_broker() as served:
        yield served


@pytest.mark.parametrize("group_option", [False, True], ids=["env", "--data-dir"])
def test_an_http_broker_url_in_up_json_gets_no_token(stack, plain_impostor, group_option) -> None:
    """Attack (operator-attack review, 8 Dec 2026): up.json's ``broker_url`` rewritten to
    ``http://…``. The pinned CA context only checks a TLS handshake; over plain HTTP there is
    none, and the broker token went in the clear to the operator's server. Refused before any
    request: up.json's broker URL must be https."""
    d, _ = stack
    url, seen = plain_impostor
    (d / "up.json").write_text(json.dumps({"broker_url": url}))
    args = ["broker", "--data-dir", str(d)] if group_option else ["broker"]
    r = CliRunner().invoke(cli, [*args, "manifest", "show"],
                           env={"SAFEHOLD_BROKER_TOKEN": "owner-secret", "SAFEHOLD_DATA_DIR": str(d)})
    sent = any("owner-secret" in v for h in seen for v in h.values())
    assert not sent, "the broker token went in the clear to the operator's plain-HTTP server"
    assert seen == []
    assert r.exit_code != 0
    assert "https" in r.output, r.output
    with pytest.raises(ConfigError, match=r"not an https URL"):
        broker_target(None, None, str(d))


@pytest.mark.parametrize("ledger", ["records", "broker"])
def test_an_http_service_url_in_up_json_gets_no_admin_token_from_the_freshness_tools(
        stack, plain_impostor, ledger) -> None:
    """Attack (operator-attack review, 8 Dec 2026): up.json's ``records_url`` / ``broker_url``
    rewritten to ``http://…``; ``safehold freshness proposal`` (and ``status``, ``reanchor``)
    sent the records admin token in the clear (no handshake, so the pinned CA was never
    checked) — a token the operator can then use at the genuine service. Refused, nothing sent."""
    from safehold.devstack.anchor import proposal
    from safehold.devstack.errors import StackError

    d, _ = stack
    url, seen = plain_impostor
    (d.parent / "data.owner" / "tokens.json").write_text(json.dumps({"admin": "admin-secret"}))
    (d / "up.json").write_text(json.dumps({"records_url": url, "broker_url": url}))
    with pytest.raises(StackError, match="not an https URL"):
        proposal(d, ledger)
    assert seen == []


def test_status_does_not_show_a_plain_http_broker_as_ready(stack, plain_impostor) -> None:
    from safehold.devstack.status import stack_status

    d, _ = stack
    url, seen = plain_impostor
    (d / "up.json").write_text(json.dumps({"broker_url": url, "records_url": "https://127.0.0.1:9"}))
    out = stack_status(d)
    assert out["broker"]["ok"] is False and "not an https URL" in out["broker"]["status"]
    assert seen == []
