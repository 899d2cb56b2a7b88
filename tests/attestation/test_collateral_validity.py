"""Collateral that is not valid yet was reported as "expired" (a cache lookup before its
issueDate said "cached collateral expired at <nextUpdate>"). "Not yet valid" — a verifier clock
behind, or collateral issued in the future — is a different fault with a different remedy;
it now has its own error, EndorsementNotYetValidError, and message. Certificates of every
verifier say which side of their validity window failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from safehold.attestation.collateral import DcapCollateral, check_validity
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.pcs import CollateralCache
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.cli.evidence import load_evidence
from safehold.errors import EndorsementExpiredError, EndorsementNotYetValidError
from tests.support.shared import evidence_dir

SECOND = timedelta(seconds=1)


@pytest.fixture(scope="module")
def sgx():
    d = evidence_dir() / "sgx"
    coll_json = (d / "dcapqvl-sgx_quote_collateral.json").read_bytes()
    quote = load_evidence(d / "dcapqvl-sgx_quote.bin").data
    return DcapCollateral.from_json(coll_json), coll_json, quote


def test_cached_collateral_not_yet_valid_is_not_reported_as_expired(sgx):
    coll, _, quote = sgx
    v = SgxVerifier(CollateralCache([coll]))
    with pytest.raises(EndorsementNotYetValidError) as ei:
        v.verify(Evidence(MEDIA_TYPES["sgx"], quote, {}), at=coll.not_before - SECOND)
    msg = str(ei.value)
    assert "is not yet valid" in msg and coll.not_before.isoformat() in msg
    assert "expired" not in msg
    # past nextUpdate it is an expiry, with its own class
    with pytest.raises(EndorsementExpiredError, match="cached collateral expired at"):
        v.verify(Evidence(MEDIA_TYPES["sgx"], quote, {}), at=coll.next_update + SECOND)


def test_carried_collateral_not_yet_valid_and_expired_are_told_apart(sgx):
    coll, coll_json, quote = sgx
    e = Evidence(MEDIA_TYPES["sgx"], quote, {"collateral": coll_json})
    with pytest.raises(EndorsementNotYetValidError, match="not yet valid"):
        SgxVerifier().verify(e, at=coll.not_before - SECOND)
    with pytest.raises(EndorsementExpiredError, match="expired: .* nextUpdate"):
        SgxVerifier().verify(e, at=coll.next_update)


def test_vcek_before_its_not_before_says_not_yet_valid():
    snp = evidence_dir() / "snp"
    e = Evidence(MEDIA_TYPES["sev-snp"], (snp / "gosev-attestation.bin").read_bytes(),
                 {"vcek": (snp / "gosev-vcek.der").read_bytes()})
    with pytest.raises(EndorsementNotYetValidError, match="VCEK validity .*: not yet valid at verification"):
        SevSnpVerifier().verify(e, at=datetime(2000, 1, 1, tzinfo=UTC))
    with pytest.raises(EndorsementExpiredError, match="expired at verification time"):
        SevSnpVerifier().verify(e, at=datetime(2100, 1, 1, tzinfo=UTC))


def test_check_validity_bounds_are_inclusive():
    a, b = datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
    check_validity("x", a, b, a)
    check_validity("x", a, b, b)
    with pytest.raises(EndorsementNotYetValidError):
        check_validity("x", a, b, a - SECOND)
    with pytest.raises(EndorsementExpiredError):
        check_validity("x", a, b, b + SECOND)
