"""Real SGX / TDX quotes inside RA-TLS certificates (Gramine's standard and legacy formats) go
through the same path as ``safehold attest``: the quote verifies against Intel's root and
collateral, and the binding to the certificate key is appraised — a captured quote placed in
a certificate for a new key (a relay) is refused on report_data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.errors import EndorsementError
from safehold.ratls import cert as ratls_cert
from safehold.ratls.verify import evaluate_certificate
from tests.support.shared import EVIDENCE

SGX_Q = EVIDENCE / "sgx" / "dcapqvl-sgx_quote.bin"
SGX_C = EVIDENCE / "sgx" / "dcapqvl-sgx_quote_collateral.json"
SGX_AT = datetime.fromtimestamp(1752919277, UTC)
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


pytestmark = pytest.mark.usefixtures("captured_evidence")


def _cert(ext_oid: x509.ObjectIdentifier, value_for_key) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0)
        .not_valid_after(t0 + timedelta(days=365))
        .add_extension(x509.UnrecognizedExtension(ext_oid, value_for_key(key.public_key())), critical=False)
        .sign(key, hashes.SHA256())
    )
    return c.public_bytes(ratls_cert.serialization.Encoding.DER)


def _policy() -> AppraisalPolicy:
    return AppraisalPolicy.from_dict(
        {
            "allowed_tee_types": ["sgx"],
            "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
            "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"],
            "reference_values": {"measurements": [MRENCLAVE]},
        }
    )


def _standard(pub) -> bytes:
    claims = ratls_cert.encode_claims(ratls_cert.spki_der(pub))
    return ratls_cert.encode_extension(Evidence(MEDIA_TYPES["sgx"], SGX_Q.read_bytes()), claims)


@pytest.mark.parametrize("fmt", ["standard", "legacy"])
def test_real_quote_in_ratls_certificate_verifies_and_relay_is_refused(fmt, monkeypatch):
    if fmt == "standard":
        der = _cert(ratls_cert.OID_TCG_DICE_TAGGED_EVIDENCE, _standard)
    else:
        der = _cert(ratls_cert.OID_GRAMINE_LEGACY_QUOTE, lambda pub: SGX_Q.read_bytes())
    # collateral through the environment, as `safehold attest` would pick it up
    monkeypatch.setenv("SAFEHOLD_DCAP_COLLATERAL", str(SGX_C))
    rat, appraisal = evaluate_certificate(der, Verifier(_policy()), at=SGX_AT)
    assert rat.legacy is (fmt == "legacy")
    assert appraisal.claims.measurement.hex() == MRENCLAVE
    assert appraisal.claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    failed = {v.claim for v in appraisal.failures}
    # the quote is genuine, but its report_data ("Hello, world!") does not bind this key
    assert failed == {"report_data"}


def test_ratls_real_quote_without_collateral_fails_closed(monkeypatch):
    monkeypatch.delenv("SAFEHOLD_DCAP_COLLATERAL", raising=False)
    der = _cert(ratls_cert.OID_TCG_DICE_TAGGED_EVIDENCE, _standard)
    with pytest.raises(EndorsementError, match="no fresh DCAP collateral"):
        evaluate_certificate(der, Verifier(_policy()), at=SGX_AT)
