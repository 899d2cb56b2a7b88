"""Verifying an RA-TLS peer certificate: Evidence authentic, bound to the TLS key, and
acceptable under the appraisal policy.

Order (each step fails closed with its own error):

1. parse the certificate and its Evidence extension (``ratls.cert``);
2. check the certificate is within its validity period;
3. key binding: ``pubkey-hash`` = hash(DER SPKI of the certificate) — else the Evidence was
   relayed from another TEE (:class:`~safehold.ratls.errors.KeyBindingError`);
4. optional nonce: the claims carry the nonce the Relying Party expects;
5. the Verifier checks the Evidence (plug-in) and appraises the claims with
   ``expected_report_data`` = SHA-256(claims) ‖ 0³² (legacy: SHA-256(SPKI) ‖ 0³²).

The TLS handshake itself proves the peer holds the certificate's private key (CertificateVerify,
RFC 8446 §4.4.3), so with step 3 the Evidence speaks for this very connection. The certificate's
self-signature adds nothing to that and is not checked.
"""

from __future__ import annotations

import hmac
from dataclasses import replace
from datetime import UTC, datetime

from cryptography import x509

from safehold.attestation.checks import Verdict
from safehold.attestation.verifier import Appraisal, Verifier
from safehold.ratls.cert import (
    HASH_ALGS,
    RATLSEvidence,
    check_key_binding,
    load_certificate,
    parse_certificate,
    spki_der,
)
from safehold.ratls.errors import CertificateFormatError, NonceMismatchError


def _check_validity(cert: x509.Certificate, at: datetime | None) -> None:
    when = at or datetime.now(UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise CertificateFormatError(
            f"RA-TLS certificate valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}.."
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, verification time "
            f"{when:%Y-%m-%dT%H:%M:%SZ}"
        )


def _binding_rows(cert: x509.Certificate, rat: RATLSEvidence,
                  expected_nonce: bytes | None) -> list[Verdict]:
    want = HASH_ALGS[rat.pubkey_hash_alg](spki_der(cert)).digest()
    rows = [Verdict("ratls.pubkey-hash", f"{want.hex()} (this certificate's key)",
                    rat.pubkey_hash.hex(), hmac.compare_digest(want, rat.pubkey_hash), "ratls")]
    if expected_nonce is not None:
        got = rat.nonce
        rows.append(Verdict("ratls.nonce", expected_nonce.hex(), "none" if got is None else got.hex(),
                            got is not None and hmac.compare_digest(got, expected_nonce), "ratls"))
    return rows


def evaluate_certificate(cert: bytes | x509.Certificate, verifier: Verifier, *,
                         expected_nonce: bytes | None = None,
                         at: datetime | None = None) -> tuple[RATLSEvidence, Appraisal]:
    """Parse, verify and appraise without raising on policy failures (for display).

    Returns:
        ``(ratls_evidence, appraisal)``; the appraisal includes ``ratls.pubkey-hash`` (and
        ``ratls.nonce``) rows before the policy rows.

    Raises:
        CertificateFormatError, MissingEvidenceError, EvidenceExtensionError, ...: the
            certificate or its Evidence cannot be parsed or is out of validity.
        EvidenceSignatureError, EndorsementError: the Evidence is not authentic.
    """
    c = load_certificate(cert)
    rat = parse_certificate(c)
    _check_validity(c, at)
    appraisal = verifier.evaluate(rat.evidence, expected_report_data=rat.expected_report_data(),
                                  at=at)
    rows = tuple(_binding_rows(c, rat, expected_nonce)) + appraisal.verdicts
    return rat, replace(appraisal, verdicts=rows)


def verify_certificate(cert: bytes | x509.Certificate, verifier: Verifier, *,
                       expected_nonce: bytes | None = None,
                       at: datetime | None = None) -> Appraisal:
    """Verify an RA-TLS certificate completely; return the appraisal only if it is acceptable.

    Args:
        cert: DER/PEM bytes or a loaded certificate (the TLS peer's leaf).
        verifier: the Verifier holding the appraisal policy.
        expected_nonce: if given, the claims must carry exactly this nonce.
        at: verification time (None = now).

    Raises:
        CertificateFormatError, MissingEvidenceError, EvidenceExtensionError,
        UnknownEvidenceTagError, ClaimsFormatError, EvidenceFormatError: malformed input.
        KeyBindingError: Evidence bound to another key (relay).
        NonceMismatchError: missing or wrong nonce.
        EvidenceSignatureError, EndorsementError: Evidence not authentic.
        AppraisalError (subclasses): claims fail the policy, listing every failed claim.
    """
    c = load_certificate(cert)
    rat = parse_certificate(c)
    _check_validity(c, at)
    check_key_binding(c, rat)
    if expected_nonce is not None and (
        rat.nonce is None or not hmac.compare_digest(rat.nonce, expected_nonce)
    ):
        raise NonceMismatchError(
            f"RA-TLS nonce: expected {expected_nonce.hex()}, "
            f"got {'none' if rat.nonce is None else rat.nonce.hex()}"
        )
    return verifier.appraise(rat.evidence, expected_report_data=rat.expected_report_data(), at=at)
