"""E-Rezept VAU channel (gemSpec_Krypt, E-Rezept chapter: A_20160, A_20161-01, A_20162, A_20163,
A_20174, A_20175): the wire format and the client's half (:func:`seal_request`), no web
framework. The VAU's half is :mod:`safehold.vau.erp_server`.

Request (client → VAU), A_20161-01. The client builds the plaintext ::

    p = "1" SP <access token (JWS)> SP <request-id: 32 hex> SP <response key: 32 hex> SP <HTTP/1.1 request>

and encrypts it to the VAU's long-lived brainpoolP256r1 key (ECIES): fresh ephemeral key on
brainpoolP256r1, ECDH shared secret = x coordinate (32 bytes), CEK = HKDF-SHA256(IKM = secret,
salt none, info ``"ecies-vau-transport"``, L = 16), AES-128-GCM with a random 96-bit IV, 128-bit
tag, no AAD. Wire layout (gemSpec_Krypt Tab_KRYPT_ERP)::

    offset 0   1 byte   version 0x01
           1   32       X of the ephemeral public key (big-endian, zero-padded)
           33  32       Y
           65  12       IV
           77  len(p)   ciphertext
           ..  16       GCM tag                              (minimum 93 bytes)

Response (VAU → client), A_20163 steps 8–9 / A_20174: ``a = "1" SP <request-id> SP <HTTP/1.1
response>``, AES-128-GCM under the client's response key, random IV, no AAD, body
``IV (12) || ciphertext || tag (16)``. The client accepts it only if the version is 1 and the
request-id is the one it sent.

User pseudonym (A_20162, A_20163 steps 6–7, A_20175) is in :mod:`safehold.vau.pseudonym`.
Replay: the VAU remembers request-ids (:class:`RequestIdCache`) until the access token expires
and refuses a second use — a Safehold addition; gemSpec's request-id only binds the response.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehold.vau.errors import (
    VauDecryptionError,
    VauFormatError,
    VauInnerRequestError,
    VauResponseError,
)
from safehold.vau.httpmsg import HttpRequest, HttpResponse, parse_response

__all__ = [
    "HKDF_INFO",
    "MIN_MESSAGE_SIZE",
    "InnerRequest",
    "SealedRequest",
    "decrypt_response",
    "ecies_decrypt",
    "ecies_encrypt",
    "encrypt_response",
    "load_vau_private_key",
    "new_request_id",
    "new_response_key",
    "seal_request",
]

VERSION = 0x01
HKDF_INFO = b"ecies-vau-transport"
CEK_SIZE = 16
IV_SIZE = 12
TAG_SIZE = 16
COORD = 32
MIN_MESSAGE_SIZE = 1 + 2 * COORD + IV_SIZE + TAG_SIZE  # 93
CURVE = ec.BrainpoolP256R1

_HEX32 = re.compile(rb"[0-9A-Fa-f]{32}")
_JWS = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


# --- keys ------------------------------------------------------------------------------------


def load_vau_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """A VAU ECIES private key from PEM or DER (SEC1 or PKCS#8), which must be brainpoolP256r1.

    Raises:
        VauFormatError: not a key, not EC, or another curve.
    """
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        raise VauFormatError("VAU private key is not a PEM/DER private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
        raise VauFormatError("VAU private key must be an EC key on brainpoolP256r1 (A_20160)")
    return key


def _cek(private_key: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    secret = private_key.exchange(ec.ECDH(), peer)
    return HKDF(hashes.SHA256(), CEK_SIZE, salt=None, info=HKDF_INFO).derive(secret)


# --- ECIES (A_20161-01 step 6, A_20163 step 2) ----------------------------------------------


def ecies_encrypt(
    vau_public_key: ec.EllipticCurvePublicKey,
    plaintext: bytes,
    *,
    ephemeral_key: ec.EllipticCurvePrivateKey | None = None,
    iv: bytes | None = None,
) -> bytes:
    """Encrypt ``plaintext`` to the VAU key in the Tab_KRYPT_ERP layout.

    Args:
        vau_public_key: the VAU's brainpoolP256r1 public key (from its C.FD.ENC certificate).
        plaintext: the inner request ``p``.
        ephemeral_key, iv: fixed values only for reproducing the gemSpec test vector; leave
            None in real use (a fresh key and IV per message).

    Raises:
        VauFormatError: the VAU key or the given ephemeral key is not on brainpoolP256r1.
    """
    if not isinstance(vau_public_key, ec.EllipticCurvePublicKey) or not isinstance(
        vau_public_key.curve, CURVE
    ):
        raise VauFormatError("VAU public key must be an EC key on brainpoolP256r1")
    eph = ephemeral_key if ephemeral_key is not None else ec.generate_private_key(CURVE())
    if not isinstance(eph.curve, CURVE):
        raise VauFormatError("ephemeral key must be on brainpoolP256r1")
    nonce = iv if iv is not None else os.urandom(IV_SIZE)
    if len(nonce) != IV_SIZE:
        raise VauFormatError(f"IV must be {IV_SIZE} bytes")
    point = eph.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    ct = AESGCM(_cek(eph, vau_public_key)).encrypt(nonce, bytes(plaintext), None)
    return bytes((VERSION,)) + point[1:] + nonce + ct


def ecies_decrypt(private_keys: Sequence[ec.EllipticCurvePrivateKey], message: bytes) -> bytes:
    """Decrypt a Tab_KRYPT_ERP message, trying the current key and then fallback keys (rotation,
    A_20163 step 2).

    Raises:
        VauFormatError: shorter than 93 bytes, version byte not 0x01, or the ephemeral point is
            not on brainpoolP256r1.
        VauDecryptionError: no key authenticates the message (wrong VAU key or tampered bytes).
    """
    message = bytes(message)
    if len(message) < MIN_MESSAGE_SIZE:
        raise VauFormatError(
            f"VAU message is {len(message)} bytes, shorter than the minimum {MIN_MESSAGE_SIZE}"
        )
    if message[0] != VERSION:
        raise VauFormatError(f"VAU message version byte is 0x{message[0]:02x}, expected 0x01")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(CURVE(), b"\x04" + message[1 : 1 + 2 * COORD])
    except ValueError:
        raise VauFormatError(
            "ephemeral public key in the VAU message is not a brainpoolP256r1 point"
        ) from None
    nonce = message[65:77]
    body = message[77:]
    if not private_keys:
        raise VauDecryptionError("no VAU private key configured")
    for key in private_keys:
        try:
            return AESGCM(_cek(key, peer)).decrypt(nonce, body, None)
        except InvalidTag:
            continue
    raise VauDecryptionError("VAU message does not authenticate under the VAU key (tampered or wrong key)")


# --- inner request (A_20161-01 steps 1–5, A_20163 step 3) -------------------------------------


def new_request_id() -> str:
    """A fresh 128-bit request-id, 32 lower-case hex characters (A_20161-01 step 2)."""
    return os.urandom(16).hex()


def new_response_key() -> bytes:
    """A fresh 128-bit AES response key (A_20161-01 step 3)."""
    return os.urandom(16)


@dataclass(frozen=True)
class InnerRequest:
    """The decrypted inner request ``p``. ``repr`` hides the token and the response key.

    Attributes:
        access_token: the JWS access token (ASCII).
        request_id: 32 hex characters exactly as sent (upper case is accepted on input).
        response_key: 16-byte AES-128 key for the response.
        http_request: the serialised inner HTTP/1.1 request.
    """

    access_token: str
    request_id: str
    response_key: bytes
    http_request: bytes

    def __repr__(self) -> str:
        return f"InnerRequest(request_id={self.request_id!r}, http_request=<{len(self.http_request)} bytes>)"

    def encode(self) -> bytes:
        """``p`` as bytes.

        Raises:
            VauInnerRequestError: a field has the wrong shape.
        """
        tok = self.access_token.encode("ascii") if self.access_token.isascii() else b""
        if not _JWS.fullmatch(tok):
            raise VauInnerRequestError("access token must be a compact JWS (three base64url parts)")
        if not _HEX32.fullmatch(self.request_id.encode("ascii", "replace")):
            raise VauInnerRequestError("request-id must be 32 hex characters")
        if len(self.response_key) != 16:
            raise VauInnerRequestError("response key must be 16 bytes (AES-128)")
        if not self.http_request:
            raise VauInnerRequestError("inner HTTP request is empty")
        rid = self.request_id.encode("ascii")
        return b" ".join((b"1", tok, rid, self.response_key.hex().encode("ascii"), bytes(self.http_request)))

    @classmethod
    def parse(cls, p: bytes) -> InnerRequest:
        """Parse ``p``: exactly four single-space-separated items, then the HTTP request.

        Raises:
            VauInnerRequestError: leading or doubled spaces, version not ``1``, token not a JWS,
                request-id or response key not 32 hex characters, or no HTTP request.
        """
        parts = bytes(p).split(b" ", 4)
        if len(parts) != 5:
            raise VauInnerRequestError(f"inner request has {len(parts)} space-separated items, expected 5")
        version, tok, rid, key, http = parts
        if version != b"1":
            raise VauInnerRequestError("inner request version is not '1'")
        if not tok:
            raise VauInnerRequestError("inner request has an empty access token (leading or double space)")
        if not _JWS.fullmatch(tok):
            raise VauInnerRequestError("inner request access token is not a compact JWS")
        if not _HEX32.fullmatch(rid):
            raise VauInnerRequestError("inner request request-id is not 32 hex characters")
        if not _HEX32.fullmatch(key):
            raise VauInnerRequestError("inner request response key is not 32 hex characters (AES-128)")
        if not http or http[:1] == b" ":
            raise VauInnerRequestError("inner request carries no HTTP request (or a double space)")
        return cls(tok.decode("ascii"), rid.decode("ascii"), bytes.fromhex(key.decode("ascii")), http)


# --- response (A_20163 steps 8–9, A_20174) -----------------------------------------------------


def encrypt_response(response_key: bytes, request_id: str, http_response: bytes) -> bytes:
    """``IV || AES-128-GCM(response_key, "1 <request-id> <HTTP response>") || tag``.

    Raises:
        VauFormatError: response key not 16 bytes or request-id not 32 hex characters.
    """
    if len(response_key) != 16:
        raise VauFormatError("response key must be 16 bytes (AES-128)")
    if not _HEX32.fullmatch(request_id.encode("ascii", "replace")):
        raise VauFormatError("request-id must be 32 hex characters")
    nonce = os.urandom(IV_SIZE)
    a = b"1 " + request_id.encode("ascii") + b" " + bytes(http_response)
    return nonce + AESGCM(bytes(response_key)).encrypt(nonce, a, None)


def decrypt_response(response_key: bytes, request_id: str, body: bytes) -> bytes:
    """Open a VAU response and return the inner HTTP response bytes (A_20174).

    Raises:
        VauFormatError: body shorter than IV + tag.
        VauDecryptionError: does not authenticate under ``response_key`` (wrong key, tampered).
        VauResponseError: version not ``1`` or the request-id is not ``request_id``.
    """
    body = bytes(body)
    if len(body) < IV_SIZE + TAG_SIZE:
        raise VauFormatError(f"VAU response is {len(body)} bytes, shorter than IV + tag")
    try:
        a = AESGCM(bytes(response_key)).decrypt(body[:IV_SIZE], body[IV_SIZE:], None)
    except InvalidTag:
        raise VauDecryptionError(
            "VAU response does not authenticate under this request's response key"
        ) from None
    parts = a.split(b" ", 2)
    if len(parts) != 3 or parts[0] != b"1":
        raise VauResponseError("VAU response plaintext is not '1 <request-id> <HTTP response>'")
    if parts[1].lower() != request_id.encode("ascii").lower():
        raise VauResponseError("VAU response answers another request-id")
    return parts[2]


# --- the client side (A_20161-01, A_20174) ----------------------------------------------------


@dataclass(frozen=True)
class SealedRequest:
    """An encrypted request and what the client needs to read its answer."""

    body: bytes
    request_id: str
    response_key: bytes

    def __repr__(self) -> str:
        return f"SealedRequest(request_id={self.request_id!r}, body=<{len(self.body)} bytes>)"

    def open_response(self, body: bytes, *, request_method: str = "POST") -> HttpResponse:
        """Decrypt and parse the VAU's answer to this request (A_20174).

        Raises:
            VauDecryptionError, VauResponseError, VauFormatError: see :func:`decrypt_response`.
        """
        return parse_response(
            decrypt_response(self.response_key, self.request_id, body), request_method=request_method
        )


def seal_request(
    vau_public_key: ec.EllipticCurvePublicKey, access_token: str, request: HttpRequest
) -> SealedRequest:
    """Build and encrypt one E-Rezept VAU request with a fresh request-id and response key.

    The inner request gets ``Authorization: Bearer <token>`` (the same token as in ``p``).

    Raises:
        VauInnerRequestError / VauFormatError: a malformed token or request.
    """
    headers = [(k, v) for k, v in request.headers if k.lower() != "authorization"]
    headers.append(("Authorization", "Bearer " + access_token))
    http = HttpRequest(request.method, request.target, headers, request.body).encode()
    inner = InnerRequest(access_token, new_request_id(), new_response_key(), http)
    return SealedRequest(ecies_encrypt(vau_public_key, inner.encode()), inner.request_id, inner.response_key)
