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

from safehold.crypto.keyset import Keyset

#: Fixed prefix of every ``info`` string; bump ``v1`` only with a new derivation scheme.
INFO_PREFIX = b"safehold/v1/"
#: RFC 5869 §2.3: L <= 255 * HashLen (32 bytes for SHA-256).
MAX_LENGTH = 255 * 32
#: Longest purpose label, in ASCII characters.
MAX_PURPOSE = 255
#: Size of a service's root secret (:class:`RootSecret`), bytes.
ROOT_SECRET_SIZE = 32


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


class RootSecret:
    """A service's 32-byte root secret, held in memory, from which all of its keys are derived.

    Each key is HKDF-SHA256 (RFC 5869) of the secret with ``info = build_info(purpose)`` and no
    salt (:func:`hkdf_sha256`); ``repr`` shows no key material.

    Args:
        secret: exactly :data:`ROOT_SECRET_SIZE` bytes.
        name: the service, for the error message (``"SVR"``, ``"discovery"``).

    Raises:
        ValueError: ``secret`` is not 32 bytes.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | bytearray, name: str) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) != ROOT_SECRET_SIZE:
            raise ValueError(f"the {name} secret must be {ROOT_SECRET_SIZE} bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "RootSecret(<hidden>)"

    def derive(self, purpose: str) -> bytes:
        """The 32-byte key for ``purpose`` (1..255 printable ASCII, e.g. ``"svr/freshness"``)."""
        return hkdf_sha256(self._secret, info=build_info(purpose))

    def keyset(self, prefix: str) -> Keyset:
        """A one-key :class:`~safehold.crypto.keyset.Keyset`: key id from the first 4 bytes
        (big-endian) of purpose ``{prefix}/keyset-id`` (1 if they are zero), the AES-256-GCM key
        from ``{prefix}/keyset``, the index key from ``{prefix}/index``."""
        kid = int.from_bytes(self.derive(f"{prefix}/keyset-id")[:4], "big") or 1
        return Keyset({kid: self.derive(f"{prefix}/keyset")}, kid, self.derive(f"{prefix}/index"))
