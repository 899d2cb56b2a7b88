"""Azure CVM HCL reports: parsing, runtime-data binding, SNP signature with the VCEK, vTPM
quote under the bound AK, and the fail-closed TDX path (a TDREPORT is not signed)."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime

import pytest

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers import azure
from safehold.attestation.verifiers.azure import AzureSnpVerifier, AzureTdxVerifier
from safehold.attestation.verifiers.tdx import TdxVerifier
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError
from tests.support.shared import EVIDENCE

AZ = EVIDENCE / "azure"
SNP_MT = MEDIA_TYPES["azure-sev-snp"]
TDX_MT = MEDIA_TYPES["azure-tdx"]
AT = datetime(2023, 11, 24, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("captured_evidence")


def rd(name: str) -> bytes:
    return (AZ / name).read_bytes()


def constellation(**over: bytes) -> Evidence:
    ends = {
        "vcek": rd("constellation-azure-vcek-kds.der"),
        "runtime_data": rd("constellation-azure-runtimedata.bin"),
    }
    ends.update(over)
    return Evidence(SNP_MT, rd("constellation-azure-snp-attestation.bin"), ends)


@pytest.mark.parametrize("vcek", ["constellation-azure-vcek-kds.der", "constellation-azure-vcek-thim.pem"])
def test_constellation_azure_snp_verifies(vcek):
    c = AzureSnpVerifier().verify(constellation(vcek=rd(vcek)), at=AT)
    assert c.tee_type == "azure-sev-snp"
    assert c.signer.hex() == (
        "57e229e0ffe5fa92d0faddff6cae0e61c926fc9ef9afd20a8b8cfcf7129db9338cbe5bf3f6987733a2bf65d06dc38fc1"
    )
    assert c.measurement.hex() == (
        "5677f1de87289e7ad2c7e99c805d0468b1a9ccd83f0d245afa5242d405da4d5725852f8c6550564870e5f3206dfb1841"
    )
    assert c.raw["policy"] == 0x3001F and c.security_version == 2 and not c.debug
    assert c.report_data[:32] == hashlib.sha256(rd("constellation-azure-runtimedata.bin")).digest()
    assert c.report_data.hex().startswith("0ccc0895") and c.report_data[:32].hex().endswith("cacfd38b")
    assert c.raw["reported_tcb_parts"]["microcode"] == 0x5D  # "THIM VCEK has ucode version 0x5d"
    vm = c.raw["vm_configuration"]
    assert (vm["secure-boot"], vm["tpm-enabled"], vm["current-time"]) == (False, True, 1661455391)
    assert vm["vmUniqueId"].startswith("B6C98C3B-")


def test_runtime_data_binding_is_enforced():
    rt = json.loads(rd("constellation-azure-runtimedata.bin"))
    rt["vm-configuration"]["secure-boot"] = True
    forged = json.dumps(rt, separators=(",", ":")).encode()
    hdr = rd("constellation-azure-snp-attestation.bin")
    e = Evidence(SNP_MT, hdr[:1184], {"vcek": rd("constellation-azure-vcek-kds.der"), "runtime_data": forged})
    with pytest.raises(EvidenceSignatureError, match=r"report_data\[0:32\]: expected sha256\(runtime data\)"):
        AzureSnpVerifier().verify(e, at=AT)
    # the 20-byte header's size must match the runtime data it announces
    with pytest.raises(EvidenceFormatError, match="runtime-data header says 584"):
        AzureSnpVerifier().verify(constellation(runtime_data=forged), at=AT)


def test_azcvm_snp_report_with_a_vcek_of_another_chip_is_refused():
    e = Evidence(SNP_MT, rd("azcvm-hcl-report-snp.bin"), {"vcek": rd("azcvm-certs.pem")})
    with pytest.raises((EndorsementError, EvidenceSignatureError), match="chip_id|reported_tcb|VCEK"):
        AzureSnpVerifier().verify(e, at=datetime(2024, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("name", "kind", "bind", "measure"),
    [
        ("azcvm-hcl-report-snp.bin", "sev-snp", "1d0a466a", "5a71e4ba"),
        ("azcvm-hcl-report-tdx.bin", "tdx", "e8f07961", None),
        ("constellation-azure-tdx-hclreport.bin", "tdx", "1b2d148a", None),
    ],
)
def test_hcl_reports_parse_and_bind(name, kind, bind, measure):
    data = rd(name)
    hcl = azure.parse_hcl_report(data)
    info = azure.inspect_hcl(data)
    assert info["report_type"] == kind and info["runtime_data_binding"] == "ok"
    assert info["runtime_data_sha256"].startswith(bind)
    assert hcl.ak_pub().key_size == 2048
    if kind == "sev-snp":
        assert info["measurement"].startswith(measure) and info["chip_id"].startswith("3a5d5b1d")
    else:
        assert azure._jwk(hcl.runtime, "HCLEkPub").key_size == 2048
        assert set(hcl.runtime["user-data"]) == {"0"}


def test_azcvm_certs_bundle_chains_and_an_ask_is_no_root():
    from safehold.attestation.verifiers import sev_snp

    vcek, ask, ark = sev_snp.load_certs(rd("azcvm-certs.pem"), "azcvm-certs")
    assert sev_snp.verify_chain(vcek, [ask, ark], datetime(2024, 1, 1, tzinfo=UTC), "VCEK") == "milan"
    assert not sev_snp._issued_by(ask, ask)  # "ASK is not self-signed"
    assert sev_snp._issued_by(ark, ark) and sev_snp._issued_by(ask, ark)


def test_var_data_sample_is_runtime_json_with_an_ak():
    rt = azure._runtime_json(rd("azcvm-var-data.bin"))
    assert azure._jwk(rt, "HCLAkPub").key_size == 2048


def test_azure_tdx_fails_closed_without_a_td_quote():
    e = Evidence(TDX_MT, rd("azcvm-hcl-report-tdx.bin"))
    with pytest.raises(EndorsementError, match="MAC'd, not signed"):
        AzureTdxVerifier().verify(e, at=AT)


def test_azure_tdx_with_the_quote_of_another_td_is_refused():
    tdx = EVIDENCE / "tdx"
    e = Evidence(
        TDX_MT,
        rd("azcvm-hcl-report-tdx.bin"),
        {
            "td_quote": (tdx / "dcapqvl-tdx_quote.bin").read_bytes(),
            "td_quote_collateral": (tdx / "dcapqvl-tdx_quote_collateral.json").read_bytes(),
        },
    )
    with pytest.raises(
        EvidenceSignatureError, match="td_quote report_data|td_quote .*: expected the TDREPORT"
    ):
        AzureTdxVerifier(TdxVerifier()).verify(e, at=datetime.fromtimestamp(1752919234, UTC))


def test_vtpm_quote_must_be_signed_by_the_hcl_ak():
    sig = rd("azcvm-quote.sig.bin")
    pcrs = json.dumps(
        {
            "sha256": {
                str(i): v for i, v in enumerate((AZ / "azcvm-quote.pcrs_sha256.txt").read_text().split())
            }
        }
    )
    e = constellation(tpm_quote=rd("azcvm-quote.tpms_attest.bin"), tpm_signature=sig, tpm_pcrs=pcrs.encode())
    # the sample quote comes from another VM (its AK is not this report's HCLAkPub)
    with pytest.raises(EvidenceSignatureError, match="under the AK"):
        AzureSnpVerifier().verify(e, at=AT)
    with pytest.raises(EvidenceFormatError, match="tpm_pcrs"):
        AzureSnpVerifier().verify(constellation(tpm_quote=b"x", tpm_signature=sig), at=AT)


def test_malformed_hcl_reports():
    data = bytearray(rd("azcvm-hcl-report-snp.bin"))
    for mutate, msg in (
        (lambda b: b"XXXX" + b[4:100], "expected an HCL report"),
        (lambda b: b[:100], "truncated before the end"),
        (lambda b: b[:1230], "truncated"),
        (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "report_size"),
        (lambda b: b[: 1216 + 4] + struct.pack("<I", 7) + b[1224:], "runtime-data header"),
        (lambda b: b[:1240] + b"\xff" + b[1241:], "not UTF-8 JSON"),
    ):
        with pytest.raises(EvidenceFormatError, match=msg):
            azure.parse_hcl_report(bytes(mutate(bytes(data))))
    with pytest.raises(EvidenceFormatError, match="expected 2"):
        AzureSnpVerifier().verify(Evidence(SNP_MT, rd("azcvm-hcl-report-tdx.bin")), at=AT)
    with pytest.raises(EvidenceFormatError, match="runtime_data"):
        azure.parse_hcl_report(rd("constellation-azure-snp-attestation.bin")[:1184])
