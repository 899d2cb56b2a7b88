"""The appraisal checks an :class:`~safehold.attestation.policy.AppraisalPolicy` is built from
(RFC 9334 §8.1 appraisal of Evidence claims), after sigstore-python's ``verify/policy.py``.

Each :class:`Check` returns :class:`Verdict` rows ``(claim, expected, got, ok, kind)``;
:func:`raise_for` raises the most specific :class:`~safehold.errors.AppraisalError` subclass
(:mod:`safehold.attestation.errors`) listing every failed row. :class:`AllOf` refuses to be
empty, :class:`AnyOf` too; the simulated TEE passes :class:`TeeTypeIn` only when allowed, and then
warns (:class:`~safehold.attestation.errors.SimulatedTEEWarning`) on every use.
"""

from __future__ import annotations

import hmac
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from safehold.attestation.claims import Claims
from safehold.attestation.errors import (
    DebugModeError,
    ReferenceValueMismatchError,
    ReportDataMismatchError,
    SimulatedEvidenceError,
    SimulatedTEEWarning,
    TcbStatusError,
    TeeTypeError,
)
from safehold.errors import AppraisalError, ConfigError

__all__ = [
    "AllOf",
    "AnyOf",
    "Check",
    "Context",
    "DebugAllowed",
    "ERROR_CLASSES",
    "MeasurementIn",
    "MinSecurityVersion",
    "ProductIdIn",
    "REPORT_DATA_MODES",
    "ReportDataEquals",
    "SNP_TCB_COMPONENTS",
    "SNP_TEE_TYPES",
    "SNP_VMPLS",
    "SignerIn",
    "SnpMaxVmpl",
    "SnpMinimumTcb",
    "TDX_REGISTERS",
    "TDX_TEE_TYPES",
    "TEE_TYPES_WITHOUT_TCB_STATUS",
    "TcbStatusIn",
    "TdxRegistersIn",
    "TeeTypeIn",
    "Verdict",
    "raise_for",
]

log = logging.getLogger("safehold.attestation.policy")

REPORT_DATA_MODES = ("required", "nonce", "key-binding", "any")
#: TEE types whose Evidence carries TCB *versions* (appraised with ``min_tcb``) or no TCB at all,
#: never a vendor TCB *status* string: TcbStatusIn does not apply to them.
TEE_TYPES_WITHOUT_TCB_STATUS = ("sev-snp", "azure-sev-snp", "tpm")
#: TEE types appraised with ``min_tcb`` (AMD SEV-SNP TCB_VERSION components).
SNP_TEE_TYPES = ("sev-snp", "azure-sev-snp")
SNP_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")
#: TEE types whose claims carry TD registers (``raw`` names as set by ``verifiers.tdx``).
TDX_TEE_TYPES = ("tdx", "azure-tdx")
#: TD registers a policy may pin: RTMR0-3 (firmware config, kernel, app...) and MRCONFIGID.
TDX_REGISTERS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id")
#: SEV-SNP virtual machine privilege levels (AMD SEV-SNP ABI §7.3 / APM Vol. 2 §15.35.7).
SNP_VMPLS = range(4)

#: kind → error class; the raised class is the first failing kind in this order.
ERROR_CLASSES: dict[str, type[AppraisalError]] = {
    "simulated": SimulatedEvidenceError,
    "tee_type": TeeTypeError,
    "debug": DebugModeError,
    "report_data": ReportDataMismatchError,
    "reference": ReferenceValueMismatchError,
    "tcb": TcbStatusError,
}


@dataclass(frozen=True)
class Verdict:
    """One appraised claim.

    Attributes:
        claim: claim name (``measurement``, ``debug``, ``report_data``, ...).
        expected: what the policy wants, human-readable.
        got: what the Evidence claims, human-readable (bytes as hex).
        ok: whether the claim satisfies the policy.
        kind: failure category, a key of :data:`ERROR_CLASSES`.
    """

    claim: str
    expected: str
    got: str
    ok: bool
    kind: str = "reference"

    def as_tuple(self) -> tuple[str, str, str]:
        """``(claim, expected, got)`` as :class:`AppraisalError` lists failures."""
        return (self.claim, self.expected, self.got)


def raise_for(verdicts: Sequence[Verdict], message: str = "Evidence appraisal failed") -> None:
    """Raise the most specific :class:`AppraisalError` listing every failed verdict, if any.

    Raises:
        AppraisalError: a subclass from :data:`ERROR_CLASSES`, with ``failures`` set.
    """
    failed = [v for v in verdicts if not v.ok]
    if not failed:
        return
    kinds = {v.kind for v in failed}
    cls = next((c for k, c in ERROR_CLASSES.items() if k in kinds), AppraisalError)
    raise cls(message, [v.as_tuple() for v in failed])


@dataclass(frozen=True)
class Context:
    """Per-appraisal inputs that are not claims: the expected report_data (64 B) or None."""

    expected_report_data: bytes | None = None


def _hexlist(values: Iterable[bytes]) -> str:
    vals = [v.hex() for v in values]
    return vals[0] if len(vals) == 1 else "one of [" + ", ".join(vals) + "]"


class Check(ABC):
    """One policy check; returns its verdict rows (possibly several)."""

    @abstractmethod
    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        """Appraise ``claims`` and return one row per claim looked at."""


class AllOf(Check):
    """All child checks must pass. Refuses to be empty (it would accept everything).

    Raises:
        ConfigError: no checks given.
    """

    def __init__(self, checks: Sequence[Check]) -> None:
        if not checks:
            raise ConfigError("AllOf needs at least one check: an empty policy would accept anything")
        self.checks = tuple(checks)

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        out: list[Verdict] = []
        for c in self.checks:
            out.extend(c.verdicts(claims, ctx))
        return out


class AnyOf(Check):
    """At least one child check must pass (e.g. one of several approved builds with their own
    signer). Returns the passing child's rows, or one failed row summarising all children.

    Raises:
        ConfigError: no checks given.
    """

    def __init__(self, checks: Sequence[Check]) -> None:
        if not checks:
            raise ConfigError("AnyOf needs at least one check")
        self.checks = tuple(checks)

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        reasons = []
        kind = "reference"
        for c in self.checks:
            rows = c.verdicts(claims, ctx)
            if all(r.ok for r in rows):
                return rows
            bad = [r for r in rows if not r.ok]
            kind = bad[0].kind
            reasons.append("; ".join(f"{r.claim}={r.got}" for r in bad))
        return [Verdict("any-of", f"one of {len(self.checks)} alternatives", " | ".join(reasons),
                        False, kind)]


class TeeTypeIn(Check):
    """``tee_type`` is allowed; ``simulated`` only with ``allow_simulated`` (then warns)."""

    def __init__(self, allowed: Iterable[str], *, allow_simulated: bool = False) -> None:
        self.allowed = tuple(allowed)
        self.allow_simulated = allow_simulated

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        if claims.tee_type == "simulated":
            if not self.allow_simulated:
                return [Verdict("tee_type", "a hardware TEE (policy has allow_simulated = false)",
                                "simulated", False, "simulated")]
            msg = ("accepting SIMULATED TEE Evidence: no hardware protects this workload "
                   "(policy allow_simulated = true; never use in production)")
            log.warning(msg)
            warnings.warn(msg, SimulatedTEEWarning, stacklevel=4)
            return [Verdict("tee_type", "simulated allowed (allow_simulated = true)",
                            "simulated (NOT hardware-protected)", True, "simulated")]
        ok = claims.tee_type in self.allowed
        return [Verdict("tee_type", "one of " + ", ".join(self.allowed) if self.allowed else "none",
                        claims.tee_type, ok, "tee_type")]


class DebugAllowed(Check):
    """Debug TEEs (memory readable by the host) are refused unless allowed."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        exp = "false or true (debug_allowed = true)" if self.allowed else "false"
        return [Verdict("debug", exp, str(claims.debug).lower(),
                        self.allowed or not claims.debug, "debug")]


class MeasurementIn(Check):
    """``measurement`` equals one of the Reference Values."""

    def __init__(self, values: Iterable[bytes]) -> None:
        self.values = tuple(values)

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        ok = any(hmac.compare_digest(claims.measurement, v) for v in self.values)
        return [Verdict("measurement", _hexlist(self.values), claims.measurement.hex(), ok)]


class SignerIn(Check):
    """``signer`` (MRSIGNER / ID-key digest) equals one of the Reference Values."""

    def __init__(self, values: Iterable[bytes]) -> None:
        self.values = tuple(values)

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        got = claims.signer
        ok = got is not None and any(hmac.compare_digest(got, v) for v in self.values)
        return [Verdict("signer", _hexlist(self.values), "none" if got is None else got.hex(), ok)]


class ProductIdIn(Check):
    """``product_id`` (SGX ISVPRODID) is one of the allowed values."""

    def __init__(self, values: Iterable[int]) -> None:
        self.values = tuple(values)

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        got = claims.product_id
        return [Verdict("product_id", "one of " + ", ".join(map(str, self.values)),
                        "none" if got is None else str(got), got in self.values)]


class MinSecurityVersion(Check):
    """``security_version`` (ISVSVN / GUEST_SVN) is at least the minimum."""

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        got = claims.security_version
        return [Verdict("security_version", f">= {self.minimum}", "none" if got is None else str(got),
                        got is not None and got >= self.minimum)]


class TcbStatusIn(Check):
    """The platform TCB status is accepted and every applicable advisory is tolerated.

    Simulated Evidence carries ``"Simulated"``, accepted exactly when the TEE-type check
    accepted simulated Evidence (that row carries the decision and the warning).
    """

    def __init__(self, statuses: Iterable[str], advisories: Iterable[str] = (), *,
                 allow_simulated: bool = False) -> None:
        self.statuses = tuple(statuses)
        self.advisories = tuple(advisories)
        self.allow_simulated = allow_simulated

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        got = claims.tcb_status
        if claims.tee_type in TEE_TYPES_WITHOUT_TCB_STATUS and got is None:
            # SEV-SNP reports TCB versions (checked by SnpMinimumTcb); a TPM quote has no TCB.
            rows = [Verdict("tcb_status", "not applicable to " + claims.tee_type
                            + (" (TCB versions: see min_tcb)" if claims.tee_type in SNP_TEE_TYPES
                               else ""), "none", True, "tcb")]
        elif claims.tee_type == "simulated" and got == "Simulated":
            ok = self.allow_simulated
            rows = [Verdict("tcb_status", "Simulated (allow_simulated = true)"
                            if ok else "a hardware TCB status", got, ok, "simulated")]
        else:
            rows = [Verdict("tcb_status", "one of " + ", ".join(self.statuses),
                            got if got is not None else "none (no collateral evaluated)",
                            got in self.statuses, "tcb")]
        bad = [a for a in claims.advisory_ids if a not in self.advisories]
        if claims.advisory_ids:
            rows.append(Verdict("advisory_ids",
                                "subset of [" + ", ".join(self.advisories) + "]",
                                ", ".join(claims.advisory_ids) + (
                                    f" (not accepted: {', '.join(bad)})" if bad else ""),
                                not bad, "tcb"))
        return rows


class SnpMinimumTcb(Check):
    """Every component SPL of an SEV-SNP report's REPORTED_TCB and LAUNCH_TCB is at least the
    minimum (AMD compares TCBs per component; AMD SEV-SNP ABI spec §8.19, TCB_VERSION).

    Args:
        minimum: component → minimum SPL, e.g. ``{"bootloader": 2, "tee": 0, "snp": 5,
            "microcode": 68}`` (names as in ``verifiers.sev_snp.decode_tcb``).

    Only SEV-SNP claims (``sev-snp``, ``azure-sev-snp``) are checked; other TEE types yield no
    rows. A component missing from the claims fails.
    """

    def __init__(self, minimum: Mapping[str, int]) -> None:
        self.minimum = dict(minimum)

    def verdicts(self, claims: Claims, ctx: Context | None) -> list[Verdict]:
        """One verdict row per (TCB, component)."""
        if claims.tee_type not in SNP_TEE_TYPES:
            return []
        rows = []
        for which in ("reported_tcb", "launch_tcb"):
            parts = claims.raw.get(f"{which}_parts", {})
            for comp, want in self.minimum.items():
                got = parts.get(comp)
                rows.append(Verdict(f"{which}.{comp}", f">= {want}",
                                    "none" if got is None else str(got),
                                    got is not None and got >= want, "tcb"))
        return rows


class TdxRegistersIn(Check):
    """Each pinned TD register (RTMR0-3, MRCONFIGID; 48 B) equals one of its Reference Values.

    MRTD (the ``measurement`` claim) covers only the TD firmware; the kernel, command line and
    application are extended into RTMR1-3 (Intel TDX Module ABI §3.4 / TDX virtual firmware
    design guide §4), so a TDX policy needs these rows to bind the workload.

    Args:
        values: register name from :data:`TDX_REGISTERS` → accepted 48-byte values.

    Only ``tdx`` / ``azure-tdx`` claims are checked (one row per pinned register); other TEE
    types yield no rows. A register missing from ``claims.raw`` fails.
    """

    def __init__(self, values: Mapping[str, Iterable[bytes]]) -> None:
        self.values = {k: tuple(v) for k, v in values.items()}

    def verdicts(self, claims: Claims, ctx: Context | None) -> list[Verdict]:
        """One verdict row per pinned register."""
        if claims.tee_type not in TDX_TEE_TYPES:
            return []
        rows = []
        for reg, vals in self.values.items():
            got_hex = claims.raw.get(reg)
            try:
                got = bytes.fromhex(got_hex) if isinstance(got_hex, str) else None
            except ValueError:
                got = None
            ok = got is not None and any(hmac.compare_digest(got, v) for v in vals)
            rows.append(Verdict(reg, _hexlist(vals), "none" if got is None else got.hex(), ok))
        return rows


class SnpMaxVmpl(Check):
    """An SEV-SNP report was requested from VMPL <= ``maximum`` (REPORT.VMPL, AMD SEV-SNP ABI
    §7.3 Table 23). VMPL 0 is the guest's most privileged level; a report from a higher VMPL
    may come from less trusted code running beside the workload (which chose REPORT_DATA).

    Only ``sev-snp`` / ``azure-sev-snp`` claims are checked; others yield no rows. A missing
    VMPL fails.
    """

    def __init__(self, maximum: int = 0) -> None:
        self.maximum = maximum

    def verdicts(self, claims: Claims, ctx: Context | None) -> list[Verdict]:
        """One ``vmpl`` row for SEV-SNP claims."""
        if claims.tee_type not in SNP_TEE_TYPES:
            return []
        got = claims.raw.get("vmpl")
        ok = isinstance(got, int) and not isinstance(got, bool) and 0 <= got <= self.maximum
        return [Verdict("vmpl", f"<= {self.maximum} (snp_max_vmpl)",
                        "none" if got is None else str(got), ok)]


class ReportDataEquals(Check):
    """report_data (64 B) equals the caller's expected value (nonce or key binding)."""

    def __init__(self, mode: str = "required") -> None:
        if mode not in REPORT_DATA_MODES:
            raise ConfigError(f"report_data: expected one of {REPORT_DATA_MODES}, got {mode!r}")
        self.mode = mode

    def verdicts(self, claims: Claims, ctx: Context) -> list[Verdict]:
        exp = ctx.expected_report_data
        if self.mode == "any" and exp is None:
            # Inspection only: nothing to compare against. A Relying Party always supplies its
            # binding (KBS nonce + tee-pubkey, RA-TLS key hash), and that is then compared
            # whatever the mode — "any" never lets relayed Evidence through.
            return [Verdict("report_data", "any (not checked: report_data = \"any\")",
                            claims.report_data.hex(), True, "report_data")]
        label = {"nonce": "nonce", "key-binding": "key binding"}.get(self.mode, "binding")
        if exp is None:
            return [Verdict("report_data", f"a {label} supplied by the Relying Party",
                            "no expected value was supplied", False, "report_data")]
        ok = len(exp) == len(claims.report_data) and hmac.compare_digest(exp, claims.report_data)
        return [Verdict("report_data", f"{exp.hex()} ({label})", claims.report_data.hex(), ok,
                        "report_data")]


