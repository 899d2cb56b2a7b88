"""EAR Attestation Results: round trip, expiry, tamper, wrong issuer key, status, nonce, fuzz."""

from __future__ import annotations

import base64
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.claims import Claims
from safehold.attestation.errors import SimulatedTEEWarning
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.result import (
    EAT_PROFILE,
    generate_signing_key,
    issue_ear,
    status_of,
    verify_ear,
)
from safehold.attestation.verifier import Verifier
from safehold.errors import AttestationResultError, SafeholdError

RD = bytes(range(64))
NOW = 1_790_000_000


@pytest.fixture(scope="module")
def key():
    return generate_signing_key()


@pytest.fixture(scope="module")
def hw_appraisal():
    pol = AppraisalPolicy(allowed_tee_types=("sgx",), measurements=(b"\x11" * 32,), name="prod")
    c = Claims("sgx", b"\x11" * 32, RD, False, tcb_status="UpToDate")
    return Verifier(pol).evaluate_claims(c, expected_report_data=RD)


@pytest.fixture(scope="module")
def sim_appraisal(tmp_path_factory):
    att = SimulatedAttester(tmp_path_factory.mktemp("sim"))
    pol = AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                          measurements=(att.measurement.digest,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)
        return Verifier(pol).appraise(att.attest(RD), expected_report_data=RD)


def test_round_trip(key, hw_appraisal) -> None:
    tok = issue_ear(hw_appraisal, key, nonce=b"n" * 16, now=NOW)
    cl = verify_ear(tok, key.public_key(), now=NOW + 10, expected_nonce=b"n" * 16)
    assert cl["eat_profile"] == EAT_PROFILE and cl["iat"] == NOW and cl["exp"] == NOW + 300
    sub = cl["submods"]["sgx"]
    assert sub["ear.status"] == "affirming"
    assert sub["ear.appraisal-policy-id"] == "prod"
    assert sub["ear.veraison.annotated-evidence"]["measurement"] == "11" * 32
    assert sub["ear.trustworthiness-vector"] == {"executables": 2, "hardware": 2}
    assert cl["ear.verifier-id"]["developer"]
    header = json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))
    assert header["alg"] == "ES256"


def test_expired_and_future(key, hw_appraisal) -> None:
    tok = issue_ear(hw_appraisal, key, now=NOW, ttl=60)
    with pytest.raises(AttestationResultError, match="expired"):
        verify_ear(tok, key.public_key(), now=NOW + 61)
    assert verify_ear(tok, key.public_key(), now=NOW + 61, leeway=5)
    with pytest.raises(AttestationResultError, match="future"):
        verify_ear(tok, key.public_key(), now=NOW - 100)


def test_tampered_payload_and_signature(key, hw_appraisal) -> None:
    tok = issue_ear(hw_appraisal, key, now=NOW)
    h, p, s = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["submods"]["sgx"]["ear.veraison.annotated-evidence"]["debug"] = True
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AttestationResultError, match="rejected"):
        verify_ear(f"{h}.{p2}.{s}", key.public_key(), now=NOW)
    s2 = ("A" if s[0] != "A" else "B") + s[1:]
    with pytest.raises(AttestationResultError):
        verify_ear(f"{h}.{p}.{s2}", key.public_key(), now=NOW)
    with pytest.raises(AttestationResultError):
        verify_ear(tok[:-10], key.public_key(), now=NOW)


def test_wrong_issuer_key(key, hw_appraisal) -> None:
    tok = issue_ear(hw_appraisal, key, now=NOW)
    with pytest.raises(AttestationResultError, match="another key"):
        verify_ear(tok, generate_signing_key().public_key(), now=NOW)


def test_wrong_nonce(key, hw_appraisal) -> None:
    tok = issue_ear(hw_appraisal, key, nonce=b"a" * 16, now=NOW)
    with pytest.raises(AttestationResultError, match="eat_nonce"):
        verify_ear(tok, key.public_key(), now=NOW, expected_nonce=b"b" * 16)
    with pytest.raises(AttestationResultError, match="8..64"):
        issue_ear(hw_appraisal, key, nonce=b"short", now=NOW)


def test_simulated_is_warning_and_failed_is_contraindicated(key, sim_appraisal, hw_appraisal) -> None:
    assert status_of(sim_appraisal) == "warning"
    tok = issue_ear(sim_appraisal, key, now=NOW)
    with pytest.raises(AttestationResultError, match="got warning"):
        verify_ear(tok, key.public_key(), now=NOW)
    assert verify_ear(tok, key.public_key(), now=NOW, accept_warning=True)
    pol = AppraisalPolicy(allowed_tee_types=("sgx",), measurements=(b"\x99" * 32,))
    failed = Verifier(pol).evaluate_claims(hw_appraisal.claims, expected_report_data=RD)
    tok = issue_ear(failed, key, now=NOW)
    with pytest.raises(AttestationResultError, match="contraindicated"):
        verify_ear(tok, key.public_key(), now=NOW, accept_warning=True)


def test_wrong_key_types(hw_appraisal) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(AttestationResultError, match="P-256"):
        issue_ear(hw_appraisal, p384)
    with pytest.raises(AttestationResultError, match="private"):
        issue_ear(hw_appraisal, generate_signing_key().public_key())
    with pytest.raises(AttestationResultError):
        issue_ear(hw_appraisal, b"not a key")  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.lists(st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=60),
                          min_size=3, max_size=3).map(".".join)))
def test_fuzz_verify_ear(tok) -> None:
    k = _FUZZ_KEY.public_key()
    try:
        verify_ear(tok, k, now=NOW)
    except SafeholdError:
        pass


_FUZZ_KEY = generate_signing_key()
