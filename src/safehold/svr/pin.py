"""PIN handling on the client: normalisation, Argon2id stretching, the salt, sealing the secret.

Shared module (the client SDK imports it; the service never needs it: **the PIN is stretched on
the client only**, and the service sees a 32-byte access key or an OPRF input's blinding).

* :func:`normalise_pin` — Signal's PIN normalisation (libsignal ``rust/pin/src/hash.rs``, module
  documentation): trim surrounding whitespace; if every character is a decimal digit, map
  non-Arabic digits to 0-9; apply Unicode NFKD; UTF-8.
* :func:`stretch` — Argon2id, version 1.3 (0x13), RFC 9106, through ``argon2-cffi``'s low-level
  API with Signal's SVR2 parameters (:data:`SIGNAL_ARGON2`: 16 MiB, 32 iterations, p = 1,
  64-byte output). The first 32 bytes are the encryption key, the last 32 the access key.
* :func:`make_salt` — HKDF-SHA256 (RFC 5869) with ``salt = group id (u64 big-endian)`` and
  ``ikm = user name``, 32 bytes (libsignal ``PinHash::make_salt``).
* :func:`seal_secret` / :func:`open_secret` — the secret under the encryption key with AES-SIV
  (RFC 5297, deterministic: a retried backup sends identical data, which SVR2's expose step
  compares), key ``HKDF(encryption key, "svr/secret-siv")`` of 64 bytes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from argon2.low_level import Type, hash_secret_raw

from safehold.crypto.kdf import derive_key, hkdf_sha256
from safehold.crypto.siv import SIV
from safehold.errors import DecryptionError
from safehold.svr.errors import InvalidPinError, InvalidRequestError
from safehold.svr.protocol import MAX_SECRET

__all__ = [
    "MIN_PIN_LENGTH", "SIGNAL_ARGON2", "Argon2Params", "PinHash", "make_salt", "normalise_pin",
    "open_secret", "seal_secret", "stretch",
]

#: Shortest PIN accepted (characters after normalisation; Signal's clients ask for 4 digits).
MIN_PIN_LENGTH = 4
ARGON2_VERSION = 0x13


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost: ``memory_kib`` (KiB), ``iterations`` (t), ``parallelism`` (p). Output is
    always 64 bytes. ``label`` names a non-production setting in messages and reprs."""

    memory_kib: int
    iterations: int
    parallelism: int = 1
    label: str = "signal-svr2"


#: Signal's SVR2 PIN hash (libsignal ``PinHash::create``): 16 MiB, t = 32, p = 1.
SIGNAL_ARGON2 = Argon2Params(memory_kib=16 * 1024, iterations=32, parallelism=1)


@dataclass(frozen=True)
class PinHash:
    """The 64-byte Argon2id output: ``encryption_key`` = bytes 0..31 (stays on the client) and
    ``access_key`` = bytes 32..63 (SVR2 sends it as ``pin``). ``raw`` is all 64 bytes (SVR3's
    OPRF input). ``repr`` shows none of them."""

    raw: bytes = field(repr=False)

    @property
    def encryption_key(self) -> bytes:
        return self.raw[:32]

    @property
    def access_key(self) -> bytes:
        return self.raw[32:]


def normalise_pin(pin: str) -> bytes:
    """Signal's PIN normalisation, returning UTF-8 bytes (module docstring).

    Raises:
        InvalidPinError: not a string, or shorter than :data:`MIN_PIN_LENGTH` characters after
            normalisation (the message never contains the PIN).
    """
    if not isinstance(pin, str):
        raise InvalidPinError("the PIN must be text")
    s = pin.strip()
    if s and all(unicodedata.category(c) == "Nd" for c in s):
        s = "".join(str(unicodedata.decimal(c)) for c in s)
    s = unicodedata.normalize("NFKD", s)
    if len(s) < MIN_PIN_LENGTH:
        raise InvalidPinError(f"the PIN must have at least {MIN_PIN_LENGTH} characters")
    return s.encode("utf-8")


def make_salt(user: bytes, group_id: int) -> bytes:
    """The 32-byte Argon2 salt of ``user`` in SVR group ``group_id`` (u64): HKDF-SHA256 with
    ``salt = group_id`` big-endian, ``ikm = user``, empty info (libsignal ``make_salt``).

    Raises:
        ValueError: ``group_id`` outside 0..2^64-1.
    """
    if not 0 <= group_id < 2**64:
        raise ValueError("group id must be an unsigned 64-bit integer")
    return hkdf_sha256(user, info=b"", salt=group_id.to_bytes(8, "big"), length=32)


def stretch(pin: bytes, salt: bytes, params: Argon2Params = SIGNAL_ARGON2) -> PinHash:
    """Argon2id v1.3 of a *normalised* PIN (RFC 9106), 64-byte output.

    Args:
        pin: :func:`normalise_pin` output.
        salt: 32 bytes from :func:`make_salt`.
        params: :data:`SIGNAL_ARGON2` in production; a cheaper setting only where labelled.

    Raises:
        ValueError: salt not 32 bytes.
    """
    if len(salt) != 32:
        raise ValueError("the Argon2 salt must be 32 bytes")
    raw = hash_secret_raw(pin, salt, time_cost=params.iterations, memory_cost=params.memory_kib,
                          parallelism=params.parallelism, hash_len=64, type=Type.ID,
                          version=ARGON2_VERSION)
    return PinHash(raw)


def _siv(key: bytes) -> SIV:
    return SIV(derive_key(key, purpose="svr/secret-siv", length=64))


def seal_secret(encryption_key: bytes, secret: bytes, context: bytes) -> bytes:
    """AES-SIV of ``secret`` (1..256 bytes) under ``encryption_key`` with ``context`` (protocol,
    group id, backup id) as associated data; deterministic.

    Raises:
        InvalidRequestError: an empty or over-long secret.
    """
    if not isinstance(secret, bytes | bytearray) or not 1 <= len(secret) <= MAX_SECRET:
        raise InvalidRequestError(f"the secret must be 1..{MAX_SECRET} bytes")
    return _siv(encryption_key).encrypt(bytes(secret), [context])


def open_secret(encryption_key: bytes, data: bytes, context: bytes) -> bytes:
    """Inverse of :func:`seal_secret`.

    Raises:
        DecryptionError: wrong key or context, or the data was altered.
    """
    try:
        return _siv(encryption_key).decrypt(data, [context])
    except DecryptionError:
        raise DecryptionError("the recovered data does not open under this PIN's key") from None
