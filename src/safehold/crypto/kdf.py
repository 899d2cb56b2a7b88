"""HKDF-SHA256 sub-key derivation with Safehold domain separation.

Every sub-key Safehold derives goes through :func:`derive_key`, which runs HKDF-SHA256
(RFC 5869, §2.2 extract + §2.3 expand) with an ``info`` string that names *what the key is
for*. Two derivations with different purposes or contexts can never produce related keys,
and no ``(purpose, context)`` pair encodes to the same ``info`` as another (see
:func:`build_info`).
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Fixed prefix of every ``info`` string; bump ``v1`` only with a new derivation scheme.
INFO_PREFIX = b"safehold/v1/"
#: RFC 5869 §2.3: L <= 255 * HashLen (32 bytes for SHA-256).
MAX_LENGTH = 255 * 32
#: Longest purpose label, in ASCII characters.
MAX_PURPOSE = 255


def hkdf_sha256(ikm: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """Plain HKDF-SHA256 (RFC 5869 §2), no Safehold framing.

    Args:
        ikm: input keying material, any length (should carry >= 256 bits of entropy).
        info: the RFC 5869 ``info`` octets.
        length: output length L in bytes, 1..8160.
        salt: RFC 5869 salt; ``None`` means HashLen zero bytes (§2.2).

    Returns:
        ``length`` bytes of output keying material (OKM).

    Raises:
        ValueError: ``length`` outside 1..8160.
    """
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"HKDF-SHA256 output length must be 1..{MAX_LENGTH} bytes, got {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def build_info(purpose: str, context: bytes = b"") -> bytes:
    """The HKDF ``info`` for ``(purpose, context)``.

    Layout: ``b"safehold/v1/" || u8 len(purpose) || purpose (ASCII) || u32be len(context) ||
    context``. Both fields are length-prefixed, so the encoding is injective.

    Raises:
        ValueError: ``purpose`` empty, longer than 255 characters or not printable ASCII;
            ``context`` longer than 2**32 - 1 bytes.
    """
    if not purpose or len(purpose) > MAX_PURPOSE or not (purpose.isascii() and purpose.isprintable()):
        raise ValueError("HKDF purpose must be 1..255 printable ASCII characters")
    if len(context) >= 2**32:
        raise ValueError("HKDF context must be shorter than 2**32 bytes")
    p = purpose.encode("ascii")
    return b"".join((INFO_PREFIX, struct.pack(">B", len(p)), p, struct.pack(">I", len(context)), context))


def derive_key(ikm: bytes, *, purpose: str, context: bytes = b"", length: int = 32) -> bytes:
    """Derive a sub-key from ``ikm`` for one ``purpose`` (and optional ``context``).

    HKDF-SHA256 (RFC 5869) with no salt (HashLen zero bytes, §2.2: ``ikm`` is already a
    uniformly random key) and ``info = build_info(purpose, context)``.

    Args:
        ikm: the parent key, normally 32 bytes from a :class:`~safehold.crypto.keyset.Keyset`.
        purpose: what the key is for, e.g. ``"blind-index"``; 1..255 printable ASCII.
        context: extra binding, e.g. a namespace name as UTF-8; 0..2**32-1 bytes.
        length: output length in bytes, 1..8160 (default 32, an AES-256 / HMAC-SHA256 key).

    Returns:
        ``length`` bytes.

    Raises:
        ValueError: bad ``purpose``, ``context`` or ``length``, or empty ``ikm``.
    """
    if not ikm:
        raise ValueError("HKDF input keying material must not be empty")
    return hkdf_sha256(ikm, info=build_info(purpose, context), length=length)
