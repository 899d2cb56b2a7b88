"""ePA 3 VAU channel ("VAU-Protokoll für ePA für alle", gemSpec_Krypt chapter 7): both sides,
no web framework, no I/O.

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

import hashlib
import hmac
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehold.vau.errors import (
    VauChannelUnknownError,
    VauCounterError,
    VauDecryptionError,
    VauFormatError,
    VauHandshakeError,
    VauKeyIdError,
    VauKeyVerificationError,
    VauResponseError,
)
from safehold.vau.kyber import KyberPrivateKey, KyberPublicKey, Variant

__all__ = [
    "HEADER_SIZE",
    "MAX_KEY_LIFETIME",
    "ChannelKeys",
    "EpaVauClient",
    "EpaVauServer",
    "SignedPublicVauKeys",
    "UserDataHeader",
    "VauKeyTrust",
    "VauPublicKeys",
    "VauServerKeys",
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


def ecdh_key_from_cbor(obj: Any, what: str) -> ec.EllipticCurvePublicKey:
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
class VauPublicKeys:
    """``VauPublicKeys`` (A_24425-01): the VAU instance's ECDH and Kyber768 keys with validity.

    Attributes:
        ecdh: P-256 public key. kyber: Kyber768 public key. iat, exp: Unix seconds.
        comment: free text. raw: the exact CBOR bytes (what the signature covers), if decoded.
    """

    ecdh: ec.EllipticCurvePublicKey
    kyber: KyberPublicKey
    iat: int
    exp: int
    comment: str = ""

    def encode(self) -> bytes:
        """The CBOR map ``{ECDH_PK, Kyber768_PK, iat, exp, comment}``."""
        return cbor2.dumps(
            {
                "ECDH_PK": ecdh_key_to_cbor(self.ecdh),
                "Kyber768_PK": self.kyber.raw,
                "iat": self.iat,
                "exp": self.exp,
                "comment": self.comment,
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, variant: Variant = "round3") -> VauPublicKeys:
        """Parse the CBOR map.

        Raises:
            VauFormatError: a field is missing, of the wrong type, or an invalid key.
        """
        what = "VauPublicKeys"
        obj = _cbor_map(data, what)
        ecdh = ecdh_key_from_cbor(_field(obj, "ECDH_PK", dict, what), "VauPublicKeys ECDH_PK")
        kyber = KyberPublicKey(_field(obj, "Kyber768_PK", bytes, what), variant=variant)
        comment = obj.get("comment", "")
        return cls(
            ecdh,
            kyber,
            _field(obj, "iat", int, what),
            _field(obj, "exp", int, what),
            comment if isinstance(comment, str) else "",
        )


@dataclass(frozen=True)
class SignedPublicVauKeys:
    """``SignedPublicVauKeys`` (A_24425-01, lib-vau ≥ 1.0.13 layout).

    Attributes:
        signed_pub_keys: CBOR bytes of :class:`VauPublicKeys` (the signed content).
        signature: ECDSA-SHA256 over ``signed_pub_keys``, raw ``r || s`` (64 bytes).
        cert_hash: SHA-256 of the AUT-VAU certificate. cdv: certificate data version.
        ocsp_response: DER OCSP response for that certificate (stapled; may be empty).
    """

    signed_pub_keys: bytes
    signature: bytes
    cert_hash: bytes
    cdv: int
    ocsp_response: bytes = b""

    def encode(self) -> bytes:
        """The CBOR map sent inside M2."""
        return cbor2.dumps(
            {
                "signed_pub_keys": self.signed_pub_keys,
                "signature-ES256": self.signature,
                "cert_hash": self.cert_hash,
                "cdv": self.cdv,
                "ocsp_response": self.ocsp_response,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedPublicVauKeys:
        """Parse the CBOR map.

        Raises:
            VauFormatError: a field is missing or has the wrong type or length.
        """
        what = "SignedPublicVauKeys"
        obj = _cbor_map(data, what)
        sig = _field(obj, "signature-ES256", bytes, what)
        if len(sig) != 64:
            raise VauFormatError(f"signature-ES256 must be raw r||s (64 bytes), got {len(sig)} bytes")
        cert_hash = _field(obj, "cert_hash", bytes, what)
        if len(cert_hash) != 32:
            raise VauFormatError("cert_hash must be 32 bytes (SHA-256)")
        ocsp = obj.get("ocsp_response", b"")
        return cls(
            _field(obj, "signed_pub_keys", bytes, what),
            sig,
            cert_hash,
            _field(obj, "cdv", int, what),
            ocsp if isinstance(ocsp, bytes) else b"",
        )

    @classmethod
    def sign(
        cls,
        keys: VauPublicKeys,
        signing_key: ec.EllipticCurvePrivateKey,
        certificate: bytes,
        *,
        cdv: int = 1,
        ocsp_response: bytes = b"",
    ) -> SignedPublicVauKeys:
        """Sign ``keys`` with the AUT-VAU key whose certificate (DER) is ``certificate``.

        Raises:
            VauKeyVerificationError: the certificate's key is not the signing key's.
        """
        cert = x509.load_der_x509_certificate(certificate)
        if cert.public_key() != signing_key.public_key():
            raise VauKeyVerificationError("AUT-VAU certificate does not carry the signing key")
        body = keys.encode()
        r, s = decode_dss_signature(signing_key.sign(body, ec.ECDSA(hashes.SHA256())))
        n = (signing_key.curve.key_size + 7) // 8
        return cls(
            body,
            r.to_bytes(n, "big") + s.to_bytes(n, "big"),
            hashlib.sha256(certificate).digest(),
            cdv,
            ocsp_response,
        )


class VauKeyTrust:
    """What an ePA client trusts: pinned AUT-VAU certificates (A_24624-01, as far as implemented).

    gemSpec_Krypt has the client validate the AUT-VAU certificate against the TI trust list
    (TSL), its ``oid_epa_vau`` role and a stapled OCSP response no older than 24 h. Safehold has
    no TI PKI: the data owner pins the AUT-VAU certificates by SHA-256 instead, and the stapled
    OCSP response is carried but **not** validated. Enforced: the certificate named by
    ``cert_hash`` is pinned and its bytes hash to the pin; the certificate is within its
    validity period; ``signature-ES256`` verifies over ``signed_pub_keys`` with the
    certificate's key (curve taken from the certificate); the keys inside are valid;
    ``exp`` has not passed, ``iat`` is not in the future, and ``exp - iat`` is at most 30 days.

    Args:
        certificates: pinned AUT-VAU certificates (DER); at least one.
        clock: seconds since the epoch.
        skew: tolerated clock difference in seconds.
    """

    def __init__(
        self,
        certificates: Iterable[bytes],
        *,
        clock: Callable[[], float] = time.time,
        skew: float = 300.0,
        variant: Variant = "round3",
    ):
        self._certs = {hashlib.sha256(c).digest(): bytes(c) for c in certificates}
        if not self._certs:
            raise VauKeyVerificationError("no AUT-VAU certificate is pinned; refusing to trust any VAU")
        self._clock = clock
        self.skew = skew
        self.variant: Variant = variant

    def certificate(self, cert_hash: bytes) -> bytes:
        """The pinned certificate with this SHA-256.

        Raises:
            VauKeyVerificationError: not pinned.
        """
        cert = self._certs.get(cert_hash)
        if cert is None:
            raise VauKeyVerificationError(f"AUT-VAU certificate {cert_hash.hex()[:16]}… is not pinned")
        return cert

    def verify(self, signed: SignedPublicVauKeys) -> VauPublicKeys:
        """Check ``signed`` as the class docstring says and return the VAU keys.

        Raises:
            VauKeyVerificationError: any check fails (the message names which).
            VauFormatError: the signed keys are malformed.
        """
        der = self.certificate(signed.cert_hash)
        cert = x509.load_der_x509_certificate(der)
        now = self._clock()
        if not (
            cert.not_valid_before_utc.timestamp() - self.skew
            <= now
            <= cert.not_valid_after_utc.timestamp() + self.skew
        ):
            raise VauKeyVerificationError("AUT-VAU certificate is outside its validity period")
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise VauKeyVerificationError("AUT-VAU certificate key is not an EC key")
        n = len(signed.signature) // 2
        sig = encode_dss_signature(
            int.from_bytes(signed.signature[:n], "big"), int.from_bytes(signed.signature[n:], "big")
        )
        try:
            pub.verify(sig, signed.signed_pub_keys, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VauKeyVerificationError(
                "signature-ES256 over the VAU public keys does not verify"
            ) from None
        keys = VauPublicKeys.decode(signed.signed_pub_keys, variant=self.variant)
        if keys.exp < now - self.skew:
            raise VauKeyVerificationError("VAU public keys have expired (exp in the past)")
        if keys.iat > now + self.skew:
            raise VauKeyVerificationError("VAU public keys are issued in the future (iat)")
        if keys.exp - keys.iat > MAX_KEY_LIFETIME:
            raise VauKeyVerificationError("VAU public keys are valid for more than 30 days")
        return keys


@dataclass
class VauServerKeys:
    """The VAU instance's long-term KEM keys (P-256 ECDH and Kyber768). ``repr`` hides them."""

    ecdh: ec.EllipticCurvePrivateKey
    kyber: KyberPrivateKey

    def __repr__(self) -> str:
        return "VauServerKeys(<secret>)"

    @classmethod
    def generate(cls, *, variant: Variant = "round3") -> VauServerKeys:
        """Fresh keys."""
        return cls(ec.generate_private_key(ec.SECP256R1()), KyberPrivateKey.generate(variant=variant))

    @classmethod
    def from_cbor(cls, data: bytes, *, variant: Variant = "round3") -> VauServerKeys:
        """Keys from lib-vau's key-file CBOR map: ``ECDH_PrivKey`` (PKCS#8 DER, P-256) and
        ``Kyber768_PrivKey`` (2400-byte expanded key) or ``Kyber768_Seed`` (64-byte seed).

        Raises:
            VauFormatError: missing fields, wrong curve, key pair inconsistent with ``ECDH_PK`` /
                ``Kyber768_PK`` when those are present.
        """
        what = "VAU server key file"
        obj = _cbor_map(data, what)
        try:
            ecdh = serialization.load_der_private_key(_field(obj, "ECDH_PrivKey", bytes, what), None)
        except ValueError:
            raise VauFormatError("ECDH_PrivKey is not a PKCS#8 DER key") from None
        if not isinstance(ecdh, ec.EllipticCurvePrivateKey) or not isinstance(ecdh.curve, ec.SECP256R1):
            raise VauFormatError("ECDH_PrivKey must be a P-256 key")
        if "Kyber768_PrivKey" in obj:
            kyber = KyberPrivateKey.from_expanded(
                _field(obj, "Kyber768_PrivKey", bytes, what), variant=variant
            )
        else:
            kyber = KyberPrivateKey.from_seed(_field(obj, "Kyber768_Seed", bytes, what), variant=variant)
        if "ECDH_PK" in obj and ecdh_key_from_cbor(obj["ECDH_PK"], "ECDH_PK") != ecdh.public_key():
            raise VauFormatError("ECDH_PK does not match ECDH_PrivKey")
        if "Kyber768_PK" in obj and obj["Kyber768_PK"] != kyber.public_key.raw:
            raise VauFormatError("Kyber768_PK does not match Kyber768_PrivKey")
        return cls(ecdh, kyber)

    def public(self, *, iat: int, exp: int, comment: str = "") -> VauPublicKeys:
        """The public half as :class:`VauPublicKeys` valid from ``iat`` to ``exp`` (Unix seconds)."""
        return VauPublicKeys(self.ecdh.public_key(), self.kyber.public_key, iat, exp, comment)


# --- user data --------------------------------------------------------------------------------


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


class _Channel:
    __slots__ = (
        "cid",
        "m1",
        "m2",
        "k1",
        "ss_e",
        "keys",
        "lock",
        "max_seen",
        "window",
        "enc_counter",
        "touched",
        "established",
    )

    def __init__(self, cid: str, m1: bytes, m2: bytes, k1: _K1, ss_e: tuple[bytes, bytes], now: float):
        self.cid = cid
        self.m1, self.m2, self.k1, self.ss_e = m1, m2, k1, ss_e
        self.keys: ChannelKeys | None = None
        self.lock = threading.Lock()
        self.max_seen = 0
        self.window = 0  # bit i set: counter max_seen - i was seen
        self.enc_counter = 0
        self.touched = now
        self.established = False


class EpaVauServer:
    """The VAU side of the ePA 3 channel: handshake and user data, channels kept in memory.

    Args:
        keys: the instance's KEM keys.
        signed_keys: its :class:`SignedPublicVauKeys` (sent inside M2).
        pu: production environment flag (the PU byte every user-data message must carry).
        cid_prefix: path prefix of the channel ids handed out (``VAU-CID``, A_24622:
            ``/[A-Za-z0-9/-]*``, at most 200 characters).
        max_channels: most channels held; the least recently used one is dropped when full.
        idle_timeout: seconds an established channel lives without traffic.
        handshake_timeout: seconds between M1 and M3.
        clock: seconds since the epoch.

    Thread-safe.
    """

    def __init__(
        self,
        keys: VauServerKeys,
        signed_keys: SignedPublicVauKeys,
        *,
        pu: bool = False,
        cid_prefix: str = "/VAU/epa/",
        max_channels: int = 100_000,
        idle_timeout: float = 3600.0,
        handshake_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        import re

        if not re.fullmatch(r"/[A-Za-z0-9/-]*", cid_prefix) or len(cid_prefix) + 32 > 200:
            raise ValueError("cid_prefix must match /[A-Za-z0-9/-]* and leave room for 32 characters")
        self.keys = keys
        self.signed_keys = signed_keys
        self._signed_bytes = signed_keys.encode()
        self.pu = pu
        self.cid_prefix = cid_prefix
        self.max_channels = max_channels
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self._clock = clock
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._lock = threading.Lock()
        ks = VauPublicKeys.decode(signed_keys.signed_pub_keys, variant=keys.kyber.variant)
        if ks.ecdh != keys.ecdh.public_key() or ks.kyber != keys.kyber.public_key:
            raise VauKeyVerificationError("signed VAU public keys are not this instance's keys")
        if ks.exp - ks.iat > MAX_KEY_LIFETIME:
            raise VauKeyVerificationError("signed VAU public keys are valid for more than 30 days")
        self._exp = ks.exp

    def __repr__(self) -> str:
        return f"EpaVauServer(pu={self.pu}, channels={len(self._channels)})"

    def __len__(self) -> int:
        return len(self._channels)

    def _get(self, cid: str) -> _Channel:
        now = self._clock()
        with self._lock:
            ch = self._channels.get(cid)
            if ch is None:
                raise VauChannelUnknownError("no VAU channel under this VAU-CID; perform a new handshake")
            ttl = self.idle_timeout if ch.established else self.handshake_timeout
            if now - ch.touched > ttl:
                del self._channels[cid]
                raise VauChannelUnknownError("VAU channel expired; perform a new handshake")
            ch.touched = now
            self._channels.move_to_end(cid)
            return ch

    def _drop(self, cid: str) -> None:
        with self._lock:
            self._channels.pop(cid, None)

    def handle_m1(self, m1: bytes) -> tuple[str, bytes]:
        """Answer M1 with M2 (A_24608); returns ``(VAU-CID, M2 bytes)``.

        Raises:
            VauHandshakeError: not an M1, or the VAU keys have expired.
            VauFormatError: malformed client keys.
        """
        m1 = bytes(m1)
        now = self._clock()
        if now > self._exp:
            raise VauHandshakeError("this VAU's signed public keys have expired; it takes no new channels")
        obj = _message(m1, "M1")
        client_ecdh = ecdh_key_from_cbor(_field(obj, "ECDH_PK", dict, "M1"), "M1 ECDH_PK")
        client_kyber = KyberPublicKey(
            _field(obj, "Kyber768_PK", bytes, "M1"), variant=self.keys.kyber.variant
        )
        ss_ecdh, ecdh_ct = _ecdh_encapsulate(client_ecdh)
        ss_kyber, kyber_ct = client_kyber.encapsulate()
        k1 = _k1(ss_ecdh, ss_kyber)
        m2 = cbor2.dumps(
            {
                "MessageType": "M2",
                "ECDH_ct": ecdh_ct,
                "Kyber768_ct": kyber_ct,
                "AEAD_ct": aead_encrypt(k1.s2c, self._signed_bytes),
            }
        )
        cid = self.cid_prefix + os.urandom(16).hex()
        with self._lock:
            while len(self._channels) >= self.max_channels:
                self._channels.popitem(last=False)
            self._channels[cid] = _Channel(cid, m1, m2, k1, (ss_ecdh, ss_kyber), now)
        return cid, m2

    def handle_m3(self, cid: str, m3: bytes) -> bytes:
        """Check M3's key confirmation and answer with M4 (A_24623, A_24626).

        A failed M3 ends the channel.

        Raises:
            VauChannelUnknownError: no channel under ``cid``.
            VauHandshakeError: not an M3, channel already established, inner layer does not
                decrypt, or the client's transcript hash differs (key confirmation failed).
            VauFormatError: malformed inner layer.
        """
        m3 = bytes(m3)
        ch = self._get(cid)
        with ch.lock:
            if ch.established or ch.keys is not None:
                raise VauHandshakeError("M3 for a channel that already completed its handshake")
            try:
                obj = _message(m3, "M3")
                inner_ct = _field(obj, "AEAD_ct", bytes, "M3")
                kc_ct = _field(obj, "AEAD_ct_key_confirmation", bytes, "M3")
                inner = _cbor_map(aead_decrypt(ch.k1.c2s, inner_ct, "M3 AEAD_ct"), "M3 inner layer")
                peer = ecdh_key_from_cbor(_field(inner, "ECDH_ct", dict, "M3 inner layer"), "M3 ECDH_ct")
                ss_s_ecdh = self.keys.ecdh.exchange(ec.ECDH(), peer)
                ss_s_kyber = self.keys.kyber.decapsulate(
                    _field(inner, "Kyber768_ct", bytes, "M3 inner layer")
                )
                for flag in ("ERP", "ESO"):
                    _field(inner, flag, bool, "M3 inner layer")
                keys = ChannelKeys.derive(ch.ss_e[0], ch.ss_e[1], ss_s_ecdh, ss_s_kyber)
                got = aead_decrypt(keys.c2s_key_confirmation, kc_ct, "M3 AEAD_ct_key_confirmation")
                want = hashlib.sha256(ch.m1 + ch.m2 + inner_ct).digest()
                if not hmac.compare_digest(got, want):
                    raise VauHandshakeError("M3 key confirmation failed: client transcript hash differs")
            except Exception:
                self._drop(cid)
                raise
            m4 = cbor2.dumps(
                {
                    "MessageType": "M4",
                    "AEAD_ct_key_confirmation": aead_encrypt(
                        keys.s2c_key_confirmation, hashlib.sha256(ch.m1 + ch.m2 + m3).digest()
                    ),
                }
            )
            ch.keys, ch.established = keys, True
            ch.m1 = ch.m2 = b""
            ch.k1 = _K1(b"", b"")
            ch.ss_e = (b"", b"")
        return m4

    def open_request(self, cid: str, msg: bytes) -> tuple[int, bytes]:
        """Decrypt a client request (A_24628-01, A_24629); returns ``(request counter, plaintext)``.

        Raises:
            VauChannelUnknownError: no established channel under ``cid``.
            VauFormatError: malformed header, PU flag of the other environment, or not a request.
            VauKeyIdError: the KeyID is not this channel's.
            VauDecryptionError: tampered message.
            VauCounterError: the request counter was used before or is too old for the window.
        """
        ch = self._get(cid)
        if not ch.established or ch.keys is None:
            raise VauChannelUnknownError("VAU channel has not completed its handshake")
        header = UserDataHeader.decode(bytes(msg))
        if header.pu != self.pu:
            raise VauFormatError(f"PU flag {int(header.pu)} does not match this environment ({int(self.pu)})")
        if header.direction != DIRECTION_REQUEST:
            raise VauFormatError(
                "VAU user-data message to the VAU is not marked as a request (direction 0x01)"
            )
        if not hmac.compare_digest(header.key_id, ch.keys.key_id):
            raise VauKeyIdError("KeyID in the VAU user-data header is not this channel's")
        _, pt = open_user_data(ch.keys.c2s_app_data, msg)
        with ch.lock:
            self._accept_counter(ch, header.counter)
        return header.counter, pt

    @staticmethod
    def _accept_counter(ch: _Channel, n: int) -> None:
        if n == 0:
            raise VauCounterError("request counter 0 is never valid (the client starts at 1)")
        if n > ch.max_seen:
            shift = n - ch.max_seen
            ch.window = (
                ((ch.window << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            )
            ch.max_seen = n
            return
        age = ch.max_seen - n
        if age >= REPLAY_WINDOW:
            raise VauCounterError(
                f"request counter {n} is older than the replay window (highest {ch.max_seen})"
            )
        if ch.window >> age & 1:
            raise VauCounterError(f"request counter {n} was already used (replayed request refused)")
        ch.window |= 1 << age

    def seal_response(self, cid: str, request_counter: int, plaintext: bytes) -> bytes:
        """Encrypt the answer to request ``request_counter`` under ``K2_s2c_app_data``.

        Raises:
            VauChannelUnknownError: no established channel under ``cid``.
        """
        ch = self._get(cid)
        if not ch.established or ch.keys is None:
            raise VauChannelUnknownError("VAU channel has not completed its handshake")
        with ch.lock:
            ch.enc_counter += 1
            enc = ch.enc_counter
        header = UserDataHeader(self.pu, DIRECTION_RESPONSE, request_counter, ch.keys.key_id)
        return seal_user_data(ch.keys.s2c_app_data, header, plaintext, encryption_counter=enc)


# --- client ------------------------------------------------------------------------------------


CertificateProvider = Callable[[bytes, int], bytes]


class EpaVauClient:
    """The client side of the ePA 3 channel: one instance per channel; not thread-safe.

    Use: :meth:`message1` → send, :meth:`handle_m2` → send M3, :meth:`handle_m4`; then
    :meth:`encrypt_request` / :meth:`decrypt_response` in turn.

    Args:
        trust: pinned AUT-VAU certificates and the checks of :class:`VauKeyTrust`.
        pu: the environment flag expected in every user-data message.
        variant: Kyber round 3 (production) or FIPS 203 ML-KEM.
    """

    def __init__(self, trust: VauKeyTrust, *, pu: bool = False):
        self.trust = trust
        self.pu = pu
        self._variant: Variant = trust.variant
        self._ecdh = ec.generate_private_key(ec.SECP256R1())
        self._kyber = KyberPrivateKey.generate(variant=self._variant)
        self._m1: bytes | None = None
        self._transcript = b""
        self._keys: ChannelKeys | None = None
        self._established = False
        self.vau_keys: VauPublicKeys | None = None
        self.request_counter = 0
        self._pending: set[int] = set()

    def __repr__(self) -> str:
        return f"EpaVauClient(established={self._established}, counter={self.request_counter})"

    @property
    def established(self) -> bool:
        """True once M4 verified."""
        return self._established

    @property
    def key_id(self) -> bytes:
        """The channel's KeyID (after M2)."""
        if self._keys is None:
            raise VauHandshakeError("no KeyID before M2")
        return self._keys.key_id

    def message1(self) -> bytes:
        """M1 (A_24428) with this channel's ephemeral ECDH and Kyber768 keys."""
        if self._m1 is not None:
            raise VauHandshakeError("M1 was already sent on this channel")
        self._m1 = cbor2.dumps(
            {
                "MessageType": "M1",
                "ECDH_PK": ecdh_key_to_cbor(self._ecdh.public_key()),
                "Kyber768_PK": self._kyber.public_key.raw,
            }
        )
        return self._m1

    def handle_m2(self, m2: bytes) -> bytes:
        """Check M2 and the signed VAU keys (A_24624-01) and build M3 (A_24623).

        Raises:
            VauHandshakeError: out of order, not an M2, or ``AEAD_ct`` does not decrypt.
            VauKeyVerificationError: the signed VAU keys fail a trust check.
            VauFormatError: malformed fields.
        """
        if self._m1 is None or self._keys is not None:
            raise VauHandshakeError("M2 received out of order")
        m2 = bytes(m2)
        obj = _message(m2, "M2")
        peer = ecdh_key_from_cbor(_field(obj, "ECDH_ct", dict, "M2"), "M2 ECDH_ct")
        ss_e_ecdh = self._ecdh.exchange(ec.ECDH(), peer)
        ss_e_kyber = self._kyber.decapsulate(_field(obj, "Kyber768_ct", bytes, "M2"))
        k1 = _k1(ss_e_ecdh, ss_e_kyber)
        signed = SignedPublicVauKeys.decode(
            aead_decrypt(k1.s2c, _field(obj, "AEAD_ct", bytes, "M2"), "M2 AEAD_ct")
        )
        vau = self.trust.verify(signed)
        ss_s_ecdh, ecdh_ct = _ecdh_encapsulate(vau.ecdh)
        ss_s_kyber, kyber_ct = vau.kyber.encapsulate()
        inner = cbor2.dumps({"ECDH_ct": ecdh_ct, "Kyber768_ct": kyber_ct, "ERP": False, "ESO": False})
        inner_ct = aead_encrypt(k1.c2s, inner)
        keys = ChannelKeys.derive(ss_e_ecdh, ss_e_kyber, ss_s_ecdh, ss_s_kyber)
        confirmation = aead_encrypt(
            keys.c2s_key_confirmation, hashlib.sha256(self._m1 + m2 + inner_ct).digest()
        )
        m3 = cbor2.dumps({"MessageType": "M3", "AEAD_ct": inner_ct, "AEAD_ct_key_confirmation": confirmation})
        self._transcript = self._m1 + m2 + m3
        self._keys = keys
        self.vau_keys = vau
        return m3

    def handle_m4(self, m4: bytes) -> None:
        """Check the VAU's key confirmation (A_24627); the channel is then established.

        Raises:
            VauHandshakeError: out of order, not an M4, or the transcript hash differs.
        """
        if self._keys is None or self._established:
            raise VauHandshakeError("M4 received out of order")
        obj = _message(bytes(m4), "M4")
        got = aead_decrypt(
            self._keys.s2c_key_confirmation,
            _field(obj, "AEAD_ct_key_confirmation", bytes, "M4"),
            "M4 AEAD_ct_key_confirmation",
        )
        if not hmac.compare_digest(got, hashlib.sha256(self._transcript).digest()):
            raise VauHandshakeError("M4 key confirmation failed: VAU transcript hash differs")
        self._established = True
        self._transcript = b""

    def encrypt_request(self, plaintext: bytes) -> bytes:
        """Encrypt one request with the next request counter (A_24628-01, A_24629).

        Raises:
            VauHandshakeError: the handshake has not completed.
        """
        if not self._established or self._keys is None:
            raise VauHandshakeError("VAU channel is not established")
        self.request_counter += 1
        n = self.request_counter
        self._pending.add(n)
        header = UserDataHeader(self.pu, DIRECTION_REQUEST, n, self._keys.key_id)
        return seal_user_data(self._keys.c2s_app_data, header, plaintext, encryption_counter=n)

    def decrypt_response(self, msg: bytes, *, request_counter: int | None = None) -> bytes:
        """Decrypt the VAU's answer (A_24633): direction 0x02, this channel's KeyID and PU flag,
        and the counter of an outstanding request (``request_counter``, default the last one).

        Raises:
            VauHandshakeError: the handshake has not completed.
            VauFormatError: malformed, wrong PU flag, or not a response.
            VauKeyIdError: another channel's KeyID.
            VauResponseError: the counter is not the expected request's.
            VauDecryptionError: tampered.
        """
        if not self._established or self._keys is None:
            raise VauHandshakeError("VAU channel is not established")
        header = UserDataHeader.decode(bytes(msg))
        if header.pu != self.pu:
            raise VauFormatError(f"PU flag {int(header.pu)} does not match this environment ({int(self.pu)})")
        if header.direction != DIRECTION_RESPONSE:
            raise VauFormatError(
                "VAU user-data message from the VAU is not marked as a response (direction 0x02)"
            )
        if not hmac.compare_digest(header.key_id, self._keys.key_id):
            raise VauKeyIdError("KeyID in the VAU response header is not this channel's")
        want = self.request_counter if request_counter is None else request_counter
        if header.counter != want or want not in self._pending:
            raise VauResponseError(f"VAU response carries request counter {header.counter}, expected {want}")
        _, pt = open_user_data(self._keys.s2c_app_data, msg)
        self._pending.discard(want)
        return pt
