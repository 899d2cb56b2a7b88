"""Intel SGX / TDX DCAP quotes: every real sample in ../shared/evidence/INDEX.md verifies with
the expected claims at its pinned time; tampering, wrong roots and stale collateral fail."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dcap_qvl
import pytest

from safehold.attestation.collateral import DcapCollateral, load_collateral
from safehold.attestation.errors import TcbStatusError
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.pcs import CollateralCache
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.verifiers import dcap
from safehold.attestation.verifiers.sgx import SgxVerifier
from safehold.attestation.verifiers.tdx import TdxVerifier
from safehold.cli.evidence import load_evidence
from safehold.errors import (
    EndorsementError,
    EvidenceFormatError,
    EvidenceSignatureError,
    SafeholdError,
)
from tests.support.shared import EVIDENCE

SGX = EVIDENCE / "sgx"
TDX = EVIDENCE / "tdx"
SGX_AT = datetime.fromtimestamp(1752919277, UTC)  # INDEX: min(nextUpdate) - 1
TDX_AT = datetime.fromtimestamp(1752919234, UTC)
OUTDATED_AT = datetime.fromtimestamp(1774003274, UTC)
NEAR_AT = datetime.fromtimestamp(1757462400, UTC)
GOTDX_AT = datetime(2023, 7, 1, 1, 0, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("captured_evidence")


def ev(path: Path, tee: str = "sgx", **ends: bytes) -> Evidence:
    return Evidence(MEDIA_TYPES[tee], load_evidence(path).data, ends)


def snapshot(path: Path) -> dict[str, str]:
    """``name: 0xHEX`` lines of the dcap-qvl insta snapshot (first occurrence wins)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s*(\w+): 0x([0-9a-f]+),", path.read_text(), re.M):
        out.setdefault(m.group(1), m.group(2))
    return out


@pytest.fixture(scope="module")
def sgx_coll() -> DcapCollateral:
    return DcapCollateral.from_json((SGX / "dcapqvl-sgx_quote_collateral.json").read_bytes())


@pytest.fixture(scope="module")
def tdx_coll() -> DcapCollateral:
    return DcapCollateral.from_json((TDX / "dcapqvl-tdx_quote_collateral.json").read_bytes())


# --- every real sample -------------------------------------------------------------------------


def test_sgx_dcapqvl_quote_verifies_with_repo_asserted_claims(sgx_coll):
    c = SgxVerifier(sgx_coll).verify(ev(SGX / "dcapqvl-sgx_quote.bin"), at=SGX_AT)
    assert c.tee_type == "sgx"
    assert c.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert c.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert c.measurement.hex() == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert c.signer.hex() == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert c.report_data == b"Hello, world!".ljust(64, b"\0")
    assert (c.product_id, c.security_version, c.debug) == (0, 0, False)
    assert c.raw["attributes"] == "0500000000000000e700000000000000"
    assert c.raw["cpu_svn"] == "0b0b1a18ffff04000000000000000000"
    assert (c.raw["qe_svn"], c.raw["pce_svn"]) == (10, 15)
    assert (c.raw["fmspc"], c.raw["collateral"]) == ("00a067110000", "verified")
    snap = snapshot(SGX / "dcapqvl-sgx_quote.expected-snapshot.txt")
    for k in ("cpu_svn", "attributes", "mr_enclave", "mr_signer", "report_data"):
        assert c.raw[k] == snap[k], k


def test_tdx_dcapqvl_quote_verifies_with_snapshot_claims(tdx_coll):
    c = TdxVerifier(tdx_coll).verify(ev(TDX / "dcapqvl-tdx_quote.bin", "tdx"), at=TDX_AT)
    assert (c.tcb_status, c.advisory_ids, c.debug) == ("UpToDate", (), False)
    snap = snapshot(TDX / "dcapqvl-tdx_quote.expected-snapshot.txt")
    names = {"rt_mr0": "rtmr0", "rt_mr1": "rtmr1", "rt_mr2": "rtmr2", "rt_mr3": "rtmr3"}
    for k in (
        "tee_tcb_svn",
        "mr_seam",
        "mr_signer_seam",
        "seam_attributes",
        "td_attributes",
        "xfam",
        "mr_td",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
        "rt_mr0",
        "rt_mr1",
        "rt_mr2",
        "rt_mr3",
        "report_data",
    ):
        assert c.raw[names.get(k, k)] == snap[k], k
    assert c.measurement.hex() == snap["mr_td"]
    assert c.measurement.hex().startswith("91eb2b44d141d4ec")
    assert c.report_data.hex() == snap["report_data"]
    assert c.raw["fmspc"] == "b0c06f000000" and c.raw["quote_version"] == 4
    assert c.raw["trailing_bytes"] == 70  # zero padding after the declared quote


def test_near_hex_quote_verifies_at_pinned_time():
    coll = DcapCollateral.from_json((TDX / "dcapqvl-near-quote_collateral.json").read_bytes())
    e = ev(TDX / "dcapqvl-near-quote_hex.txt", "tdx")
    c = TdxVerifier(coll).verify(e, at=NEAR_AT)
    direct = dcap_qvl.verify(e.data, coll.qvl, int(NEAR_AT.timestamp()))
    assert c.tcb_status == direct.status and list(c.advisory_ids) == list(direct.advisory_ids)
    assert c.raw["mr_td"].startswith("f06dfda6") and c.raw["mr_td"].endswith("8fa87077")
    assert c.raw["mr_config_id"].startswith("0112a20a") and c.raw["fmspc"] == "20a06f000000"


def test_outdated_v5_quote_signatures_verify_but_no_tcb_level_matches():
    e = ev(TDX / "dcapqvl-tdx_quote_outdated.bin", "tdx")
    c = TdxVerifier(require_collateral=False).verify(e, at=OUTDATED_AT)
    assert c.raw["quote_version"] == 5 and c.raw["tdx_module"] == "1.5"
    assert c.raw["mr_td"].startswith("273828c4") and c.raw["mr_td"].endswith("ae9a3dbd")
    assert c.raw["tee_tcb_svn"].startswith("07010300") and c.raw["tee_tcb_svn2"].startswith("0d010300")
    assert c.tcb_status is None and c.raw["collateral"] == "absent"
    coll = TDX / "dcapqvl-tdx_quote_outdated_collateral.json"
    # the repo only asserts UpToDate with a TCB override; without one no level matches
    with pytest.raises(EndorsementError, match="No matching TCB level"):
        TdxVerifier(coll).verify(e, at=OUTDATED_AT)


def test_gotdx_quote_without_collateral_and_with_pcs_files():
    e = ev(TDX / "gotdx-tdx_prod_quote_SPR_E4.bin", "tdx")
    c = TdxVerifier(require_collateral=False).verify(e, at=GOTDX_AT)
    assert c.raw["mr_seam"] == (
        "2fd279c16164a93dd5bf373d834328d46008c2b693af9ebb865b08b2ced320c9a89b4869a9fab60fbe9d0c5a5363c656"
    )
    assert c.raw["td_attributes"] == "0000004000000000" and not c.debug
    assert c.raw["xfam"] == "e71a060000000000"
    assert c.measurement.hex() == (
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
    )
    assert c.raw["mr_config_id"] == c.raw["mr_owner"] == c.raw["mr_owner_config"] == "00" * 48
    assert c.report_data.hex() == (
        "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545"
        "eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113"
    )
    assert (c.raw["fmspc"], c.raw["pck_ca"]) == ("50806f000000", "platform")
    assert c.raw["trailing_bytes"] == 39  # go-tdx-guest appends "extra bytes(only for testing purpose)"
    # The PCS responses load; their signatures and CRLs verify inside dcap-qvl, and the TCB
    # level evaluation fails as go-tdx-guest's sample notes.
    pcs = [x for x in load_collateral(TDX) if x.fmspc == "50806f000000"]
    assert len(pcs) == 1 and pcs[0].ca == "platform" and pcs[0].tee == "tdx"
    assert pcs[0].next_update == datetime(2023, 7, 8, 7, 24, 59, tzinfo=UTC)
    with pytest.raises(EndorsementError, match="TCB"):
        TdxVerifier(TDX).verify(e, at=GOTDX_AT)
    with pytest.raises(EndorsementError, match="PCK certificate validity"):
        TdxVerifier(require_collateral=False).verify(e, at=datetime(2053, 7, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("name", "at", "fmspc"),
    [
        ("gotdx-ccel-cos-113-tdx-quote.bin", datetime(2024, 9, 1, tzinfo=UTC), "00806f050000"),
        ("dcapqvl-quote-from-tappd.hex", datetime(2025, 3, 13, tzinfo=UTC), "b0c06f000000"),
        ("dcapqvl-tdx-quote.hex", datetime(2025, 3, 13, tzinfo=UTC), "b0c06f000000"),
    ],
)
def test_tdx_quotes_without_collateral_verify_signatures(name, at, fmspc):
    c = TdxVerifier(require_collateral=False).verify(ev(TDX / name, "tdx"), at=at)
    assert c.raw["fmspc"] == fmspc and c.tcb_status is None
    if name.startswith("gotdx-ccel"):
        assert c.report_data == (TDX / "gotdx-ccel-nonce.bin").read_bytes() == bytes(64)
        assert c.raw["trailing_bytes"] == 8000 - 4935


def test_cosmian_sgx_quote_signatures_and_claims():
    e = ev(SGX / "cosmian-quote.dat.bin")
    c = SgxVerifier(require_collateral=False).verify(e, at=datetime(2024, 1, 1, tzinfo=UTC))
    assert c.signer.hex() == "ac2c9fa87e4c91768b1d0c47169466c50d5a98c790639fbaefe7352a59919980"
    assert c.measurement.hex() == "e413a4ed616c7a79634d5ca05a2fda746a1f0c71349a80b25a02828846fab90e"
    assert (c.product_id, c.security_version, c.report_data) == (1, 10, bytes(64))
    assert c.raw["fmspc"] == "30606a000000"
    assert len(dcap._chain(dcap.parse_quote(e.data).pck_pem).certs) == 3
    # fail closed by default: no collateral, no TCB status
    with pytest.raises(EndorsementError, match="no fresh DCAP collateral for SGX FMSPC 30606a000000"):
        SgxVerifier().verify(e, at=datetime(2024, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_synthetic_intel_sample_parses_but_is_not_verifiable(tee):
    d = EVIDENCE / tee / "intel-qvl-sampledata-synthetic"
    raw = (d / "quote.dat").read_bytes()
    q = dcap.parse_quote(raw, strict_chain=False)
    ref = dcap_qvl.parse_quote(raw)
    assert q.version == ref.header.version and q.qe_svn == ref.header.qe_svn
    if tee == "sgx":
        assert q.body[64:96] == bytes(ref.report.mr_enclave) == bytes(32)
        assert q.body[320:384] == bytes(ref.report.report_data)
    else:
        assert q.body[136:184] == bytes(ref.report.mr_td)
        assert q.body[520:584] == bytes(ref.report.report_data)
    with pytest.raises(EvidenceFormatError):
        dcap.parse_quote(raw)
    tcb = json.loads((d / "tcbInfo.json").read_text())["tcbInfo"]
    assert tcb["version"] in (2, 3)
    # the synthetic root is a test root named like Intel's, not the production key
    root = (d / "trustedRootCaCert.pem").read_bytes()
    from cryptography import x509

    der = x509.load_pem_x509_certificate(root).public_bytes(dcap.serialization.Encoding.DER)
    assert dcap._spki_of_der(der) != dcap._spki_of_der(dcap.packaged_root_der())


# --- roots, collateral freshness, cache ---------------------------------------------------------


def test_packaged_root_is_the_production_intel_root():
    import hashlib

    der = dcap.packaged_root_der()
    assert hashlib.sha256(der).hexdigest() == (
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )
    assert der == (EVIDENCE / "roots" / "intel-sgx-rootca.dcapqvl.der").read_bytes()


def test_wrong_root_is_refused_naming_the_root(sgx_coll):
    from cryptography import x509

    pem = (SGX / "intel-qvl-sampledata-synthetic" / "trustedRootCaCert.pem").read_bytes()
    wrong = x509.load_pem_x509_certificate(pem).public_bytes(dcap.serialization.Encoding.DER)
    for v in (
        SgxVerifier(sgx_coll, root_ca_der=wrong),
        SgxVerifier(root_ca_der=wrong, require_collateral=False),
    ):
        with pytest.raises(EndorsementError, match="not the pinned Intel SGX Root CA key"):
            v.verify(ev(SGX / "dcapqvl-sgx_quote.bin"), at=SGX_AT)


def test_expired_and_not_yet_valid_collateral(sgx_coll):
    v = SgxVerifier(sgx_coll)
    e = ev(SGX / "dcapqvl-sgx_quote.bin")
    assert sgx_coll.next_update == datetime.fromtimestamp(1752919278, UTC)
    with pytest.raises(EndorsementError, match=r"expired.*nextUpdate|no fresh DCAP collateral"):
        v.verify(e, at=sgx_coll.next_update)
    # the same collateral carried inside the Evidence is checked the same way
    e2 = ev(
        SGX / "dcapqvl-sgx_quote.bin", collateral=(SGX / "dcapqvl-sgx_quote_collateral.json").read_bytes()
    )
    assert SgxVerifier().verify(e2, at=SGX_AT).tcb_status == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(EndorsementError, match=r"expired: \w+ nextUpdate 2025-07-19T10:01:18"):
        SgxVerifier().verify(e2, at=SGX_AT + timedelta(seconds=1))
    with pytest.raises(EndorsementError, match="not yet valid"):
        SgxVerifier().verify(e2, at=sgx_coll.not_before - timedelta(seconds=1))


def test_collateral_for_another_platform_is_refused(tdx_coll):
    e = ev(SGX / "dcapqvl-sgx_quote.bin", collateral=tdx_coll.to_json().encode())
    with pytest.raises(
        EndorsementError, match="collateral FMSPC: expected SGX 00a067110000, got TDX b0c06f000000"
    ):
        SgxVerifier().verify(e, at=TDX_AT)


def test_collateral_json_round_trip_and_garbage(sgx_coll):
    again = DcapCollateral.from_json(sgx_coll.to_json())
    assert again.key == sgx_coll.key == ("sgx", "00a067110000", "processor")
    assert again.next_update == sgx_coll.next_update
    for bad in (
        b"",
        b"[]",
        b"{}",
        b"\xff",
        json.dumps({k: 1 for k in json.loads(sgx_coll.to_json())}).encode(),
    ):
        with pytest.raises(EndorsementError):
            DcapCollateral.from_json(bad)
    obj = json.loads(sgx_coll.to_json())
    obj["pck_crl"] = "zz"
    with pytest.raises(EndorsementError, match="pck_crl: not hex"):
        DcapCollateral.from_json(json.dumps(obj))


PCCS_STANDIN = r"""
import json, sys, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
coll = json.load(open(sys.argv[1]))
q = lambda s: urllib.parse.quote(s, safe="")
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        path = urllib.parse.urlparse(self.path).path
        hdr = {}
        if path == "/sgx/certification/v4/pckcrl":
            body = bytes.fromhex(coll["pck_crl"])
            hdr["SGX-PCK-CRL-Issuer-Chain"] = q(coll["pck_crl_issuer_chain"])
        elif path == "/sgx/certification/v4/rootcacrl":
            body = coll["root_ca_crl"].encode()  # PCCS answers hex text
        elif path == "/sgx/certification/v4/tcb":
            body = ('{"tcbInfo":' + coll["tcb_info"] + ',"signature":"'
                    + coll["tcb_info_signature"] + '"}').encode()
            hdr["TCB-Info-Issuer-Chain"] = q(coll["tcb_info_issuer_chain"])
        elif path == "/sgx/certification/v4/qe/identity":
            body = ('{"enclaveIdentity":' + coll["qe_identity"] + ',"signature":"'
                    + coll["qe_identity_signature"] + '"}').encode()
            hdr["SGX-Enclave-Identity-Issuer-Chain"] = q(coll["qe_identity_issuer_chain"])
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200)
        for k, v in hdr.items(): self.send_header(k, v)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


@pytest.fixture
def loopback_pccs(tmp_path):
    """A PCCS on 127.0.0.1 (separate process) serving the dcap-qvl SGX sample collateral."""
    script = tmp_path / "pccs.py"
    script.write_text(PCCS_STANDIN)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(SGX / "dcapqvl-sgx_quote_collateral.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cache_evicts_at_next_update(sgx_coll):
    cache = CollateralCache([sgx_coll])
    key = ("sgx", "00a067110000", "processor")
    assert cache.lookup(*key, SGX_AT) is sgx_coll
    assert cache.lookup(*key, sgx_coll.next_update) is None  # evicted at nextUpdate
    with pytest.raises(EndorsementError, match="no fresh DCAP collateral"):
        cache.get(*key, SGX_AT)


@pytest.mark.slow
def test_fetch_from_loopback_pccs_once_then_cached_and_persisted(loopback_pccs, tmp_path, sgx_coll):
    key = ("sgx", "00a067110000", "processor")
    cache_dir = tmp_path / "cache"
    cache = CollateralCache(pccs_url=loopback_pccs + "/sgx/certification/v4/", cache_dir=cache_dir)
    v = SgxVerifier(cache)
    for _ in range(2):
        c = v.verify(ev(SGX / "dcapqvl-sgx_quote.bin"), at=SGX_AT)
        assert c.tcb_status == "ConfigurationAndSWHardeningNeeded" and c.raw["collateral"] == "verified"
    assert cache.fetches == 1
    got = cache.lookup(*key, SGX_AT)
    assert got is not None and got.qvl.tcb_info == sgx_coll.qvl.tcb_info  # signed text kept verbatim
    files = sorted(f.name for f in cache_dir.glob("*collateral*.json"))
    assert files == ["sgx-00a067110000-processor-collateral.json"]
    assert CollateralCache(cache_dir=cache_dir).lookup(*key, SGX_AT) is not None  # no network
    # upstream collateral that is already stale is refused, not cached
    late = CollateralCache(pccs_url=loopback_pccs)
    with pytest.raises(EndorsementError, match="expired"):
        late.get(*key, sgx_coll.next_update + timedelta(days=1))
    # the stand-in has no TDX collateral: a clear error naming the URL
    with pytest.raises(EndorsementError, match=r"tdx/certification/v4/tcb\?fmspc=B0C06F000000: HTTP 404"):
        TdxVerifier(pccs_url=loopback_pccs).verify(ev(TDX / "dcapqvl-tdx_quote.bin", "tdx"), at=TDX_AT)


def test_fetch_from_unreachable_pccs():
    from tests.support.shared import free_port

    cache = CollateralCache(pccs_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EndorsementError, match="ConnectError"):
        cache.get("sgx", "00a067110000", "processor", SGX_AT)


# --- tampering: every byte offset ----------------------------------------------------------------


def _sweep(verifier, data: bytes, tee: str, at: datetime) -> list[int]:
    accepted = []
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0x01
        try:
            verifier.verify(Evidence(MEDIA_TYPES[tee], bytes(b)), at=at)
        except SafeholdError:
            continue
        accepted.append(i)
    return accepted


def test_sweep_every_byte_of_sgx_v3_quote(sgx_coll):
    data = (SGX / "dcapqvl-sgx_quote.bin").read_bytes()
    v = SgxVerifier(sgx_coll)
    v.verify(Evidence(MEDIA_TYPES["sgx"], data), at=SGX_AT)  # control: untouched verifies
    assert _sweep(v, data, "sgx", SGX_AT) == []


def test_sweep_every_byte_of_tdx_v4_quote(tdx_coll):
    data = (TDX / "dcapqvl-tdx_quote.bin").read_bytes()
    v = TdxVerifier(tdx_coll)
    declared = len(dcap.parse_quote(data).quote)
    assert declared == 4936 and set(data[declared:]) == {0}
    # Only the 70 zero bytes after the quote's declared end (header+body+4+sig_len) pass:
    # they are not part of the quote, are never read, and are reported as trailing_bytes.
    assert _sweep(v, data, "tdx", TDX_AT) == list(range(declared, len(data)))


def test_sweep_every_byte_of_tdx_v5_quote_signature_only():
    data = (TDX / "dcapqvl-tdx_quote_outdated.bin").read_bytes()
    v = TdxVerifier(require_collateral=False)
    v.verify(Evidence(MEDIA_TYPES["tdx"], data), at=OUTDATED_AT)
    assert _sweep(v, data, "tdx", OUTDATED_AT) == []


@pytest.mark.parametrize("cut", [0, 1, 47, 48, 431, 432, 435, 436, 600, 1000, 4599])
def test_truncated_sgx_quote(cut, sgx_coll):
    data = (SGX / "dcapqvl-sgx_quote.bin").read_bytes()[:cut]
    with pytest.raises(EvidenceFormatError):
        SgxVerifier(sgx_coll).verify(Evidence(MEDIA_TYPES["sgx"], data), at=SGX_AT)


def test_debug_bit_cannot_be_forged(sgx_coll):
    data = bytearray((SGX / "dcapqvl-sgx_quote.bin").read_bytes())
    data[48 + 48] |= 0x02  # ATTRIBUTES.DEBUG
    assert (
        SgxVerifier.claims_for(
            dcap.parse_quote(bytes(data)), dcap._chain(dcap.parse_quote(bytes(data)).pck_pem), None, (), False
        ).debug
        is True
    )
    with pytest.raises(EvidenceSignatureError):
        SgxVerifier(sgx_coll).verify(Evidence(MEDIA_TYPES["sgx"], bytes(data)), at=SGX_AT)


def test_tdx_quote_on_sgx_verifier_and_naive_time(tdx_coll):
    with pytest.raises(EvidenceFormatError, match="tee_type"):
        SgxVerifier(tdx_coll).verify(ev(TDX / "dcapqvl-tdx_quote.bin"), at=TDX_AT)
    with pytest.raises(EvidenceFormatError, match="accepts"):
        SgxVerifier().verify(ev(TDX / "dcapqvl-tdx_quote.bin", "tdx"), at=TDX_AT)
    with pytest.raises(ValueError, match="timezone-aware"):
        TdxVerifier(tdx_coll).verify(ev(TDX / "dcapqvl-tdx_quote.bin", "tdx"), at=datetime(2025, 7, 1))


# --- through the Verifier and appraisal policy ------------------------------------------------


def _policy(**kw) -> AppraisalPolicy:
    base = {
        "allowed_tee_types": ["sgx", "tdx"],
        "report_data": "required",
        "reference_values": {
            "measurements": ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"],
            # a policy allowing tdx must pin TD registers: the TDX sample's, from its snapshot
            **{f"rtmr{i}": [snapshot(TDX / "dcapqvl-tdx_quote.expected-snapshot.txt")[f"rt_mr{i}"]]
               for i in range(4)},
        },
    }
    base.update(kw)
    return AppraisalPolicy.from_dict(base)


def test_appraisal_tcb_status_and_advisories():
    opts = {"sgx": {"collateral": SGX / "dcapqvl-sgx_quote_collateral.json"}}
    e = ev(SGX / "dcapqvl-sgx_quote.bin")
    rd = b"Hello, world!".ljust(64, b"\0")
    with pytest.raises(TcbStatusError) as ei:
        Verifier(_policy(), verifier_options=opts).appraise(e, expected_report_data=rd, at=SGX_AT)
    claims = {f[0] for f in ei.value.failures}
    assert claims == {"tcb_status", "advisory_ids"}
    assert "ConfigurationAndSWHardeningNeeded" in str(ei.value) and "INTEL-SA-00615" in str(ei.value)
    ok = _policy(
        accepted_tcb_statuses=["ConfigurationAndSWHardeningNeeded"],
        accepted_advisories=["INTEL-SA-00289", "INTEL-SA-00615"],
    )
    a = Verifier(ok, verifier_options=opts).appraise(e, expected_report_data=rd, at=SGX_AT)
    assert a.ok and a.claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
