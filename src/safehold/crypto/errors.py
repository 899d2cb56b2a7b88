"""Exceptions of the crypto layer beyond :class:`safehold.errors.CryptoError`: the RFC 9497
OPRF errors of :mod:`safehold.crypto.oprf`."""

from __future__ import annotations

from safehold.errors import CryptoError


class OPRFError(CryptoError):
    """An RFC 9497 OPRF operation failed."""


class DeserializeError(OPRFError):
    """An element or scalar is not a valid encoding (RFC 9497 §2.1 DeserializeElement/Scalar)."""


class InvalidElementError(DeserializeError):
    """32 bytes that are not the canonical encoding of a ristretto255 element (or the wrong
    length) — RFC 9497 §4.1 DeserializeElement, RFC 9496 §4.3.1 Decode."""


class IdentityElementError(DeserializeError):
    """The identity element, which RFC 9497 §4.1 DeserializeElement rejects."""


class InvalidScalarError(DeserializeError):
    """Not a 32-byte little-endian scalar below the group order (RFC 9497 §4.1 DeserializeScalar)."""


class InvalidInputError(OPRFError):
    """The input hashes to the identity element (RFC 9497 §3.3.1 Blind / Evaluate)."""


class InputLengthError(OPRFError, ValueError):
    """An input of 2^16 - 1 bytes or more (RFC 9497 §5.1 Input Limits)."""


class DeriveKeyPairError(OPRFError):
    """DeriveKeyPair found no non-zero scalar in 256 tries (RFC 9497 §3.2.1)."""
