"""A FAKE AMD key hierarchy (ARK → ASK → VCEK) that stands in for SEV-SNP hardware, which cannot
exist on this machine: it signs report bodies the tests build from the real samples."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, pub, key, *, exts=(), ca: bool = False) -> x509.Certificate:
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(pub).serial_number(x509.random_serial_number())
         .not_valid_before(t0).not_valid_after(t0 + timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for oid, val in exts:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), val), critical=False)
    if isinstance(key, rsa.RSAPrivateKey):
        return b.sign(key, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 48))
    return b.sign(key, hashes.SHA384())


@dataclass
class FakeAmdHardware:
    """A FAKE AMD ARK → ASK → VCEK chain standing in for SEV-SNP hardware: it signs reports the
    way the AMD Secure Processor does. Only a test pin (``pin``) makes a Verifier trust it."""

    ark: x509.Certificate
    ask: x509.Certificate
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey

    def vcek_for(self, tcb: dict[str, int], hwid: bytes) -> tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey]:
        from safehold.attestation.verifiers import sev_snp

        key = ec.generate_private_key(ec.SECP384R1())
        exts = [(sev_snp.TCB_OIDS[k], bytes([2, 1, v])) for k, v in tcb.items()]
        exts.append((sev_snp.OID_HWID, hwid))
        return _cert("SEV-VCEK", "SEV-Milan", key.public_key(), self.ask_key, exts=exts), key

    @staticmethod
    def sign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
        """Re-sign bytes 0x000-0x29F as the Secure Processor would (r, s little-endian, 72 B)."""
        r, s = decode_dss_signature(key.sign(report[:0x2A0], ec.ECDSA(hashes.SHA384())))
        return report[:0x2A0] + r.to_bytes(72, "little") + s.to_bytes(72, "little") + report[0x2A0 + 144:]

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark))

    def pin(self, monkeypatch) -> None:
        """Trust this fake ARK as Milan's, for one test (the packaged AMD roots stay pinned otherwise)."""
        from safehold.attestation.verifiers import sev_snp

        spki = self.ark.public_key().public_bytes(*sev_snp._SPKI)
        monkeypatch.setattr(sev_snp, "pinned_arks", lambda: {spki: "milan"})


def make_fake_amd_hardware() -> FakeAmdHardware:
    """A fresh FAKE ARK → ASK pair (RSA-PSS, like AMD's); VCEKs come from :meth:`FakeAmdHardware.vcek_for`."""
    ark_k = rsa.generate_private_key(65537, 2048)
    ask_k = rsa.generate_private_key(65537, 2048)
    ark = _cert("ARK-Milan", "ARK-Milan", ark_k.public_key(), ark_k, ca=True)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_k.public_key(), ark_k, ca=True)
    return FakeAmdHardware(ark, ask, ark_k, ask_k)
