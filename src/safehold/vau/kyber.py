"""Kyber768 as the ePA 3 VAU uses it: round-3 (v3.0.2) shared secrets from an ML-KEM-768 library.

gemSpec_Krypt chapter 7 names "Kyber768" and the production Aktensystem speaks Kyber **round 3**
(gematik lib-vau post-processes BouncyCastle's ML-KEM output; IBM's client uses Botan
``Kyber768_R3``). Keys and ciphertexts of round 3 and FIPS 203 ML-KEM-768 have the same encodings
(public key 1184 bytes, expanded private key 2400 bytes, ciphertext 1088 bytes); only the final
shared-secret derivation differs. With ``K`` the FIPS 203 shared secret and ``c`` the ciphertext::

    ss_round3 = SHAKE256(K || SHA3-256(c))[:32]

holds for encapsulation (round 3 hashes its random message first, which is again uniformly
random) and for successful decapsulation; on implicit rejection both are pseudorandom and
different, which ends in an AEAD failure one step later, as with a real round-3 peer. The
transform is checked against an independent round-3 implementation in the tests.

The lattice arithmetic is never done here: seed-form keys (64-byte ``d || z``) and fresh key
pairs use pyca/cryptography (OpenSSL) ML-KEM-768; expanded-form private keys (2400 bytes, as in
lib-vau's key files, which carry no seed) use PyCryptodome's ML-KEM-768, because cryptography 50
imports seeds only. ``variant="mlkem"`` skips the transform for peers that moved to FIPS 203
(lib-vau issue 27).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import mlkem

from safehold.vau.errors import VauFormatError

__all__ = [
    "CIPHERTEXT_SIZE",
    "EXPANDED_PRIVATE_KEY_SIZE",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "KyberPrivateKey",
    "KyberPublicKey",
    "Variant",
]

PUBLIC_KEY_SIZE = 1184
EXPANDED_PRIVATE_KEY_SIZE = 2400
CIPHERTEXT_SIZE = 1088
SEED_SIZE = 64
SHARED_SECRET_SIZE = 32

Variant = Literal["round3", "mlkem"]


def _round3(ss: bytes, ct: bytes) -> bytes:
    """Kyber v3.0.2 KDF over an ML-KEM shared secret (see module docstring)."""
    return hashlib.shake_256(ss + hashlib.sha3_256(ct).digest()).digest(SHARED_SECRET_SIZE)


def _check_variant(variant: str) -> None:
    if variant not in ("round3", "mlkem"):
        raise ValueError(f"Kyber variant must be 'round3' or 'mlkem', got {variant!r}")


class KyberPublicKey:
    """A Kyber768 / ML-KEM-768 encapsulation key (1184 raw bytes).

    Raises (constructor):
        VauFormatError: not 1184 bytes, or not a valid key (FIPS 203 §7.2 modulus check).
    """

    def __init__(self, raw: bytes, *, variant: Variant = "round3"):
        _check_variant(variant)
        raw = bytes(raw)
        if len(raw) != PUBLIC_KEY_SIZE:
            raise VauFormatError(f"Kyber768 public key must be {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
        try:
            self._key = mlkem.MLKEM768PublicKey.from_public_bytes(raw)
        except ValueError:
            raise VauFormatError(
                "Kyber768 public key is not a valid key (coefficient out of range)"
            ) from None
        self.raw = raw
        self.variant = variant

    def encapsulate(self) -> tuple[bytes, bytes]:
        """Fresh shared secret for this key: ``(shared_secret 32 bytes, ciphertext 1088 bytes)``."""
        ss, ct = self._key.encapsulate()
        return (_round3(ss, ct) if self.variant == "round3" else ss), ct

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KyberPublicKey) and hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)


class KyberPrivateKey:
    """A Kyber768 / ML-KEM-768 decapsulation key; build with :meth:`generate`,
    :meth:`from_seed` or :meth:`from_expanded`. ``repr`` never shows key bytes."""

    def __init__(self, *, _backend: object, _public: bytes, variant: Variant):
        _check_variant(variant)
        self._backend = _backend
        self.variant = variant
        self.public_key = KyberPublicKey(_public, variant=variant)

    def __repr__(self) -> str:
        return f"KyberPrivateKey(variant={self.variant!r}, <secret>)"

    @classmethod
    def generate(cls, *, variant: Variant = "round3") -> KyberPrivateKey:
        """A fresh key pair (OpenSSL ML-KEM-768 key generation, FIPS 203 Algorithm 19)."""
        key = mlkem.MLKEM768PrivateKey.generate()
        return cls(_backend=key, _public=key.public_key().public_bytes_raw(), variant=variant)

    @classmethod
    def from_seed(cls, seed: bytes, *, variant: Variant = "round3") -> KyberPrivateKey:
        """Key pair from its 64-byte seed ``d || z`` (FIPS 203 Algorithm 16).

        Raises:
            VauFormatError: seed not 64 bytes.
        """
        if len(seed) != SEED_SIZE:
            raise VauFormatError(f"ML-KEM-768 seed must be {SEED_SIZE} bytes, got {len(seed)}")
        key = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(seed))
        return cls(_backend=key, _public=key.public_key().public_bytes_raw(), variant=variant)

    @classmethod
    def from_expanded(cls, dk: bytes, *, variant: Variant = "round3") -> KyberPrivateKey:
        """Key from its 2400-byte expanded form ``dk_PKE || ek || H(ek) || z`` (lib-vau key files).

        Raises:
            VauFormatError: wrong length, or the embedded hash ``H(ek)`` does not match
                (FIPS 203 §7.3 decapsulation-key check).
        """
        from Crypto.PublicKey import MLKEM as _pcd_mlkem  # only expanded keys need it

        dk = bytes(dk)
        if len(dk) != EXPANDED_PRIVATE_KEY_SIZE:
            raise VauFormatError(
                f"Kyber768 expanded private key must be {EXPANDED_PRIVATE_KEY_SIZE} bytes, got {len(dk)}"
            )
        try:
            key = _pcd_mlkem.construct(param_set=_pcd_mlkem.ML_KEM_768, expanded_dk=dk)
        except ValueError:
            raise VauFormatError("Kyber768 expanded private key fails its consistency check") from None
        return cls(_backend=key, _public=bytes(key.ek), variant=variant)

    def decapsulate(self, ct: bytes) -> bytes:
        """The 32-byte shared secret of ciphertext ``ct`` (implicit rejection on a bad one).

        Raises:
            VauFormatError: ``ct`` is not 1088 bytes.
        """
        ct = bytes(ct)
        if len(ct) != CIPHERTEXT_SIZE:
            raise VauFormatError(f"Kyber768 ciphertext must be {CIPHERTEXT_SIZE} bytes, got {len(ct)}")
        backend = self._backend
        # PyCryptodome exposes ML-KEM decapsulation to its HPKE module only (``_decaps``).
        ss = backend.decapsulate(ct) if isinstance(backend, mlkem.MLKEM768PrivateKey) else backend._decaps(ct)  # type: ignore[attr-defined]
        return _round3(ss, ct) if self.variant == "round3" else ss
