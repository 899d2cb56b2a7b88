"""Appraisal of TD registers (RTMR0-3, MRCONFIGID) and of the SEV-SNP VMPL with real Evidence.

MRTD measures only the TD firmware, so a policy allowing TDX must pin RTMRs or MRCONFIGID
(fail closed, like ``[min_tcb]`` for SEV-SNP). The dcap-qvl TDX sample is verified with its
collateral, then appraised; its register values come from dcap-qvl's own snapshot file.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

import pytest

from safehold.attestation.checks import SnpMaxVmpl, TdxRegistersIn, raise_for
from safehold.attestation.collateral import DcapCollateral
from safehold.attestation.errors import ReferenceValueMismatchError
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.attestation.verifiers.tdx import TdxVerifier
from safehold.errors import ConfigError
from tests.support.shared import EVIDENCE

TDX = EVIDENCE / "tdx"
SGX = EVIDENCE / "sgx"
SNP = EVIDENCE / "snp"
TDX_AT = datetime.fromtimestamp(1752919234, UTC)
SGX_AT = datetime.fromtimestamp(1752919277, UTC)
GOSEV_AT = datetime(2022, 9, 24, 1, 0, tzinfo=UTC)
REGS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id")


pytestmark = pytest.mark.usefixtures("captured_evidence")


@pytest.fixture(scope="module")
def snap() -> dict[str, str]:
    """Register values of the dcap-qvl TDX sample, named as the TDX plug-in names them."""
    text = (TDX / "dcapqvl-tdx_quote.expected-snapshot.txt").read_text()
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s*(\w+): 0x([0-9a-f]+),", text, re.M):
        out.setdefault(m.group(1).replace("rt_mr", "rtmr"), m.group(2))
    assert all(len(out[r]) == 96 for r in REGS)
    return out


@pytest.fixture(scope="module")
def opts() -> dict:
    coll = DcapCollateral.from_json((TDX / "dcapqvl-tdx_quote_collateral.json").read_bytes())
    return {"tdx": {"collateral": coll}}


def tdx_evidence() -> Evidence:
    return Evidence(MEDIA_TYPES["tdx"], (TDX / "dcapqvl-tdx_quote.bin").read_bytes(), {})


def policy(snap: dict[str, str], **regs: object) -> AppraisalPolicy:
    rv: dict[str, object] = {"measurements": [snap["mr_td"]]}
    rv.update(regs)
    return AppraisalPolicy.from_dict({"allowed_tee_types": ["tdx"], "reference_values": rv})


def test_real_tdx_quote_passes_with_its_pinned_registers(snap, opts):
    pol = policy(snap, **{r: [snap[r]] for r in REGS[:4]}, mr_config_id=snap["mr_config_id"])
    rd = bytes.fromhex(snap["report_data"])
    a = Verifier(pol, verifier_options=opts).appraise(tdx_evidence(), expected_report_data=rd, at=TDX_AT)
    assert a.ok
    rows = {v.claim: v for v in a.verdicts}
    for r in REGS:
        assert rows[r].ok and rows[r].got == snap[r] and rows[r].expected == snap[r]
    # one of several accepted values (e.g. two approved kernels) is enough
    other = "ab" * 48
    pol2 = policy(snap, rtmr1=[other, snap["rtmr1"]])
    assert Verifier(pol2, verifier_options=opts).appraise(
        tdx_evidence(), expected_report_data=rd, at=TDX_AT).ok


@pytest.mark.parametrize("reg", REGS)
def test_each_register_mismatch_is_its_own_failed_verdict(snap, opts, reg):
    wrong = bytearray.fromhex(snap[reg])
    wrong[47] ^= 1
    pins = {r: [snap[r]] for r in REGS}
    pins[reg] = [wrong.hex()]
    rd = bytes.fromhex(snap["report_data"])
    with pytest.raises(ReferenceValueMismatchError) as ei:
        Verifier(policy(snap, **pins), verifier_options=opts).appraise(
            tdx_evidence(), expected_report_data=rd, at=TDX_AT)
    assert ei.value.failures == [(reg, wrong.hex(), snap[reg])]


def test_policy_allowing_tdx_without_registers_is_refused(snap):
    for tee in ("tdx", "azure-tdx"):
        with pytest.raises(ConfigError, match="pin at least one of reference_values.rtmr0"):
            AppraisalPolicy.from_dict({"allowed_tee_types": ["sgx", tee],
                                       "reference_values": {"measurements": [snap["mr_td"]]}})
        with pytest.raises(ConfigError, match="pin at least one"):
            AppraisalPolicy(allowed_tee_types=(tee,), measurements=(bytes(48),))
    # SGX-only policies need none
    assert AppraisalPolicy.from_dict({"allowed_tee_types": ["sgx"],
                                      "reference_values": {"measurements": [snap["mr_td"]]}})


@pytest.mark.parametrize(
    ("regs", "match"),
    [
        ({"rtmr0": [("00" * 47)]}, "47 bytes, expected 48"),
        ({"rtmr2": ["zz" * 48]}, "is not hex"),
        ({"rtmr4": ["00" * 48]}, "unknown keys"),
        ({"rtmr1": []}, "non-empty list"),
        ({"mr_config_id": 5}, "expected a list"),
        ({"rtmr3": [1]}, "expected str"),
    ],
)
def test_bad_register_values_are_config_errors(snap, regs, match):
    with pytest.raises(ConfigError, match=match):
        policy(snap, **regs)


def test_registers_do_not_apply_to_sgx_and_missing_ones_fail(snap):
    coll = DcapCollateral.from_json((SGX / "dcapqvl-sgx_quote_collateral.json").read_bytes())
    sgx = SgxVerifier(coll).verify(
        Evidence(MEDIA_TYPES["sgx"], (SGX / "dcapqvl-sgx_quote.bin").read_bytes(), {}), at=SGX_AT)
    check = TdxRegistersIn({"rtmr0": [bytes.fromhex(snap["rtmr0"])]})
    assert check.verdicts(sgx, None) == []
    # TDX claims that lack the register (or hold garbage) fail, they do not pass
    c = TdxVerifier(require_collateral=False).verify(tdx_evidence(), at=TDX_AT)
    for bad in (None, "not hex"):
        raw = {k: v for k, v in c.raw.items() if k != "rtmr0"}
        if bad is not None:
            raw["rtmr0"] = bad
        rows = check.verdicts(dataclasses.replace(c, raw=raw), None)
        assert [(r.claim, r.got, r.ok) for r in rows] == [("rtmr0", "none", False)]


# --- SEV-SNP VMPL ------------------------------------------------------------------------------


def gosev_claims():
    ev = Evidence(MEDIA_TYPES["sev-snp"], (SNP / "gosev-attestation.bin").read_bytes(),
                  {"vcek": (SNP / "gosev-vcek.der").read_bytes()})
    return SevSnpVerifier().verify(ev, at=GOSEV_AT)


def snp_policy(**kw) -> AppraisalPolicy:
    c = gosev_claims()
    data = {"allowed_tee_types": ["sev-snp"], "report_data": "any", "debug_allowed": True,
            "min_tcb": {"bootloader": 2}, "reference_values": {"measurements": [c.measurement.hex()]}}
    data.update(kw)
    return AppraisalPolicy.from_dict(data)


def test_vmpl_zero_report_passes_and_higher_vmpl_is_refused_by_default():
    c = gosev_claims()
    assert c.raw["vmpl"] == 0
    rows = [v for v in snp_policy().verdicts(c) if v.claim == "vmpl"]
    assert [(r.expected, r.got, r.ok) for r in rows] == [("<= 0 (snp_max_vmpl)", "0", True)]
    # the same real report as if it had been requested from VMPL 2 (cannot be re-signed here)
    at2 = dataclasses.replace(c, raw={**c.raw, "vmpl": 2})
    failed = snp_policy().appraise(at2)
    assert [v.as_tuple() for v in failed] == [("vmpl", "<= 0 (snp_max_vmpl)", "2")]
    with pytest.raises(ReferenceValueMismatchError, match="vmpl"):
        raise_for(failed)
    assert snp_policy(snp_max_vmpl=2).appraise(at2) == []
    assert snp_policy(snp_max_vmpl=1).appraise(at2)[0].claim == "vmpl"
    missing = dataclasses.replace(c, raw={k: v for k, v in c.raw.items() if k != "vmpl"})
    assert [v.claim for v in snp_policy(snp_max_vmpl=3).appraise(missing)] == ["vmpl"]
    # not SEV-SNP: no row
    assert SnpMaxVmpl(0).verdicts(dataclasses.replace(c, tee_type="tpm"), None) == []


@pytest.mark.parametrize("bad", [4, -1, "0", True, 1.0])
def test_bad_snp_max_vmpl_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="snp_max_vmpl"):
        snp_policy(snp_max_vmpl=bad)
