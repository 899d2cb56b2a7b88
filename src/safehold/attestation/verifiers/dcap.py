"""Intel DCAP ECDSA quotes (SGX v3/v4, TDX v4/v5): strict layout parsing and verification.

Formats follow Intel's "SGX ECDSA Quote Library API" (quote v3, appendix A.4) and "TDX DCAP
Quoting Library API" (quote v4 §A.3, v5 §A.3.2):

```
header      48 B  version u16 | att_key_type u16 (2 = ECDSA-P256) | tee_type u32 (0 SGX, 0x81 TDX;
                  0 in v3) | qe_svn u16 | pce_svn u16 | qe_vendor_id 16 B | user_data 20 B
[v5 only]    6 B  body_type u16 (1 SGX, 2 TDX 1.0, 3 TDX 1.5) | body_size u32
body              SGX report body 384 B | TD report 1.0 584 B | TD report 1.5 648 B
sig_len      4 B  u32, length of the signature data that follows
sig data          v3: sig 64 | att_key 64 | QE report 384 | QE report sig 64 | auth_len u16 | auth
                      | cert_type u16 (5) | cert_len u32 | PEM chain
                  v4/v5: sig 64 | att_key 64 | cert_type u16 (6) | cert_len u32 | QE report 384 |
                      QE report sig 64 | auth_len u16 | auth | cert_type u16 (5) | cert_len u32 | PEM
```

What covers what: the quote signature (attestation key, ECDSA-P256/SHA-256, raw r‖s) covers
header and body; the attestation key and QE auth data are bound by SHA-256 into the QE
report's REPORTDATA; the QE report is signed by the PCK key; the PCK chain by the Intel SGX
Root CA. Everything else is structure, checked strictly here: every length field must match
exactly, cert types must be 6/5, and the PEM chain must be the canonical PEM of its
certificates followed only by NUL padding — so a flipped bit anywhere in the declared quote
is rejected. Bytes *after* the declared quote end (``sig_len``) are not part of the quote
(QGS/driver buffers are often padded): they are ignored and counted in
``raw["trailing_bytes"]``.

Cryptographic verification with collateral (quote signature, QE report, PCK chain and CRLs,
TCB info / QE identity signatures and TCB level evaluation) is done by ``dcap-qvl``, with the
Intel SGX Root CA *pinned by public key*: the packaged root is passed to dcap-qvl as its trust
anchor and the root certificate embedded in a quote must carry the same public key (older
encodings of the same root have another fingerprint but the same key).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from safehold.attestation.certs import load_certificate, load_certificates
from safehold.attestation.claims import Claims
from safehold.attestation.collateral import DcapCollateral, check_validity, load_collateral, require_aware
from safehold.attestation.evidence import Evidence
from safehold.attestation.pcs import CollateralCache
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError

#: Intel's QE vendor id (Intel DCAP quote header, qe_vendor_id).
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
HEADER_LEN = 48
SGX_BODY_LEN = 384
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
_V5_BODY = {1: (TEE_SGX, SGX_BODY_LEN), 2: (TEE_TDX, TD10_BODY_LEN), 3: (TEE_TDX, TD15_BODY_LEN)}
_PEM_CERT = serialization.Encoding.PEM
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def packaged_root_der(name: str = "intel-sgx-root-ca.der") -> bytes:
    """The Intel SGX Root CA certificate shipped with Safehold (DER, from dcap-qvl)."""
    return resources.files("safehold.attestation").joinpath("roots", name).read_bytes()


def _spki_of_der(der: bytes) -> bytes:
    return load_certificate(der, "Intel root CA", EndorsementError).public_key().public_bytes(*_SPKI)


@dataclass(frozen=True)
class DcapQuote:
    """A structurally valid DCAP quote (offsets refer to :attr:`quote`).

    Attributes:
        quote: the declared quote bytes (without trailing padding).
        trailing: number of bytes after the declared end in the input (ignored).
        version: 3, 4 or 5.  tee_type: 0 (SGX) or 0x81 (TDX).  body_type: 1/2/3.
        signed: header(+v5 descriptor)+body, the bytes the quote signature covers.
        body: the SGX report body or TD report.
        signature, attestation_key: 64 B each (raw r‖s, raw X‖Y).
        qe_report (384 B), qe_report_sig (64 B), qe_auth: the QE certification data.
        pck_pem: the PEM chain bytes (without NUL padding).
    """

    quote: bytes
    trailing: int
    version: int
    tee_type: int
    body_type: int
    signed: bytes
    body: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_sig: bytes
    qe_auth: bytes
    pck_pem: bytes

    @property
    def qe_svn(self) -> int:
        return int(struct.unpack_from("<H", self.quote, 8)[0])

    @property
    def pce_svn(self) -> int:
        return int(struct.unpack_from("<H", self.quote, 10)[0])


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EvidenceFormatError(
                f"DCAP quote truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"{self.end - self.pos} left"
            )
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def parse_quote(data: bytes, *, strict_chain: bool = True) -> DcapQuote:
    """Parse a DCAP quote strictly (layout in the module docstring).

    Args:
        data: raw quote bytes, optionally followed by padding (ignored, counted).
        strict_chain: require certification data type 5 with a canonical PEM chain (always
            for verification); False only for display (``evidence inspect``) of quotes with
            other certification data, then ``pck_pem`` is empty.

    Raises:
        EvidenceFormatError: wrong version / key type / TEE type / QE vendor, a length field
            that does not match the structure, an unsupported certification data type, or
            a PCK chain that is not canonical PEM followed by NUL padding.
    """
    if not isinstance(data, bytes | bytearray):
        raise EvidenceFormatError("DCAP quote must be bytes")
    data = bytes(data)
    r = _Reader(data, 0, len(data))
    version = r.u16("header.version")
    if version not in (3, 4, 5):
        raise EvidenceFormatError(f"DCAP quote version: expected 3, 4 or 5, got {version}")
    akt = r.u16("header.att_key_type")
    if akt != 2:
        raise EvidenceFormatError(f"DCAP quote attestation key type: expected 2 (ECDSA-P256), got {akt}")
    tee = r.u32("header.tee_type")
    if tee not in (TEE_SGX, TEE_TDX) or (version == 3 and tee != TEE_SGX):
        raise EvidenceFormatError(f"DCAP quote v{version} TEE type: unsupported value {tee:#x}")
    r.take(4, "header.svns")
    if r.take(16, "header.qe_vendor_id") != INTEL_QE_VENDOR_ID:
        raise EvidenceFormatError("DCAP quote qe_vendor_id: expected Intel's QE vendor id")
    r.take(20, "header.user_data")
    if version == 5:
        body_type = r.u16("body descriptor type")
        body_len = r.u32("body descriptor size")
        want = _V5_BODY.get(body_type)
        if want is None or want[0] != tee or want[1] != body_len:
            raise EvidenceFormatError(
                f"DCAP quote v5 body: type {body_type} size {body_len} unsupported for TEE {tee:#x}"
            )
    else:
        body_type = 1 if tee == TEE_SGX else 2
        body_len = SGX_BODY_LEN if tee == TEE_SGX else TD10_BODY_LEN
    body = r.take(body_len, "report body")
    signed_end = r.pos
    sig_len = r.u32("signature data length")
    end = r.pos + sig_len
    if end > len(data):
        raise EvidenceFormatError(
            f"DCAP quote signature data length {sig_len} exceeds the {len(data) - r.pos} bytes present"
        )
    s = _Reader(data, r.pos, end)
    signature = s.take(64, "quote signature")
    att_key = s.take(64, "attestation key")
    if version >= 4:
        outer_type = s.u16("certification data type")
        if outer_type != 6:
            raise EvidenceFormatError(f"DCAP quote certification data type: expected 6, got {outer_type}")
        outer_len = s.u32("certification data size")
        if s.pos + outer_len != end:
            raise EvidenceFormatError(
                f"DCAP quote certification data size {outer_len} does not match the signature "
                f"data length (expected {end - s.pos})"
            )
    qe_report = s.take(384, "QE report")
    qe_sig = s.take(64, "QE report signature")
    auth_len = s.u16("QE auth data size")
    qe_auth = s.take(auth_len, "QE auth data")
    cert_type = s.u16("PCK certification data type")
    if cert_type != 5 and strict_chain:
        raise EvidenceFormatError(
            f"DCAP quote PCK certification data type: expected 5 (PEM chain), got {cert_type}"
        )
    cert_len = s.u32("PCK certification data size")
    if s.pos + cert_len != end:
        raise EvidenceFormatError(
            f"DCAP quote PCK certification data size {cert_len} does not match the signature "
            f"data length (expected {end - s.pos})"
        )
    cert = s.take(cert_len, "PCK certificate chain")
    pem = cert.rstrip(b"\x00")
    if strict_chain:
        _chain(pem)  # canonical-PEM check (cached)
    elif cert_type != 5:
        pem = b""
    return DcapQuote(
        quote=data[:end],
        trailing=len(data) - end,
        version=version,
        tee_type=tee,
        body_type=body_type,
        signed=data[:signed_end],
        body=body,
        signature=signature,
        attestation_key=att_key,
        qe_report=qe_report,
        qe_report_sig=qe_sig,
        qe_auth=qe_auth,
        pck_pem=pem,
    )


@dataclass(frozen=True)
class _Chain:
    certs: tuple[x509.Certificate, ...]
    root_spki: bytes
    fmspc: str
    ca: str


@functools.lru_cache(maxsize=256)
def _chain(pem: bytes) -> _Chain:
    """Parse a PCK chain; it must be exactly the canonical PEM of its certificates."""
    certs = tuple(load_certificates(pem, "DCAP quote PCK chain", EvidenceFormatError))
    if len(certs) < 2 or b"".join(c.public_bytes(_PEM_CERT) for c in certs) != pem:
        raise EvidenceFormatError("DCAP quote PCK chain is not canonical PEM (PCK, intermediate CA, root CA)")
    try:
        ext = dcap_qvl.parse_pck_extension_from_pem(pem)
        fmspc = bytes(ext.fmspc).hex()
    except ValueError:
        raise EvidenceFormatError(
            "DCAP quote PCK certificate lacks the Intel SGX extension (FMSPC)"
        ) from None
    try:
        cn, root_spki = _touch(certs)
    except Exception:  # noqa: BLE001 - any parse error of untrusted DER means "malformed"
        raise EvidenceFormatError("DCAP quote PCK chain holds a malformed certificate") from None
    # dcap-qvl anchors at the pinned root and ignores the embedded root certificate; check
    # that certificate's self-signature here so no byte of the quote goes unverified.
    try:
        certs[-1].verify_directly_issued_by(certs[-1])
    except (ValueError, TypeError, InvalidSignature):
        raise EvidenceSignatureError(
            "embedded Intel SGX Root CA certificate is not validly self-signed"
        ) from None
    ca = "processor" if "Processor" in cn else "platform" if "Platform" in cn else "unknown"
    return _Chain(certs, root_spki, fmspc, ca)


def _touch(certs: tuple[x509.Certificate, ...]) -> tuple[str, bytes]:
    """Force cryptography's lazy parsing of every field used later, so garbage fails early."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in certs:
            _ = (c.subject, c.issuer, c.not_valid_before_utc, c.not_valid_after_utc, c.extensions)
            c.public_key()
        cn = " ".join(str(a.value) for a in certs[1].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))
        return cn, certs[-1].public_key().public_bytes(*_SPKI)


def _raw_sig(sig64: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(sig64[:32], "big"), int.from_bytes(sig64[32:], "big"))


def verify_signatures_only(q: DcapQuote, root_spki: bytes, at: datetime) -> None:
    """Check a quote's signatures without collateral (no CRLs, no TCB evaluation).

    Checks, in order: PCK chain signatures and validity at ``at`` up to a root with the
    pinned public key; QE report signature under the PCK key; QE REPORTDATA =
    SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes; the quote signature.

    Raises:
        EndorsementError: the chain does not end at the pinned root or a certificate is not
            valid at ``at``.
        EvidenceSignatureError: a signature or the attestation-key binding fails.
    """
    ch = _chain(q.pck_pem)
    if ch.root_spki != root_spki:
        raise EndorsementError("PCK chain root: public key is not the pinned Intel SGX Root CA key")
    names = ("PCK certificate", "PCK intermediate CA", "Intel SGX Root CA")
    for i, c in enumerate(ch.certs):
        issuer = ch.certs[min(i + 1, len(ch.certs) - 1)]
        name = names[min(i, 2)]
        check_validity(name, c.not_valid_before_utc, c.not_valid_after_utc, at)
        try:
            c.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise EvidenceSignatureError(f"{name} signature does not verify under its issuer") from None
    pck_key = ch.certs[0].public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey):
        raise EvidenceSignatureError("PCK key is not an ECDSA key")
    try:
        pck_key.verify(_raw_sig(q.qe_report_sig), q.qe_report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceSignatureError("QE report signature does not verify under the PCK key") from None
    want = hashlib.sha256(q.attestation_key + q.qe_auth).digest() + bytes(32)
    if q.qe_report[320:384] != want:
        raise EvidenceSignatureError(
            "QE report_data: expected SHA-256(attestation key || QE auth data), got another value"
        )
    try:
        ak = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
        ak.verify(_raw_sig(q.signature), q.signed, ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise EvidenceSignatureError("quote signature does not verify under the attestation key") from None


@functools.lru_cache(maxsize=64)
def _collateral_from_json(blob: bytes) -> DcapCollateral:
    return DcapCollateral.from_json(blob)


def _qvl_error(msg: str) -> Exception:
    low = msg.lower()
    if any(w in low for w in ("tcb", "expired", "crl", "identity", "revoked", "collateral")):
        return EndorsementError(f"DCAP collateral/TCB check failed (dcap-qvl): {msg}")
    return EvidenceSignatureError(f"DCAP quote verification failed (dcap-qvl): {msg}")


class DcapVerifier:
    """Common verifier for SGX and TDX DCAP quotes (subclassed per TEE).

    Collateral is taken, in order, from the Evidence's ``"collateral"`` endorsement
    (dcap-qvl JSON), then from the :class:`~safehold.attestation.pcs.CollateralCache`.

    Args:
        collateral: a cache, one or more :class:`DcapCollateral`, or a file/directory path;
            default: ``$SAFEHOLD_DCAP_COLLATERAL`` (path) if set.
        pccs_url: PCCS / Intel PCS base URL for fetching (default ``$SAFEHOLD_PCCS_URL``).
        root_ca_der: override of the pinned Intel SGX Root CA (DER); tests use it for
            wrong-root checks.
        require_collateral: when False, a quote without collateral is still accepted after a
            signature-only check (no CRL, no TCB status: ``tcb_status`` is None and
            ``raw["collateral"] == "absent"``); the appraisal policy must then decide.
    """

    media_types: ClassVar[tuple[str, ...]] = ()
    tee_name: ClassVar[str] = ""
    tee_code: ClassVar[int] = -1

    def __init__(
        self,
        collateral: CollateralCache | DcapCollateral | Iterable[DcapCollateral] | str | Path | None = None,
        *,
        pccs_url: str | None = None,
        root_ca_der: bytes | None = None,
        require_collateral: bool = True,
    ) -> None:
        if collateral is None and os.environ.get("SAFEHOLD_DCAP_COLLATERAL"):
            collateral = os.environ["SAFEHOLD_DCAP_COLLATERAL"]
        pccs_url = pccs_url or os.environ.get("SAFEHOLD_PCCS_URL") or None
        if isinstance(collateral, CollateralCache):
            self.cache = collateral
            if pccs_url and not collateral.pccs_url:
                collateral.pccs_url = pccs_url
        elif isinstance(collateral, DcapCollateral):
            self.cache = CollateralCache([collateral], pccs_url=pccs_url)
        elif isinstance(collateral, str | Path):
            self.cache = CollateralCache(load_collateral(collateral), pccs_url=pccs_url)
        else:
            self.cache = CollateralCache(collateral or (), pccs_url=pccs_url)
        self.root_ca_der = root_ca_der if root_ca_der is not None else packaged_root_der()
        self.root_spki = _spki_of_der(self.root_ca_der)
        self.require_collateral = require_collateral

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify a DCAP quote and return its claims (see :meth:`EvidenceVerifier.verify`).

        Raises:
            EvidenceFormatError: wrong media type, wrong TEE, malformed quote.
            EvidenceSignatureError: a signature fails (quote, QE report, PCK chain).
            EndorsementError: root key not pinned, collateral missing/expired/for another
                FMSPC, revoked certificates, or no TCB level matches.
        """
        if evidence.media_type not in self.media_types:
            raise EvidenceFormatError(
                f"{type(self).__name__} accepts {self.media_types}, got {evidence.media_type!r}"
            )
        at = require_aware(at)
        q = parse_quote(evidence.data)
        if q.tee_type != self.tee_code:
            raise EvidenceFormatError(
                f"quote tee_type: expected {self.tee_code:#x} ({self.tee_name}), got {q.tee_type:#x}"
            )
        ch = _chain(q.pck_pem)
        if ch.root_spki != self.root_spki:
            raise EndorsementError("PCK chain root: public key is not the pinned Intel SGX Root CA key")
        blob = evidence.endorsements.get("collateral")
        coll: DcapCollateral | None
        if blob is not None:
            coll = _collateral_from_json(bytes(blob))
        else:
            try:
                coll = self.cache.get(self.tee_name, ch.fmspc, ch.ca, at)
            except EndorsementError:
                if self.require_collateral:
                    raise
                coll = None
        status: str | None = None
        advisories: tuple[str, ...] = ()
        if coll is None:
            verify_signatures_only(q, self.root_spki, at)
        else:
            if coll.tee != self.tee_name or coll.fmspc != ch.fmspc:
                raise EndorsementError(
                    f"collateral FMSPC: expected {self.tee_name.upper()} {ch.fmspc}, "
                    f"got {coll.tee.upper()} {coll.fmspc}"
                )
            coll.check_fresh(at)
            try:
                rep = dcap_qvl.verify_with_root_ca(q.quote, coll.qvl, self.root_ca_der, int(at.timestamp()))
            except ValueError as e:
                raise _qvl_error(" ".join(str(e).split())) from None
            status = rep.status
            advisories = tuple(rep.advisory_ids)
        return self.claims_for(q, ch, status, advisories, coll is not None)

    @classmethod
    def claims_for(
        cls, q: DcapQuote, ch: _Chain, status: str | None, adv: tuple[str, ...], with_coll: bool
    ) -> Claims:  # pragma: no cover - overridden
        """Normalised claims of a quote (after verification, or for display)."""
        raise NotImplementedError

    @staticmethod
    def _common_raw(
        q: DcapQuote, ch: _Chain, status: str | None, adv: tuple[str, ...], with_coll: bool
    ) -> dict[str, Any]:
        return {
            "quote_version": q.version,
            "qe_svn": q.qe_svn,
            "pce_svn": q.pce_svn,
            "fmspc": ch.fmspc,
            "pck_ca": ch.ca,
            "tcb_status": status,
            "advisory_ids": list(adv),
            "collateral": "verified" if with_coll else "absent",
            "trailing_bytes": q.trailing,
        }
