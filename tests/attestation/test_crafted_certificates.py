"""Crafted certificates inside Evidence and Endorsements are refused with a Safehold error.

``cryptography`` raises ``x509.InvalidVersion`` (not a ``ValueError``) for a certificate whose
version field is not v1..v3, and ``UnsupportedAlgorithm`` for an unknown key OID; both used to
escape the Verifiers (a 500 at the broker). The certificates here are real ones (the shared
Evidence samples, the simulated TEE's platform certificate) with one byte changed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers import sev_snp, tpm
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.attestation.verifiers.simulated import PLATFORM_CERT, SimulatedVerifier
from safehold.broker import protocol
from safehold.broker.http import create_app
from safehold.broker.server import open_broker
from safehold.errors import EndorsementError, EvidenceFormatError, SafeholdError
from tests.support.shared import shared_path

AT = datetime(2025, 7, 1, tzinfo=UTC)
#: ``[0] EXPLICIT Version ::= INTEGER v3(2)`` at the start of a TBSCertificate (RFC 5280 §4.1).
V3 = bytes.fromhex("a003020102")


def with_version(der: bytes, version: int) -> bytes:
    """``der`` with its TBSCertificate version INTEGER set to ``version`` (same length)."""
    i = der.find(V3)
    assert 0 < i < 16, "not a v3 certificate"
    out = bytearray(der)
    out[i + 4] = version
    return bytes(out)


def test_invalid_version_is_what_cryptography_does_not_report_as_valueerror():
    der = shared_path("evidence", "snp", "gosev-vcek.der").read_bytes()
    with pytest.raises(x509.InvalidVersion) as ei:
        x509.load_der_x509_certificate(with_version(der, 5))
    assert not isinstance(ei.value, ValueError)  # why `except ValueError` let it through


def _pem_with_version(pem: bytes, version: int) -> bytes:
    body = b"".join(pem.strip().splitlines()[1:-1])
    b64 = base64.b64encode(with_version(base64.b64decode(body), version))
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----"


def test_dcap_quote_with_an_invalid_pck_certificate_version_is_evidence_format_error():
    quote = shared_path("evidence", "sgx", "dcapqvl-sgx_quote.bin").read_bytes()
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    crafted_pem = _pem_with_version(quote[start:end], 5)
    assert len(crafted_pem) == end - start  # the quote's length fields stay right
    crafted = quote[:start] + crafted_pem + quote[end:]
    with pytest.raises(EvidenceFormatError, match=r"PCK chain is not a well-formed .*InvalidVersion"):
        SgxVerifier(require_collateral=False).verify(Evidence(MEDIA_TYPES["sgx"], crafted), at=AT)


def test_sev_snp_vcek_with_an_invalid_version_is_endorsement_error():
    report = shared_path("evidence", "snp", "gosev-attestation.bin").read_bytes()
    vcek = with_version(shared_path("evidence", "snp", "gosev-vcek.der").read_bytes(), 7)
    with pytest.raises(EndorsementError, match="VCEK is not a well-formed X.509 certificate"):
        SevSnpVerifier().verify(Evidence(MEDIA_TYPES["sev-snp"], report, {"vcek": vcek}), at=AT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this real VCEK has serial number 0
        vcek_pem = x509.load_der_x509_certificate(shared_path("evidence", "snp", "gosev-vcek.der")
                                                  .read_bytes()).public_bytes(serialization.Encoding.PEM)
    bundle = _pem_with_version(vcek_pem, 3)
    with pytest.raises(EndorsementError, match="cert_chain"):
        sev_snp.load_certs(bundle, "cert_chain")


def test_tpm_ak_certificate_and_ak_key_with_unknown_algorithms_are_endorsement_errors(tmp_path):
    der = shared_path("evidence", "snp", "gosev-vcek.der").read_bytes()
    with pytest.raises(EndorsementError, match="AK certificate material"):
        tpm.TpmQuoteVerifier(ak_roots=[with_version(der, 5)])
    spki = bytearray(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    oid = spki.find(bytes.fromhex("2a8648ce3d030107"))  # prime256v1 → an unknown curve arc
    spki[oid + 7] = 0x7F
    with pytest.raises(EndorsementError, match="ak_pub: unsupported key algorithm"):
        tpm.load_ak(bytes(spki))


def _simulated(tmp_path: Path) -> tuple[SimulatedAttester, Evidence]:
    warnings.simplefilter("ignore")
    wl = SimulatedAttester(tmp_path / "tee")
    return wl, wl.attest(bytes(64))


def test_simulated_platform_certificate_with_an_invalid_version_is_evidence_format_error(tmp_path):
    wl, ev = _simulated(tmp_path)
    crafted = Evidence(ev.media_type, ev.data,
                       {PLATFORM_CERT: with_version(ev.endorsements[PLATFORM_CERT], 5)})
    with pytest.raises(EvidenceFormatError, match="simulated platform certificate is not a well-formed"):
        SimulatedVerifier(trusted_roots=[wl.root_ca_pem()]).verify(crafted)


def test_broker_answers_400_not_500_for_evidence_with_a_crafted_certificate(tmp_path):
    """The KBS path end to end (in process): auth, then Evidence whose platform certificate has
    version 5 → 400 ``bad-request``, and the audit log is intact."""
    wl, _ = _simulated(tmp_path)
    manifest = {"workloads": {"w": {"secrets": ["k"], "policy": {
        "allow_simulated": True, "simulated_root": str(wl.root_ca_path),
        "accepted_tcb_statuses": ["Simulated"], "report_data": "key-binding",
        "reference_values": {"measurements": [wl.measurement.hex()]}}}},
        "secrets": {"k": {"type": "keyset"}}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    broker = open_broker(tmp_path / "b", manifest_path=tmp_path / "m.json")
    from joserfc.jwk import ECKey

    jwk = protocol.public_jwk(ECKey.generate_key("P-256"))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(broker))
        async with httpx.AsyncClient(transport=transport, base_url="https://broker.test") as c:
            r = await c.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                                   "extra-params": {"workload": "w"}})
            assert r.status_code == 200, r.text
            ev = wl.attest(protocol.report_data(r.json()["nonce"], jwk))
            crafted = Evidence(ev.media_type, ev.data,
                               {PLATFORM_CERT: with_version(ev.endorsements[PLATFORM_CERT], 5)})
            return await c.post("/kbs/v0/attest", json={"tee-pubkey": jwk,
                                                         "tee-evidence": crafted.to_cmw()})

    try:
        r = asyncio.run(go())
        assert r.status_code == 400, r.text
        assert "InvalidVersion" in r.json()["detail"]
        assert broker.audit_verify()["ok"]
    finally:
        broker.state.store.close()


@pytest.mark.parametrize("version", [3, 4, 5, 0x7F])
def test_every_invalid_version_byte_is_a_safehold_error(version):
    der = shared_path("evidence", "snp", "gosev-vcek.der").read_bytes()
    with pytest.raises(SafeholdError):
        sev_snp.load_cert(with_version(der, version), "VCEK")
