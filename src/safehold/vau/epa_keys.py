"""ePA 3 VAU keys (gemSpec_Krypt A_24425-01, A_24624-01): the VAU instance's ECDH P-256 and
Kyber768 key pairs, the signed ``SignedPublicVauKeys`` the VAU sends in M2, and the client's
trust check of that signature against the VAU certificate. No I/O."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from safehold.vau.epa import MAX_KEY_LIFETIME, _cbor_map, _field, ecdh_key_from_cbor, ecdh_key_to_cbor
from safehold.vau.errors import (
    VauFormatError,
    VauKeyVerificationError,
)
from safehold.vau.kyber import KyberPrivateKey, KyberPublicKey, Variant

__all__ = ["SignedPublicVauKeys", "VauKeyTrust", "VauPublicKeys", "VauServerKeys"]


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
