"""SVR3 after Signal's DB4 ("SVR3/SVRB v4"): additive OPRF-key shares, XOR encryption shares,
zero shares, and a Schnorr authorisation proof before a server releases its share.

Shared module: the client SDK splits, combines and proves with it; the service evaluates and
verifies with it. Every group operation is libsodium (ristretto255) through
:mod:`safehold.crypto.oprf`; the OPRF is RFC 9497 mode 0, ``ristretto255-SHA512``.

Backup (client, ``n`` servers)::

    x        = "safehold/svr3/oprf-input/v1|" || Argon2id(PIN)          (64-byte stretched PIN)
    k        = Σ k_i          (random non-zero scalars, one per server)
    0        = Σ z_i          (zero shares)
    s_enc    = ⊕ s_i          (32 random bytes, XOR-shared)
    out      = RFC 9497 Evaluate(k, x)                                  (§3.3.1, 64 bytes)
    k_auth   = HKDF(out, "svr3/master-auth-key")
    sk_i     = HashToScalar(k_auth || server name_i, DST "safehold-svr3-server-auth-key-v1")
    C_i      = sk_i · G                                                 (auth commitment)
    K        = HKDF(s_enc || k_auth, "svr3/encryption-key");  sealed = AES-SIV(K, secret)
    server i stores (k_i, z_i, s_i, C_i, sealed, tries, version)

Restore::

    client   r random, B = r · HashToGroup(x)                          (RFC 9497 Blind)
    server i charges one guess (durably), answers e_i = k_i·B + z_i·M(B),
             M(B) = hash_to_ristretto255(B, DST "safehold-svr3-zero-share-mask-v1")
    client   Σ e_i = k·B (the masks cancel);  out = Finalize(x, r, k·B)  (RFC 9497)
             k_auth, sk_i as above; per server a Schnorr proof bound to the server's
             restore1 session: R = ρ·G, c = HashToScalar(R || B || session), z = sk_i·c + ρ
    server i releases (s_i, sealed) only if z·G == c·C_i + R
    client   s_enc = ⊕ s_i;  secret = AES-SIV⁻¹(K, sealed)

Differences from Signal's DB4, and why: the OPRF input is the Argon2id-stretched PIN (DB4
uses HKDF of the password) so that an attacker who breaks every TEE still pays Argon2 per
guess; HashToGroup and Finalize are RFC 9497's (DB4 maps 64 HKDF bytes directly), so the
combined output *is* ``Evaluate(k, x)`` and the RFC vectors test the share arithmetic; the
proof binds a per-restore1 random session instead of a Noise handshake hash (there is no
Noise channel; the session is single-use and lives in the server's memory only); the sealed
secret is stored with every share (DB4 leaves the ciphertext to the caller).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from safehold.crypto import oprf
from safehold.crypto.errors import OPRFError
from safehold.crypto.kdf import derive_key
from safehold.svr.protocol import ELEMENT_SIZE, SESSION_SIZE, SHARE_SIZE

__all__ = [
    "INPUT_CONTEXT", "ShareSet", "auth_commitment", "challenge", "combine", "encryption_key",
    "evaluate_share", "mask_element", "master_auth_key", "oprf_input", "prove",
    "server_auth_key", "split", "verify", "xor_all",
]

INPUT_CONTEXT = b"safehold/svr3/oprf-input/v1|"
MASK_DST = b"safehold-svr3-zero-share-mask-v1"
AUTH_KEY_DST = b"safehold-svr3-server-auth-key-v1"
PROOF_DST = b"safehold-svr3-auth-proof-v1"
ZERO_SCALAR = bytes(oprf.NS)


@dataclass(frozen=True)
class ShareSet:
    """One backup's shares for ``n`` servers (``repr`` shows the count only).

    Attributes:
        oprf_key: k = Σ oprf_shares (mod ℓ). oprf_shares: non-zero scalars k_i.
        zero_shares: z_i with Σ z_i = 0 (for one server: the zero scalar).
        encryption_secret: s_enc = ⊕ encryption_shares (32 bytes each).
    """

    oprf_key: bytes = field(repr=False)
    oprf_shares: list[bytes] = field(repr=False)
    zero_shares: list[bytes] = field(repr=False)
    encryption_secret: bytes = field(repr=False)
    encryption_shares: list[bytes] = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.oprf_shares)


def xor_all(parts: Sequence[bytes]) -> bytes:
    """XOR of equally long byte strings.

    Raises:
        ValueError: no parts, or parts of different lengths.
    """
    if not parts or any(len(p) != len(parts[0]) for p in parts):
        raise ValueError("XOR needs one or more parts of equal length")
    acc = int.from_bytes(parts[0], "big")
    for p in parts[1:]:
        acc ^= int.from_bytes(p, "big")
    return acc.to_bytes(len(parts[0]), "big")


def split(n: int, *, oprf_shares: Sequence[bytes] | None = None,
          zero_shares: Sequence[bytes] | None = None,
          encryption_shares: Sequence[bytes] | None = None) -> ShareSet:
    """Draw a backup's shares for ``n`` servers (fixed shares only for known-answer tests).

    Random shares come from libsodium's CSPRNG (scalars) and ``os.urandom`` (bytes); a share
    set whose key or a zero share's partner sums to zero is drawn again.

    Raises:
        ValueError: ``n`` < 1, fixed shares of the wrong count, a zero OPRF share or key, zero
            shares that do not sum to zero.
    """
    if n < 1:
        raise ValueError("SVR3 needs at least one server")
    while True:
        ks = list(oprf_shares) if oprf_shares is not None else [oprf.random_scalar() for _ in range(n)]
        zs = list(zero_shares) if zero_shares is not None else _zero_shares(n)
        ss = list(encryption_shares) if encryption_shares is not None else [os.urandom(SHARE_SIZE)
                                                                            for _ in range(n)]
        if not len(ks) == len(zs) == len(ss) == n:
            raise ValueError(f"{n} servers need {n} shares of each kind")
        key = ks[0]
        for k in ks[1:]:
            key = oprf.scalar_add(key, k)
        if key != ZERO_SCALAR and ZERO_SCALAR not in ks:
            break
        if oprf_shares is not None:
            raise ValueError("OPRF key shares must be non-zero and must not sum to zero")
    total = ZERO_SCALAR
    for z in zs:
        total = oprf.scalar_add(total, oprf.check_scalar(z, "zero share"))
    if total != ZERO_SCALAR:
        raise ValueError("zero shares must sum to zero")
    if any(len(s) != SHARE_SIZE for s in ss):
        raise ValueError(f"encryption shares must be {SHARE_SIZE} bytes")
    return ShareSet(key, ks, zs, xor_all(ss), ss)


def _zero_shares(n: int) -> list[bytes]:
    if n == 1:
        return [ZERO_SCALAR]
    zs = [oprf.random_scalar() for _ in range(n - 1)]
    total = zs[0]
    for z in zs[1:]:
        total = oprf.scalar_add(total, z)
    return [*zs, oprf.scalar_negate(total)]


def oprf_input(stretched: bytes) -> bytes:
    """The RFC 9497 input for a stretched PIN (64 bytes): :data:`INPUT_CONTEXT` || stretched."""
    if len(stretched) != 64:
        raise ValueError("the stretched PIN must be 64 bytes")
    return INPUT_CONTEXT + stretched


def mask_element(blinded: bytes) -> bytes:
    """M(B): hash_to_ristretto255 (RFC 9380 App. B, expand_message_xmd/SHA-512) of the blinded
    element under :data:`MASK_DST`; the same on every server, so Σ z_i·M(B) = 0."""
    return oprf.hash_to_group(blinded, MASK_DST)


def evaluate_share(oprf_share: bytes, zero_share: bytes, blinded: bytes) -> bytes:
    """Server i's masked evaluation ``k_i·B + z_i·M(B)`` (32-byte element).

    Raises:
        InvalidElementError / IdentityElementError: ``blinded`` fails RFC 9497 DeserializeElement;
        InvalidScalarError: a bad share.
    """
    return oprf.blind_evaluate_masked(oprf_share, zero_share, [blinded], MASK_DST)[0]


def combine(elements: Sequence[bytes]) -> bytes:
    """Σ e_i = k·B. Raises the element errors of :mod:`safehold.crypto.oprf` for an invalid
    answer, or for a sum that is the identity (only for wrong answers)."""
    if not elements:
        raise ValueError("nothing to combine")
    total = oprf.check_element(elements[0], "evaluated element 0")
    for i, e in enumerate(elements[1:], 1):
        total = oprf.element_add(total, oprf.check_element(e, f"evaluated element {i}"))
    return oprf.check_element(total, "combined element")


def master_auth_key(output: bytes) -> bytes:
    """k_auth: 32 bytes of HKDF-SHA256 over the 64-byte OPRF output (purpose ``svr3/master-auth-key``)."""
    return derive_key(output, purpose="svr3/master-auth-key")


def server_auth_key(k_auth: bytes, server: str) -> bytes:
    """sk_i: HashToScalar(k_auth || u8 len || server name) under :data:`AUTH_KEY_DST`
    (RFC 9380 expand_message_xmd, reduced mod ℓ); never zero in practice (probability 2^-252)."""
    name = server.encode("utf-8")
    return oprf.hash_to_scalar(k_auth + len(name).to_bytes(1, "big") + name, AUTH_KEY_DST)


def auth_commitment(sk: bytes) -> bytes:
    """C_i = sk_i · G."""
    return oprf.scalar_mult_base(sk)


def challenge(auth_point: bytes, blinded: bytes, session: bytes) -> bytes:
    """c = HashToScalar(R || B || session) under :data:`PROOF_DST` (Fiat–Shamir)."""
    return oprf.hash_to_scalar(auth_point + blinded + session, PROOF_DST)


def prove(sk: bytes, blinded: bytes, session: bytes) -> tuple[bytes, bytes]:
    """Schnorr proof of knowledge of ``sk`` bound to ``blinded`` and ``session``: ``(R, z)``."""
    if len(session) != SESSION_SIZE:
        raise ValueError(f"session must be {SESSION_SIZE} bytes")
    rho = oprf.random_scalar()
    r_point = oprf.scalar_mult_base(rho)
    z = oprf.scalar_add(oprf.scalar_mul(sk, challenge(r_point, blinded, session)), rho)
    return r_point, z


def verify(commitment: bytes, blinded: bytes, session: bytes, auth_point: bytes, auth_scalar: bytes) -> bool:
    """Check ``z·G == c·C + R``; False for any malformed part (constant-time comparison)."""
    try:
        r_point = oprf.check_element(auth_point, "auth point")
        z = oprf.check_scalar(auth_scalar, "auth scalar")
        c = challenge(r_point, blinded, session)
        lhs = oprf.scalar_mult_base(z)
        rhs = oprf.element_add(oprf.scalar_mult(c, oprf.check_element(commitment, "commitment")), r_point)
    except (OPRFError, ValueError):
        return False
    return len(lhs) == len(rhs) == ELEMENT_SIZE and hmac.compare_digest(lhs, rhs)


def encryption_key(encryption_secret: bytes, k_auth: bytes) -> bytes:
    """K: 32 bytes of HKDF-SHA256 over s_enc || k_auth (purpose ``svr3/encryption-key``); the
    secret is sealed under it with :func:`safehold.svr.pin.seal_secret`."""
    return derive_key(encryption_secret + k_auth, purpose="svr3/encryption-key")
