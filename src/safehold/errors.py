"""One exception hierarchy for Safehold, rooted at :class:`SafeholdError`.

Rules every subclass follows:

* the message names what was wrong (which field, which claim, which row's blind index);
* it never contains plaintext record content or key material;
* attestation failures say expected vs. got.

Packages add their own subclasses of the classes below in their own modules
(``safehold.<pkg>.errors`` or next to the code); this module stays the shared root.
"""

from __future__ import annotations


class SafeholdError(Exception):
    """Root of every error Safehold raises on purpose."""


class ConfigError(SafeholdError):
    """A configuration file, manifest, schema or policy is missing or invalid."""


# --- crypto -----------------------------------------------------------------------------------


class CryptoError(SafeholdError):
    """A cryptographic operation failed (wrong key, bad format, failed authentication)."""


class EnvelopeFormatError(CryptoError):
    """Bytes are not a well-formed Safehold envelope (wrong length, version or layout)."""


class DecryptionError(CryptoError):
    """Authenticated decryption failed: wrong key, wrong associated data, or tampered bytes."""


class UnknownKeyError(CryptoError):
    """A ciphertext names a key id that the keyset does not hold."""


class KeysetError(CryptoError):
    """A keyset operation is invalid (no primary, duplicate id, retiring the primary, ...)."""


# --- storage ----------------------------------------------------------------------------------


class StoreError(SafeholdError):
    """The untrusted store failed (I/O, connection, schema)."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or the connection dropped; nothing was written."""


class ConflictError(StoreError):
    """Compare-and-set failed: the row's version is not the one the caller expected."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this code or cannot be migrated."""


# --- records ----------------------------------------------------------------------------------


class RecordError(SafeholdError):
    """A record operation failed."""


class RecordNotFoundError(RecordError):
    """No record under that key (in that namespace)."""


class RecordTamperedError(RecordError):
    """A stored row failed authentication; the message names the row's blind index only."""


# --- attestation ------------------------------------------------------------------------------


class AttestationError(SafeholdError):
    """Evidence could not be verified or appraised (RFC 9334 terms)."""


class EvidenceFormatError(AttestationError):
    """Evidence bytes are truncated, garbled or of an unsupported type/version."""


class EvidenceSignatureError(AttestationError):
    """A signature over Evidence or an Endorsement (certificate chain, collateral) is invalid."""


class EndorsementError(AttestationError):
    """Endorsements (vendor certificates, collateral) are missing, expired or do not chain."""


class EndorsementExpiredError(EndorsementError):
    """A certificate or collateral item is past its validity (notAfter / nextUpdate) at the
    verification time."""


class EndorsementNotYetValidError(EndorsementError):
    """A certificate or collateral item is not valid yet (notBefore / issueDate / thisUpdate
    after the verification time): a clock that is behind, or collateral from the future — not
    an expiry, and refreshing the collateral will not help."""


class AppraisalError(AttestationError):
    """Evidence verified but its claims do not satisfy the appraisal policy.

    ``failures`` lists every failed claim as ``(claim, expected, got)`` strings.
    """

    def __init__(self, message: str, failures: list[tuple[str, str, str]] | None = None):
        self.failures = list(failures or [])
        if self.failures:
            detail = "; ".join(f"{c}: expected {e}, got {g}" for c, e, g in self.failures)
            message = f"{message}: {detail}"
        super().__init__(message)


class AttestationResultError(AttestationError):
    """An Attestation Result (EAR token) is invalid, expired, from another issuer or not affirming."""


class RATLSError(AttestationError):
    """An RA-TLS certificate lacks Evidence, carries malformed Evidence or a wrong key binding."""


# --- broker / protocol -------------------------------------------------------------------------


class BrokerError(SafeholdError):
    """The key broker refused or failed a request."""


class JWKError(BrokerError):
    """A KBS ``tee-pubkey`` is not an acceptable public JWK (RFC 7517); raised by both sides of
    the protocol (:mod:`safehold.broker.protocol`)."""


class ManifestError(ConfigError):
    """A broker manifest is malformed or its update is not properly signed."""


class SealingError(CryptoError):
    """The master key cannot be unsealed on this TEE identity (measurement or host changed)."""


class AuditChainError(SafeholdError):
    """The audit log's hash chain or a signature is broken; names the first bad entry."""


class AuditSegmentRefusedError(SafeholdError):
    """An audit retention request (export or seal of a segment) does not fit the live log — a
    range outside the live entries, or a SHA-256 that is not the segment's — and changed
    nothing; the chain itself is fine (unlike :class:`AuditChainError`)."""


# --- proxy / FPE --------------------------------------------------------------------------------


class FPEError(CryptoError):
    """Format-preserving encryption input is outside the domain (alphabet, length, radix)."""


class TransformError(SafeholdError):
    """A configured field cannot be transformed (protect/reveal) as the schema says."""


class ShapeError(TransformError):
    """A protected field's path meets JSON of another shape than the schema describes: an array
    where an object is expected (``{"address": [{"city": ...}]}`` for ``address.city``), an
    object or a scalar where an array is expected (``*``), or a scalar where an object is
    expected. The record is refused rather than passed on with the value unprotected.

    ``where`` is the JSON position (``names[0].given``), ``found`` and ``expected`` are JSON
    type names; no value is ever part of the message.
    """

    def __init__(self, found: str, expected: str, where: str = "", field: str = ""):
        self.found, self.expected, self.where, self.field = found, expected, where, field
        at = f" at {where!r}" if where else ""
        name = f"field {field!r}: " if field else ""
        super().__init__(f"{name}found {found}{at} where the schema expects {expected}; "
                         "not passed on unprotected")

    def within(self, segment: str) -> ShapeError:
        """The same error one level further out (``segment`` prepended to :attr:`where`)."""
        if not self.where:
            where = segment
        elif self.where.startswith("["):
            where = segment + self.where
        else:
            where = f"{segment}.{self.where}"
        return ShapeError(self.found, self.expected, where, self.field)

    def for_field(self, field: str) -> ShapeError:
        """The same error naming the schema field."""
        return ShapeError(self.found, self.expected, self.where, field)
