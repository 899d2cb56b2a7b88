"""Normalised claims: what a Verifier extracts from any Evidence type (RFC 9334 §8.1).

Every verifier plug-in (simulated, SGX, TDX, SEV-SNP, Azure, TPM) returns one :class:`Claims`,
so the appraisal policy compares the same names whatever the TEE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: TEE type names used in Claims, Evidence and policies.
TEE_TYPES = ("simulated", "sgx", "tdx", "sev-snp", "azure-sev-snp", "azure-tdx", "tpm")


@dataclass(frozen=True)
class Claims:
    """Claims a Verifier asserts after checking Evidence signatures and Endorsements.

    Attributes:
        tee_type: one of :data:`TEE_TYPES`.
        measurement: the workload measurement — SGX MRENCLAVE (32 B), TDX MRTD (48 B),
            SEV-SNP MEASUREMENT (48 B), simulated SHA-384 of the workload manifest (48 B).
        report_data: the 64-byte user data bound into the Evidence (SGX/TDX REPORTDATA,
            SNP REPORT_DATA, simulated report_data).
        debug: True if the TEE runs in a debug mode (SGX ATTRIBUTES.DEBUG, TDX TD_ATTRIBUTES
            bit 0, SNP POLICY.DEBUG, simulated flag). Debug TEEs do not protect memory.
        signer: who signed the workload — SGX MRSIGNER (32 B), SNP ID-key digest (48 B); None
            where the TEE has no such notion.
        product_id: SGX ISVPRODID; None elsewhere.
        security_version: SGX ISVSVN, SNP GUEST_SVN; None elsewhere.
        tcb_status: vendor TCB status ("UpToDate", "SWHardeningNeeded", ...); "Simulated" for
            the simulated TEE; None when no collateral was evaluated.
        advisory_ids: Intel/AMD security advisories that apply (e.g. "INTEL-SA-00615").
        raw: the vendor fields, bytes as lowercase hex, for display and fine-grained policy.
    """

    tee_type: str
    measurement: bytes
    report_data: bytes
    debug: bool
    signer: bytes | None = None
    product_id: int | None = None
    security_version: int | None = None
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (bytes as lowercase hex), e.g. for EAR annotated claims."""
        def h(v: bytes | None) -> str | None:
            return None if v is None else v.hex()

        return {
            "tee_type": self.tee_type,
            "measurement": h(self.measurement),
            "report_data": h(self.report_data),
            "debug": self.debug,
            "signer": h(self.signer),
            "product_id": self.product_id,
            "security_version": self.security_version,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "raw": dict(self.raw),
        }
