"""Simulated Attester + Verifier plug-in + appraisal policy: each bad input its own error."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.checks import AllOf, AnyOf, MeasurementIn, SignerIn
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
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.verifiers.simulated import SimulatedVerifier, parse_report
from safehold.errors import (
    AppraisalError,
    ConfigError,
    EndorsementError,
    EvidenceFormatError,
    EvidenceSignatureError,
    SafeholdError,
)

RD = bytes(range(64))


@pytest.fixture(scope="module")
def att(tmp_path_factory: pytest.TempPathFactory) -> SimulatedAttester:
    return SimulatedAttester(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def dbg(att: SimulatedAttester) -> SimulatedAttester:
    return SimulatedAttester(att.dir.parent, debug=True)


@pytest.fixture(scope="module")
def fixed_ev(att: SimulatedAttester) -> Evidence:
    return att.attest(RD)


def sim_policy(att: SimulatedAttester, **kw) -> AppraisalPolicy:
    base = dict(allow_simulated=True, simulated_root=att.root_ca_path,
                measurements=(att.measurement.digest,))
    base.update(kw)
    return AppraisalPolicy(**base)


@pytest.fixture(autouse=True)
def _quiet_sim_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)
        yield


# --- the simulated Attester --------------------------------------------------------------------


def test_keys_created_once_with_private_permissions(att: SimulatedAttester) -> None:
    for name in ("root-ca.key", "platform.key", "platform.pem", "root-ca.pem"):
        mode = stat.S_IMODE(os.stat(att.dir / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    again = SimulatedAttester(att.dir.parent)
    assert again.root_ca_pem() == att.root_ca_pem()
    from cryptography import x509
    root = x509.load_pem_x509_certificate(att.root_ca_pem())
    assert "SIMULATED" in root.subject.rfc4514_string()
    assert stat.S_IMODE(os.stat(att.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(att.dir / ".lock").st_mode) == 0o600


def test_preexisting_loose_directory_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "data" / "simulated-tee"
    loose.mkdir(parents=True, mode=0o755)
    os.chmod(loose, 0o755)
    a = SimulatedAttester(tmp_path / "data")
    assert a.dir == loose
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700


def test_report_data_must_be_64_bytes(att: SimulatedAttester) -> None:
    with pytest.raises(ValueError, match="64 bytes, got 32"):
        att.attest(bytes(32))


def test_round_trip_through_cmw_and_all_rows(att: SimulatedAttester) -> None:
    ev = Evidence.from_cmw(att.attest(RD).to_cmw())
    with pytest.warns(SimulatedTEEWarning):
        warnings.simplefilter("always", SimulatedTEEWarning)
        a = Verifier(sim_policy(att)).appraise(ev, expected_report_data=RD)
    assert a.ok and a.claims.measurement == att.measurement.digest and a.claims.report_data == RD
    assert [v.claim for v in a.verdicts] == ["tee_type", "debug", "report_data", "measurement",
                                             "tcb_status"]
    assert a.warnings


def test_simulated_use_is_logged_every_time(att: SimulatedAttester, caplog) -> None:
    v = Verifier(sim_policy(att))
    with caplog.at_level(logging.WARNING, logger="safehold.attestation.policy"):
        v.appraise(att.attest(RD), expected_report_data=RD)
        v.appraise(att.attest(RD), expected_report_data=RD)
    assert sum("SIMULATED" in r.getMessage() for r in caplog.records) >= 2


# --- distinct errors ------------------------------------------------------------------------------


def test_simulated_under_default_policy(att: SimulatedAttester) -> None:
    # a TDX policy must pin a TD register: RTMR1 of the dcap-qvl TDX sample
    rtmr1 = bytes.fromhex("0084452c01668329d4bc06acdf58a7205c26743304509973"
                          "949e5619bf81a6a7aea8c323c173019b3093d54e579e9378")
    pol = AppraisalPolicy(allowed_tee_types=("sgx", "tdx"), simulated_root=att.root_ca_path,
                          measurements=(att.measurement.digest,), tdx_registers={"rtmr1": (rtmr1,)})
    with pytest.raises(SimulatedEvidenceError, match="allow_simulated = false"):
        Verifier(pol).appraise(att.attest(RD), expected_report_data=RD)


def test_debug_under_no_debug_policy(att: SimulatedAttester, dbg: SimulatedAttester) -> None:
    with pytest.raises(DebugModeError) as ei:
        Verifier(sim_policy(att)).appraise(dbg.attest(RD), expected_report_data=RD)
    assert ei.value.failures == [("debug", "false", "true")]
    assert Verifier(sim_policy(att, debug_allowed=True)).appraise(
        dbg.attest(RD), expected_report_data=RD).ok


def test_wrong_nonce(att: SimulatedAttester) -> None:
    other = bytes(64)
    with pytest.raises(ReportDataMismatchError, match="report_data: expected 0000"):
        Verifier(sim_policy(att, report_data="nonce")).appraise(att.attest(RD),
                                                                expected_report_data=other)


def test_missing_expected_report_data_fails_closed(att: SimulatedAttester) -> None:
    with pytest.raises(ReportDataMismatchError, match="no expected value"):
        Verifier(sim_policy(att)).appraise(att.attest(RD))
    assert Verifier(sim_policy(att, report_data="any")).appraise(att.attest(RD)).ok


def test_every_failure_listed(att: SimulatedAttester, dbg: SimulatedAttester) -> None:
    pol = sim_policy(att, measurements=(bytes(48),))
    with pytest.raises(AppraisalError) as ei:
        Verifier(pol).appraise(dbg.attest(RD), expected_report_data=bytes(64))
    claims = [f[0] for f in ei.value.failures]
    assert claims == ["debug", "report_data", "measurement"]
    assert isinstance(ei.value, DebugModeError)  # most specific first


def test_tampered_report_signature(att: SimulatedAttester) -> None:
    ev = att.attest(RD)
    report, sig = cbor2.loads(ev.data)
    m = cbor2.loads(report)
    m["debug"] = False
    m["measurement"] = bytes(48)
    forged = cbor2.dumps([cbor2.dumps(m, canonical=True), sig])
    with pytest.raises(EvidenceSignatureError):
        Verifier(sim_policy(att)).appraise(replace(ev, data=forged), expected_report_data=RD)


def test_platform_cert_from_another_simulated_root(att: SimulatedAttester, tmp_path: Path) -> None:
    stranger = SimulatedAttester(tmp_path)
    with pytest.raises(EndorsementError, match="does not chain"):
        Verifier(sim_policy(att)).appraise(stranger.attest(RD), expected_report_data=RD)


def test_missing_endorsement_and_no_root(att: SimulatedAttester) -> None:
    ev = att.attest(RD)
    with pytest.raises(EndorsementError, match="platform_cert"):
        SimulatedVerifier(trusted_roots=[att.root_ca_pem()]).verify(replace(ev, endorsements={}))
    with pytest.raises(EndorsementError, match="no simulated root"):
        SimulatedVerifier().verify(ev)


def test_truncated_and_garbled(att: SimulatedAttester) -> None:
    ev = att.attest(RD)
    v = SimulatedVerifier(trusted_roots=[att.root_ca_pem()])
    for bad in (ev.data[:-7], ev.data[:3], b"", b"\xff" * 40, ev.data + b"\x00"):
        with pytest.raises(EvidenceFormatError):
            v.verify(replace(ev, data=bad))
    with pytest.raises(EvidenceFormatError, match="media type"):
        v.verify(replace(ev, media_type=MEDIA_TYPES["sgx"]))


def test_policy_toml_and_config_errors(att: SimulatedAttester, tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(
        'name = "t"\nallowed_tee_types = ["sgx"]\nallow_simulated = true\n'
        'simulated_root = "root.pem"\naccepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]\n'
        f'[reference_values]\nmeasurements = ["{att.measurement.hex()}"]\nproduct_ids = [1]\n'
        "min_security_version = 3\n"
    )
    pol = AppraisalPolicy.from_toml(p)
    assert pol.simulated_root == tmp_path / "root.pem"
    assert pol.product_ids == (1,) and pol.min_security_version == 3 and pol.name == "t"
    assert AppraisalPolicy.from_toml(str(p)) == pol
    sg = '[reference_values]\nsigners=["' + "00" * 32 + '"]'
    sgx = 'allowed_tee_types=["sgx"]\n'
    bad = {
        "unknown keys": sgx + "colour = 1\n" + sg,
        "pins no Reference": sgx,
        "not hex": sgx + '[reference_values]\nmeasurements=["zz"]',
        "expected bool": sgx + 'debug_allowed="no"\n' + sg,
        "allow_simulated": 'allowed_tee_types=["simulated"]\n' + sg,
        "no TEE type": sg,
        "report_data": sgx + 'report_data="maybe"\n' + sg,
        "not valid TOML": "allowed_tee_types = [",
    }
    for msg, text in bad.items():
        with pytest.raises(ConfigError, match=msg):
            AppraisalPolicy.from_toml(text)
    with pytest.raises(ConfigError, match="cannot read"):
        AppraisalPolicy.from_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="simulated_root"):
        Verifier(sim_policy(att, simulated_root=tmp_path / "missing.pem"))


def test_allof_refuses_empty_and_anyof() -> None:
    with pytest.raises(ConfigError, match="empty policy"):
        AllOf([])
    with pytest.raises(ConfigError):
        AnyOf([])
    from safehold.attestation.checks import Context
    c = Claims("sgx", b"\x01" * 32, bytes(64), False, signer=b"\x02" * 32)
    any_ = AnyOf([MeasurementIn([b"\x09" * 32]), SignerIn([b"\x02" * 32])])
    assert all(v.ok for v in any_.verdicts(c, Context()))
    none = AnyOf([MeasurementIn([b"\x09" * 32]), SignerIn([b"\x03" * 32])])
    (row,) = none.verdicts(c, Context())
    assert not row.ok and "measurement=" in row.got and "signer=" in row.got


def _hw_claims(**kw) -> Claims:
    base = dict(tee_type="sgx", measurement=b"\x11" * 32, report_data=RD, debug=False,
                signer=b"\x22" * 32, product_id=1, security_version=5, tcb_status="UpToDate")
    base.update(kw)
    return Claims(**base)


def test_hardware_claims_reference_values_and_tcb() -> None:
    pol = AppraisalPolicy(allowed_tee_types=("sgx",), measurements=(b"\x11" * 32,),
                          signers=(b"\x22" * 32,), product_ids=(1,), min_security_version=5,
                          accepted_tcb_statuses=("UpToDate", "SWHardeningNeeded"),
                          accepted_advisories=("INTEL-SA-00615",))
    v = Verifier(pol)
    assert v.evaluate_claims(_hw_claims(), expected_report_data=RD).ok
    cases = [
        (dict(tee_type="tdx"), TeeTypeError, "tee_type"),
        (dict(security_version=4), ReferenceValueMismatchError, "security_version"),
        (dict(product_id=2), ReferenceValueMismatchError, "product_id"),
        (dict(signer=None), ReferenceValueMismatchError, "signer"),
        (dict(tcb_status="OutOfDate"), TcbStatusError, "tcb_status"),
        (dict(tcb_status=None), TcbStatusError, "tcb_status"),
        (dict(advisory_ids=("INTEL-SA-00615", "INTEL-SA-00999")), TcbStatusError, "advisory_ids"),
        (dict(tcb_status="Simulated"), TcbStatusError, "tcb_status"),
    ]
    for kw, err, claim in cases:
        a = v.evaluate_claims(_hw_claims(**kw), expected_report_data=RD)
        assert [f.claim for f in a.failures] == [claim], kw
        with pytest.raises(err):
            a.raise_for_failures()
    ok = v.evaluate_claims(_hw_claims(advisory_ids=("INTEL-SA-00615",),
                                      tcb_status="SWHardeningNeeded"), expected_report_data=RD)
    assert ok.ok


def test_unknown_media_type_plugin() -> None:
    pol = AppraisalPolicy(allowed_tee_types=("sgx",), signers=(bytes(32),))
    with pytest.raises(EvidenceFormatError):
        Verifier(pol).appraise(Evidence("application/x-unknown", b"x"), expected_report_data=RD)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_simulated_report_parser(data: bytes) -> None:
    try:
        parse_report(data)
    except SafeholdError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_simulated_evidence(att: SimulatedAttester, fixed_ev: Evidence, data) -> None:
    ev = fixed_ev
    raw = bytearray(ev.data)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    v = SimulatedVerifier(trusted_roots=[att.root_ca_pem()])
    with pytest.raises(SafeholdError):
        v.verify(replace(ev, data=bytes(raw)))


_toml_val = st.recursive(
    st.one_of(st.booleans(), st.integers(-5, 2**70), st.text(max_size=20),
              st.sampled_from(["sgx", "simulated", "00" * 32, "11" * 48, "any", "nonce"])),
    lambda ch: st.one_of(st.lists(ch, max_size=3),
                         st.dictionaries(st.sampled_from(sorted(
                             ["measurements", "signers", "product_ids", "min_security_version", "x"])),
                             ch, max_size=3)),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "allowed_tee_types", "debug_allowed", "report_data",
                                        "accepted_tcb_statuses", "accepted_advisories",
                                        "allow_simulated", "reference_values", "bogus"]),
                       _toml_val, max_size=6))
def test_fuzz_policy_from_dict(d) -> None:
    try:
        pol = AppraisalPolicy.from_dict(d)
    except SafeholdError:
        return
    assert pol.measurements or pol.signers


# --- SEV-SNP / TPM: TCB versions instead of a TCB status ---------------------------------------

def _snp_claims(**kw):
    from safehold.attestation.claims import Claims

    base = dict(tee_type="sev-snp", measurement=b"\x33" * 48, report_data=RD, debug=False,
                raw={"reported_tcb_parts": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
                     "launch_tcb_parts": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}})
    base.update(kw)
    base["raw"] = {"vmpl": 0, **base["raw"]}  # as from VMPL 0 (policy snp_max_vmpl = 0)
    return Claims(**base)


def test_snp_policy_requires_min_tcb():
    from safehold.errors import ConfigError

    with pytest.raises(ConfigError, match=r"set \[min_tcb\]"):
        AppraisalPolicy.from_dict({"allowed_tee_types": ["sev-snp"],
                                   "reference_values": {"measurements": ["33" * 48]}})
    with pytest.raises(ConfigError, match="min_tcb"):
        AppraisalPolicy.from_dict({"allowed_tee_types": ["sev-snp"], "min_tcb": {"bogus": 1},
                                   "reference_values": {"measurements": ["33" * 48]}})


def test_snp_min_tcb_accepts_and_names_the_low_component():
    from safehold.attestation.errors import TcbStatusError

    pol = AppraisalPolicy.from_dict({"allowed_tee_types": ["sev-snp"],
                                     "min_tcb": {"snp": 8, "microcode": 115},
                                     "reference_values": {"measurements": ["33" * 48]}})
    assert pol.appraise(_snp_claims(), expected_report_data=RD) == []
    low = _snp_claims(raw={"reported_tcb_parts": {"snp": 8, "microcode": 114},
                           "launch_tcb_parts": {"snp": 8, "microcode": 115}})
    failed = pol.appraise(low, expected_report_data=RD)
    assert [(v.claim, v.expected, v.got) for v in failed] == [
        ("reported_tcb.microcode", ">= 115", "114")]
    with pytest.raises(TcbStatusError, match="reported_tcb.microcode: expected >= 115, got 114"):
        from safehold.attestation.checks import raise_for

        raise_for(failed)


def test_tcb_status_still_required_for_sgx_without_collateral():
    from safehold.attestation.claims import Claims

    pol = AppraisalPolicy.from_dict({"allowed_tee_types": ["sgx"], "report_data": "any",
                                     "reference_values": {"measurements": ["11" * 32]}})
    c = Claims(tee_type="sgx", measurement=b"\x11" * 32, report_data=RD, debug=False)
    assert [v.claim for v in pol.appraise(c)] == ["tcb_status"]
