"""TPM 2.0 quote verifier: TPMS_ATTEST + signature + PCR values against a trusted AK.

Structures: TCG "TPM 2.0 Library, Part 2: Structures" — §10.12.12 TPMS_ATTEST (magic
TPM_GENERATED_VALUE 0xff544347, type TPM_ST_ATTEST_QUOTE 0x8018), §10.12.1 TPMS_QUOTE_INFO,
§10.9.7 TPML_PCR_SELECTION, §11.3.4 TPMT_SIGNATURE, §12.2.4 TPMT_PUBLIC. All integers are
big-endian.

Evidence: ``data`` = the TPMS_ATTEST bytes. Endorsements:

* ``signature``: a TPMT_SIGNATURE (RSASSA / RSAPSS / ECDSA) or a raw RSASSA-PKCS1-v1_5
  signature as long as the AK modulus (Azure vTPM ``tpm2_quote`` output);
* ``ak_pub``: the AK public key as TPMT_PUBLIC, PEM or DER SubjectPublicKeyInfo (the quote's
  qualifiedSigner is the AK's *qualified* name, which depends on its hierarchy, so it is
  reported in ``raw`` but not compared);
* ``pcrs``: JSON ``{"<bank>": {"<index>": "<hex>"}}`` (bank = sha1/sha256/sha384/sha512);
* optional ``ak_cert`` (DER/PEM) and ``ak_chain`` (PEM intermediates) to anchor the AK in a
  configured CA (e.g. Google's vTPM AK CA).

The pcrDigest is the hash (the signature scheme's hash) of the selected PCR values
concatenated in selection order; every selected PCR must be supplied and match. The AK must
be trusted: listed in ``trusted_aks``, certified by ``ak_roots``, or bound by a caller that
verified it otherwise (e.g. the Azure HCL report, :mod:`.azure`). AK certificate chains are
validated per RFC 5280 §6.1 with cryptography's ``x509.verification``: every issuer must be a
CA (BasicConstraints cA, KeyUsage keyCertSign, pathLenConstraint respected), every
certificate valid at the verification time, and the AK certificate itself not a CA — a TPM AK
can sign a TBSCertificate, so an AK certificate must never act as an issuer.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from safehold.attestation.certs import load_certificates
from safehold.attestation.claims import Claims
from safehold.attestation.collateral import check_validity, require_aware
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
#: TPM_ALG_ID → (name, digest size, hashlib name, cryptography hash class)
HASH_ALGS: dict[int, tuple[str, int, type[hashes.HashAlgorithm]]] = {
    0x0004: ("sha1", 20, hashes.SHA1),
    0x000B: ("sha256", 32, hashes.SHA256),
    0x000C: ("sha384", 48, hashes.SHA384),
    0x000D: ("sha512", 64, hashes.SHA512),
}
BANK_IDS = {name: alg for alg, (name, _, _) in HASH_ALGS.items()}
TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA = 0x0014, 0x0016, 0x0018
TPM_ALG_RSA, TPM_ALG_ECC, TPM_ALG_NULL = 0x0001, 0x0023, 0x0010
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class _Buf:
    __slots__ = ("b", "p", "what")

    def __init__(self, b: bytes, what: str):
        self.b, self.p, self.what = b, 0, what

    def take(self, n: int, field: str) -> bytes:
        if self.p + n > len(self.b):
            raise EvidenceFormatError(f"{self.what} truncated at {field} (offset {self.p})")
        out = self.b[self.p : self.p + n]
        self.p += n
        return out

    def u8(self, f: str) -> int:
        return self.take(1, f)[0]

    def u16(self, f: str) -> int:
        return int(struct.unpack(">H", self.take(2, f))[0])

    def u32(self, f: str) -> int:
        return int(struct.unpack(">I", self.take(4, f))[0])

    def u64(self, f: str) -> int:
        return int(struct.unpack(">Q", self.take(8, f))[0])

    def tpm2b(self, f: str) -> bytes:
        return self.take(self.u16(f + ".size"), f)

    def done(self) -> None:
        if self.p != len(self.b):
            raise EvidenceFormatError(f"{self.what}: {len(self.b) - self.p} unexpected trailing bytes")


@dataclass(frozen=True)
class TpmQuote:
    """A parsed TPMS_ATTEST of type quote (TPM 2.0 Part 2 §10.12.12)."""

    raw: bytes
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: tuple[tuple[int, tuple[int, ...]], ...]  # (hash alg id, PCR indices)
    pcr_digest: bytes


def parse_tpms_attest(data: bytes) -> TpmQuote:
    """Parse a TPMS_ATTEST quote structure exactly (no trailing bytes).

    Raises:
        EvidenceFormatError: wrong magic/type, unknown hash algorithm, truncation.
    """
    b = _Buf(bytes(data), "TPMS_ATTEST")
    if b.u32("magic") != TPM_GENERATED_VALUE:
        raise EvidenceFormatError("TPMS_ATTEST magic: expected TPM_GENERATED_VALUE 0xff544347")
    st = b.u16("type")
    if st != TPM_ST_ATTEST_QUOTE:
        raise EvidenceFormatError(f"TPMS_ATTEST type: expected TPM_ST_ATTEST_QUOTE 0x8018, got {st:#06x}")
    signer = b.tpm2b("qualifiedSigner")
    extra = b.tpm2b("extraData")
    if len(extra) > 64:
        raise EvidenceFormatError(f"TPMS_ATTEST extraData: at most 64 bytes, got {len(extra)}")
    clock, reset, restart, safe = b.u64("clock"), b.u32("resetCount"), b.u32("restartCount"), b.u8("safe")
    if safe > 1:
        raise EvidenceFormatError("TPMS_CLOCK_INFO.safe must be 0 or 1")
    fw = b.u64("firmwareVersion")
    sel = []
    for i in range(b.u32("pcrSelect.count")):
        alg = b.u16(f"pcrSelect[{i}].hash")
        if alg not in HASH_ALGS:
            raise EvidenceFormatError(f"TPML_PCR_SELECTION: unknown hash algorithm {alg:#06x}")
        bitmap = b.take(b.u8(f"pcrSelect[{i}].sizeofSelect"), f"pcrSelect[{i}].pcrSelect")
        idx = tuple(n * 8 + k for n, byte in enumerate(bitmap) for k in range(8) if byte >> k & 1)
        sel.append((alg, idx))
    digest = b.tpm2b("pcrDigest")
    b.done()
    return TpmQuote(bytes(data), signer, extra, clock, reset, restart, bool(safe), fw, tuple(sel), digest)


@dataclass(frozen=True)
class AkPublic:
    """An attestation key: the public key and, if known, its TPM name (nameAlg ‖ H(TPMT_PUBLIC))."""

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    name: bytes | None = None

    @property
    def spki(self) -> bytes:
        return self.key.public_bytes(*_SPKI)


def parse_tpmt_public(blob: bytes) -> AkPublic:
    """Parse an RSA TPMT_PUBLIC (Part 2 §12.2.4) into a key and its TPM name.

    Raises:
        EndorsementError: not an RSA TPMT_PUBLIC or trailing bytes.
    """
    try:
        b = _Buf(blob, "TPMT_PUBLIC")
        typ, name_alg = b.u16("type"), b.u16("nameAlg")
        b.u32("objectAttributes")
        b.tpm2b("authPolicy")
        if typ != TPM_ALG_RSA:
            raise EndorsementError(f"TPMT_PUBLIC type {typ:#06x}: only RSA AKs are supported")
        if b.u16("symmetric") != TPM_ALG_NULL:
            b.u16("symmetric.keyBits")
            b.u16("symmetric.mode")
        if b.u16("scheme") != TPM_ALG_NULL:
            b.u16("scheme.hash")
        b.u16("keyBits")
        exp = b.u32("exponent") or 65537
        n = int.from_bytes(b.tpm2b("unique"), "big")
        b.done()
    except EvidenceFormatError as e:
        raise EndorsementError(f"ak_pub: {e}") from None
    if name_alg not in HASH_ALGS:
        raise EndorsementError(f"TPMT_PUBLIC nameAlg {name_alg:#06x} unsupported")
    h = hashes.Hash(HASH_ALGS[name_alg][2]())
    h.update(blob)
    try:
        key = rsa.RSAPublicNumbers(exp, n).public_key()
    except ValueError:
        raise EndorsementError("TPMT_PUBLIC holds an invalid RSA key") from None
    return AkPublic(key, struct.pack(">H", name_alg) + h.finalize())


def load_ak(blob: bytes) -> AkPublic:
    """Load an AK from TPMT_PUBLIC, PEM or DER SubjectPublicKeyInfo.

    Raises:
        EndorsementError: none of those formats, or not an RSA/EC key.
    """
    blob = bytes(blob)
    try:
        if blob.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(blob)
        else:
            key = serialization.load_der_public_key(blob)
    except ValueError:
        return parse_tpmt_public(blob)
    except UnsupportedAlgorithm as e:  # a SubjectPublicKeyInfo with an unknown algorithm or curve
        raise EndorsementError(f"ak_pub: unsupported key algorithm ({e})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EndorsementError("ak_pub must be an RSA or EC public key")
    return AkPublic(key)


def load_pcrs(blob: bytes | str | Mapping[str, object]) -> dict[str, dict[int, bytes]]:
    """Parse PCR values: JSON ``{"bank": {"idx": "hex"}}`` (or an already-decoded mapping).

    Raises:
        EndorsementError: not that shape, an unknown bank, or a digest of the wrong length.
    """
    try:
        obj = json.loads(blob) if isinstance(blob, bytes | str) else blob
    except ValueError:
        raise EndorsementError("pcrs is not JSON") from None
    if not isinstance(obj, Mapping):
        raise EndorsementError("pcrs must be a JSON object of banks")
    out: dict[str, dict[int, bytes]] = {}
    for bank, vals in obj.items():
        if bank not in BANK_IDS or not isinstance(vals, Mapping):
            raise EndorsementError(f"pcrs: unknown bank {bank!r:.20}")
        size = HASH_ALGS[BANK_IDS[bank]][1]
        out[bank] = {}
        for k, v in vals.items():
            try:
                idx, val = int(k), bytes.fromhex(v)
            except (ValueError, TypeError):
                raise EndorsementError(f"pcrs[{bank}][{k!r:.10}]: bad index or hex") from None
            if not 0 <= idx < 24 or len(val) != size:
                raise EndorsementError(f"pcrs[{bank}][{idx}]: expected a {size}-byte PCR 0-23")
            out[bank][idx] = val
    return out


def parse_signature(blob: bytes, ak: AkPublic) -> tuple[int, int, bytes]:
    """Return (sigAlg, hashAlg, signature bytes as cryptography expects them).

    Accepts a TPMT_SIGNATURE, or raw RSASSA bytes whose length is the AK modulus length.

    Raises:
        EvidenceFormatError: malformed or unsupported signature structure.
    """
    blob = bytes(blob)
    if isinstance(ak.key, rsa.RSAPublicKey) and len(blob) == ak.key.key_size // 8:
        return TPM_ALG_RSASSA, 0x000B, blob
    b = _Buf(blob, "TPMT_SIGNATURE")
    alg, h = b.u16("sigAlg"), b.u16("hash")
    if h not in HASH_ALGS:
        raise EvidenceFormatError(f"TPMT_SIGNATURE hash {h:#06x} unsupported")
    if alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        sig = b.tpm2b("signature")
    elif alg == TPM_ALG_ECDSA:
        r, s = b.tpm2b("signatureR"), b.tpm2b("signatureS")
        sig = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    else:
        raise EvidenceFormatError(f"TPMT_SIGNATURE sigAlg {alg:#06x} unsupported")
    b.done()
    return alg, h, sig


def verify_quote(
    attest: bytes, sig_blob: bytes, ak: AkPublic, pcrs: Mapping[str, Mapping[int, bytes]]
) -> tuple[TpmQuote, dict[str, dict[str, str]], str]:
    """Verify a quote's signature under ``ak`` and its pcrDigest over ``pcrs``.

    Returns:
        (parsed quote, the selected PCRs as {bank: {index: hex}}, hash name of the scheme).

    Raises:
        EvidenceFormatError: malformed structures.
        EvidenceSignatureError: signature fails or the pcrDigest does not match the PCR values.
        EndorsementError: a selected PCR value is missing.
    """
    q = parse_tpms_attest(attest)
    alg, h, sig = parse_signature(sig_blob, ak)
    hname, _, hcls = HASH_ALGS[h]
    try:
        if alg == TPM_ALG_ECDSA:
            if not isinstance(ak.key, ec.EllipticCurvePublicKey):
                raise EvidenceSignatureError("ECDSA quote signature but the AK is RSA")
            ak.key.verify(sig, q.raw, ec.ECDSA(hcls()))
        else:
            if not isinstance(ak.key, rsa.RSAPublicKey):
                raise EvidenceSignatureError("RSA quote signature but the AK is not RSA")
            pad = (
                padding.PKCS1v15()
                if alg == TPM_ALG_RSASSA
                else padding.PSS(padding.MGF1(hcls()), padding.PSS.AUTO)
            )
            ak.key.verify(sig, q.raw, pad, hcls())
    except InvalidSignature:
        raise EvidenceSignatureError("TPM quote signature does not verify under the AK") from None
    hh = hashlib.new(hname)
    selected: dict[str, dict[str, str]] = {}
    for bank_alg, idxs in q.selection:
        bank = HASH_ALGS[bank_alg][0]
        for i in idxs:
            v = pcrs.get(bank, {}).get(i)
            if v is None:
                raise EndorsementError(f"PCR {bank}:{i} is selected by the quote but was not supplied")
            hh.update(v)
            selected.setdefault(bank, {})[str(i)] = v.hex()
    if hh.digest() != q.pcr_digest:
        raise EvidenceSignatureError(
            "TPM quote pcrDigest: expected the hash of the supplied PCR values, got another value"
        )
    return q, selected, hname


def tpm_claims(
    q: TpmQuote, selected: dict[str, dict[str, str]], hname: str, ak: AkPublic, trust: str
) -> Claims:
    """Claims for a verified quote: measurement = pcrDigest, report_data = extraData padded to 64 B."""
    raw = {
        "extra_data": q.extra_data.hex(),
        "pcr_digest": q.pcr_digest.hex(),
        "pcr_digest_alg": hname,
        "pcrs": selected,
        "clock": q.clock,
        "reset_count": q.reset_count,
        "restart_count": q.restart_count,
        "safe": q.safe,
        "firmware_version": q.firmware_version,
        "qualified_signer": q.qualified_signer.hex(),
        "ak_spki_sha256": hashlib.sha256(ak.spki).hexdigest(),
        "ak_trust": trust,
    }
    if ak.name is not None:
        raw["ak_name"] = ak.name.hex()
    return Claims(
        tee_type="tpm",
        measurement=q.pcr_digest,
        report_data=q.extra_data.ljust(64, b"\x00"),
        debug=False,
        raw=raw,
    )


class TpmQuoteVerifier:
    """Verifier plug-in for TPM 2.0 quotes (``application/vnd.tcg.tpm2.quote``).

    Args:
        trusted_aks: AK public keys (PEM/DER SPKI/TPMT_PUBLIC bytes) accepted as is.
        ak_roots: CA certificates (PEM/DER bytes) that may certify an AK via ``ak_cert``.
        ak_intermediates: further CA certificates for building the AK certificate chain.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["tpm"],)

    def __init__(
        self,
        *,
        trusted_aks: Iterable[bytes] = (),
        ak_roots: Iterable[bytes] = (),
        ak_intermediates: Iterable[bytes] = (),
    ) -> None:
        self.trusted = {load_ak(k).spki for k in trusted_aks}
        self.roots = [c for b in ak_roots for c in _certs(b)]
        self.inters = [c for b in ak_intermediates for c in _certs(b)]

    def _trust(self, ak: AkPublic, ends: Mapping[str, bytes], at: datetime) -> str:
        if ak.spki in self.trusted:
            return "trusted-key"
        if "ak_cert" in ends and self.roots:
            leaf = _certs(bytes(ends["ak_cert"]))[0]
            if leaf.public_key().public_bytes(*_SPKI) != ak.spki:
                raise EndorsementError("ak_cert certifies another key than ak_pub")
            pool = self.inters + (_certs(bytes(ends["ak_chain"])) if "ak_chain" in ends else [])
            _chain_to(leaf, pool, self.roots, at)
            return "ak-certificate"
        raise EndorsementError(
            "TPM attestation key is not trusted: not in trusted_aks and no ak_cert chaining to a "
            "configured AK CA"
        )

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify the quote (signature, AK trust, pcrDigest) at ``at``.

        Raises:
            EvidenceFormatError: malformed TPMS_ATTEST / signature, missing endorsements.
            EvidenceSignatureError: signature or pcrDigest mismatch.
            EndorsementError: untrusted AK, AK certificate chain failure, missing PCRs.
        """
        if evidence.media_type not in self.media_types:
            raise EvidenceFormatError(
                f"TpmQuoteVerifier accepts {self.media_types}, got {evidence.media_type!r}"
            )
        at = require_aware(at)
        ends = evidence.endorsements
        for need in ("signature", "ak_pub", "pcrs"):
            if need not in ends:
                raise EvidenceFormatError(f"TPM quote Evidence lacks the {need!r} endorsement")
        ak = load_ak(bytes(ends["ak_pub"]))
        trust = self._trust(ak, ends, at)
        q, selected, hname = verify_quote(
            evidence.data, bytes(ends["signature"]), ak, load_pcrs(bytes(ends["pcrs"]))
        )
        return tpm_claims(q, selected, hname, ak, trust)


def _certs(blob: bytes) -> list[x509.Certificate]:
    return load_certificates(blob, "AK certificate material", EndorsementError)


#: TCG EK / AK certificate purposes (TCG EK Credential Profile §3.2.11, tcg-kp-EKCertificate;
#: TCG Infrastructure WG, tcg-kp-AIKCertificate) and anyExtendedKeyUsage (RFC 5280 §4.2.1.12).
AK_CERT_EKUS = frozenset(
    {
        x509.ObjectIdentifier("2.23.133.8.1"),
        x509.ObjectIdentifier("2.23.133.8.3"),
        x509.ObjectIdentifier("2.5.29.37.0"),
    }
)


def _ca_key_usage(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    if not ku.key_cert_sign:
        raise ValueError("issuer KeyUsage lacks keyCertSign")


def _leaf_not_ca(_policy: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("ak_cert is a CA certificate (BasicConstraints cA = true)")


def _leaf_key_usage(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.digital_signature:
        raise ValueError("ak_cert KeyUsage lacks digitalSignature (an AK signs quotes)")


def _leaf_eku(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and not AK_CERT_EKUS.intersection(eku):
        raise ValueError("ak_cert ExtendedKeyUsage names no TCG EK/AK certificate purpose")


# RFC 5280 §6.1 path validation by cryptography's verifier (signatures, validity of every
# certificate at `at`, issuer cA, pathLenConstraint, name chaining). Its Web-PKI extension
# defaults demand TLS EKUs, so the extension policies are spelled out: every issuer needs
# BasicConstraints (cA checked by the verifier) and KeyUsage keyCertSign; the AK certificate
# must not be a CA. Other extensions are tolerated (GCE AK certificates carry a critical
# directoryName SAN and Google-specific extensions).
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
)
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _leaf_not_ca)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _leaf_key_usage)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _leaf_eku)
)


def _chain_to(
    leaf: x509.Certificate, pool: list[x509.Certificate], roots: list[x509.Certificate], at: datetime
) -> None:
    """Validate ``leaf`` → ``pool`` intermediates → one of ``roots`` at ``at`` (RFC 5280 §6.1).

    Raises:
        EndorsementError: the AK certificate is outside its validity, or no valid path exists
            (bad signature, an issuer that is not a CA or lacks keyCertSign, a violated
            pathLenConstraint, any certificate invalid at ``at``, a CA leaf, a non-TCG EKU).
    """
    check_validity("ak_cert", leaf.not_valid_before_utc, leaf.not_valid_after_utc, at)
    try:
        verifier = (
            PolicyBuilder()
            .store(Store(roots))
            .time(at)
            .max_chain_depth(6)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        verifier.verify(leaf, pool)
    except VerificationError as e:
        raise EndorsementError(f"ak_cert does not chain to a configured AK CA root: {e}") from None
