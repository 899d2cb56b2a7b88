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

The checks are :mod:`safehold.attestation.checks`; each returns
:class:`~safehold.attestation.checks.Verdict` rows ``(claim, expected, got, ok)`` — the same rows
the CLI prints and :class:`~safehold.errors.AppraisalError` lists. Style after sigstore-python's
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

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from safehold.attestation.checks import (
    REPORT_DATA_MODES,
    SNP_TCB_COMPONENTS,
    SNP_TEE_TYPES,
    SNP_VMPLS,
    TDX_REGISTERS,
    TDX_TEE_TYPES,
    AllOf,
    Check,
    Context,
    DebugAllowed,
    MeasurementIn,
    MinSecurityVersion,
    ProductIdIn,
    ReportDataEquals,
    SignerIn,
    SnpMaxVmpl,
    SnpMinimumTcb,
    TcbStatusIn,
    TdxRegistersIn,
    TeeTypeIn,
    Verdict,
)
from safehold.attestation.claims import TEE_TYPES, Claims
from safehold.errors import ConfigError

__all__ = ["AppraisalPolicy"]

_T = TypeVar("_T")

log = logging.getLogger("safehold.attestation.policy")

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
            for value in vals:
                if len(value) != 48:
                    raise ConfigError(f"reference_values.{reg}: {value.hex()[:20]!r}... is {len(value)} "
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
    def from_dict(cls, data: Mapping[str, object], *, base_dir: Path | None = None) -> AppraisalPolicy:
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


def _tdx_registers(rv: Mapping[str, object]) -> dict[str, tuple[bytes, ...]]:
    out = {}
    for reg in TDX_REGISTERS:
        if reg in rv:
            v = rv[reg]
            # mr_config_id is usually one value; a string is accepted for any register
            out[reg] = tuple(_hexes([v] if isinstance(v, str) else v, f"reference_values.{reg}"))
    return out


def _min_tcb(v: object) -> dict[str, int]:
    if not isinstance(v, Mapping):
        raise ConfigError("min_tcb must be a table of component = minimum SPL")
    return {str(k): _int(x, f"min_tcb.{k}") for k, x in v.items()}


def _typed(v: object, t: type[_T], name: str) -> _T:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise ConfigError(f"{name}: expected {t.__name__}, got {type(v).__name__}")
    return v


def _int(v: object, name: str) -> int:
    n = _typed(v, int, name)
    if n < 0:
        raise ConfigError(f"{name}: expected a non-negative integer, got {n}")
    return n


def _list(v: object, name: str) -> list[object]:
    if not isinstance(v, list):
        raise ConfigError(f"{name}: expected a list, got {type(v).__name__}")
    return v


def _strs(v: object, name: str) -> list[str]:
    return [_typed(x, str, name) for x in _list(v, name)]


def _ints(v: object, name: str) -> list[int]:
    return [_int(x, name) for x in _list(v, name)]


def _hexes(v: object, name: str) -> list[bytes]:
    out = []
    for x in _strs(v, name):
        try:
            out.append(bytes.fromhex(x))
        except ValueError:
            raise ConfigError(f"{name}: {x[:20]!r}... is not hex") from None
    return out
