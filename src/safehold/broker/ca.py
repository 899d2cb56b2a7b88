"""The broker's workload CA: a root created at first start, leaf certificates for attested keys.

Root: ECDSA P-384, self-signed, 10 years, ``BasicConstraints(ca=True, path_length=0)``,
``KeyUsage(keyCertSign, cRLSign)`` (RFC 5280 §4.2.1.9, §4.2.1.3). Leaves: the workload's own
public key (the one it attested as ``tee-pubkey``), SubjectAltNames from the manifest, the
validity the manifest gives, EKU serverAuth + clientAuth (+ the attested-workload key purpose
that lets the anchor members accept it as a ledger writer: only for attested keys), SKI/AKI, and
optionally the
workload's RA-TLS Evidence extension (OID 2.23.133.5.4.9, non-critical) or Gramine's legacy
raw-quote extension copied in verbatim, so one certificate proves both CA issuance and Evidence.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safehold.broker.errors import CertificateRequestError
from safehold.errors import BrokerError
from safehold.freshness.anchor.core import ATTESTED_WORKLOAD_EKU

#: Extensions a workload may ask to have copied into its leaf: the interoperable RA-TLS
#: Evidence extension and Gramine's legacy SGX quote extension.
ALLOWED_EXTENSION_OIDS = ("2.23.133.5.4.9", "1.2.840.113741.1.13.1.0")
MAX_EXTENSION_BYTES = 64 * 1024
_ROOT_VALIDITY = timedelta(days=3650)


@dataclass
class WorkloadCA:
    """The root key and certificate.

    Attributes:
        key: ECDSA P-384 private key. cert: the self-signed root.
    """

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, name: str) -> WorkloadCA:
        """Create a new root CA named ``Safehold workload CA (<name>)``."""
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Safehold"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Safehold workload CA ({name})"),
        ])
        now = datetime.now(UTC) - timedelta(minutes=5)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    def to_pem(self) -> bytes:
        """Private key (PKCS#8) and certificate, PEM, concatenated (stored encrypted only)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ) + self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def from_pem(cls, data: bytes) -> WorkloadCA:
        """Inverse of :meth:`to_pem`. Raises BrokerError on malformed input."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
            cert = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE"):])
        except ValueError as e:
            raise BrokerError(f"stored workload CA is malformed: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise BrokerError("stored workload CA key is not ECDSA")
        return cls(key, cert)

    def cert_pem(self) -> str:
        """The root certificate, PEM text."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def issue(self, public_key: object, *, common_name: str, dns_names: tuple[str, ...] = (),
              ip_addresses: tuple[str, ...] = (), validity_days: int = 30,
              extensions: Sequence[tuple[str, bytes]] = (), client_only: bool = False,
              attested: bool = False) -> x509.Certificate:
        """Issue a leaf certificate (RFC 5280) for ``public_key``.

        Args:
            public_key: an EC (P-256/P-384), Ed25519 or RSA (>= 2048 bit) public key object.
            common_name: subject CN (the workload or user name).
            dns_names / ip_addresses: SubjectAltName entries.
            validity_days: lifetime in days from now (minus 5 minutes of clock-skew slack).
            extensions: ``(dotted OID, DER extnValue)`` pairs from :data:`ALLOWED_EXTENSION_OIDS`,
                added non-critical.
            client_only: EKU clientAuth only (user certificates).
            attested: add the key purpose
                :data:`~safehold.freshness.anchor.core.ATTESTED_WORKLOAD_EKU` — only for a key the
                broker appraised (KBS issuance) or generated in its own TEE (its ledger
                certificate): with it, the CN writes that workload's freshness ledger.

        Raises:
            CertificateRequestError: unsupported key type, or an extension that is not allowed
                or too large.
        """
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < 2048:
                raise CertificateRequestError("RSA keys for certificates must be >= 2048 bits")
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name not in ("secp256r1", "secp384r1"):
                raise CertificateRequestError(f"unsupported EC curve {public_key.curve.name}")
        elif not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise CertificateRequestError(f"unsupported public key type {type(public_key).__name__}")
        now = datetime.now(UTC) - timedelta(minutes=5)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_only else [
            ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if attested:
            eku.append(ATTESTED_WORKLOAD_EKU)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Safehold workload"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, not isinstance(public_key, ec.EllipticCurvePublicKey
                                                                     | ed25519.Ed25519PublicKey),
                                         False, isinstance(public_key, ec.EllipticCurvePublicKey),
                                         False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        seen = set()
        for oid, value in extensions:
            if oid not in ALLOWED_EXTENSION_OIDS:
                raise CertificateRequestError(
                    f"extension {oid} is not allowed; allowed: {list(ALLOWED_EXTENSION_OIDS)}"
                )
            if oid in seen:
                raise CertificateRequestError(f"extension {oid} given twice")
            if len(value) > MAX_EXTENSION_BYTES:
                raise CertificateRequestError(f"extension {oid} is larger than {MAX_EXTENSION_BYTES} bytes")
            seen.add(oid)
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
        return b.sign(self.key, hashes.SHA384())
