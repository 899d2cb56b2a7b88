"""Gramine and configfs-tsm Attesters against STAND-INS for the hardware interfaces: temporary
directories laid out like ``/dev/attestation`` and ``/sys/kernel/config/tsm/report``, filled
with Evidence captured on real machines. The stand-ins return a fixed captured blob (real
hardware would generate one per request), so each test writes the report_data that blob carries.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.attesters.gramine import GramineAttester
from safehold.attestation.attesters.tsm import (
    GUID_ARK,
    GUID_ASK,
    GUID_VCEK,
    TsmAttester,
    build_cert_table,
    parse_cert_table,
)
from safehold.attestation.evidence import MEDIA_TYPES
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.attestation.verifiers.tdx import TdxVerifier
from safehold.errors import AttestationError
from tests.support.shared import EVIDENCE

SGX_AT = datetime.fromtimestamp(1752919277, UTC)
TDX_AT = datetime.fromtimestamp(1752919234, UTC)
GOSEV_AT = datetime(2022, 9, 24, 1, 0, tzinfo=UTC)
SGX_RD = b"Hello, world!".ljust(64, b"\0")
GOSEV_RD = bytes([1, 2, 3, 4, 5]).ljust(64, b"\0")


pytestmark = pytest.mark.usefixtures("captured_evidence")


def tdx_rd() -> bytes:
    snap = (EVIDENCE / "tdx" / "dcapqvl-tdx_quote.expected-snapshot.txt").read_text()
    return bytes.fromhex(re.search(r"^\s*report_data: 0x([0-9a-f]{128}),", snap, re.M).group(1))


@pytest.fixture
def fake_dev_attestation_standin(tmp_path: Path) -> Path:
    """Stand-in for Gramine's /dev/attestation (no SGX hardware here)."""
    d = tmp_path / "dev-attestation"
    d.mkdir()
    (d / "attestation_type").write_text("dcap\n")
    (d / "user_report_data").write_bytes(b"")
    (d / "quote").write_bytes((EVIDENCE / "sgx" / "dcapqvl-sgx_quote.bin").read_bytes())
    return d


def _tsm_entry(root: Path, provider: str, outblob: bytes, auxblob: bytes | None = None) -> Path:
    e = root / "safehold"
    e.mkdir(parents=True)
    (e / "provider").write_text(provider + "\n")
    (e / "generation").write_text("1\n")
    (e / "inblob").write_bytes(b"")
    (e / "outblob").write_bytes(outblob)
    if auxblob is not None:
        (e / "auxblob").write_bytes(auxblob)
    return e


@pytest.fixture
def fake_configfs_tsm_tdx_standin(tmp_path: Path) -> Path:
    """Stand-in for configfs-tsm on a TDX guest (no TDX hardware here)."""
    root = tmp_path / "tsm" / "report"
    _tsm_entry(root, "tdx_guest", (EVIDENCE / "tdx" / "dcapqvl-tdx_quote.bin").read_bytes())
    return root


@pytest.fixture
def fake_configfs_tsm_snp_standin(tmp_path: Path) -> Path:
    """Stand-in for configfs-tsm on an SEV-SNP guest, with the host's certificate table."""
    snp = EVIDENCE / "snp"
    ask, ark = x509.load_pem_x509_certificates((snp / "gosev-milan-ask-ark.pem").read_bytes())
    der = serialization.Encoding.DER
    aux = build_cert_table(
        [
            (GUID_VCEK, (snp / "gosev-vcek.der").read_bytes()),
            (GUID_ASK, ask.public_bytes(der)),
            (GUID_ARK, ark.public_bytes(der)),
        ]
    )
    root = tmp_path / "tsm" / "report"
    _tsm_entry(root, "sev_guest", (snp / "gosev-attestation.bin").read_bytes(), aux)
    return root


# --- gramine ---------------------------------------------------------------------------------


def test_gramine_attester_produces_verifiable_sgx_evidence(fake_dev_attestation_standin):
    ev = GramineAttester(fake_dev_attestation_standin).attest(SGX_RD)
    assert (fake_dev_attestation_standin / "user_report_data").read_bytes() == SGX_RD
    assert ev.media_type == MEDIA_TYPES["sgx"]
    claims = SgxVerifier(EVIDENCE / "sgx" / "dcapqvl-sgx_quote_collateral.json").verify(ev, at=SGX_AT)
    assert claims.report_data == SGX_RD


def test_gramine_attester_refuses_a_quote_for_other_report_data(fake_dev_attestation_standin):
    with pytest.raises(AttestationError, match="report_data: expected the 64 bytes just written"):
        GramineAttester(fake_dev_attestation_standin).attest(bytes(64))


def test_gramine_attester_errors(fake_dev_attestation_standin, tmp_path):
    with pytest.raises(ValueError, match="64 bytes"):
        GramineAttester(fake_dev_attestation_standin).attest(b"short")
    with pytest.raises(AttestationError, match="failed"):
        GramineAttester(tmp_path / "absent").attest(SGX_RD)
    (fake_dev_attestation_standin / "attestation_type").write_text("epid")
    with pytest.raises(AttestationError, match="expected 'dcap'"):
        GramineAttester(fake_dev_attestation_standin).attest(SGX_RD)
    (fake_dev_attestation_standin / "attestation_type").write_text("dcap")
    (fake_dev_attestation_standin / "quote").write_bytes(b"\x03\x00garbage")
    with pytest.raises(AttestationError, match="malformed quote"):
        GramineAttester(fake_dev_attestation_standin).attest(SGX_RD)


# --- configfs-tsm ------------------------------------------------------------------------------


def test_tsm_attester_tdx(fake_configfs_tsm_tdx_standin):
    rd = tdx_rd()
    ev = TsmAttester(fake_configfs_tsm_tdx_standin, entry="safehold").attest(rd)
    assert (fake_configfs_tsm_tdx_standin / "safehold" / "inblob").read_bytes() == rd
    assert ev.media_type == MEDIA_TYPES["tdx"] and len(ev.data) == 4936  # padding dropped
    coll = EVIDENCE / "tdx" / "dcapqvl-tdx_quote_collateral.json"
    assert TdxVerifier(coll).verify(ev, at=TDX_AT).report_data == rd
    with pytest.raises(AttestationError, match="report_data"):
        TsmAttester(fake_configfs_tsm_tdx_standin, entry="safehold").attest(bytes(64))


def test_tsm_attester_snp_with_certificate_table(fake_configfs_tsm_snp_standin):
    ev = TsmAttester(fake_configfs_tsm_snp_standin, entry="safehold").attest(GOSEV_RD)
    assert ev.media_type == MEDIA_TYPES["sev-snp"]
    assert set(ev.endorsements) == {"vcek", "cert_chain"}
    c = SevSnpVerifier().verify(ev, at=GOSEV_AT)
    assert c.report_data == GOSEV_RD and c.raw["product"] == "milan"


def test_tsm_attester_fresh_entry_is_cleaned_up_on_failure(tmp_path):
    root = tmp_path / "report"
    root.mkdir()
    # a plain directory gets no kernel attributes on mkdir: the attester must fail and rmdir
    with pytest.raises(AttestationError, match="configfs-tsm interface"):
        TsmAttester(root).attest(bytes(64))
    assert list(root.iterdir()) == []


def test_tsm_attester_unknown_provider(fake_configfs_tsm_tdx_standin):
    (fake_configfs_tsm_tdx_standin / "safehold" / "provider").write_text("arm_cca_guest\n")
    with pytest.raises(AttestationError, match="provider"):
        TsmAttester(fake_configfs_tsm_tdx_standin, entry="safehold").attest(tdx_rd())


def test_cert_table_round_trip_and_garbage():
    vcek = (EVIDENCE / "snp" / "gosev-vcek.der").read_bytes()
    assert parse_cert_table(build_cert_table([(GUID_VCEK, vcek)])) == {"vcek": vcek}
    with pytest.raises(AttestationError, match="not terminated"):
        parse_cert_table(bytes(16) + (0).to_bytes(4, "little") + (1).to_bytes(4, "little"))
    bad = bytearray(build_cert_table([(GUID_VCEK, vcek)]))
    bad[16:20] = (10**6).to_bytes(4, "little")
    with pytest.raises(AttestationError, match="outside"):
        parse_cert_table(bytes(bad))
