"""Keysets: several AES-256 keys with 32-bit ids, exactly one primary, plus a blind-index key.

New ciphertexts use the primary key; decryption picks the key named by the ciphertext's key id
(:mod:`safehold.crypto.envelope`). Rotation is ``add(primary=True)`` (or ``add`` + ``promote``),
re-encryption of old rows (``RecordEngine.rekey``) and finally ``retire`` of the old key.

A keyset also holds one **index key** (32 bytes) that never rotates: blind indexes address
rows in the untrusted store, so they must stay stable across rotations of the value keys.

The only serialised form is :meth:`Keyset.wrap` — AES-256-GCM (NIST SP 800-38D) under a
32-byte key-encryption key (KEK), versioned::

    b"SHKS" | 0x01 | nonce (12) | AES-256-GCM(KEK, nonce, body, aad=b"SHKS" | 0x01)
    body  = u32be primary_id | index_key (32) | u16be n | n x (u32be key_id | key (32))

Keys appear in ascending id order. A keyset is never written anywhere in clear.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from safehold.errors import DecryptionError, EnvelopeFormatError, KeysetError, UnknownKeyError

#: AES-256 key size in bytes.
KEY_SIZE = 32
#: Largest key id (ids are unsigned 32-bit integers; 0 is never used).
MAX_KEY_ID = 2**32 - 1
#: Most keys a keyset may hold (u16 count in the wrapped form).
MAX_KEYS = 2**16 - 1

_WRAP_MAGIC = b"SHKS"
_WRAP_VERSION = 1
_WRAP_HEADER = _WRAP_MAGIC + bytes([_WRAP_VERSION])
_NONCE = 12
_TAG = 16


def _check_key(key_id: int, key: bytes) -> None:
    if not isinstance(key_id, int) or not 1 <= key_id <= MAX_KEY_ID:
        raise KeysetError(f"key id must be an integer in 1..{MAX_KEY_ID}, got {key_id!r}")
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise KeysetError(f"key {key_id} must be {KEY_SIZE} bytes")


class Keyset:
    """A set of AES-256 keys addressed by 32-bit unsigned ids, exactly one of them primary.

    Thread-safe. ``repr()`` shows ids only, never key material.

    Args:
        keys: ``{key_id: 32-byte key}``, ids in 1..2**32-1, at least one entry.
        primary_id: one of the ids.
        index_key: 32-byte blind-index key; ``None`` draws a fresh random one.

    Raises:
        KeysetError: empty keyset, bad id or key length, primary not among the keys.
    """

    def __init__(self, keys: Mapping[int, bytes], primary_id: int, index_key: bytes | None = None):
        if not keys:
            raise KeysetError("a keyset needs at least one key")
        if len(keys) > MAX_KEYS:
            raise KeysetError(f"a keyset holds at most {MAX_KEYS} keys, got {len(keys)}")
        for kid, key in keys.items():
            _check_key(kid, key)
        if primary_id not in keys:
            raise KeysetError(f"primary key id {primary_id} is not in the keyset")
        if index_key is None:
            index_key = os.urandom(KEY_SIZE)
        if len(index_key) != KEY_SIZE:
            raise KeysetError(f"index key must be {KEY_SIZE} bytes")
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {int(k): bytes(v) for k, v in keys.items()}
        self._aead: dict[int, AESGCM] = {}
        self._primary = int(primary_id)
        self._index_key = bytes(index_key)

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def generate(cls) -> Keyset:
        """A new keyset: one random primary key, a random id, a random index key (os.urandom)."""
        kid = cls._fresh_id(set())
        return cls({kid: AESGCM.generate_key(bit_length=256)}, kid, os.urandom(KEY_SIZE))

    @staticmethod
    def _fresh_id(taken: set[int]) -> int:
        while True:
            kid = secrets.randbits(32)
            if kid and kid not in taken:
                return kid

    # --- reading -----------------------------------------------------------------------------

    @property
    def primary_id(self) -> int:
        """Id of the primary key (used for every new ciphertext)."""
        return self._primary

    @property
    def index_key(self) -> bytes:
        """The 32-byte blind-index key; stable across rotations of the value keys."""
        return self._index_key

    def primary_key(self) -> tuple[int, bytes]:
        """``(primary_id, 32-byte key)``."""
        with self._lock:
            return self._primary, self._keys[self._primary]

    def key(self, key_id: int) -> bytes:
        """The 32-byte key with id ``key_id``.

        Raises:
            UnknownKeyError: no such id (retired or never present).
        """
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(f"key id {key_id} is not in the keyset") from None

    def ids(self) -> list[int]:
        """All key ids, ascending."""
        with self._lock:
            return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyset(ids={self.ids()}, primary_id={self._primary})"

    def aead(self, key_id: int) -> AESGCM:
        """A cached :class:`AESGCM` for ``key_id`` (one object per key, reused for speed).

        Raises:
            UnknownKeyError: no such id.
        """
        a = self._aead.get(key_id)
        if a is None:
            a = AESGCM(self.key(key_id))
            self._aead[key_id] = a
        return a

    def primary_aead(self) -> tuple[int, AESGCM]:
        """``(primary_id, cached AESGCM)`` read consistently under the lock."""
        with self._lock:
            kid = self._primary
        return kid, self.aead(kid)

    # --- rotation ----------------------------------------------------------------------------

    def add(self, *, primary: bool = False) -> int:
        """Add a fresh random key; make it primary if ``primary``. Returns its id.

        Raises:
            KeysetError: the keyset is full (65535 keys).
        """
        with self._lock:
            if len(self._keys) >= MAX_KEYS:
                raise KeysetError(f"keyset is full ({MAX_KEYS} keys)")
            kid = self._fresh_id(set(self._keys))
            self._keys[kid] = AESGCM.generate_key(bit_length=256)
            if primary:
                self._primary = kid
            return kid

    def promote(self, key_id: int) -> None:
        """Make ``key_id`` the primary key.

        Raises:
            KeysetError: ``key_id`` is not in the keyset.
        """
        with self._lock:
            if key_id not in self._keys:
                raise KeysetError(f"cannot promote key id {key_id}: not in the keyset")
            self._primary = key_id

    def retire(self, key_id: int) -> None:
        """Remove ``key_id``; ciphertexts under it then fail with :class:`UnknownKeyError`.

        Re-encrypt first (``RecordEngine.rekey``) and check ``RecordEngine.key_usage``.

        Raises:
            KeysetError: ``key_id`` is the primary or not in the keyset.
        """
        with self._lock:
            if key_id == self._primary:
                raise KeysetError(f"cannot retire key id {key_id}: it is the primary key")
            if key_id not in self._keys:
                raise KeysetError(f"cannot retire key id {key_id}: not in the keyset")
            del self._keys[key_id]
            self._aead.pop(key_id, None)

    # --- serialisation -----------------------------------------------------------------------

    def wrap(self, kek: bytes) -> bytes:
        """Serialise and encrypt under a 32-byte KEK (format in the module docstring).

        Returns:
            ``17 + 4 + 32 + 2 + 36 * len(self) + 16`` bytes.

        Raises:
            ValueError: ``kek`` is not 32 bytes.
        """
        if len(kek) != KEY_SIZE:
            raise ValueError(f"key-encryption key must be {KEY_SIZE} bytes, got {len(kek)}")
        with self._lock:
            parts = [struct.pack(">I", self._primary), self._index_key, struct.pack(">H", len(self._keys))]
            for kid in sorted(self._keys):
                parts.append(struct.pack(">I", kid))
                parts.append(self._keys[kid])
        nonce = os.urandom(_NONCE)
        return _WRAP_HEADER + nonce + AESGCM(kek).encrypt(nonce, b"".join(parts), _WRAP_HEADER)

    @classmethod
    def unwrap(cls, blob: bytes, kek: bytes) -> Keyset:
        """Inverse of :meth:`wrap`.

        Raises:
            EnvelopeFormatError: not a wrapped keyset (magic, version, length) or a body that
                authenticates but is malformed.
            DecryptionError: wrong KEK or tampered bytes (GCM tag mismatch).
            ValueError: ``kek`` is not 32 bytes.
        """
        if len(kek) != KEY_SIZE:
            raise ValueError(f"key-encryption key must be {KEY_SIZE} bytes, got {len(kek)}")
        blob = bytes(blob)
        if len(blob) < len(_WRAP_HEADER) + _NONCE + _TAG:
            raise EnvelopeFormatError(f"wrapped keyset too short ({len(blob)} bytes)")
        if blob[:4] != _WRAP_MAGIC:
            raise EnvelopeFormatError("not a wrapped Safehold keyset (bad magic)")
        if blob[4] != _WRAP_VERSION:
            raise EnvelopeFormatError(
                f"unsupported wrapped keyset version {blob[4]} (expected {_WRAP_VERSION})"
            )
        nonce = blob[5 : 5 + _NONCE]
        try:
            body = AESGCM(kek).decrypt(nonce, blob[5 + _NONCE :], _WRAP_HEADER)
        except InvalidTag:
            raise DecryptionError("wrapped keyset failed authentication: wrong KEK or tampered") from None
        if len(body) < 4 + KEY_SIZE + 2:
            raise EnvelopeFormatError("wrapped keyset body too short")
        (primary,) = struct.unpack_from(">I", body, 0)
        index_key = body[4 : 4 + KEY_SIZE]
        (n,) = struct.unpack_from(">H", body, 4 + KEY_SIZE)
        off = 4 + KEY_SIZE + 2
        if n == 0 or len(body) != off + n * (4 + KEY_SIZE):
            raise EnvelopeFormatError(f"wrapped keyset body length does not match its {n} keys")
        keys: dict[int, bytes] = {}
        for _ in range(n):
            (kid,) = struct.unpack_from(">I", body, off)
            if kid in keys:
                raise EnvelopeFormatError(f"wrapped keyset lists key id {kid} twice")
            keys[kid] = body[off + 4 : off + 4 + KEY_SIZE]
            off += 4 + KEY_SIZE
        try:
            return cls(keys, primary, index_key)
        except KeysetError as e:
            raise EnvelopeFormatError(f"wrapped keyset is inconsistent: {e}") from None
