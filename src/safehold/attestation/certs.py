"""Parse X.509 certificates and CRLs that arrive with Evidence or Endorsements.

Every byte of Evidence is the adversary's. ``cryptography`` reports a malformed structure with
several exception types — ``ValueError`` for bad DER, but ``x509.InvalidVersion`` for a
certificate whose version is not v1..v3 (RFC 5280 §4.1.2.1), ``UnsupportedAlgorithm`` for an
unknown key or curve OID, ``x509.DuplicateExtension`` for a repeated extension
(RFC 5280 §4.2) — and parses most fields lazily, on first access. The loaders here parse every
field the Verifiers use at once and turn *any* failure into the :class:`SafeholdError` subclass
the caller names, so a crafted certificate is a clean refusal (400 at the broker), never an
escaping exception (500).
"""

from __future__ import annotations

import warnings

from cryptography import x509

from safehold.errors import SafeholdError

__all__ = ["load_certificate", "load_certificates", "load_crl"]


def _force(cert: x509.Certificate) -> x509.Certificate:
    """Parse the lazily decoded fields now (subject, issuer, validity, extensions, key)."""
    _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc,
         cert.extensions, cert.signature_algorithm_oid)
    cert.public_key()
    return cert


def load_certificate(blob: bytes, what: str, error: type[SafeholdError]) -> x509.Certificate:
    """One certificate, PEM (``-----BEGIN``) or DER, with every field used later parsed.

    Args:
        blob: the certificate bytes as received.
        what: what it is, for the message (``"VCEK"``, ``"AK certificate"``).
        error: the exception class to raise (e.g. ``EvidenceFormatError``, ``EndorsementError``).

    Raises:
        error: ``"<what> is not a well-formed X.509 certificate (<reason>)"`` for any parse
            failure (no certificate bytes in the message).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. serial number 0 on older AMD VCEKs
            if bytes(blob).lstrip().startswith(b"-----BEGIN"):
                return _force(x509.load_pem_x509_certificate(bytes(blob)))
            return _force(x509.load_der_x509_certificate(bytes(blob)))
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes means "malformed"
        raise error(f"{what} is not a well-formed X.509 certificate ({_reason(e)})") from None


def load_certificates(blob: bytes, what: str, error: type[SafeholdError]) -> list[x509.Certificate]:
    """A PEM bundle (one or more certificates) or a single DER certificate, each fully parsed.

    Raises:
        error: no certificate, or any certificate does not parse (as :func:`load_certificate`).
    """
    raw = bytes(blob)
    if b"-----BEGIN" not in raw:
        return [load_certificate(raw, what, error)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [_force(c) for c in x509.load_pem_x509_certificates(raw)]
    except Exception as e:  # noqa: BLE001 - as above
        raise error(f"{what} is not a well-formed PEM certificate chain ({_reason(e)})") from None


def load_crl(der: bytes, what: str, error: type[SafeholdError]) -> x509.CertificateRevocationList:
    """A DER CRL (RFC 5280 §5) with its entries and extensions parsed.

    Raises:
        error: any parse failure.
    """
    try:
        crl = x509.load_der_x509_crl(bytes(der))
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.extensions,
             crl.signature_algorithm_oid)
        for entry in crl:
            _ = (entry.serial_number, entry.revocation_date_utc, entry.extensions)
        return crl
    except Exception as e:  # noqa: BLE001 - as above
        raise error(f"{what} is not a well-formed DER X.509 CRL ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """The exception's class and message, short (cryptography's messages hold no key bytes)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__
