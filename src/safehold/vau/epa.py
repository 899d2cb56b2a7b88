"""ePA 3 VAU channel ("VAU-Protokoll für ePA für alle", gemSpec_Krypt chapter 7): the wire
format both sides share: constants, handshake AEAD and key schedule, CBOR message checks,
user-data framing. No web framework, no I/O. The keys are in :mod:`safehold.vau.epa_keys`, the
VAU side in :mod:`safehold.vau.epa_server`, the client side in :mod:`safehold.vau.epa_client`.

Handshake (A_24428, A_24608, A_24623, A_24626, A_24627), CBOR maps with text keys:

* **M1** client → VAU ``{MessageType: "M1", ECDH_PK: {crv: "P-256", x, y}, Kyber768_PK}``.
* **M2** VAU → client ``{MessageType: "M2", ECDH_ct, Kyber768_ct, AEAD_ct}``: the VAU encapsulates
  to both client keys (``ss_e``), ``K1 = HKDF-SHA256(ss_e_ecdh || ss_e_kyber, salt none, info
  empty, L = 64)`` = ``K1_c2s || K1_s2c``, and ``AEAD_ct = AEAD(K1_s2c, SignedPublicVauKeys)``.
  The answer carries the channel id (``VAU-CID`` header, A_24622).
* **M3** client → VAU ``{MessageType: "M3", AEAD_ct, AEAD_ct_key_confirmation}``: the client checks
  the signed VAU keys (A_24624-01), encapsulates to them (``ss_s``), ``K2 = HKDF(ss_e_ecdh ||
  ss_e_kyber || ss_s_ecdh || ss_s_kyber, L = 160)`` = c2s key confirmation || c2s app data ||
  s2c key confirmation || s2c app data || KeyID; ``AEAD_ct = AEAD(K1_c2s, {ECDH_ct, Kyber768_ct,
  ERP, ESO})`` and the confirmation ``AEAD(K2_c2s_kc, SHA-256(M1 || M2 || AEAD_ct))``.
* **M4** VAU → client ``{MessageType: "M4", AEAD_ct_key_confirmation: AEAD(K2_s2c_kc,
  SHA-256(M1 || M2 || M3))}``; the client compares (A_24627).

Transcripts hash the exact bytes sent and received; decoders accept definite and indefinite CBOR
maps. Handshake AEAD (A_24619) is AES-256-GCM, random IV, no AAD, ``IV || ct || tag``. KEMs are
ECDH on P-256 (the "ciphertext" is the sender's ephemeral public key) and Kyber768 round 3
(:mod:`safehold.vau.kyber`).

User data (A_24628-01, A_24629, A_24633)::

    0   1   version 0x02
    1   1   PU flag: 0x01 production, 0x00 test/reference
    2   1   direction: 0x01 request (client → VAU), 0x02 response
    3   8   request counter, big-endian uint64
    11  32  KeyID (from K2)
    43  12  IV = 4 random bytes || 8-byte big-endian encryption counter
    55  ..  AES-256-GCM ciphertext || tag; AAD = bytes 0..42

Requests use ``K2_c2s_app_data``, responses ``K2_s2c_app_data``; the VAU echoes the request's
counter. Checks enforced here: version, PU flag, direction, KeyID, and on the VAU a request
counter not seen before (anti-replay window of 64 below the highest, so concurrent requests may
arrive out of order); on the client, the response's counter equals the request's.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehold.vau.errors import (
    VauDecryptionError,
    VauFormatError,
    VauHandshakeError,
    VauKeyIdError,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_KEY_LIFETIME",
    "ChannelKeys",
    "UserDataHeader",
    "aead_decrypt",
    "aead_encrypt",
    "open_user_data",
    "seal_user_data",
]

USER_DATA_VERSION = 0x02
DIRECTION_REQUEST = 0x01
DIRECTION_RESPONSE = 0x02
HEADER_SIZE = 43
IV_SIZE = 12
TAG_SIZE = 16
#: Shortest user-data message: header, IV, one byte of plaintext, tag.
MIN_USER_DATA = HEADER_SIZE + IV_SIZE + 1 + TAG_SIZE
#: Longest allowed distance between the VAU keys' ``iat`` and ``exp`` (30 days, as lib-vau enforces).
MAX_KEY_LIFETIME = 30 * 86_400
#: Anti-replay window of the VAU for request counters.
REPLAY_WINDOW = 64
_U64 = struct.Struct(">Q")


# --- primitives ----------------------------------------------------------------------------------


def aead_encrypt(key: bytes, plaintext: bytes) -> bytes:
    """Handshake AEAD (A_24619): ``IV(12) || AES-256-GCM(key, IV, plaintext, no AAD) || tag``."""
    iv = os.urandom(IV_SIZE)
    return iv + AESGCM(key).encrypt(iv, plaintext, None)


def aead_decrypt(key: bytes, blob: bytes, what: str) -> bytes:
    """Inverse of :func:`aead_encrypt`.

    Raises:
        VauHandshakeError: too short or the tag does not verify (``what`` names the field).
    """
    if len(blob) < IV_SIZE + TAG_SIZE:
        raise VauHandshakeError(f"{what} is {len(blob)} bytes, shorter than IV + tag")
    try:
        return AESGCM(key).decrypt(blob[:IV_SIZE], blob[IV_SIZE:], None)
    except InvalidTag:
        raise VauHandshakeError(f"{what} does not authenticate (wrong key or tampered)") from None


def _hkdf(ikm: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=b"").derive(ikm)


@dataclass(frozen=True)
class _K1:
    c2s: bytes
    s2c: bytes


def _k1(ss_e_ecdh: bytes, ss_e_kyber: bytes) -> _K1:
    okm = _hkdf(ss_e_ecdh + ss_e_kyber, 64)
    return _K1(okm[:32], okm[32:])


@dataclass(frozen=True)
class ChannelKeys:
    """K2 (A_24623): the five 32-byte outputs of HKDF-SHA256 over all four shared secrets."""

    c2s_key_confirmation: bytes
    c2s_app_data: bytes
    s2c_key_confirmation: bytes
    s2c_app_data: bytes
    key_id: bytes

    def __repr__(self) -> str:
        return f"ChannelKeys(key_id={self.key_id.hex()[:16]}…, <keys hidden>)"

    @classmethod
    def derive(cls, ss_e_ecdh: bytes, ss_e_kyber: bytes, ss_s_ecdh: bytes, ss_s_kyber: bytes) -> ChannelKeys:
        """K2 from the four shared secrets, in the order gemSpec_Krypt gives."""
        okm = _hkdf(ss_e_ecdh + ss_e_kyber + ss_s_ecdh + ss_s_kyber, 160)
        return cls(*(okm[i : i + 32] for i in range(0, 160, 32)))


def _cbor_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = cbor2.loads(data)
    except Exception:  # noqa: BLE001 - cbor2 raises several types for garbage
        raise VauFormatError(f"{what} is not valid CBOR") from None
    if not isinstance(obj, dict):
        raise VauFormatError(f"{what} is not a CBOR map")
    return obj


def _field(obj: Mapping[str, Any], name: str, typ: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise VauFormatError(f"{what} lacks field {name!r}")
    v = obj[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise VauFormatError(f"{what} field {name!r} has the wrong type")
    return v


def _message(data: bytes, want: str) -> dict[str, Any]:
    obj = _cbor_map(data, f"VAU message {want}")
    mt = obj.get("MessageType")
    if mt != want:
        raise VauHandshakeError(f"expected VAU message {want}, got MessageType {mt!r}")
    return obj


def ecdh_key_to_cbor(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """``{crv: "P-256", x: 32 bytes, y: 32 bytes}`` (A_24428 key and "ciphertext" encoding)."""
    n = key.public_numbers()
    return {"crv": "P-256", "x": n.x.to_bytes(32, "big"), "y": n.y.to_bytes(32, "big")}


def ecdh_key_from_cbor(obj: object, what: str) -> ec.EllipticCurvePublicKey:
    """Parse and validate a P-256 public key map.

    Raises:
        VauFormatError: not a map, ``crv`` not ``P-256``, x / y not 32 bytes, or not on the curve.
    """
    if not isinstance(obj, dict):
        raise VauFormatError(f"{what} is not a CBOR map")
    if obj.get("crv") != "P-256":
        raise VauFormatError(f"{what} crv must be 'P-256'")
    x, y = obj.get("x"), obj.get("y")
    if not isinstance(x, bytes) or not isinstance(y, bytes) or len(x) != 32 or len(y) != 32:
        raise VauFormatError(f"{what} x and y must be 32-byte strings")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise VauFormatError(f"{what} is not a point on P-256") from None


def _ecdh_encapsulate(peer: ec.EllipticCurvePublicKey) -> tuple[bytes, dict[str, Any]]:
    eph = ec.generate_private_key(ec.SECP256R1())
    return eph.exchange(ec.ECDH(), peer), ecdh_key_to_cbor(eph.public_key())


# --- VAU keys ----------------------------------------------------------------------------------



@dataclass(frozen=True)
class UserDataHeader:
    """The 43-byte user-data header (A_24628-01)."""

    pu: bool
    direction: int
    counter: int
    key_id: bytes

    def encode(self) -> bytes:
        """The header bytes (also the GCM AAD)."""
        if len(self.key_id) != 32:
            raise VauFormatError("KeyID must be 32 bytes")
        if not 0 <= self.counter < 2**64:
            raise VauFormatError("request counter must fit in 64 bits")
        return (
            bytes((USER_DATA_VERSION, 1 if self.pu else 0, self.direction))
            + _U64.pack(self.counter)
            + self.key_id
        )

    @classmethod
    def decode(cls, msg: bytes) -> UserDataHeader:
        """Parse the header of a user-data message.

        Raises:
            VauFormatError: too short, version not 0x02, PU flag or direction byte out of range.
        """
        if len(msg) < MIN_USER_DATA:
            raise VauFormatError(f"VAU user-data message is {len(msg)} bytes, shorter than {MIN_USER_DATA}")
        if msg[0] != USER_DATA_VERSION:
            raise VauFormatError(f"VAU user-data version byte is 0x{msg[0]:02x}, expected 0x02")
        if msg[1] not in (0, 1):
            raise VauFormatError(f"VAU user-data PU flag is 0x{msg[1]:02x}, expected 0x00 or 0x01")
        if msg[2] not in (DIRECTION_REQUEST, DIRECTION_RESPONSE):
            raise VauFormatError(f"VAU user-data direction byte is 0x{msg[2]:02x}, expected 0x01 or 0x02")
        return cls(msg[1] == 1, msg[2], _U64.unpack_from(msg, 3)[0], bytes(msg[11:43]))

    @classmethod
    def expect(cls, msg: bytes, *, pu: bool, direction: int, key_id: bytes) -> UserDataHeader:
        """Decode the header of ``msg`` and check it is for this channel (A_24628-01): the
        environment's PU flag, ``direction`` (what this side receives) and the channel's KeyID.

        Raises:
            VauFormatError: malformed (:meth:`decode`), the other environment's PU flag, or the
                wrong direction.
            VauKeyIdError: another channel's KeyID (compared in constant time).
        """
        header = cls.decode(bytes(msg))
        if header.pu != pu:
            raise VauFormatError(f"PU flag {int(header.pu)} does not match this environment ({int(pu)})")
        to_vau = direction == DIRECTION_REQUEST
        if header.direction != direction:
            raise VauFormatError(
                f"VAU user-data message {'to' if to_vau else 'from'} the VAU is not marked as "
                f"{'a request' if to_vau else 'a response'} (direction 0x{direction:02x})")
        if not hmac.compare_digest(header.key_id, key_id):
            raise VauKeyIdError(f"KeyID in the VAU {'user-data' if to_vau else 'response'} header "
                                "is not this channel's")
        return header


def seal_user_data(key: bytes, header: UserDataHeader, plaintext: bytes, *, encryption_counter: int) -> bytes:
    """``header || IV || AES-256-GCM(key, IV, plaintext, AAD = header) || tag`` with
    ``IV = 4 random bytes || encryption_counter`` (A_24628-01)."""
    h = header.encode()
    iv = os.urandom(4) + _U64.pack(encryption_counter)
    return h + iv + AESGCM(key).encrypt(iv, bytes(plaintext), h)


def open_user_data(key: bytes, msg: bytes) -> tuple[UserDataHeader, bytes]:
    """Authenticate and decrypt a user-data message; no counter / direction policy here.

    Raises:
        VauFormatError: malformed header.
        VauDecryptionError: the tag does not verify under ``key`` with the header as AAD.
    """
    msg = bytes(msg)
    header = UserDataHeader.decode(msg)
    try:
        pt = AESGCM(key).decrypt(
            msg[HEADER_SIZE : HEADER_SIZE + IV_SIZE], msg[HEADER_SIZE + IV_SIZE :], msg[:HEADER_SIZE]
        )
    except InvalidTag:
        raise VauDecryptionError(
            "VAU user-data message does not authenticate (wrong key or tampered)"
        ) from None
    return header, pt


# --- server ------------------------------------------------------------------------------------
