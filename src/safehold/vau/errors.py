"""Errors of the gematik VAU channels (E-Rezept VAU and ePA 3 VAU).

Each error names what was wrong (field, length, counter, key id) and never carries plaintext,
access tokens or key material. The outer HTTP status each maps to is decided in
:mod:`safehold.vau.http` (gemSpec_Krypt Tab_KRYPT_VAUERR: 400 decryption / malformed, 403 token).
"""

from __future__ import annotations

from safehold.errors import CryptoError


class VauError(CryptoError):
    """Root of every VAU protocol failure."""


class VauFormatError(VauError):
    """A VAU message is malformed: wrong length, version byte, CBOR shape or field type."""


class VauDecryptionError(VauError):
    """AES-GCM authentication failed: wrong key, tampered ciphertext, header or tag."""


class VauInnerRequestError(VauFormatError):
    """The decrypted E-Rezept inner request ``1 <JWT> <request-id> <response-key> <HTTP>`` is malformed."""


class VauAccessTokenError(VauError):
    """The access token in the inner request is missing, invalid, expired or does not match."""


class VauReplayError(VauError):
    """A request was seen before: E-Rezept request-id or ePA 3 request counter replayed."""


class VauPseudonymError(VauError):
    """The user pseudonym in ``/VAU/<pseudonym>`` is not one this VAU issued for this user."""


class VauResponseError(VauError):
    """A VAU response does not belong to the request (request-id, counter, direction, key id)."""


class VauCounterError(VauReplayError):
    """An ePA 3 user-data message carries a request counter that was used or is out of order."""


class VauKeyIdError(VauError):
    """An ePA 3 user-data message names another channel's KeyID."""


class VauHandshakeError(VauError):
    """An ePA 3 handshake message (M1..M4) is out of order, malformed or fails key confirmation."""


class VauKeyVerificationError(VauHandshakeError):
    """The VAU's signed public keys do not verify: signature, pinned certificate, expiry, key shape."""


class VauChannelUnknownError(VauError):
    """An ePA 3 VAU-CID names no live channel (expired or never opened): handshake again."""


class VauCapacityError(VauError):
    """The VAU's bounded state (replay cache, channel table) is full; refused rather than forgetting."""
