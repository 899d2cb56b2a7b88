"""Keys and certificates for VAU tests: a test CA issuing the E-Rezept VAU certificate (with an OCSP
response), and the lib-vau ePA 3 server keys with their AUT-VAU signing key and certificate."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from safehold.vau.epa_keys import SignedPublicVauKeys, VauServerKeys

from .shared import vau_vector

#: A moment inside the lib-vau test certificate's validity (2023-11-04 .. 2024-11-03).
LIBVAU_NOW = 1_711_500_000


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Safehold TEST-ONLY"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class ErpVauIdentity:
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes
    ocsp_der: bytes


def erp_vau_identity(key: ec.EllipticCurvePrivateKey | None = None) -> ErpVauIdentity:
    """A brainpoolP256r1 VAU key with a C.FD.ENC-like certificate from a test CA, and a GOOD OCSP response."""
    key = key or ec.generate_private_key(ec.BrainpoolP256R1())
    ca_key = ec.generate_private_key(ec.BrainpoolP256R1())
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Test Komponenten-CA"))
        .issuer_name(_name("Test Komponenten-CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("erp-vau TEST-ONLY"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )
    resp = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=ca,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now,
            next_update=now + dt.timedelta(hours=24),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
        .sign(ca_key, hashes.SHA256())
    )
    return ErpVauIdentity(
        key, cert.public_bytes(serialization.Encoding.DER), resp.public_bytes(serialization.Encoding.DER)
    )


def libvau_server_keys() -> VauServerKeys:
    return VauServerKeys.from_cbor(vau_vector("lib-vau/vau_server_keys.cbor"))


def libvau_signer() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = serialization.load_der_private_key(vau_vector("lib-vau/vau-sig-key.der"), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, vau_vector("lib-vau/vau_sig_cert.der")


def libvau_signed_keys(
    keys: VauServerKeys,
    *,
    iat: int = LIBVAU_NOW - 3600,
    exp: int = LIBVAU_NOW + 6 * 86400,
) -> SignedPublicVauKeys:
    key, cert = libvau_signer()
    return SignedPublicVauKeys.sign(keys.public(iat=iat, exp=exp, comment="Safehold test"), key, cert)
