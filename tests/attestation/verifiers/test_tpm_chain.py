"""TPM AK certificate chains (RFC 5280 §6.1): only CA certificates may issue.

The attack: a TPM restricted AK can sign any TBSCertificate, so the holder of one genuine
vTPM AK certificate (an end-entity certificate under a trusted AK CA) could certify a
*software* key and sign quotes with it. Each test here builds that software AK, a quote it
signs (TPMS_ATTEST, TPM 2.0 Part 2 §10.12.12) and a certificate chain with cryptography, and
checks the Verifier plug-in accepts the well-formed chain (the control) and refuses every
forged one. The software AK stands in for a TPM, which cannot exist here.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers.tpm import TpmQuoteVerifier
from safehold.errors import EndorsementError, EndorsementExpiredError

AT = datetime(2025, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)
TCG_AK_EKU = x509.ObjectIdentifier("2.23.133.8.3")  # tcg-kp-AIKCertificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Node:
    name: str
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _cert(
    subject: str,
    pub,
    issuer: Node | None,
    signer_key,
    *,
    ca: bool | None,
    pathlen: int | None = None,
    cert_sign: bool | None = None,
    digital_signature: bool = True,
    eku: list[x509.ObjectIdentifier] | None = None,
    not_before: datetime = AT - 30 * DAY,
    not_after: datetime = AT + 30 * DAY,
) -> x509.Certificate:
    """One v3 certificate; ``ca=None`` omits BasicConstraints, ``cert_sign`` defaults to ``ca``."""
    cert_sign = bool(ca) if cert_sign is None else cert_sign
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer.cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                       critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(signer_key, hashes.SHA256())


def _ca(subject: str, issuer: Node | None = None, **kw) -> Node:
    key = ec.generate_private_key(ec.SECP256R1())
    kw.setdefault("ca", True)
    signer = key if issuer is None else issuer.key
    return Node(subject, key, _cert(subject, key.public_key(), issuer, signer, **kw))


@pytest.fixture(scope="module")
def ak() -> rsa.RSAPrivateKey:
    """The software "AK" an attacker would certify (RSA 2048, like vTPM AKs)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def root() -> Node:
    return _ca("AK CA root")


@pytest.fixture(scope="module")
def inter(root: Node) -> Node:
    return _ca("AK CA intermediate", root, pathlen=0)


def _ak_cert(ak: rsa.RSAPrivateKey, issuer: Node, **kw) -> bytes:
    kw.setdefault("ca", False)
    kw.setdefault("eku", [TCG_AK_EKU])
    c = _cert("software AK", ak.public_key(), issuer, issuer.key, **kw)
    return c.public_bytes(serialization.Encoding.DER)


def _quote(ak: rsa.RSAPrivateKey, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """(TPMS_ATTEST, raw RSASSA-SHA256 signature, pcrs JSON) over PCR 0-2 of the sha256 bank."""
    pcrs = {i: hashlib.sha256(b"pcr %d" % i).digest() for i in range(3)}
    digest = hashlib.sha256(b"".join(pcrs[i] for i in range(3))).digest()
    attest = (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", 34) + b"\x00\x0b" + bytes(32)           # qualifiedSigner
        + struct.pack(">H", len(nonce)) + nonce                     # extraData
        + struct.pack(">QIIB", 1000, 1, 0, 1)                       # TPMS_CLOCK_INFO
        + struct.pack(">Q", 0x2024)                                 # firmwareVersion
        + struct.pack(">IHB", 1, 0x000B, 3) + bytes([0b111, 0, 0])  # TPML_PCR_SELECTION
        + struct.pack(">H", 32) + digest                            # pcrDigest
    )
    sig = ak.sign(attest, padding.PKCS1v15(), hashes.SHA256())
    pj = json.dumps({"sha256": {str(i): v.hex() for i, v in pcrs.items()}}).encode()
    return attest, sig, pj


def _evidence(ak: rsa.RSAPrivateKey, ak_cert: bytes, chain: list[Node]) -> Evidence:
    attest, sig, pcrs = _quote(ak, b"nonce-42")
    pub = ak.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    ends = {"signature": sig, "ak_pub": pub, "pcrs": pcrs, "ak_cert": ak_cert}
    if chain:
        ends["ak_chain"] = b"".join(n.pem for n in chain)
    return Evidence(MEDIA_TYPES["tpm"], attest, ends)


def _verify(root: Node, ev: Evidence, at: datetime = AT):
    return TpmQuoteVerifier(ak_roots=[root.pem]).verify(ev, at=at)


def test_ak_certificate_under_a_ca_intermediate_is_accepted(ak, root, inter):
    c = _verify(root, _evidence(ak, _ak_cert(ak, inter), [inter]))
    assert c.raw["ak_trust"] == "ak-certificate" and c.raw["extra_data"] == b"nonce-42".hex()
    # the intermediate may also be configured instead of carried in the Evidence
    v = TpmQuoteVerifier(ak_roots=[root.pem], ak_intermediates=[inter.pem])
    assert v.verify(_evidence(ak, _ak_cert(ak, inter), []), at=AT).raw["ak_trust"] == "ak-certificate"
    # an AK certificate without BasicConstraints / EKU (allowed for end entities) is accepted
    bare = _ak_cert(ak, inter, ca=None, eku=None)
    assert _verify(root, _evidence(ak, bare, [inter])).raw["ak_trust"] == "ak-certificate"


@pytest.mark.parametrize("cert_sign", [False, True], ids=["ak-like-ee", "ee-with-keyCertSign"])
def test_end_entity_issuer_is_refused(ak, root, inter, cert_sign):
    """A genuine AK certificate (cA = false) "certifying" a software key: the forgery described
    in the module docstring, which the AK chain check used to accept."""
    victim = _ca("genuine vTPM AK", inter, ca=False, cert_sign=cert_sign, eku=[TCG_AK_EKU])
    ev = _evidence(ak, _ak_cert(ak, victim), [inter, victim])
    with pytest.raises(EndorsementError, match="does not chain.*basicConstraints.cA"):
        _verify(root, ev)


def test_issuer_without_basic_constraints_is_refused(ak, root):
    # pathlen-free CA intermediate, so only the missing BasicConstraints can fail
    inter = _ca("AK CA intermediate 2", root)
    nobc = _ca("no basic constraints", inter, ca=None, cert_sign=True)
    with pytest.raises(EndorsementError, match="CA certificate has no basicConstraints"):
        _verify(root, _evidence(ak, _ak_cert(ak, nobc), [inter, nobc]))


def test_issuer_without_key_cert_sign_is_refused(ak, root):
    inter = _ca("AK CA without keyCertSign", root, pathlen=0, cert_sign=False)
    with pytest.raises(EndorsementError, match="keyCertSign"):
        _verify(root, _evidence(ak, _ak_cert(ak, inter), [inter]))


def test_path_length_constraint_is_enforced(ak, root, inter):
    sub = _ca("sub-CA below a pathlen 0 CA", inter)
    with pytest.raises(EndorsementError, match="path length"):
        _verify(root, _evidence(ak, _ak_cert(ak, sub), [inter, sub]))


def test_expired_or_not_yet_valid_intermediate_and_root_are_refused(ak, root, inter):
    expired = Node(inter.name, inter.key, _cert(inter.name, inter.key.public_key(), root, root.key,
                                                ca=True, pathlen=0, not_after=AT - DAY))
    leaf = _ak_cert(ak, inter)
    with pytest.raises(EndorsementError, match="not valid at validation time"):
        _verify(root, _evidence(ak, leaf, [expired]))
    future = Node(inter.name, inter.key, _cert(inter.name, inter.key.public_key(), root, root.key,
                                               ca=True, pathlen=0, not_before=AT + DAY))
    with pytest.raises(EndorsementError, match="not valid at validation time"):
        _verify(root, _evidence(ak, leaf, [future]))
    old_root = Node(root.name, root.key, _cert(root.name, root.key.public_key(), None, root.key,
                                               ca=True, not_after=AT - DAY))
    with pytest.raises(EndorsementError, match="not valid at validation time"):
        _verify(old_root, _evidence(ak, leaf, [inter]))
    # the AK certificate itself: expired and not yet valid are told apart
    with pytest.raises(EndorsementExpiredError, match="ak_cert validity .*: expired at verification time"):
        _verify(root, _evidence(ak, _ak_cert(ak, inter, not_after=AT - DAY), [inter]))


def test_ca_leaf_and_wrong_purpose_leaf_are_refused(ak, root, inter):
    with pytest.raises(EndorsementError, match="is a CA certificate"):
        _verify(root, _evidence(ak, _ak_cert(ak, inter, ca=True), [inter]))
    tls = _ak_cert(ak, inter, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(EndorsementError, match="no TCG EK/AK certificate purpose"):
        _verify(root, _evidence(ak, tls, [inter]))
    with pytest.raises(EndorsementError, match="digitalSignature"):
        _verify(root, _evidence(ak, _ak_cert(ak, inter, digital_signature=False), [inter]))


def test_signature_by_another_key_and_untrusted_root_are_refused(ak, root, inter):
    other_root = _ca("AK CA root")  # same name, other key
    with pytest.raises(EndorsementError, match="does not chain"):
        _verify(other_root, _evidence(ak, _ak_cert(ak, inter), [inter]))
    impostor = _ca("AK CA intermediate", other_root, pathlen=0)  # same name as `inter`
    with pytest.raises(EndorsementError, match="does not chain"):
        _verify(root, _evidence(ak, _ak_cert(ak, impostor), [impostor]))
