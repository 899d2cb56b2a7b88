"""AMD SEV-SNP attestation report verifier (report versions 2 to 5, 1184 bytes).

Layout: AMD "SEV Secure Nested Paging Firmware ABI Specification" (pub. 56860), §7.3
"Attestation", table "ATTESTATION_REPORT Structure" (Table 22 in Rev. 1.55). Version 3 (Rev.
1.56) adds CPUID_FAM_ID/CPUID_MOD_ID/CPUID_STEP at 0x188-0x18A; version 4 (firmware 1.55.31+)
changes no field a Verifier reads; version 5 (Rev. 1.58) adds LAUNCH_MIT_VECTOR at 0x1F8 and
CURRENT_MIT_VECTOR at 0x200 (8 bytes each, little-endian) and guest policy bit 25
PAGE_SWAP_DISABLE. Every version keeps the 1184-byte size, the fields before 0x1F8 and the
signature at 0x2A0, so a Verifier reads the older fields the same way. Versions above 5 are
refused: their layout is not known here. The signature (ECDSA P-384 with SHA-384) covers bytes
0x000-0x29F; r and s are 72-byte little-endian fields at 0x2A0 and 0x2E8, the remaining 368
bytes of the 512-byte signature area are reserved and must be zero (checked, so no byte of a
report is left unchecked).

The report is signed by the VCEK (chip- and TCB-specific, flags bits 4:2 = 0) or the VLEK
(cloud-provider specific, = 1). Endorsements: ``vcek`` or ``vlek`` (DER or PEM), optional
``cert_chain`` (PEM ASK/ASVK and ARK, AMD KDS ``cert_chain`` format). The chain
VCEK → ASK → ARK (VLEK → ASVK → ARK) is RSA-PSS/SHA-384 and must end at one of the ARKs for
Milan, Genoa or Turin shipped in ``safehold/attestation/roots`` (pinned by public key). The
VCEK's TCB extensions (AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification" §3.1: OIDs 1.3.6.1.4.1.3704.1.3.{1,2,3,8,9}, hwID 1.3.6.1.4.1.3704.1.4) must
equal the report's REPORTED_TCB and CHIP_ID. A CHIP_ID of all zeros means the guest policy
asked to mask it (MASK_CHIP_ID); per AMD (virtee/sev#303) that is recognised by the zeros
alone — flags bit 1 is MASK_CHIP_KEY, a different setting.
"""

from __future__ import annotations

import functools
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from safehold.attestation.certs import load_certificate, load_certificates
from safehold.attestation.checks import SnpMinimumTcb  # noqa: F401 - re-exported (the check moved to checks)
from safehold.attestation.claims import Claims
from safehold.attestation.collateral import check_validity, require_aware
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError

REPORT_LEN = 1184
SIGNED_LEN = 0x2A0
#: Report versions whose layout this module knows (see the module docstring).
SUPPORTED_VERSIONS = (2, 3, 4, 5)
PRODUCTS = ("milan", "genoa", "turin")
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_OID = "1.3.6.1.4.1.3704.1."
OID_HWID = _OID + "4"
OID_PRODUCT = _OID + "2"
#: TCB component → VCEK extension OID (VCEK spec §3.1, Table 8).
TCB_OIDS = {
    "bootloader": _OID + "3.1",
    "tee": _OID + "3.2",
    "snp": _OID + "3.3",
    "microcode": _OID + "3.8",
    "fmc": _OID + "3.9",
}

# Guest policy bits (ABI spec Table 9).
POLICY_SMT = 1 << 16
POLICY_RESERVED_1 = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
POLICY_CXL_ALLOW = 1 << 21
POLICY_MEM_AES_256_XTS = 1 << 22
POLICY_RAPL_DIS = 1 << 23
POLICY_CIPHERTEXT_HIDING = 1 << 24
POLICY_PAGE_SWAP_DISABLE = 1 << 25  # report version 5 (Rev. 1.58)


def decode_tcb(tcb: int, product: str) -> dict[str, int]:
    """Split a 64-bit TCB_VERSION into its SPL components (ABI spec Table 3 / Turin Table 4).

    Milan and Genoa: byte 0 bootloader, 1 tee, 6 snp, 7 microcode. Turin: byte 0 fmc,
    1 bootloader, 2 tee, 3 snp, 7 microcode.
    """
    b = tcb.to_bytes(8, "little")
    if product == "turin":
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


@dataclass(frozen=True)
class SnpReport:
    """A parsed SEV-SNP ATTESTATION_REPORT (ABI spec Table 22); byte fields as in the report."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb: int
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    r: int
    s: int

    @property
    def signing_key(self) -> str:
        """``"vcek"``, ``"vlek"`` or ``"none"`` from flags bits 4:2."""
        return {0: "vcek", 1: "vlek", 7: "none"}.get((self.flags >> 2) & 7, "reserved")

    @property
    def mask_chip_key(self) -> bool:
        """Flags bit 1, MASK_CHIP_KEY: the VCEK is not used for attestation or key derivation."""
        return bool(self.flags & 2)

    @property
    def mask_chip_id(self) -> bool:
        """CHIP_ID is all zeros: the guest policy masked it (MASK_CHIP_ID). Per AMD this is the
        only way to tell (virtee/sev#303); flags bit 1 is MASK_CHIP_KEY, not this."""
        return not any(self.chip_id)


def parse_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte SEV-SNP attestation report (versions 2 to 5).

    Raises:
        EvidenceFormatError: wrong length, version, signature algorithm, reserved policy bit
            17 clear, or non-zero bytes in the reserved part of the signature area.
    """
    if not isinstance(data, bytes | bytearray) or len(data) != REPORT_LEN:
        n = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
        raise EvidenceFormatError(f"SEV-SNP report: expected {REPORT_LEN} bytes, got {n}")
    d = bytes(data)
    version, guest_svn, policy = struct.unpack_from("<IIQ", d, 0)
    if version not in SUPPORTED_VERSIONS:
        lo, hi = SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[-1]
        raise EvidenceFormatError(f"SEV-SNP report version: expected {lo}..{hi}, got {version}")
    vmpl, sig_algo, current_tcb, platform_info, flags = struct.unpack_from("<IIQQI", d, 0x30)
    if sig_algo != 1:
        raise EvidenceFormatError(f"SEV-SNP signature_algo: expected 1 (ECDSA P-384/SHA-384), got {sig_algo}")
    if not policy & POLICY_RESERVED_1:
        raise EvidenceFormatError("SEV-SNP policy: reserved bit 17 must be 1")
    if any(d[0x330:REPORT_LEN]):
        raise EvidenceFormatError("SEV-SNP report: reserved bytes after the signature are not zero")
    r_b, s_b = d[0x2A0:0x2E8], d[0x2E8:0x330]
    if any(r_b[48:]) or any(s_b[48:]):
        raise EvidenceFormatError("SEV-SNP signature: r/s exceed 48 bytes (P-384)")
    return SnpReport(
        raw=d,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=d[0x10:0x20],
        image_id=d[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        flags=flags,
        report_data=d[0x50:0x90],
        measurement=d[0x90:0xC0],
        host_data=d[0xC0:0xE0],
        id_key_digest=d[0xE0:0x110],
        author_key_digest=d[0x110:0x140],
        report_id=d[0x140:0x160],
        report_id_ma=d[0x160:0x180],
        reported_tcb=struct.unpack_from("<Q", d, 0x180)[0],
        cpuid=(d[0x188], d[0x189], d[0x18A]) if version >= 3 else None,
        chip_id=d[0x1A0:0x1E0],
        committed_tcb=struct.unpack_from("<Q", d, 0x1E0)[0],
        current_version=(d[0x1EA], d[0x1E9], d[0x1E8]),
        committed_version=(d[0x1EE], d[0x1ED], d[0x1EC]),
        launch_tcb=struct.unpack_from("<Q", d, 0x1F0)[0],
        launch_mit_vector=struct.unpack_from("<Q", d, 0x1F8)[0] if version >= 5 else None,
        current_mit_vector=struct.unpack_from("<Q", d, 0x200)[0] if version >= 5 else None,
        r=int.from_bytes(r_b, "little"),
        s=int.from_bytes(s_b, "little"),
    )


def load_cert(blob: bytes, what: str) -> x509.Certificate:
    """Load one DER or PEM certificate (older AMD VCEKs have serial 0: warning silenced).

    Every field used later is parsed here (cryptography parses lazily), so malformed
    certificates fail with :class:`EndorsementError` rather than later
    (:func:`safehold.attestation.certs.load_certificate`).

    Raises:
        EndorsementError: not a well-formed certificate.
    """
    return load_certificate(blob, what, EndorsementError)


def load_certs(blob: bytes, what: str) -> list[x509.Certificate]:
    """Load a PEM bundle (or a single DER certificate), each certificate fully parsed.

    Raises:
        EndorsementError: no certificate could be read, or one is malformed.
    """
    return load_certificates(blob, what, EndorsementError)


def _pkg_cert(name: str) -> x509.Certificate:
    return load_cert(resources.files("safehold.attestation").joinpath("roots", name).read_bytes(), name)


@functools.cache
def pinned_arks() -> dict[bytes, str]:
    """SPKI (DER) of each packaged AMD Root Key → product name."""
    return {_pkg_cert(f"amd-ark-{p}.pem").public_key().public_bytes(*_SPKI): p for p in PRODUCTS}


@functools.cache
def packaged_intermediates() -> tuple[x509.Certificate, ...]:
    """The packaged ASKs and ASVKs (the AMD SEV and SEV-VLEK signing keys)."""
    return tuple(_pkg_cert(f"amd-{k}-{p}.pem") for p in PRODUCTS for k in ("ask", "asvk"))


@functools.cache
def _packaged_arks() -> tuple[x509.Certificate, ...]:
    return tuple(_pkg_cert(f"amd-ark-{p}.pem") for p in PRODUCTS)


def _der_int(v: bytes, what: str) -> int:
    # VCEK SPL extensions are DER INTEGERs: 0x02 len value (small, non-negative).
    if len(v) < 3 or v[0] != 0x02 or v[1] != len(v) - 2 or v[1] > 8:
        raise EndorsementError(f"VCEK extension {what} is not a small DER INTEGER")
    return int.from_bytes(v[2:], "big", signed=True)


def _ext(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        e = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    val = e.value
    return val.value if isinstance(val, x509.UnrecognizedExtension) else None


def _valid_at(c: x509.Certificate, at: datetime, name: str) -> None:
    check_validity(name, c.not_valid_before_utc, c.not_valid_after_utc, at)


def _issued_by(c: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if c.issuer != issuer.subject:
                return False
            c.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - bad signature, unsupported algorithm, garbled fields
        return False
    return True


def verify_chain(leaf: x509.Certificate, extra: list[x509.Certificate], at: datetime, leaf_name: str) -> str:
    """Verify leaf → ASK/ASVK → ARK (RSA-PSS) ending at a pinned ARK; return the product.

    Args:
        leaf: VCEK or VLEK.  extra: candidate intermediates/roots (e.g. KDS cert_chain).

    Raises:
        EndorsementError: no path to a pinned ARK, or a certificate is outside its validity.
    """
    arks = pinned_arks()
    cands = [c for c in extra] + list(packaged_intermediates())
    for inter in cands:
        if not _issued_by(leaf, inter):
            continue
        for root in [c for c in extra] + list(_packaged_arks()):
            product = arks.get(root.public_key().public_bytes(*_SPKI))
            if product is None or not _issued_by(inter, root) or not _issued_by(root, root):
                continue
            _valid_at(leaf, at, leaf_name)
            _valid_at(inter, at, "ASVK" if leaf_name == "VLEK" else "ASK")
            _valid_at(root, at, f"ARK-{product.capitalize()}")
            return product
    raise EndorsementError(
        f"{leaf_name} does not chain to a pinned AMD ARK (Milan/Genoa/Turin) via an ASK/ASVK "
        f"(issuer {leaf.issuer.rfc4514_string()!r:.80})"
    )


def check_vcek_tcb(cert: x509.Certificate, rep: SnpReport, product: str, name: str) -> None:
    """Compare the VCEK/VLEK TCB extensions with REPORTED_TCB, and hwID with CHIP_ID (VCEK;
    not when CHIP_ID is masked, i.e. all zeros).

    Raises:
        EndorsementError: a component differs (names it, expected vs. got) or is missing.
    """
    tcb = decode_tcb(rep.reported_tcb, product)
    for comp, val in tcb.items():
        ext = _ext(cert, TCB_OIDS[comp])
        if ext is None:
            raise EndorsementError(f"{name} lacks the {comp} SPL extension {TCB_OIDS[comp]}")
        got = _der_int(ext, comp)
        if got != val:
            raise EndorsementError(f"reported_tcb.{comp}: {name} certifies {got}, report says {val}")
    if name == "VCEK" and not rep.mask_chip_id:
        hwid = _ext(cert, OID_HWID)
        if hwid is None:
            raise EndorsementError("VCEK lacks the hwID extension")
        if len(hwid) not in (8, 64) or rep.chip_id[: len(hwid)] != hwid:
            raise EndorsementError("chip_id: the VCEK hwID does not match the report's CHIP_ID")


def verify_report_signature(rep: SnpReport, key_cert: x509.Certificate, name: str) -> None:
    """ECDSA P-384/SHA-384 over bytes 0x000-0x29F (ABI spec Table 139).

    Raises:
        EvidenceSignatureError: the signature does not verify or the key is not P-384.
    """
    pub = key_cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp384r1":
        raise EvidenceSignatureError(f"{name} key is not ECDSA P-384")
    try:
        pub.verify(encode_dss_signature(rep.r, rep.s), rep.raw[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceSignatureError(f"SEV-SNP report signature does not verify under the {name}") from None


def _version(v: tuple[int, int, int]) -> str:
    return f"{v[0]}.{v[1]}.{v[2]}"


def snp_claims(rep: SnpReport, product: str | None, tee_type: str = "sev-snp") -> Claims:
    """Normalised claims for a (verified) report; ``raw`` holds every decoded field."""
    prod = product or "milan"
    raw: dict[str, Any] = {
        "version": rep.version,
        "product": product,
        "guest_svn": rep.guest_svn,
        "policy": rep.policy,
        "policy_debug": bool(rep.policy & POLICY_DEBUG),
        "policy_migrate_ma": bool(rep.policy & POLICY_MIGRATE_MA),
        "policy_smt": bool(rep.policy & POLICY_SMT),
        "policy_single_socket": bool(rep.policy & POLICY_SINGLE_SOCKET),
        "policy_cxl_allow": bool(rep.policy & POLICY_CXL_ALLOW),
        "policy_mem_aes_256_xts": bool(rep.policy & POLICY_MEM_AES_256_XTS),
        "policy_rapl_dis": bool(rep.policy & POLICY_RAPL_DIS),
        "policy_ciphertext_hiding": bool(rep.policy & POLICY_CIPHERTEXT_HIDING),
        "policy_page_swap_disable": bool(rep.policy & POLICY_PAGE_SWAP_DISABLE),
        "policy_abi": f"{(rep.policy >> 8) & 0xFF}.{rep.policy & 0xFF}",
        "family_id": rep.family_id.hex(),
        "image_id": rep.image_id.hex(),
        "vmpl": rep.vmpl,
        "current_tcb": rep.current_tcb,
        "reported_tcb": rep.reported_tcb,
        "committed_tcb": rep.committed_tcb,
        "launch_tcb": rep.launch_tcb,
        "reported_tcb_parts": decode_tcb(rep.reported_tcb, prod),
        "launch_tcb_parts": decode_tcb(rep.launch_tcb, prod),
        "platform_info": rep.platform_info,
        "flags": rep.flags,
        "signing_key": rep.signing_key,
        "host_data": rep.host_data.hex(),
        "id_key_digest": rep.id_key_digest.hex(),
        "author_key_digest": rep.author_key_digest.hex(),
        "report_id": rep.report_id.hex(),
        "report_id_ma": rep.report_id_ma.hex(),
        "chip_id": rep.chip_id.hex(),
        "chip_id_masked": rep.mask_chip_id,
        "mask_chip_key": rep.mask_chip_key,
        "current_version": _version(rep.current_version),
        "committed_version": _version(rep.committed_version),
        "measurement": rep.measurement.hex(),
        "report_data": rep.report_data.hex(),
    }
    if rep.cpuid is not None:
        raw["cpuid_fam_mod_step"] = list(rep.cpuid)
    if rep.launch_mit_vector is not None:
        raw["launch_mit_vector"] = rep.launch_mit_vector
        raw["current_mit_vector"] = rep.current_mit_vector
    return Claims(
        tee_type=tee_type,
        measurement=rep.measurement,
        report_data=rep.report_data,
        debug=bool(rep.policy & POLICY_DEBUG),
        signer=rep.id_key_digest,
        security_version=rep.guest_svn,
        raw=raw,
    )


def verify_snp_report(data: bytes, endorsements: Mapping[str, bytes], at: datetime) -> tuple[SnpReport, str]:
    """Parse and verify an SNP report with its VCEK/VLEK endorsement; return (report, product).

    Raises:
        EvidenceFormatError: malformed report.
        EndorsementError: missing/unchained/expired VCEK or VLEK, TCB extension mismatch.
        EvidenceSignatureError: the report signature fails.
    """
    rep = parse_report(data)
    kind = rep.signing_key
    if kind not in ("vcek", "vlek"):
        raise EvidenceFormatError(f"SEV-SNP report signing key: {kind} (flags {rep.flags:#x})")
    name = kind.upper()
    blob = endorsements.get(kind)
    if blob is None:
        raise EndorsementError(f"SEV-SNP report is {name}-signed but no {kind!r} endorsement was supplied")
    cert = load_cert(bytes(blob), name)
    extra = (
        load_certs(bytes(endorsements["cert_chain"]), "cert_chain") if "cert_chain" in endorsements else []
    )
    product = verify_chain(cert, extra, at, name)
    check_vcek_tcb(cert, rep, product, name)  # first: "wrong chip/TCB" is the clearer error
    verify_report_signature(rep, cert, name)
    return rep, product


class SevSnpVerifier:
    """Verifier plug-in for raw SEV-SNP reports (``application/vnd.amd.sev-snp.report``).

    Endorsements: ``vcek`` or ``vlek`` (DER/PEM), optional ``cert_chain`` (PEM ASK+ARK).
    Claims: measurement (48 B), report_data (64 B), debug (policy bit 19), signer =
    ID-key digest (48 B), security_version = GUEST_SVN; ``raw`` holds host_data, policy bits,
    TCB versions (raw and decoded), chip_id, VMPL, report_id, versions.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["sev-snp"],)

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify the report and its VCEK/VLEK chain at ``at``; return claims.

        Raises:
            EvidenceFormatError, EvidenceSignatureError, EndorsementError: see
            :func:`verify_snp_report`.
        """
        if evidence.media_type not in self.media_types:
            raise EvidenceFormatError(
                f"SevSnpVerifier accepts {self.media_types}, got {evidence.media_type!r}"
            )
        rep, product = verify_snp_report(evidence.data, evidence.endorsements, require_aware(at))
        return snp_claims(rep, product)


