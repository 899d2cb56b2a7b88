"""Azure confidential VM Evidence: the HCL report (SNP or TDX hardware report + runtime data).

The Azure paravisor (HCL) stores an attestation report in vTPM NV index 0x01400001:

```
0x000  32 B   header: "HCLA" | version u32 | report_size u32 | request_type u32 | status u32
                      | 12 B reserved            (all little-endian)
0x020  1184 B hardware report: SEV-SNP ATTESTATION_REPORT, or TDX TDREPORT (1024 B, zero padded)
0x4C0  20 B   runtime-data header: data_size u32 | version u32 | report_type u32 (2 SNP, 4 TDX)
                      | hash_type u32 (1 SHA-256, 2 SHA-384, 3 SHA-512) | variable_data_size u32
0x4D4  N B    runtime data: JSON with "keys" (JWKs "HCLAkPub", "HCLEkPub"), "vm-configuration",
              "user-data"
```

(Layout as read by Microsoft's ``azure-cvm-tooling`` / Constellation; bytes after
``report_size`` are NV-index padding and are not part of the report.) The runtime data is bound
to the hardware report: ``hash_type(runtime data) == report_data[0:len]``.

* :class:`AzureSnpVerifier` verifies the SNP report signature with the VCEK endorsement (as in
  :mod:`.sev_snp`), the binding, and — when ``tpm_quote``/``tpm_signature``/``tpm_pcrs``
  endorsements are present — a vTPM quote under the bound ``HCLAkPub``.
* :class:`AzureTdxVerifier`: a TDREPORT is MAC'd by the CPU, not signed, so it can only be
  verified through a TDX quote for the same TD (endorsement ``td_quote``, verified by
  :class:`~.tdx.TdxVerifier`, whose body must equal the TDREPORT's fields).

The data may also be a bare SNP report (optionally followed by the 20-byte runtime-data
header) with the runtime JSON in the ``runtime_data`` endorsement (Constellation's format).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from safehold.attestation.claims import Claims
from safehold.attestation.collateral import require_aware
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers import sev_snp, tpm
from safehold.attestation.verifiers.tdx import td_report_fields
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError

if TYPE_CHECKING:  # imported when used: the TDX Verifier is only needed for Azure TDX
    from safehold.attestation.verifiers.tdx import TdxVerifier

HCL_MAGIC = b"HCLA"
HCL_HEADER_LEN = 32
HW_REPORT_LEN = 1184
RUNTIME_HEADER_LEN = 20
REPORT_TYPE_SNP, REPORT_TYPE_TDX = 2, 4
_HASHES = {1: "sha256", 2: "sha384", 3: "sha512"}


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report.

    Attributes:
        hw_report: 1184 bytes (SNP report, or TDREPORT + zero padding).
        report_type: 2 (SNP) or 4 (TDX).  hash_type: 1/2/3.
        runtime_data: the exact runtime-data bytes (JSON) that are hashed into report_data.
        runtime: the decoded JSON object.
    """

    hw_report: bytes
    report_type: int
    hash_type: int
    runtime_data: bytes
    runtime: Mapping[str, Any]

    def ak_pub(self) -> rsa.RSAPublicKey:
        """The vTPM attestation key (JWK ``HCLAkPub``) as an RSA public key.

        Raises:
            EvidenceFormatError: no HCLAkPub RSA JWK in the runtime data.
        """
        return _jwk(self.runtime, "HCLAkPub")


def _jwk(runtime: Mapping[str, Any], kid: str) -> rsa.RSAPublicKey:
    keys = runtime.get("keys")
    for k in keys if isinstance(keys, list) else []:
        if isinstance(k, dict) and k.get("kid") == kid and k.get("kty") == "RSA":
            try:
                n = int.from_bytes(base64.urlsafe_b64decode(k["n"] + "=" * (-len(k["n"]) % 4)), "big")
                e = int.from_bytes(base64.urlsafe_b64decode(k["e"] + "=" * (-len(k["e"]) % 4)), "big")
                return rsa.RSAPublicNumbers(e, n).public_key()
            except (KeyError, TypeError, ValueError):
                raise EvidenceFormatError(f"HCL runtime data: {kid} is not a valid RSA JWK") from None
    raise EvidenceFormatError(f"HCL runtime data has no RSA JWK {kid!r}")


def _runtime_json(raw: bytes) -> Mapping[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise EvidenceFormatError("HCL runtime data is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise EvidenceFormatError("HCL runtime data must be a JSON object")
    return obj


def _runtime_header(buf: bytes, off: int) -> tuple[int, int, int]:
    if len(buf) < off + RUNTIME_HEADER_LEN:
        raise EvidenceFormatError("HCL report truncated in the runtime-data header")
    data_size, version, rtype, htype, var_size = struct.unpack_from("<5I", buf, off)
    if version != 1 or rtype not in (REPORT_TYPE_SNP, REPORT_TYPE_TDX) or htype not in _HASHES:
        raise EvidenceFormatError(
            f"HCL runtime-data header: version {version}, report type {rtype}, hash type {htype} unsupported"
        )
    if data_size != RUNTIME_HEADER_LEN + var_size:
        raise EvidenceFormatError(
            f"HCL runtime-data header: data_size {data_size} != 20 + variable_data_size {var_size}"
        )
    return rtype, htype, var_size


def parse_hcl_report(data: bytes, runtime_data: bytes | None = None) -> HclReport:
    """Parse a full HCL report, or a bare SNP report (+ optional runtime header) + runtime JSON.

    Raises:
        EvidenceFormatError: wrong magic, inconsistent sizes, unsupported types, bad JSON.
    """
    data = bytes(data)
    if data[:4] == HCL_MAGIC:
        if len(data) < HCL_HEADER_LEN + HW_REPORT_LEN:
            raise EvidenceFormatError("HCL report truncated before the end of the hardware report")
        _version, size, _req = struct.unpack_from("<III", data, 4)
        off = HCL_HEADER_LEN + HW_REPORT_LEN
        rtype, htype, var = _runtime_header(data, off)
        if size != off + RUNTIME_HEADER_LEN + var or size > len(data):
            raise EvidenceFormatError(f"HCL report_size {size} does not match its runtime data ({var} B)")
        rd = data[off + RUNTIME_HEADER_LEN : size]
        if runtime_data is not None and bytes(runtime_data) != rd:
            raise EvidenceFormatError("runtime_data endorsement differs from the HCL report's runtime data")
        return HclReport(data[HCL_HEADER_LEN:off], rtype, htype, rd, _runtime_json(rd))
    if len(data) not in (HW_REPORT_LEN, HW_REPORT_LEN + RUNTIME_HEADER_LEN):
        raise EvidenceFormatError(
            f"Azure Evidence: expected an HCL report ('HCLA') or a {HW_REPORT_LEN}-byte hardware "
            f"report, got {len(data)} bytes"
        )
    if runtime_data is None:
        raise EvidenceFormatError("bare hardware report needs the 'runtime_data' endorsement")
    rd = bytes(runtime_data)
    rtype, htype = REPORT_TYPE_SNP, 1
    if len(data) > HW_REPORT_LEN:
        rtype, htype, var = _runtime_header(data, HW_REPORT_LEN)
        if var != len(rd):
            raise EvidenceFormatError(f"runtime-data header says {var} bytes, runtime_data has {len(rd)}")
    return HclReport(data[:HW_REPORT_LEN], rtype, htype, rd, _runtime_json(rd))


def check_binding(hcl: HclReport, report_data: bytes) -> None:
    """hash_type(runtime data) must equal report_data[0:digest length].

    Raises:
        EvidenceSignatureError: the binding fails (names the claim).
    """
    digest = hashlib.new(_HASHES[hcl.hash_type], hcl.runtime_data).digest()
    if report_data[: len(digest)] != digest:
        raise EvidenceSignatureError(
            f"report_data[0:{len(digest)}]: expected {_HASHES[hcl.hash_type]}(runtime data) "
            f"{digest.hex()[:16]}…, got {report_data[: len(digest)].hex()[:16]}…"
        )


def _runtime_raw(hcl: HclReport) -> dict[str, Any]:
    ak_spki = hcl.ak_pub().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out: dict[str, Any] = {
        "hcl_ak_pub_spki_sha256": hashlib.sha256(ak_spki).hexdigest(),
        "runtime_data_sha256": hashlib.sha256(hcl.runtime_data).hexdigest(),
    }
    vmc = hcl.runtime.get("vm-configuration")
    if isinstance(vmc, dict):
        out["vm_configuration"] = vmc
    ud = hcl.runtime.get("user-data")
    if isinstance(ud, str):
        out["user_data"] = ud
    return out


def _verify_vtpm_quote(hcl: HclReport, ends: Mapping[str, bytes]) -> dict[str, Any] | None:
    if "tpm_quote" not in ends:
        return None
    for need in ("tpm_signature", "tpm_pcrs"):
        if need not in ends:
            raise EvidenceFormatError(f"vTPM quote needs the {need!r} endorsement")
    ak = tpm.AkPublic(hcl.ak_pub())
    q, selected, hname = tpm.verify_quote(
        bytes(ends["tpm_quote"]), bytes(ends["tpm_signature"]), ak, tpm.load_pcrs(bytes(ends["tpm_pcrs"]))
    )
    return {"extra_data": q.extra_data.hex(), "pcr_digest": q.pcr_digest.hex(), "pcrs": selected}


def _open_hcl(verifier: str, media_types: tuple[str, ...], evidence: Evidence, at: datetime | None,
              report_type: int, kind: str) -> tuple[datetime, Mapping[str, bytes], HclReport]:
    """The checks both Azure Verifiers start with: ``evidence``'s media type is one of
    ``media_types``, ``at`` is timezone-aware, the HCL report parses and holds a ``report_type``
    hardware report. Returns ``(at, endorsements, report)``.

    Raises:
        EvidenceFormatError: another media type, a malformed HCL report, another report type.
    """
    if evidence.media_type not in media_types:
        raise EvidenceFormatError(f"{verifier} accepts {media_types}, got {evidence.media_type!r}")
    aware = require_aware(at)
    ends = evidence.endorsements
    hcl = parse_hcl_report(evidence.data, ends.get("runtime_data"))
    if hcl.report_type != report_type:
        raise EvidenceFormatError(f"HCL report type: expected {report_type} ({kind}), got {hcl.report_type}")
    return aware, ends, hcl


class AzureSnpVerifier:
    """Verifier plug-in for Azure SEV-SNP CVM HCL reports (``…hcl-report.snp``).

    Endorsements: ``vcek`` (DER/PEM, from AMD KDS or Azure THIM), optional ``cert_chain``,
    ``runtime_data`` (for bare reports), optional ``tpm_quote``/``tpm_signature``/``tpm_pcrs``.
    Claims: as :class:`~.sev_snp.SevSnpVerifier` with tee_type ``azure-sev-snp``; ``raw`` adds
    the runtime data's AK fingerprint, vm-configuration and, if given, the verified vTPM quote.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["azure-sev-snp"],)

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify SNP signature + VCEK chain, runtime-data binding and optional vTPM quote.

        Raises:
            EvidenceFormatError: malformed HCL report or a TDX report inside.
            EvidenceSignatureError: SNP signature, binding or vTPM quote failure.
            EndorsementError: VCEK missing/unchained/expired or not for this chip/TCB.
        """
        at, ends, hcl = _open_hcl("AzureSnpVerifier", self.media_types, evidence, at, REPORT_TYPE_SNP, "SNP")
        rep, product = sev_snp.verify_snp_report(hcl.hw_report, ends, at)
        check_binding(hcl, rep.report_data)
        claims = sev_snp.snp_claims(rep, product, tee_type="azure-sev-snp")
        raw = dict(claims.raw)
        raw.update(_runtime_raw(hcl))
        quote = _verify_vtpm_quote(hcl, ends)
        if quote is not None:
            raw["vtpm_quote"] = quote
        return dataclasses.replace(claims, raw=raw)


def tdreport_fields(hw: bytes) -> dict[str, str]:
    """Decode a TDREPORT_STRUCT (Intel TDX Module ABI: REPORTMACSTRUCT 256 B, TEE_TCB_INFO
    239 B, 17 B reserved, TDINFO 512 B) into the names used by :func:`.tdx.td_report_fields`.
    """
    mac, tcb, info = hw[0:256], hw[256:495], hw[512:1024]
    return {
        "report_data": mac[128:192].hex(),
        "tee_tcb_svn": tcb[8:24].hex(),
        "mr_seam": tcb[24:72].hex(),
        "mr_signer_seam": tcb[72:120].hex(),
        "seam_attributes": tcb[120:128].hex(),
        "td_attributes": info[0:8].hex(),
        "xfam": info[8:16].hex(),
        "mr_td": info[16:64].hex(),
        "mr_config_id": info[64:112].hex(),
        "mr_owner": info[112:160].hex(),
        "mr_owner_config": info[160:208].hex(),
        "rtmr0": info[208:256].hex(),
        "rtmr1": info[256:304].hex(),
        "rtmr2": info[304:352].hex(),
        "rtmr3": info[352:400].hex(),
    }


class AzureTdxVerifier:
    """Verifier plug-in for Azure TDX CVM HCL reports (``…hcl-report.tdx``).

    The TDREPORT is authenticated only through the ``td_quote`` endorsement (a TDX quote of
    the same TD, e.g. from Azure's quote service), verified by ``tdx_verifier``; every TD
    field of the quote must equal the TDREPORT's. Without it, verification fails closed.

    Args:
        tdx_verifier: the :class:`~.tdx.TdxVerifier` for the quote (default: one with default
            collateral configuration).
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["azure-tdx"],)

    def __init__(self, tdx_verifier: TdxVerifier | None = None) -> None:
        self.tdx_verifier = tdx_verifier

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify the binding, then the TDREPORT through its TD quote.

        Raises:
            EvidenceFormatError: malformed HCL report or an SNP report inside.
            EvidenceSignatureError: binding failure, or the quote's TD fields differ.
            EndorsementError: no ``td_quote`` endorsement (a TDREPORT is not signed).
        """
        at, ends, hcl = _open_hcl("AzureTdxVerifier", self.media_types, evidence, at, REPORT_TYPE_TDX, "TDX")
        fields = tdreport_fields(hcl.hw_report)
        check_binding(hcl, bytes.fromhex(fields["report_data"]))
        if "td_quote" not in ends:
            raise EndorsementError(
                "Azure TDX HCL report: the TDREPORT is MAC'd, not signed; a 'td_quote' endorsement "
                "(TDX quote of the same TD) is required"
            )
        from safehold.attestation.verifiers.tdx import TdxVerifier

        tv = self.tdx_verifier or TdxVerifier()
        qe = {"collateral": ends["td_quote_collateral"]} if "td_quote_collateral" in ends else {}
        qc = tv.verify(Evidence(MEDIA_TYPES["tdx"], bytes(ends["td_quote"]), qe), at=at)
        qf = td_report_fields(_quote_body(qc))
        for name, val in fields.items():
            if qf.get(name) != val:
                raise EvidenceSignatureError(f"td_quote {name}: expected the TDREPORT's value, got another")
        raw = dict(qc.raw)
        raw.update(_runtime_raw(hcl))
        return dataclasses.replace(qc, tee_type="azure-tdx", raw=raw)


def _quote_body(qc: Claims) -> bytes:
    names = (
        "tee_tcb_svn",
        "mr_seam",
        "mr_signer_seam",
        "seam_attributes",
        "td_attributes",
        "xfam",
        "mr_td",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "report_data",
    )
    return b"".join(bytes.fromhex(qc.raw[n]) for n in names)


def inspect_hcl(data: bytes, runtime_data: bytes | None = None) -> dict[str, Any]:
    """Decode an HCL report WITHOUT verifying it (for ``safehold evidence inspect``)."""
    hcl = parse_hcl_report(data, runtime_data)
    out: dict[str, Any] = {"report_type": "sev-snp" if hcl.report_type == REPORT_TYPE_SNP else "tdx"}
    if hcl.report_type == REPORT_TYPE_SNP:
        out.update(sev_snp.snp_claims(sev_snp.parse_report(hcl.hw_report), None).raw)
        rd = sev_snp.parse_report(hcl.hw_report).report_data
    else:
        f = tdreport_fields(hcl.hw_report)
        out.update(f)
        rd = bytes.fromhex(f["report_data"])
    try:
        check_binding(hcl, rd)
        out["runtime_data_binding"] = "ok"
    except EvidenceSignatureError:
        out["runtime_data_binding"] = "MISMATCH"
    out.update(_runtime_raw(hcl))
    return out
