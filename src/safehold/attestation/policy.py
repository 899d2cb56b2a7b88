"""Appraisal policy: which claims (RFC 9334 §8.1) a Verifier accepts, as small composable checks.

A policy is written in TOML by the data owner::

    name = "records-prod"                    # reported in EAR results
    allowed_tee_types = ["sgx", "tdx"]        # hardware TEE types (claims.TEE_TYPES)
    debug_allowed = false                     # default false
    accepted_tcb_statuses = ["UpToDate"]      # default ["UpToDate"]
    accepted_advisories = []                  # advisory ids tolerated (e.g. "INTEL-SA-00615")
    report_data = "key-binding"               # "nonce" | "key-binding" | "required" | "any"
    allow_simulated = false                   # default false; true warns on every use
    simulated_root = "root-ca.pem"            # simulated root CA (relative to this file)
    snp_max_vmpl = 0                          # SEV-SNP: highest VMPL a report may come from

    [min_tcb]                                 # SEV-SNP only, required when sev-snp is allowed:
    bootloader = 3                            # minimum SPL per component of REPORTED_TCB and
    tee = 0                                   # LAUNCH_TCB (AMD SEV-SNP ABI §8.19, TCB_VERSION)
    snp = 8
    microcode = 115

    [reference_values]                        # at least measurements or signers
    measurements = ["<hex>", ...]             # from `safehold measure` / MRENCLAVE / MRTD
    signers = ["<hex>", ...]                  # MRSIGNER / SNP ID-key digest
    product_ids = [1]                         # SGX ISVPRODID
    min_security_version = 10                 # SGX ISVSVN / SNP GUEST_SVN
    rtmr0 = ["<hex>", ...]                    # TDX RTMR0..3 (48 B each), rtmr1..rtmr3 alike;
    mr_config_id = "<hex>"                    # TDX MRCONFIGID (48 B, or a list). A policy
                                              # allowing tdx / azure-tdx must pin one of them

Each check returns :class:`Verdict` rows ``(claim, expected, got, ok)`` — the same rows the CLI
prints and :class:`~safehold.errors.AppraisalError` lists. Style after sigstore-python's
``verify/policy.py``: :class:`AllOf` refuses to be empty (a policy that checks nothing would
accept everything), and the simulated TEE is accepted only by explicit opt-in that warns on
every use.

report_data (SGX/TDX REPORTDATA, SNP REPORT_DATA, 64 B): with ``"nonce"``, ``"key-binding"``
or ``"required"`` (the default) the caller must pass ``expected_report_data`` and the claim must
equal it (the label only names what the 64 bytes bind, in messages); ``"any"`` lets a caller
with no binding (an inspection tool) skip the check, but an ``expected_report_data`` that *is*
supplied (as every Relying Party does) is always compared, so no policy can admit relayed
Evidence.
"""

from __future__ import annotations

import hmac
import logging
import tomllib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safehold.attestation.claims import TEE_TYPES, Claims
from safehold.errors import AppraisalError, ConfigError

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


class SimulatedTEEWarning(UserWarning):
    """Simulated (not hardware-protected) Evidence was accepted because the policy allows it."""


# --- distinct appraisal errors ---------------------------------------------------------------


class SimulatedEvidenceRefused(AppraisalError):
    """Evidence comes from the simulated TEE and the policy does not set ``allow_simulated``."""


class TeeTypeRefused(AppraisalError):
    """The Evidence's TEE type is not in ``allowed_tee_types``."""


class DebugRefused(AppraisalError):
    """The TEE runs in debug mode (memory not protected) and ``debug_allowed`` is false."""


class ReportDataMismatch(AppraisalError):
    """report_data is not the expected nonce / key binding (stale, replayed or relayed Evidence)."""


class ReferenceValueMismatch(AppraisalError):
    """Measurement, signer, product id or security version does not match the Reference Values."""


class TcbStatusRefused(AppraisalError):
    """The platform TCB status or an applicable advisory is not accepted."""


#: kind → error class; the raised class is the first failing kind in this order.
ERROR_CLASSES: dict[str, type[AppraisalError]] = {
    "simulated": SimulatedEvidenceRefused,
    "tee_type": TeeTypeRefused,
    "debug": DebugRefused,
    "report_data": ReportDataMismatch,
    "reference": ReferenceValueMismatch,
    "tcb": TcbStatusRefused,
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


# --- the policy -------------------------------------------------------------------------------

_TOP_KEYS = {"name", "allowed_tee_types", "debug_allowed", "accepted_tcb_statuses",
             "accepted_advisories", "report_data", "allow_simulated", "simulated_root",
             "reference_values", "min_tcb", "snp_max_vmpl"}
_RV_KEYS = {"measurements", "signers", "product_ids", "min_security_version", *TDX_REGISTERS}


@dataclass(frozen=True)
class AppraisalPolicy:
    """The data owner's appraisal policy (see the module docstring for the TOML form).

    Attributes:
        allowed_tee_types: hardware TEE types accepted (``simulated`` goes via allow_simulated).
        measurements: accepted measurements (32 or 48 B each).
        signers: accepted signers (MRSIGNER 32 B, SNP ID-key digest 48 B).
        product_ids: accepted product ids; empty = not checked.
        min_security_version: minimum security version; None = not checked.
        debug_allowed: accept debug TEEs.
        accepted_tcb_statuses: vendor TCB statuses accepted.
        accepted_advisories: security advisory ids tolerated.
        allow_simulated: accept the simulated TEE (warns on every use).
        simulated_root: PEM file of the simulated root CA the simulated Verifier trusts.
        report_data: one of :data:`REPORT_DATA_MODES`.
        name: policy identifier, reported in Attestation Results.
        min_tcb: SEV-SNP minimum SPL per TCB component (required when SEV-SNP is allowed).
        tdx_registers: TD register (:data:`TDX_REGISTERS`) → accepted 48-byte values (one
            register at least is required when ``tdx`` / ``azure-tdx`` is allowed).
        snp_max_vmpl: highest SEV-SNP VMPL (0..3) a report may come from; default 0.
    """

    allowed_tee_types: tuple[str, ...] = ()
    measurements: tuple[bytes, ...] = ()
    signers: tuple[bytes, ...] = ()
    product_ids: tuple[int, ...] = ()
    min_security_version: int | None = None
    debug_allowed: bool = False
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    accepted_advisories: tuple[str, ...] = ()
    allow_simulated: bool = False
    simulated_root: Path | None = None
    report_data: str = "required"
    name: str = "default"
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    tdx_registers: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)
    snp_max_vmpl: int = 0
    extra_checks: tuple[Check, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.measurements and not self.signers:
            raise ConfigError(
                "policy pins no Reference Values: give reference_values.measurements or .signers"
            )
        for t in self.allowed_tee_types:
            if t not in TEE_TYPES or t == "simulated":
                raise ConfigError(
                    f"allowed_tee_types: expected hardware types from {TEE_TYPES[1:]}, got {t!r} "
                    "(use allow_simulated = true for the simulated TEE)"
                )
        for comp, v in self.min_tcb.items():
            if comp not in SNP_TCB_COMPONENTS or not isinstance(v, int) or not 0 <= v <= 255:
                raise ConfigError(f"min_tcb: expected {{component: 0..255}} with components from "
                                  f"{SNP_TCB_COMPONENTS}, got {comp!r} = {v!r}")
        snp = [t for t in self.allowed_tee_types if t in SNP_TEE_TYPES]
        if snp and not self.min_tcb:
            raise ConfigError(f"allowed_tee_types includes {', '.join(snp)}: set [min_tcb] "
                              "(SEV-SNP reports TCB versions, not a TCB status)")
        for reg, vals in self.tdx_registers.items():
            if reg not in TDX_REGISTERS or not vals:
                raise ConfigError(f"reference_values.{reg}: expected a non-empty list of values "
                                  f"for one of {TDX_REGISTERS}")
            for v in vals:
                if len(v) != 48:
                    raise ConfigError(f"reference_values.{reg}: {v.hex()[:20]!r}... is {len(v)} "
                                      "bytes, expected 48")
        tdx = [t for t in self.allowed_tee_types if t in TDX_TEE_TYPES]
        if tdx and not self.tdx_registers:
            raise ConfigError(f"allowed_tee_types includes {', '.join(tdx)}: pin at least one of "
                              "reference_values.rtmr0..rtmr3 or mr_config_id (MRTD measures only "
                              "the TD firmware; kernel and application are in the RTMRs)")
        if self.snp_max_vmpl not in SNP_VMPLS or isinstance(self.snp_max_vmpl, bool):
            raise ConfigError(f"snp_max_vmpl: expected 0..3, got {self.snp_max_vmpl!r}")
        if not self.allowed_tee_types and not self.allow_simulated:
            raise ConfigError("policy allows no TEE type: set allowed_tee_types")
        if self.report_data not in REPORT_DATA_MODES:
            raise ConfigError(
                f"report_data: expected one of {REPORT_DATA_MODES}, got {self.report_data!r}"
            )
        for m in self.measurements + self.signers:
            if len(m) not in (32, 48, 64):
                raise ConfigError(f"reference value {m.hex()!r} is {len(m)} bytes, expected 32 or 48")
        if self.allow_simulated:
            log.warning("appraisal policy %r allows SIMULATED TEE Evidence (not for production)",
                        self.name)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, source: str | Path) -> AppraisalPolicy:
        """Load a policy from a TOML file path (``Path`` or a path string) or TOML text.

        A ``str`` containing a newline or ``=`` is taken as TOML text; ``simulated_root`` is
        resolved relative to the file's directory (or the working directory for text).

        Raises:
            ConfigError: unreadable file, invalid TOML, unknown keys, wrong types or values.
        """
        base = Path.cwd()
        if isinstance(source, Path) or ("\n" not in source and "=" not in source):
            path = Path(source)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read appraisal policy {path}: {e}") from None
            base = path.resolve().parent
        else:
            text = source
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"appraisal policy is not valid TOML: {e}") from None
        return cls.from_dict(data, base_dir=base)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> AppraisalPolicy:
        """Build a policy from the TOML structure (see module docstring).

        Raises:
            ConfigError: unknown keys, wrong types, bad hex, or a policy pinning nothing.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("appraisal policy must be a table")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"appraisal policy: unknown keys {sorted(unknown)}")
        rv = data.get("reference_values", {})
        if not isinstance(rv, Mapping):
            raise ConfigError("reference_values must be a table")
        unknown = set(rv) - _RV_KEYS
        if unknown:
            raise ConfigError(f"reference_values: unknown keys {sorted(unknown)}")
        sim_root = data.get("simulated_root")
        if sim_root is not None:
            sim_root = Path(_typed(sim_root, str, "simulated_root"))
            if not sim_root.is_absolute():
                sim_root = (base_dir or Path.cwd()) / sim_root
        msv = rv.get("min_security_version")
        return cls(
            allowed_tee_types=tuple(_strs(data.get("allowed_tee_types", []), "allowed_tee_types")),
            measurements=tuple(_hexes(rv.get("measurements", []), "reference_values.measurements")),
            signers=tuple(_hexes(rv.get("signers", []), "reference_values.signers")),
            product_ids=tuple(_ints(rv.get("product_ids", []), "reference_values.product_ids")),
            min_security_version=None if msv is None else _int(msv, "min_security_version"),
            debug_allowed=_typed(data.get("debug_allowed", False), bool, "debug_allowed"),
            accepted_tcb_statuses=tuple(_strs(data.get("accepted_tcb_statuses", ["UpToDate"]),
                                              "accepted_tcb_statuses")),
            accepted_advisories=tuple(_strs(data.get("accepted_advisories", []),
                                            "accepted_advisories")),
            allow_simulated=_typed(data.get("allow_simulated", False), bool, "allow_simulated"),
            simulated_root=sim_root,
            report_data=_typed(data.get("report_data", "required"), str, "report_data"),
            name=_typed(data.get("name", "default"), str, "name"),
            min_tcb=_min_tcb(data.get("min_tcb", {})),
            tdx_registers=_tdx_registers(rv),
            snp_max_vmpl=_int(data.get("snp_max_vmpl", 0), "snp_max_vmpl"),
        )

    # -- appraisal ------------------------------------------------------------------------------

    def check(self) -> AllOf:
        """The composed check this policy runs (TEE type, debug, report_data, Reference Values,
        TCB status, then any ``extra_checks``)."""
        checks: list[Check] = [
            TeeTypeIn(self.allowed_tee_types, allow_simulated=self.allow_simulated),
            DebugAllowed(self.debug_allowed),
            ReportDataEquals(self.report_data),
        ]
        if self.measurements:
            checks.append(MeasurementIn(self.measurements))
        if self.signers:
            checks.append(SignerIn(self.signers))
        if self.product_ids:
            checks.append(ProductIdIn(self.product_ids))
        if self.min_security_version is not None:
            checks.append(MinSecurityVersion(self.min_security_version))
        checks.append(TcbStatusIn(self.accepted_tcb_statuses, self.accepted_advisories,
                                  allow_simulated=self.allow_simulated))
        if self.min_tcb:
            checks.append(SnpMinimumTcb(self.min_tcb))
        if self.tdx_registers:
            checks.append(TdxRegistersIn(self.tdx_registers))
        checks.append(SnpMaxVmpl(self.snp_max_vmpl))
        checks.extend(self.extra_checks)
        return AllOf(checks)

    def verdicts(self, claims: Claims, *, expected_report_data: bytes | None = None) -> list[Verdict]:
        """Every verdict row (passing and failing), in check order."""
        return self.check().verdicts(claims, Context(expected_report_data))

    def appraise(self, claims: Claims, *, expected_report_data: bytes | None = None) -> list[Verdict]:
        """Return the failed verdicts (empty list = acceptable). Never raises on bad claims."""
        return [v for v in self.verdicts(claims, expected_report_data=expected_report_data)
                if not v.ok]


def _tdx_registers(rv: Mapping[str, Any]) -> dict[str, tuple[bytes, ...]]:
    out = {}
    for reg in TDX_REGISTERS:
        if reg in rv:
            v = rv[reg]
            # mr_config_id is usually one value; a string is accepted for any register
            out[reg] = tuple(_hexes([v] if isinstance(v, str) else v, f"reference_values.{reg}"))
    return out


def _min_tcb(v: Any) -> dict[str, int]:
    if not isinstance(v, Mapping):
        raise ConfigError("min_tcb must be a table of component = minimum SPL")
    return {str(k): _int(x, f"min_tcb.{k}") for k, x in v.items()}


def _typed(v: Any, t: type, name: str) -> Any:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise ConfigError(f"{name}: expected {t.__name__}, got {type(v).__name__}")
    return v


def _int(v: Any, name: str) -> int:
    v = _typed(v, int, name)
    if v < 0:
        raise ConfigError(f"{name}: expected a non-negative integer, got {v}")
    return v


def _list(v: Any, name: str) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"{name}: expected a list, got {type(v).__name__}")
    return v


def _strs(v: Any, name: str) -> list[str]:
    return [_typed(x, str, name) for x in _list(v, name)]


def _ints(v: Any, name: str) -> list[int]:
    return [_int(x, name) for x in _list(v, name)]


def _hexes(v: Any, name: str) -> list[bytes]:
    out = []
    for x in _strs(v, name):
        try:
            out.append(bytes.fromhex(x))
        except ValueError:
            raise ConfigError(f"{name}: {x[:20]!r}... is not hex") from None
    return out
