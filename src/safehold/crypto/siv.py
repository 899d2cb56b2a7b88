"""Deterministic authenticated encryption with AES-SIV (RFC 5297), via ``cryptography``'s AESSIV.

Deterministic: the same (key, plaintext, associated data) always gives the same ciphertext,
which is what lets an untrusted database answer equality queries on encrypted values. That is
also exactly what it leaks: equal plaintexts are visible as equal ciphertexts (frequency).

Ciphertext layout (RFC 5297 §2.6/§2.7 as implemented by ``cryptography``): 16-byte synthetic
IV (the tag) followed by the ciphertext, so ``len(ct) == len(pt) + 16``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from safehold.errors import CryptoError, DecryptionError

__all__ = ["SIV", "SIV_TAG_LEN"]

#: RFC 5297: the synthetic IV is one AES block.
SIV_TAG_LEN = 16


class SIV:
    """AES-SIV deterministic AEAD (RFC 5297).

    Args:
        key: 32, 48 or 64 bytes (AES-SIV-128/192/256: the key is two AES keys, §2.2). Use
            64 bytes (e.g. ``derive_key(..., length=64)``) for 256-bit security.

    Raises:
        CryptoError: wrong key length.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) not in (32, 48, 64):
            raise CryptoError("AES-SIV key must be 32, 48 or 64 bytes")
        self._aead = AESSIV(bytes(key))

    def encrypt(self, plaintext: bytes, associated_data: list[bytes] | None = None) -> bytes:
        """Encrypt ``plaintext`` (any length >= 1 byte; RFC 5297 S2V over ``associated_data``).

        Returns ``16-byte SIV || ciphertext``. Raises CryptoError for an empty plaintext
        (``cryptography`` refuses it).
        """
        if not plaintext:
            raise CryptoError("AES-SIV plaintext must not be empty")
        return self._aead.encrypt(plaintext, associated_data)

    def decrypt(self, ciphertext: bytes, associated_data: list[bytes] | None = None) -> bytes:
        """Decrypt and verify; raises DecryptionError on a wrong key, AD or tampered bytes."""
        if len(ciphertext) <= SIV_TAG_LEN:
            raise DecryptionError("AES-SIV ciphertext is truncated (needs more than 16 bytes)")
        try:
            return self._aead.decrypt(ciphertext, associated_data)
        except InvalidTag:
            raise DecryptionError(
                "AES-SIV authentication failed (wrong key, field or tampered value)"
            ) from None
