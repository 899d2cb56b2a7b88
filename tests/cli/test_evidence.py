"""``safehold evidence inspect|verify`` on the real samples (raw, hex, base64, CMW, simulated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.cli.main import cli
from tests.support.shared import EVIDENCE

SGX_Q = EVIDENCE / "sgx" / "dcapqvl-sgx_quote.bin"
SGX_C = EVIDENCE / "sgx" / "dcapqvl-sgx_quote_collateral.json"
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


pytestmark = pytest.mark.usefixtures("captured_evidence")


def run(*args: str):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def inspect_json(path: Path, *extra: str) -> dict:
    r = run("evidence", "inspect", path, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.parametrize(
    ("rel", "tee", "measurement_prefix"),
    [
        ("sgx/dcapqvl-sgx_quote.bin", "sgx", "33d8736d"),
        ("sgx/cosmian-quote.dat.bin", "sgx", "e413a4ed"),
        ("sgx/intel-qvl-sampledata-synthetic/quote.dat", "sgx", "00000000"),
        ("tdx/dcapqvl-tdx-quote.hex", "tdx", ""),
        ("tdx/dcapqvl-near-quote_hex.txt", "tdx", "f06dfda6"),
        ("tdx/dcapqvl-tdx_quote_outdated.bin", "tdx", "273828c4"),
        ("tdx/gotdx-ccel-cos-113-tdx-quote.bin", "tdx", ""),
        ("snp/gosev-attestation.bin", "sev-snp", "b07af962"),
        ("snp/constellation-aws-vlek-report.txt", "sev-snp", "5a5cdbad"),
        ("snp/constellation-AttestationReportVLEK.hex", "sev-snp", ""),
        ("azure/azcvm-hcl-report-snp.bin", "azure-sev-snp", "5a71e4ba"),
        ("azure/azcvm-hcl-report-tdx.bin", "azure-tdx", ""),
        ("azure/constellation-azure-tdx-hclreport.bin", "azure-tdx", ""),
        ("azure/azcvm-quote.tpms_attest.bin", "tpm", "04fabd98"),
        ("tpm/gotpmtools-gce-cos-85-nonce9009.quote-sha256.tpms_attest.bin", "tpm", ""),
    ],
)
def test_inspect_every_format(rel, tee, measurement_prefix):
    d = inspect_json(EVIDENCE / rel)
    assert d["tee_type"] == tee and d["measurement"].startswith(measurement_prefix)
    assert len(bytes.fromhex(d["report_data"])) == 64


def test_inspect_constellation_azure_snp_with_runtime_data_and_table():
    d = inspect_json(
        EVIDENCE / "azure/constellation-azure-snp-attestation.bin",
        "--endorsement",
        f"runtime_data={EVIDENCE / 'azure/constellation-azure-runtimedata.bin'}",
    )
    assert d["tee_type"] == "azure-sev-snp" and d["raw"]["runtime_data_binding"] == "ok"
    r = run("evidence", "inspect", SGX_Q)
    assert r.exit_code == 0 and "NOT VERIFIED" in r.output and "mr_enclave" in r.output


def test_inspect_cmw_record_collection_and_simulated(tmp_path):
    raw = SGX_Q.read_bytes()
    rec = tmp_path / "rec.json"
    rec.write_text(Evidence(MEDIA_TYPES["sgx"], raw).to_cmw())
    assert inspect_json(rec)["measurement"] == MRENCLAVE
    coll = tmp_path / "coll.json"
    coll.write_text(Evidence(MEDIA_TYPES["sgx"], raw, {"collateral": SGX_C.read_bytes()}).to_cmw())
    assert inspect_json(coll)["measurement"] == MRENCLAVE
    from safehold.attestation.attesters.simulated import SimulatedAttester

    sim = SimulatedAttester(tmp_path / "sim").attest(bytes(range(64)))
    f = tmp_path / "sim.json"
    f.write_text(sim.to_cmw())
    d = inspect_json(f)
    assert d["tee_type"] == "simulated" and d["report_data"] == bytes(range(64)).hex()


def _policy(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


def test_verify_sgx_accepts_and_refuses(tmp_path):
    ok = _policy(
        tmp_path,
        f"""
allowed_tee_types = ["sgx"]
accepted_tcb_statuses = ["ConfigurationAndSWHardeningNeeded"]
accepted_advisories = ["INTEL-SA-00289", "INTEL-SA-00615"]
[reference_values]
measurements = ["{MRENCLAVE}"]
""",
    )
    rd = b"Hello, world!".hex()

    def verify(at: str, report_data: str):
        return run("evidence", "verify", SGX_Q, "--policy", ok, "--collateral", SGX_C, "--at", at,
                   "--report-data", report_data)

    r = verify("1752919277", rd)
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and "ConfigurationAndSWHardeningNeeded" in r.output
    # wrong nonce → refused naming report_data
    r = verify("1752919277", "00")
    assert r.exit_code == 1 and "report_data: expected" in r.output
    # collateral expired at the chosen time
    r = verify("2025-07-19T10:01:18Z", rd)
    assert r.exit_code == 1 and "collateral" in r.output and "expired" in r.output
    strict = _policy(
        tmp_path,
        f'allowed_tee_types = ["sgx"]\nreport_data = "any"\n'
        f'[reference_values]\nmeasurements = ["{MRENCLAVE}"]\n',
    )
    r = run("evidence", "verify", SGX_Q, "--policy", strict, "--collateral", SGX_C, "--at", "1752919277")
    assert r.exit_code == 1 and "tcb_status: expected one of UpToDate" in r.output


def test_verify_debug_snp_refused_and_tpm_nonce_accepted(tmp_path):
    snp = EVIDENCE / "snp"
    p = _policy(
        tmp_path,
        'allowed_tee_types = ["sev-snp"]\nreport_data = "any"\n'
        '[min_tcb]\nbootloader = 2\nmicrocode = 68\n'
        '[reference_values]\nmeasurements = ["b07af9620f3b839b47996422ddec6058338951d984e31'
        '2115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"]\n',
    )
    r = run(
        "evidence",
        "verify",
        snp / "gosev-attestation.bin",
        "--policy",
        p,
        "--at",
        "2022-09-24T01:00:00Z",
        "--endorsement",
        f"vcek={snp / 'gosev-vcek.der'}",
    )
    assert r.exit_code == 1 and "debug: expected false, got true" in r.output
    assert r.output.count("FAIL") == 1  # min_tcb passes, tcb_status is not applicable to SNP
    az = EVIDENCE / "azure"
    digest = "04fabd988106412e438c1b93ad3b4b046c760f8f99ec557d87adf2ab02b7a4a0"
    pcrs = tmp_path / "pcrs.json"
    pcrs.write_text(
        json.dumps({"sha256": dict(enumerate((az / "azcvm-quote.pcrs_sha256.txt").read_text().split()))})
    )
    t = _policy(
        tmp_path,
        f'allowed_tee_types = ["tpm"]\nreport_data = "nonce"\n'
        f'[reference_values]\nmeasurements = ["{digest}"]\n',
    )
    args = [
        "evidence",
        "verify",
        az / "azcvm-quote.tpms_attest.bin",
        "--policy",
        t,
        "--at",
        "2024-03-01",
        "--endorsement",
        f"signature={az / 'azcvm-quote.sig.bin'}",
        "--endorsement",
        f"ak_pub={az / 'azcvm-akpub.pem'}",
        "--endorsement",
        f"pcrs={pcrs}",
    ]
    r = run(*args, "--report-data", b"challenge".hex())
    assert r.exit_code == 1 and "attestation key is not trusted" in r.output
    r = run(*args, "--report-data", b"challenge".hex(), "--trusted-ak", az / "azcvm-akpub.pem")
    # Authentic, trusted AK, right nonce, PCR digest as pinned: accepted (a TPM quote carries no
    # vendor TCB status, so that row is "not applicable").
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.output and "not applicable to tpm" in r.output
    r = run(*args, "--report-data", "01020304", "--trusted-ak", az / "azcvm-akpub.pem")
    assert r.exit_code == 1 and "report_data: expected 01020304" in r.output


@pytest.mark.slow
def test_garbage_is_one_clear_line_without_traceback(tmp_path):
    f = tmp_path / "junk.bin"
    f.write_bytes(b"\x00\x01junk" * 10)
    r = subprocess.run(
        [sys.executable, "-m", "safehold.cli.main", "evidence", "inspect", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stderr.startswith("error: cannot tell the Evidence type")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("at", ["99999999999999999999", "yesterday", "2025-13-40"])
def test_out_of_range_or_garbled_time_is_a_usage_error(tmp_path, at):
    pol = tmp_path / "p.toml"
    pol.write_text('allowed_tee_types = ["sgx"]\n[reference_values]\nmeasurements = ["' + "00" * 32
                   + '"]\n')
    r = run("evidence", "verify", SGX_Q, "--policy", pol, "--collateral", SGX_C, "--at", at)
    assert r.exit_code == 2 and "--at" in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"tcb_info": "{}", "qe_identity": "{}"}', "JSON but not CMW Evidence"),
        (b"zz!!not-base64??", "neither hex"),
    ],
)
def test_inspect_says_what_failed_to_decode(tmp_path, content, needle):
    f = tmp_path / "ev.txt"
    f.write_bytes(content)
    r = run("evidence", "inspect", f)
    assert r.exit_code == 1 and needle in r.output, r.output
