"""Parsers of untrusted Evidence never crash: random and mutated inputs raise SafeholdError only."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers import azure, dcap, sev_snp, tpm
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.errors import SafeholdError
from tests.support.shared import EVIDENCE, need_shared

AT = datetime(2025, 7, 1, tzinfo=UTC)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample(rel: str) -> bytes:
    need_shared(EVIDENCE / rel)
    return (EVIDENCE / rel).read_bytes()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_any_parser(data):
    for fn in (dcap.parse_quote, sev_snp.parse_report, tpm.parse_tpms_attest, azure.parse_hcl_report):
        try:
            fn(data)
        except SafeholdError:
            pass


@FUZZ
@given(st.data())
def test_mutated_real_samples_only_raise_safehold_errors(data):
    sgx = _sample("sgx/dcapqvl-sgx_quote.bin")
    snp = _sample("snp/gosev-attestation.bin")
    hcl = _sample("azure/azcvm-hcl-report-snp.bin")
    for blob, check in (
        (sgx, lambda b: SgxVerifier(require_collateral=False).verify(Evidence(MEDIA_TYPES["sgx"], b), at=AT)),
        (
            snp,
            lambda b: SevSnpVerifier().verify(
                Evidence(MEDIA_TYPES["sev-snp"], b, {"vcek": _sample("snp/gosev-vcek.der")}), at=AT
            ),
        ),
        (hcl, azure.parse_hcl_report),
    ):
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(b)))
        for candidate in (bytes(b), bytes(b[:cut])):
            try:
                check(candidate)
            except SafeholdError:
                pass


@pytest.mark.parametrize("blob", [b"", b"\x00" * 64, b"-----BEGIN CERTIFICATE-----\n", b"\x30\x82\xff\xff"])
def test_garbage_endorsements(blob):
    with pytest.raises(SafeholdError):
        tpm.load_ak(blob)
    with pytest.raises(SafeholdError):
        sev_snp.load_cert(blob, "VCEK")
