"""RA-TLS errors: each bad-input case has its own subclass of :class:`~safehold.errors.RATLSError`."""

from __future__ import annotations

from safehold.errors import EvidenceFormatError, RATLSError


class MissingEvidenceError(RATLSError):
    """The peer certificate carries no RA-TLS Evidence extension (plain TLS certificate)."""


class EvidenceExtensionError(RATLSError, EvidenceFormatError):
    """The RA-TLS extension is not well-formed CBOR of the expected shape."""


class UnknownEvidenceTagError(EvidenceExtensionError):
    """The CBOR tag wrapping the Evidence is not one Safehold understands."""


class ClaimsFormatError(EvidenceExtensionError):
    """The RA-TLS claims map (pubkey-hash, nonce) is malformed or uses an unknown hash."""


class KeyBindingError(RATLSError):
    """The Evidence is bound to another public key than the certificate's (a relayed Evidence)."""


class NonceMismatchError(RATLSError):
    """The RA-TLS claims carry no nonce or another nonce than the Relying Party expected."""


class CertificateFormatError(RATLSError):
    """The peer certificate is not a parsable X.509 certificate, or is outside its validity."""
