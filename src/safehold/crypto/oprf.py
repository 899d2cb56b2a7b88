"""RFC 9497 OPRF, mode 0 (``modeOPRF``), ciphersuite ``ristretto255-SHA512``, on libsodium.

Every group operation is a libsodium call (``crypto_core_ristretto255_*``,
``crypto_scalarmult_ristretto255*``) through the maintained ``pysodium`` binding; nothing here does
group or field arithmetic itself. Only the hashing glue of RFC 9497 is Python:
``expand_message_xmd`` (RFC 9380 §5.3.1) and the Finalize hash.

Why pysodium: PyNaCl (≤ 1.6.2) exposes no ristretto255 function (only the ed25519 core), and
``rbcl`` writes its bundled libsodium to a temporary file at import and loads it from there
(code from a host-writable directory, outside the workload measurement). pysodium binds the
system libsodium (Debian ``libsodium23`` ≥ 1.0.18, which has the ristretto255 API).

Roles and calls (RFC 9497 §3.3.1, batched as in §3.3 "Online Protocol")::

    client                                   server (holds skS)
    blinds, blinded = blind(inputs)
                      ---- blinded ---->
                                             evaluated = blind_evaluate(skS, blinded)
                      <--- evaluated ----
    outputs = finalize(inputs, blinds, evaluated)
                                             evaluate(skS, inputs) == outputs   (§3.3.1 Evaluate)

Keys: :func:`generate_key_pair` (RFC 9497 §3.2, random) or :func:`derive_key_pair` (§3.2.1,
deterministic from a 32-byte seed). Scalars and elements are 32-byte strings (little-endian
scalars, canonical ristretto255 encodings; §4.1). Secret scalars are never printed: a
:class:`KeyPair`'s ``repr`` shows the public key only.

The scalar helpers (:func:`random_scalar`, :func:`scalar_add`, :func:`scalar_sub`,
:func:`scalar_mul`, :func:`scalar_negate`, :func:`scalar_invert`), element helpers
(:func:`element_add`, :func:`scalar_mult`, :func:`scalar_mult_base`) and the masked share
evaluation :func:`blind_evaluate_masked` are public so SVR's additive OPRF-key shares (Signal's
DB4, :mod:`safehold.svr.db4`) build on the same binding.

Errors (RFC 9497 §5.3 "Error Considerations"): :class:`DeserializeError` (with
:class:`InvalidElementError` for a non-canonical or invalid encoding and
:class:`IdentityElementError` for the identity, which §4.1 DeserializeElement rejects, and
:class:`InvalidScalarError` for a scalar ≥ the group order), :class:`InvalidInputError`
(the input hashes to the identity, §3.3.1 Blind/Evaluate), :class:`DeriveKeyPairError` (§3.2.1).
Inputs longer than 2^16 - 1 bytes raise :class:`InputLengthError` (§5.1).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

try:
    import pysodium
except ValueError as _e:  # pysodium raises ValueError when it finds no libsodium
    raise ImportError("safehold.crypto.oprf needs the system libsodium >= 1.0.18 "
                      "(Debian/Ubuntu: apt-get install libsodium23)") from _e

from safehold.crypto.errors import (
    DeriveKeyPairError,
    IdentityElementError,
    InputLengthError,
    InvalidElementError,
    InvalidInputError,
    InvalidScalarError,
)

#: Ciphersuite identifier (RFC 9497 §4.1).
SUITE_ID = "ristretto255-SHA512"
#: ``modeOPRF`` (RFC 9497 §3.1).
MODE_OPRF = 0x00
#: ``contextString = "OPRFV1-" || I2OSP(mode, 1) || "-" || identifier`` (RFC 9497 §3.1).
CONTEXT_STRING = b"OPRFV1-" + bytes([MODE_OPRF]) + b"-" + SUITE_ID.encode("ascii")
#: Serialized element / scalar / hash sizes Ne, Ns, Nh (RFC 9497 §4.1).
NE = 32
NS = 32
NH = 64
#: Largest input in bytes (RFC 9497 §5.1: inputs MUST be smaller than 2^16 - 1 bytes).
MAX_INPUT = 2**16 - 2
#: The group order ℓ = 2^252 + 27742317777372353535851937790883648493 (RFC 9497 §4.1).
ORDER = 2**252 + 27742317777372353535851937790883648493

_HASH_TO_GROUP_DST = b"HashToGroup-" + CONTEXT_STRING
_HASH_TO_SCALAR_DST = b"HashToScalar-" + CONTEXT_STRING
_DERIVE_KEY_PAIR_DST = b"DeriveKeyPair" + CONTEXT_STRING
_IDENTITY = bytes(NE)

_lib = pysodium.sodium
if not hasattr(_lib, "crypto_core_ristretto255_from_hash"):  # pragma: no cover - libsodium < 1.0.18
    raise ImportError("the system libsodium has no ristretto255 API (need libsodium >= 1.0.18)")
_scalarmult = _lib.crypto_scalarmult_ristretto255
_scalarmult.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p)
_scalarmult.restype = ctypes.c_int
# Own function objects (item access does not share pysodium's cached attribute objects).
_add = _lib["crypto_core_ristretto255_add"]
_add.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p)
_add.restype = ctypes.c_int
_from_hash = _lib["crypto_core_ristretto255_from_hash"]
_from_hash.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
_from_hash.restype = ctypes.c_int

# --- hashing glue (RFC 9380 §5.3.1, RFC 9497 §4.1) ----------------------------------------------


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """``expand_message_xmd`` with SHA-512 (RFC 9380 §5.3.1).

    Args:
        msg: the message, any length.
        dst: domain separation tag, 1..255 bytes (RFC 9380 §5.3.3 oversize DSTs are not needed
            here: every DST of this module is shorter).
        length: output bytes, 1..255*64 (and < 2^16).

    Raises:
        ValueError: DST empty or longer than 255 bytes, length out of range.
    """
    if not 0 < len(dst) <= 255:
        raise ValueError(f"expand_message_xmd: DST must be 1..255 bytes, got {len(dst)}")
    b_in_bytes, r_in_bytes = 64, 128  # SHA-512 output and block size
    ell = -(-length // b_in_bytes)
    if not 0 < length < 2**16 or ell > 255:
        raise ValueError(f"expand_message_xmd: output length {length} out of range")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(r_in_bytes) + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    b = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, b[-1], strict=True))
        b.append(hashlib.sha512(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(b)[:length]


def hash_to_group(msg: bytes, dst: bytes = _HASH_TO_GROUP_DST) -> bytes:
    """``HashToGroup`` of RFC 9497 §4.1: hash_to_ristretto255 (RFC 9380 Appendix B) — 64 bytes of
    ``expand_message_xmd``/SHA-512 into libsodium's ``crypto_core_ristretto255_from_hash``
    (the one-way map of RFC 9496 §4.3.4). Returns a 32-byte element encoding."""
    return bytes(pysodium.crypto_core_ristretto255_from_hash(expand_message_xmd(msg, dst, 64)))


def hash_to_scalar(msg: bytes, dst: bytes = _HASH_TO_SCALAR_DST) -> bytes:
    """``HashToScalar`` of RFC 9497 §4.1: 64 bytes of ``expand_message_xmd``/SHA-512 read as a
    little-endian integer and reduced modulo the group order (libsodium ``scalar_reduce``)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_reduce(expand_message_xmd(msg, dst, 64)))


# --- scalars and elements (all arithmetic in libsodium) -------------------------------------------


def check_scalar(s: bytes, what: str = "scalar") -> bytes:
    """``s`` as bytes if it is a 32-byte little-endian scalar below the group order.

    Raises:
        InvalidScalarError: wrong type or length, or ≥ the order (RFC 9497 §4.1 DeserializeScalar).
    """
    if not isinstance(s, bytes | bytearray) or len(s) != NS:
        raise InvalidScalarError(f"{what} must be {NS} bytes")
    if int.from_bytes(s, "little") >= ORDER:
        raise InvalidScalarError(f"{what} is not below the ristretto255 group order")
    return bytes(s)


def check_element(p: bytes, what: str = "element") -> bytes:
    """``p`` as bytes if it is the canonical encoding of a non-identity ristretto255 element
    (RFC 9497 §4.1 DeserializeElement).

    Raises:
        InvalidElementError: wrong type or length, or not a canonical ristretto255 encoding.
        IdentityElementError: the identity element.
    """
    if not isinstance(p, bytes | bytearray) or len(p) != NE:
        raise InvalidElementError(f"{what} must be {NE} bytes")
    p = bytes(p)
    if p == _IDENTITY:  # the identity's only canonical encoding is all zeros (RFC 9496 §4.3.2)
        raise IdentityElementError(f"{what} is the identity element")
    if not pysodium.crypto_core_ristretto255_is_valid_point(p):
        raise InvalidElementError(f"{what} is not a canonical ristretto255 encoding")
    return p


def random_scalar() -> bytes:
    """A uniformly random non-zero scalar (RFC 9497 §2.1 RandomScalar; libsodium draws from the
    OS CSPRNG with rejection sampling, §4.7.1)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_random())


def scalar_add(a: bytes, b: bytes) -> bytes:
    """``a + b mod ℓ`` (libsodium ``crypto_core_ristretto255_scalar_add``)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_add(check_scalar(a), check_scalar(b)))


def scalar_sub(a: bytes, b: bytes) -> bytes:
    """``a - b mod ℓ``."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_sub(check_scalar(a), check_scalar(b)))


def scalar_mul(a: bytes, b: bytes) -> bytes:
    """``a · b mod ℓ``."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_mul(check_scalar(a), check_scalar(b)))


def scalar_negate(a: bytes) -> bytes:
    """``-a mod ℓ``."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_negate(check_scalar(a)))


def scalar_invert(a: bytes) -> bytes:
    """``a⁻¹ mod ℓ`` (RFC 9497 §2.1 ScalarInverse).

    Raises:
        InvalidScalarError: ``a`` is zero (no inverse) or not a valid scalar.
    """
    a = check_scalar(a)
    if a == bytes(NS):
        raise InvalidScalarError("the zero scalar has no inverse")
    return bytes(pysodium.crypto_core_ristretto255_scalar_invert(a))


def scalar_mult(k: bytes, p: bytes) -> bytes:
    """``k · P`` for a non-zero scalar and a non-identity element (libsodium
    ``crypto_scalarmult_ristretto255``).

    Raises:
        InvalidScalarError, InvalidElementError, IdentityElementError: as their names say; also
            when the product is the identity (impossible for valid inputs of a prime-order group).
    """
    k = check_scalar(k)
    if not isinstance(p, bytes | bytearray) or len(p) != NE:
        check_element(p)  # raises InvalidElementError (libsodium reads exactly 32 bytes)
    out = ctypes.create_string_buffer(NE)
    if _scalarmult(out, k, bytes(p)) != 0:
        check_element(p)  # names the fault: not canonical, or the identity
        raise InvalidScalarError("scalar multiplication gave the identity (zero scalar?)")
    return out.raw


def scalar_mult_base(k: bytes) -> bytes:
    """``k · G`` (RFC 9497 §2.1 ScalarMultGen).

    Raises:
        InvalidScalarError: ``k`` is zero or not a valid scalar.
    """
    k = check_scalar(k)
    if k == bytes(NS):
        raise InvalidScalarError("the zero scalar has no public key")
    return bytes(pysodium.crypto_scalarmult_ristretto255_base(k))


def element_add(p: bytes, q: bytes) -> bytes:
    """``P + Q`` (libsodium ``crypto_core_ristretto255_add``). Both must be valid non-identity
    elements; the sum may be the identity (all zeros) when ``Q = -P``."""
    return bytes(pysodium.crypto_core_ristretto255_add(check_element(p), check_element(q)))


# --- keys (RFC 9497 §3.2) ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """An OPRF server key pair: ``sk`` (32-byte scalar, secret) and ``pk = sk · G``.

    ``repr`` shows the public key only.
    """

    sk: bytes = field(repr=False)
    pk: bytes

    def __post_init__(self) -> None:
        check_scalar(self.sk, "private key")
        if self.sk == bytes(NS):
            raise InvalidScalarError("the private key must not be zero")

    @classmethod
    def from_private_key(cls, sk: bytes) -> KeyPair:
        """The key pair of scalar ``sk`` (raises InvalidScalarError for zero or out of range)."""
        return cls(bytes(sk), scalar_mult_base(sk))


def generate_key_pair() -> KeyPair:
    """A random key pair (RFC 9497 §3.2 GenerateKeyPair)."""
    return KeyPair.from_private_key(random_scalar())


def derive_key_pair(seed: bytes, info: bytes) -> KeyPair:
    """Deterministic key pair from a secret seed and public ``info`` (RFC 9497 §3.2.1).

    Args:
        seed: ``Ns`` = 32 bytes from a CSPRNG (secret).
        info: public, shorter than 2^16 bytes.

    Raises:
        ValueError: seed not 32 bytes, info too long.
        DeriveKeyPairError: 256 counters all hashed to zero (probability ≈ 2^-2000).
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) != NS:
        raise ValueError(f"DeriveKeyPair seed must be {NS} bytes")
    if len(info) > 0xFFFF:
        raise ValueError("DeriveKeyPair info must be shorter than 2^16 bytes")
    derive_input = bytes(seed) + len(info).to_bytes(2, "big") + bytes(info)
    for counter in range(256):
        sk = hash_to_scalar(derive_input + bytes([counter]), _DERIVE_KEY_PAIR_DST)
        if sk != bytes(NS):
            return KeyPair.from_private_key(sk)
    raise DeriveKeyPairError("DeriveKeyPair: no non-zero scalar for counters 0..255")


# --- the protocol (RFC 9497 §3.3.1), batched ---------------------------------------------------


def _check_input(x: bytes, n: int) -> bytes:
    if not isinstance(x, bytes | bytearray):
        raise InputLengthError(f"input {n} must be bytes")
    if len(x) > MAX_INPUT:
        raise InputLengthError(f"input {n} is {len(x)} bytes; RFC 9497 §5.1 allows < 2^16 - 1")
    return bytes(x)


def _input_element(x: bytes, n: int) -> bytes:
    p = hash_to_group(x)
    if p == _IDENTITY:
        raise InvalidInputError(f"input {n} hashes to the identity element")
    return p


def _finalize_hash(x: bytes, unblinded: bytes) -> bytes:
    # RFC 9497 §3.3.1 Finalize / Evaluate: I2OSP(len(input), 2) || input ||
    # I2OSP(len(unblindedElement), 2) || unblindedElement || "Finalize"
    return hashlib.sha512(
        len(x).to_bytes(2, "big") + x + len(unblinded).to_bytes(2, "big") + unblinded + b"Finalize"
    ).digest()


@dataclass(frozen=True)
class Blinded:
    """Result of :func:`blind`: the client keeps ``blinds`` secret and sends ``elements``."""

    blinds: list[bytes] = field(repr=False)
    elements: list[bytes]


def blind(inputs: Sequence[bytes], *, blinds: Sequence[bytes] | None = None) -> Blinded:
    """Client Blind for a batch (RFC 9497 §3.3.1 Blind).

    Args:
        inputs: private inputs, each < 2^16 - 1 bytes.
        blinds: fixed blinding scalars (test vectors only); default fresh :func:`random_scalar`.

    Raises:
        InputLengthError, InvalidInputError; InvalidScalarError for a bad or zero fixed blind;
        ValueError: ``blinds`` of another length than ``inputs``.
    """
    if blinds is not None and len(blinds) != len(inputs):
        raise ValueError(f"{len(blinds)} blinds for {len(inputs)} inputs")
    bs, elements = [], []
    for n, x in enumerate(inputs):
        p = _input_element(_check_input(x, n), n)
        r = random_scalar() if blinds is None else check_scalar(blinds[n], f"blind {n}")
        if r == bytes(NS):
            raise InvalidScalarError(f"blind {n} is zero")
        bs.append(r)
        elements.append(scalar_mult(r, p))
    return Blinded(bs, elements)


def blind_evaluate(sk: bytes, blinded_elements: Sequence[bytes]) -> list[bytes]:
    """Server BlindEvaluate for a batch (RFC 9497 §3.3.1): ``skS · blindedElement`` each.

    One libsodium call per element on the success path (``crypto_scalarmult_ristretto255``
    decodes and validates the encoding itself); a failure is then classified.

    Args:
        sk: the server's 32-byte private scalar.
        blinded_elements: 32-byte encodings from the client.

    Raises:
        InvalidElementError / IdentityElementError: an element fails DeserializeElement (the
            message names its index); InvalidScalarError: bad key.
    """
    sk = check_scalar(sk, "private key")
    out = ctypes.create_string_buffer(NE)
    result = []
    for n, p in enumerate(blinded_elements):
        if not isinstance(p, bytes) or len(p) != NE or p == _IDENTITY or _scalarmult(out, sk, p) != 0:
            check_element(p, f"blinded element {n}")
            raise InvalidElementError(f"blinded element {n} could not be evaluated")
        result.append(out.raw)
    return result


def blind_evaluate_masked(sk: bytes, mask_scalar: bytes, blinded_elements: Sequence[bytes],
                          mask_dst: bytes) -> list[bytes]:
    """BlindEvaluate under one additive key share, masked: ``sk·B + z·M(B)`` per element, with
    ``M(B) = hash_to_ristretto255(B)`` under ``mask_dst`` (RFC 9380 App. B via
    :func:`hash_to_group`). This is a server's answer in Signal's SVR3 (DB4): the shares ``sk``
    of all servers sum to the OPRF key and the ``z`` to zero, so the answers sum to the RFC 9497
    BlindEvaluate under the summed key while each one alone is masked. A zero ``z`` (a single
    server) gives the plain BlindEvaluate.

    Every operation is one libsodium call (two ``crypto_scalarmult_ristretto255``, one
    ``crypto_core_ristretto255_from_hash``, one ``crypto_core_ristretto255_add``); the blinded
    element is validated by the first multiplication, as in :func:`blind_evaluate`.

    Raises:
        InvalidElementError / IdentityElementError: an element fails DeserializeElement;
        InvalidScalarError: a bad share or mask scalar.
    """
    sk = check_scalar(sk, "private key")
    z = check_scalar(mask_scalar, "mask scalar")
    if z == bytes(NS):
        return blind_evaluate(sk, blinded_elements)
    out, mask, masked, total = (ctypes.create_string_buffer(NE) for _ in range(4))
    result = []
    for n, p in enumerate(blinded_elements):
        if not isinstance(p, bytes) or len(p) != NE or p == _IDENTITY or _scalarmult(out, sk, p) != 0:
            check_element(p, f"blinded element {n}")
            raise InvalidElementError(f"blinded element {n} could not be evaluated")
        _from_hash(mask, expand_message_xmd(p, mask_dst, 64))
        if _scalarmult(masked, z, mask.raw) != 0 or _add(total, out.raw, masked.raw) != 0:
            raise InvalidElementError(f"blinded element {n}: the masked evaluation failed")
        result.append(total.raw)
    return result


def finalize(
    inputs: Sequence[bytes], blinds: Sequence[bytes], evaluated_elements: Sequence[bytes]
) -> list[bytes]:
    """Client Finalize for a batch (RFC 9497 §3.3.1): unblind and hash to 64-byte outputs.

    Raises:
        ValueError: the three sequences differ in length.
        InvalidElementError / IdentityElementError: an evaluated element from the server fails
            DeserializeElement; InputLengthError; InvalidScalarError.
    """
    if not len(inputs) == len(blinds) == len(evaluated_elements):
        raise ValueError(f"finalize: {len(inputs)} inputs, {len(blinds)} blinds, "
                         f"{len(evaluated_elements)} evaluated elements")
    outputs = []
    for n, (x, r, z) in enumerate(zip(inputs, blinds, evaluated_elements, strict=True)):
        x = _check_input(x, n)
        z = check_element(z, f"evaluated element {n}")
        unblinded = scalar_mult(scalar_invert(r), z)
        outputs.append(_finalize_hash(x, unblinded))
    return outputs


def evaluate(sk: bytes, inputs: Sequence[bytes]) -> list[bytes]:
    """Server-side full evaluation of known inputs (RFC 9497 §3.3.1 Evaluate): the same 64-byte
    outputs a client gets from blind → blind_evaluate → finalize.

    Raises:
        InputLengthError, InvalidInputError, InvalidScalarError.
    """
    sk = check_scalar(sk, "private key")
    return [_finalize_hash(x, scalar_mult(sk, _input_element(x, n)))
            for n, x in enumerate(_check_input(x, n) for n, x in enumerate(inputs))]


def outputs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two OPRF outputs."""
    return hmac.compare_digest(a, b)
