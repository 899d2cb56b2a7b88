"""RA-TLS certificates: X.509 certificates that carry Evidence bound to their own public key.

Format (interoperable with Gramine >= 1.8 RA-TLS, and the TCG DICE "tagged evidence"):

* Extension OID ``2.23.133.5.4.9`` (tcg-dice-conceptual-message-wrapper), **non-critical**;
  its extnValue holds CBOR (RFC 8949): ``tag(T, [evidence: bstr, claims: bstr])``.
* ``claims`` = serialised CBOR map ``{"pubkey-hash": bstr(serialised CBOR array
  [hash-alg-id: uint, hash: bstr]), ? "nonce": bstr}`` — the hash is over the certificate's
  DER SubjectPublicKeyInfo; hash-alg-id from the IANA Named Information Hash Algorithm
  registry (1 = SHA-256, 7 = SHA-384, 8 = SHA-512). A directly embedded array (not wrapped
  in a bstr) is also read.
* The Evidence's report_data = SHA-256(``claims`` bytes) zero-padded to 64 bytes.
* Tags: ``60000`` (:data:`TAG_INTEL_TEE_QUOTE`, IANA "Intel TEE quote") — ``evidence`` is a
  raw SGX or TDX DCAP quote, exactly as Gramine writes it; :data:`TAG_SAFEHOLD_CMW` —
  ``evidence`` is a CMW (draft-ietf-rats-msg-wrap, JSON record or collection, see
  ``safehold.attestation.evidence``), used for every other Evidence type (simulated, SEV-SNP,
  Azure, TPM) and for quotes that travel with Endorsements. This tag is Safehold's own
  (unregistered, first-come-first-served range) and documented in docs/attestation.md.

Legacy Gramine RA-TLS (before 1.8) put the raw SGX quote into a non-standard extension whose
OID bytes were mistakenly encoded with their DER tag and length; read as an OID that is
:data:`OID_GRAMINE_LEGACY_QUOTE` (``0.6.9.42.840.113741.1337.6``). The intended OID
``1.2.840.113741.1337.6`` is read too. There, report_data[0:32] = SHA-256(DER
SubjectPublicKeyInfo) and report_data[32:64] = 0.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.attestation.attesters.base import REPORT_DATA_LEN, Attester
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.errors import EvidenceFormatError
from safehold.ratls.errors import (
    CertificateFormatError,
    ClaimsFormatError,
    EvidenceExtensionError,
    KeyBindingError,
    MissingEvidenceError,
    UnknownEvidenceTagError,
)

OID_TCG_DICE_TAGGED_EVIDENCE = x509.ObjectIdentifier("2.23.133.5.4.9")
OID_GRAMINE_LEGACY_QUOTE = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
OID_INTEL_LEGACY_QUOTE = x509.ObjectIdentifier("1.2.840.113741.1337.6")
TAG_INTEL_TEE_QUOTE = 60000
#: Safehold's tag for "CMW-wrapped Evidence" (0x53484C44, ASCII "SHLD").
TAG_SAFEHOLD_CMW = 0x53484C44
CLAIM_PUBKEY_HASH = "pubkey-hash"
CLAIM_NONCE = "nonce"
#: IANA Named Information Hash Algorithm Registry ids.
HASH_ALGS = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}
MAX_EXTENSION_BYTES = 512 * 1024
MAX_NONCE_BYTES = 64


@dataclass(frozen=True)
class RATLSEvidence:
    """What an RA-TLS certificate carries.

    Attributes:
        evidence: the Evidence (media type from the tag / CMW).
        claims_bytes: the serialised claims map (None for the legacy extension).
        pubkey_hash_alg: IANA hash id of ``pubkey_hash``.
        pubkey_hash: hash of the DER SubjectPublicKeyInfo the Evidence is bound to.
        nonce: optional freshness nonce from the claims.
        legacy: True for Gramine's legacy raw-quote extension.
        tag: the CBOR tag (None for legacy).
    """

    evidence: Evidence
    claims_bytes: bytes | None
    pubkey_hash_alg: int
    pubkey_hash: bytes
    nonce: bytes | None = None
    legacy: bool = False
    tag: int | None = None

    def expected_report_data(self) -> bytes:
        """The 64 bytes the Evidence's report_data must equal for this binding."""
        if self.claims_bytes is None:
            return self.pubkey_hash + bytes(REPORT_DATA_LEN - len(self.pubkey_hash))
        return hashlib.sha256(self.claims_bytes).digest() + bytes(32)


@dataclass(frozen=True)
class RATLSIdentity:
    """A TLS identity whose certificate carries Evidence for its key.

    Attributes:
        private_key: ECDSA P-384 key generated inside the TEE; never leaves it.
        certificate: the self-signed RA-TLS certificate.
        evidence: the Evidence inside the certificate.
    """

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate
    evidence: Evidence = field(repr=False)

    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        """The certificate, DER."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (write only to 0600 files inside the TEE)."""
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


def spki_der(key: ec.EllipticCurvePublicKey | x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo (RFC 5280 §4.1.2.7) of a key or certificate."""
    pub = key.public_key() if isinstance(key, x509.Certificate) else key
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def encode_claims(spki: bytes, *, nonce: bytes | None = None, hash_alg: int = 1) -> bytes:
    """Serialise the RA-TLS claims map for ``spki`` (Gramine layout, deterministic CBOR).

    Raises:
        ValueError: unknown ``hash_alg`` or a nonce over :data:`MAX_NONCE_BYTES`.
    """
    if hash_alg not in HASH_ALGS:
        raise ValueError(f"hash_alg must be one of {sorted(HASH_ALGS)}, got {hash_alg}")
    entry = cbor2.dumps([hash_alg, HASH_ALGS[hash_alg](spki).digest()])
    claims: dict[str, bytes] = {CLAIM_PUBKEY_HASH: entry}
    if nonce is not None:
        if not 0 < len(nonce) <= MAX_NONCE_BYTES:
            raise ValueError(f"nonce must be 1..{MAX_NONCE_BYTES} bytes, got {len(nonce)}")
        claims[CLAIM_NONCE] = bytes(nonce)
    return cbor2.dumps(claims, canonical=True)


def encode_extension(evidence: Evidence, claims: bytes) -> bytes:
    """CBOR ``tag(T, [evidence, claims])`` for the 2.23.133.5.4.9 extension (see module doc)."""
    if evidence.media_type in (MEDIA_TYPES["sgx"], MEDIA_TYPES["tdx"]) and not evidence.endorsements:
        return cbor2.dumps(cbor2.CBORTag(TAG_INTEL_TEE_QUOTE, [evidence.data, claims]))
    return cbor2.dumps(cbor2.CBORTag(TAG_SAFEHOLD_CMW, [evidence.to_cmw().encode("utf-8"), claims]))


def create_identity(attester: Attester, *, common_name: str = "safehold RA-TLS",
                    hostnames: Iterable[str] = ("localhost",),
                    ip_addresses: Iterable[str] = ("127.0.0.1",), nonce: bytes | None = None,
                    validity: timedelta = timedelta(days=1),
                    hash_alg: int = 1) -> RATLSIdentity:
    """Generate a key inside the TEE and a self-signed RA-TLS certificate carrying its Evidence.

    Args:
        attester: the TEE's Attester (simulated, gramine, tsm).
        common_name / hostnames / ip_addresses: subject CN and SubjectAltName entries.
        nonce: optional freshness nonce placed in the claims.
        validity: certificate lifetime (Evidence is fresh at issue time only).
        hash_alg: IANA hash id for ``pubkey-hash`` (1 = SHA-256, Gramine's default).

    Raises:
        AttestationError: the Attester failed.
        ValueError: bad nonce, hash_alg or address.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    claims = encode_claims(spki_der(key.public_key()), nonce=nonce, hash_alg=hash_alg)
    report_data = hashlib.sha256(claims).digest() + bytes(32)
    evidence = attester.attest(report_data)
    ext = encode_extension(evidence, claims)
    now = datetime.now(UTC) - timedelta(minutes=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.UnrecognizedExtension(OID_TCG_DICE_TAGGED_EVIDENCE, ext), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA384())
    return RATLSIdentity(key, cert, evidence)


# --- parsing ----------------------------------------------------------------------------------


def load_certificate(cert: bytes | x509.Certificate) -> x509.Certificate:
    """Load a DER or PEM certificate.

    Raises:
        CertificateFormatError: not an X.509 certificate.
    """
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, bytes | bytearray) or not cert:
        raise CertificateFormatError("peer certificate is empty")
    try:
        if bytes(cert).lstrip().startswith(b"-----BEGIN"):
            c = x509.load_pem_x509_certificate(bytes(cert))
        else:
            c = x509.load_der_x509_certificate(bytes(cert))
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as e:
        raise CertificateFormatError(f"peer certificate is not X.509: {e}") from None
    try:
        # Parse lazily-decoded parts now, so a malformed key or date fails here, typed.
        c.public_key()
        c.not_valid_before_utc, c.not_valid_after_utc  # noqa: B018
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateFormatError(f"peer certificate key or validity is malformed: {e}") from None
    return c


def _cbor_one(data: bytes, what: str) -> object:
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError, LookupError, EOFError) as e:
        raise EvidenceExtensionError(f"{what} is not valid CBOR: {type(e).__name__}") from None
    if fp.tell() != len(data):
        raise EvidenceExtensionError(f"{what} has {len(data) - fp.tell()} trailing bytes")
    return obj


def quote_media_type(quote: bytes) -> str:
    """SGX or TDX media type of a raw Intel DCAP quote, from its header (Intel DCAP Quote
    Library spec, Quote Header: version u16 at 0, TEE type u32 at 4: 0 = SGX, 0x81 = TDX).

    Raises:
        EvidenceFormatError: too short or an unknown version / TEE type.
    """
    if len(quote) < 48:
        raise EvidenceFormatError(f"Intel quote is {len(quote)} bytes, shorter than its 48-byte header")
    version = int.from_bytes(quote[0:2], "little")
    tee = int.from_bytes(quote[4:8], "little")
    if version == 3:
        return MEDIA_TYPES["sgx"]
    if version in (4, 5):
        if tee == 0:
            return MEDIA_TYPES["sgx"]
        if tee == 0x81:
            return MEDIA_TYPES["tdx"]
    raise EvidenceFormatError(f"Intel quote: unknown version {version} / TEE type {tee:#x}")


def parse_claims(claims_bytes: bytes) -> tuple[int, bytes, bytes | None]:
    """Parse the serialised claims map → ``(hash_alg, pubkey_hash, nonce)``.

    Raises:
        ClaimsFormatError: not a CBOR map, missing/garbled ``pubkey-hash``, unknown hash
            algorithm, wrong hash length, or a bad ``nonce``.
    """
    try:
        m = _cbor_one(claims_bytes, "RA-TLS claims")
    except EvidenceExtensionError as e:
        raise ClaimsFormatError(str(e)) from None
    if not isinstance(m, dict):
        raise ClaimsFormatError(f"RA-TLS claims: expected a CBOR map, got {type(m).__name__}")
    if CLAIM_PUBKEY_HASH not in m:
        raise ClaimsFormatError("RA-TLS claims lack 'pubkey-hash'")
    entry = m[CLAIM_PUBKEY_HASH]
    if isinstance(entry, bytes):
        try:
            entry = _cbor_one(entry, "RA-TLS pubkey-hash")
        except EvidenceExtensionError as e:
            raise ClaimsFormatError(str(e)) from None
    if (not isinstance(entry, list | tuple) or len(entry) != 2 or not isinstance(entry[0], int)
            or isinstance(entry[0], bool) or not isinstance(entry[1], bytes)):
        raise ClaimsFormatError("RA-TLS pubkey-hash: expected [hash-alg-id, hash bytes]")
    alg, digest = entry
    if alg not in HASH_ALGS:
        raise ClaimsFormatError(f"RA-TLS pubkey-hash: hash algorithm id expected one of "
                                f"{sorted(HASH_ALGS)}, got {alg}")
    if len(digest) != HASH_ALGS[alg]().digest_size:
        raise ClaimsFormatError(f"RA-TLS pubkey-hash: {len(digest)} bytes for algorithm {alg}")
    nonce = m.get(CLAIM_NONCE)
    if nonce is not None and (not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_NONCE_BYTES):
        raise ClaimsFormatError(f"RA-TLS nonce: expected 1..{MAX_NONCE_BYTES} bytes")
    return alg, digest, nonce


def parse_extension(value: bytes) -> RATLSEvidence:
    """Parse the 2.23.133.5.4.9 extension value.

    Raises:
        EvidenceExtensionError: not CBOR / not ``tag([bstr, bstr])``.
        UnknownEvidenceTagError: a tag other than 60000 or :data:`TAG_SAFEHOLD_CMW`.
        ClaimsFormatError: malformed claims.
        EvidenceFormatError: malformed quote header or CMW.
    """
    if not isinstance(value, bytes | bytearray) or not value:
        raise EvidenceExtensionError("RA-TLS Evidence extension is empty")
    if len(value) > MAX_EXTENSION_BYTES:
        raise EvidenceExtensionError(f"RA-TLS Evidence extension is {len(value)} bytes, over the limit")
    obj = _cbor_one(bytes(value), "RA-TLS Evidence extension")
    if not isinstance(obj, cbor2.CBORTag):
        raise UnknownEvidenceTagError(
            f"RA-TLS Evidence extension: expected a CBOR tag, got {type(obj).__name__}")
    if obj.tag not in (TAG_INTEL_TEE_QUOTE, TAG_SAFEHOLD_CMW):
        raise UnknownEvidenceTagError(
            f"RA-TLS Evidence CBOR tag: expected {TAG_INTEL_TEE_QUOTE} (Intel TEE quote) or "
            f"{TAG_SAFEHOLD_CMW} (Safehold CMW), got {obj.tag}")
    arr = obj.value
    if (not isinstance(arr, list | tuple) or len(arr) != 2 or not isinstance(arr[0], bytes)
            or not isinstance(arr[1], bytes) or not arr[0]):
        raise EvidenceExtensionError("RA-TLS Evidence: expected [evidence bstr, claims bstr]")
    ev_bytes, claims_bytes = arr
    alg, digest, nonce = parse_claims(claims_bytes)
    if obj.tag == TAG_INTEL_TEE_QUOTE:
        evidence = Evidence(quote_media_type(ev_bytes), ev_bytes)
    else:
        evidence = Evidence.from_cmw(ev_bytes)
    return RATLSEvidence(evidence, claims_bytes, alg, digest, nonce, False, obj.tag)


def parse_certificate(cert: bytes | x509.Certificate) -> RATLSEvidence:
    """Extract the RA-TLS Evidence from a certificate (standard extension first, then legacy).

    Raises:
        CertificateFormatError: not X.509.
        MissingEvidenceError: neither extension present.
        EvidenceExtensionError / UnknownEvidenceTagError / ClaimsFormatError /
            EvidenceFormatError: malformed contents.
    """
    c = load_certificate(cert)
    try:
        exts = {e.oid: e for e in c.extensions}
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise CertificateFormatError(f"peer certificate extensions are malformed: {e}") from None
    ext = exts.get(OID_TCG_DICE_TAGGED_EVIDENCE)
    if ext is not None:
        return parse_extension(_ext_bytes(ext))
    for oid in (OID_GRAMINE_LEGACY_QUOTE, OID_INTEL_LEGACY_QUOTE):
        legacy = exts.get(oid)
        if legacy is not None:
            quote = _ext_bytes(legacy)
            ev = Evidence(quote_media_type(quote), quote)
            # Legacy binding: report_data[0:32] = SHA-256(SPKI); the Verifier checks all 64 B.
            return RATLSEvidence(ev, None, 1, hashlib.sha256(spki_der(c)).digest(), None, True)
    raise MissingEvidenceError(
        "peer certificate has no RA-TLS Evidence extension (OID 2.23.133.5.4.9 or Gramine's "
        "legacy quote OID): it is a plain TLS certificate, not an attested one"
    )


def _ext_bytes(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    val = ext.value
    if isinstance(val, x509.UnrecognizedExtension):
        return val.value
    raise EvidenceExtensionError(f"extension {ext.oid.dotted_string} has an unexpected type")


def check_key_binding(cert: x509.Certificate, rat: RATLSEvidence) -> None:
    """Check that the claims' ``pubkey-hash`` is the hash of this certificate's key.

    Raises:
        KeyBindingError: the Evidence names another key — it was relayed from another TEE.
    """
    got = HASH_ALGS[rat.pubkey_hash_alg](spki_der(cert)).digest()
    if not hmac.compare_digest(got, rat.pubkey_hash):
        raise KeyBindingError(
            f"RA-TLS pubkey-hash: expected {got.hex()} (hash of this certificate's key), got "
            f"{rat.pubkey_hash.hex()} — the Evidence is bound to another key (relayed Evidence)"
        )
