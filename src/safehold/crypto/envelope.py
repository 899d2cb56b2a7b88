"""Record envelopes: AES-256-GCM (NIST SP 800-38D) in a small versioned binary format.

Layout (all integers big-endian)::

    offset  size  field
    0       1     format version (0x01)
    1       4     key id (u32) of the keyset key that sealed it
    5       12    nonce, 96 bits from os.urandom (SP 800-38D §8.2.2 random construction)
    17      n+16  ciphertext || 128-bit tag

The GCM associated data is ``header (bytes 0..4) || aad``: the format version and key id are
authenticated, and the caller's ``aad`` (which is never stored) must be supplied again to
open. The header has a fixed length, so the concatenation is unambiguous.

Random 96-bit nonces keep the collision probability under 2**-32 for up to 2**32 messages
per key (SP 800-38D §8.3); rotate the primary key well before that (docs/crypto.md).
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from safehold.crypto.keyset import KEY_SIZE, Keyset
from safehold.errors import DecryptionError, EnvelopeFormatError, UnknownKeyError

#: Current (and only) envelope format version.
FORMAT_VERSION = 1
HEADER_SIZE = 5
NONCE_SIZE = 12
TAG_SIZE = 16
#: Bytes an envelope adds to its plaintext.
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE

_HDR = struct.Struct(">BI")


def envelope_key_id(blob: bytes) -> int:
    """The key id an envelope names, without decrypting it.

    Raises:
        EnvelopeFormatError: shorter than :data:`OVERHEAD` bytes or an unknown format version.
    """
    if len(blob) < OVERHEAD:
        raise EnvelopeFormatError(f"envelope too short: {len(blob)} bytes, minimum {OVERHEAD}")
    version, key_id = _HDR.unpack_from(blob, 0)
    if version != FORMAT_VERSION:
        raise EnvelopeFormatError(
            f"unsupported envelope format version {version} (expected {FORMAT_VERSION})"
        )
    return int(key_id)


def _seal(aead: AESGCM, key_id: int, plaintext: bytes, aad: bytes) -> bytes:
    header = _HDR.pack(FORMAT_VERSION, key_id)
    nonce = os.urandom(NONCE_SIZE)
    return header + nonce + aead.encrypt(nonce, plaintext, header + aad)


def _open(aead: AESGCM, key_id: int, blob: bytes, aad: bytes) -> bytes:
    try:
        nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        return aead.decrypt(nonce, blob[HEADER_SIZE + NONCE_SIZE :], blob[:HEADER_SIZE] + aad)
    except InvalidTag:
        raise DecryptionError(
            f"envelope under key id {key_id} failed authentication: tampered bytes, wrong key "
            "or wrong associated data"
        ) from None


def seal(keyset: Keyset, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under the keyset's primary key.

    Args:
        keyset: supplies the primary key and its id.
        plaintext: any length up to 2**31 - 1 bytes (cryptography's AESGCM limit).
        aad: associated data the opener must present again; not stored in the envelope.

    Returns:
        ``len(plaintext) + 33`` bytes in the layout of the module docstring.
    """
    key_id, aead = keyset.primary_aead()
    return _seal(aead, key_id, plaintext, aad)


def open_envelope(keyset: Keyset, blob: bytes, aad: bytes) -> bytes:
    """Decrypt an envelope with the keyset key its header names.

    Raises:
        EnvelopeFormatError: truncated (< 33 bytes) or unknown format version.
        UnknownKeyError: the key id is not in ``keyset`` (retired, or from another keyset).
        DecryptionError: the tag does not verify (flipped bit, wrong key, different ``aad``).
    """
    key_id = envelope_key_id(blob)
    return _open(keyset.aead(key_id), key_id, blob, aad)


def seal_with_key(key_id: int, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Lower-level :func:`seal` for callers holding one key instead of a keyset.

    Args:
        key_id: u32 id written into the header (1..2**32-1).
        key: 32-byte AES-256 key.

    Raises:
        ValueError: bad ``key_id`` or key length.
    """
    if len(key) != KEY_SIZE:
        raise ValueError(f"envelope key must be {KEY_SIZE} bytes, got {len(key)}")
    if not 1 <= key_id < 2**32:
        raise ValueError(f"key id must be in 1..2**32-1, got {key_id}")
    return _seal(AESGCM(key), key_id, plaintext, aad)


def open_with_key(key_id: int, key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Lower-level :func:`open_envelope` with one ``(key_id, 32-byte key)``.

    Raises:
        EnvelopeFormatError: truncated or unknown format version.
        UnknownKeyError: the envelope names a key id other than ``key_id``.
        DecryptionError: authentication failed.
        ValueError: ``key`` is not 32 bytes.
    """
    if len(key) != KEY_SIZE:
        raise ValueError(f"envelope key must be {KEY_SIZE} bytes, got {len(key)}")
    got = envelope_key_id(blob)
    if got != key_id:
        raise UnknownKeyError(f"envelope names key id {got}, caller holds key id {key_id}")
    return _open(AESGCM(key), key_id, blob, aad)
