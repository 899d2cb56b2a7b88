"""TPM 2.0 quotes: the Azure CVM vTPM quote and the six GCE quotes verify; nonce, PCRs,
signature, AK trust and every byte of the TPMS_ATTEST and signature are checked."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from safehold.attestation.errors import ReportDataMismatchError
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.verifiers import tpm
from safehold.attestation.verifiers.tpm import TpmQuoteVerifier
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError, SafeholdError
from tests.support.shared import EVIDENCE

AZ = EVIDENCE / "azure"
TPM = EVIDENCE / "tpm"
MT = MEDIA_TYPES["tpm"]
AT = datetime(2024, 3, 1, tzinfo=UTC)
GCE_AT = datetime(2022, 1, 1, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("captured_evidence")


def az_pcrs() -> bytes:
    lines = (AZ / "azcvm-quote.pcrs_sha256.txt").read_text().split()
    return json.dumps({"sha256": {str(i): v for i, v in enumerate(lines)}}).encode()


def az_evidence(**over: bytes) -> Evidence:
    ends = {
        "signature": (AZ / "azcvm-quote.sig.bin").read_bytes(),
        "ak_pub": (AZ / "azcvm-akpub.pem").read_bytes(),
        "pcrs": az_pcrs(),
    }
    attest = over.pop("attest", (AZ / "azcvm-quote.tpms_attest.bin").read_bytes())
    ends.update(over)
    return Evidence(MT, attest, ends)


def az_verifier() -> TpmQuoteVerifier:
    return TpmQuoteVerifier(trusted_aks=[(AZ / "azcvm-akpub.pem").read_bytes()])


def test_split_files_match_the_bincode_quote():
    blob = (AZ / "azcvm-quote.bin").read_bytes()
    sig = (AZ / "azcvm-quote.sig.bin").read_bytes()
    msg = (AZ / "azcvm-quote.tpms_attest.bin").read_bytes()
    assert blob[:8] == (256).to_bytes(8, "little") and blob[8:264] == sig
    assert blob[264:272] == (122).to_bytes(8, "little") and blob[272:394] == msg


def test_azure_vtpm_quote_verifies():
    c = az_verifier().verify(az_evidence(), at=AT)
    assert c.tee_type == "tpm" and c.raw["extra_data"] == b"challenge".hex()
    assert c.report_data == b"challenge".ljust(64, b"\0")
    pcrs = (AZ / "azcvm-quote.pcrs_sha256.txt").read_text().split()
    assert c.measurement == hashlib.sha256(b"".join(bytes.fromhex(p) for p in pcrs)).digest()
    assert c.measurement.hex().startswith("04fabd98") and c.measurement.hex().endswith("02b7a4a0")
    assert sorted(c.raw["pcrs"]["sha256"], key=int) == [str(i) for i in range(24)]
    assert c.raw["ak_trust"] == "trusted-key"


def test_wrong_nonce_is_refused_naming_report_data():
    c = az_verifier().verify(az_evidence(), at=AT)
    policy = AppraisalPolicy.from_dict(
        {
            "allowed_tee_types": ["tpm"],
            "accepted_tcb_statuses": [],
            "report_data": "nonce",
            "reference_values": {"measurements": [c.measurement.hex()]},
        }
    )
    opts = {"tpm": {"trusted_aks": [(AZ / "azcvm-akpub.pem").read_bytes()]}}
    with pytest.raises(ReportDataMismatchError) as ei:
        Verifier(policy, verifier_options=opts).appraise(
            az_evidence(), expected_report_data=bytes([1, 2, 3, 4]).ljust(64, b"\0"), at=AT
        )
    assert ei.value.failures[0][0] == "report_data"


def test_reversed_signature_tampered_pcr_untrusted_ak():
    sig = (AZ / "azcvm-quote.sig.bin").read_bytes()
    with pytest.raises(EvidenceSignatureError, match="does not verify under the AK"):
        az_verifier().verify(az_evidence(signature=sig[::-1]), at=AT)
    pcrs = json.loads(az_pcrs())
    pcrs["sha256"]["7"] = "00" * 32
    with pytest.raises(EvidenceSignatureError, match="pcrDigest"):
        az_verifier().verify(az_evidence(pcrs=json.dumps(pcrs).encode()), at=AT)
    del pcrs["sha256"]["23"]
    with pytest.raises(EndorsementError, match="PCR sha256:23 is selected"):
        az_verifier().verify(az_evidence(pcrs=json.dumps(pcrs).encode()), at=AT)
    with pytest.raises(EndorsementError, match="attestation key is not trusted"):
        TpmQuoteVerifier().verify(az_evidence(), at=AT)
    other = (TPM / "gotpmtools-gce-cos-85-nonce9009.ak_pub.pem").read_bytes()
    with pytest.raises(EvidenceSignatureError):
        TpmQuoteVerifier(trusted_aks=[other]).verify(az_evidence(ak_pub=other), at=AT)


def gce(name: str, bank: str, **over: bytes) -> Evidence:
    p = f"gotpmtools-gce-cos-85-{name}"
    pcrs = json.loads((TPM / f"{p}.quote-{bank}.pcrs.json").read_text())
    ends = {
        "signature": (TPM / f"{p}.quote-{bank}.tpmt_signature.bin").read_bytes(),
        "ak_pub": (TPM / f"{p}.ak_pub.tpmt_public.bin").read_bytes(),
        "pcrs": json.dumps({bank: pcrs}).encode(),
        "ak_cert": (TPM / f"{p}.ak_cert.der").read_bytes(),
    }
    ends.update(over)
    return Evidence(MT, (TPM / f"{p}.quote-{bank}.tpms_attest.bin").read_bytes(), ends)


def gce_verifier(**kw) -> TpmQuoteVerifier:
    kw.setdefault("ak_roots", [(TPM / "gotpmtools-ca-tpm_ek_root_1.cer").read_bytes()])
    return TpmQuoteVerifier(**kw)


@pytest.mark.parametrize("name", ["no-nonce", "nonce9009"])
@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384"])
def test_gce_quotes_verify_through_the_ak_certificate(name, bank):
    inter = (TPM / "gotpmtools-ca-tpm_ek_intermediate_2.crt").read_bytes()
    # intermediates configured, or carried in the Evidence
    for v, e in (
        (gce_verifier(ak_intermediates=[inter]), gce(name, bank)),
        (gce_verifier(), gce(name, bank, ak_chain=inter)),
    ):
        c = v.verify(e, at=GCE_AT)
        assert c.raw["extra_data"] == ("" if name == "no-nonce" else "9009")
        assert c.raw["ak_trust"] == "ak-certificate" and c.raw["pcr_digest_alg"] == "sha256"
        vals = b"".join(bytes.fromhex(c.raw["pcrs"][bank][str(i)]) for i in range(24))
        assert c.measurement == hashlib.sha256(vals).digest()
        pub = tpm.load_ak((TPM / f"gotpmtools-gce-cos-85-{name}.ak_pub.pem").read_bytes())
        assert c.raw["ak_spki_sha256"] == hashlib.sha256(pub.spki).hexdigest()


def test_gce_ak_certificate_wrong_root_missing_intermediate_and_expiry():
    inter = (TPM / "gotpmtools-ca-tpm_ek_intermediate_2.crt").read_bytes()
    wrong = gce_verifier(
        ak_roots=[(TPM / "gotpmtools-ca-gcp_ek_ak_ca_root.crt").read_bytes()], ak_intermediates=[inter]
    )
    with pytest.raises(EndorsementError, match="does not chain"):
        wrong.verify(gce("nonce9009", "sha256"), at=GCE_AT)
    with pytest.raises(EndorsementError, match="does not chain"):
        gce_verifier().verify(gce("nonce9009", "sha256"), at=GCE_AT)
    with pytest.raises(EndorsementError, match="expired at verification time"):
        gce_verifier(ak_intermediates=[inter]).verify(
            gce("nonce9009", "sha256"), at=datetime(2052, 1, 1, tzinfo=UTC)
        )
    # an AK certificate for another key than the quote's AK
    az_ak = (AZ / "azcvm-akpub.pem").read_bytes()
    with pytest.raises(EndorsementError, match="another key"):
        gce_verifier(ak_intermediates=[inter]).verify(gce("nonce9009", "sha256", ak_pub=az_ak), at=GCE_AT)


def test_tpmt_public_matches_pem_and_has_a_name():
    p = "gotpmtools-gce-cos-85-nonce9009"
    a = tpm.load_ak((TPM / f"{p}.ak_pub.tpmt_public.bin").read_bytes())
    b = tpm.load_ak((TPM / f"{p}.ak_pub.pem").read_bytes())
    assert a.spki == b.spki and a.name is not None and a.name[:2] == b"\x00\x0b" and len(a.name) == 34


def _sweep(v: TpmQuoteVerifier, make, blob: bytes, at: datetime) -> list[int]:
    accepted = []
    for i in range(len(blob)):
        b = bytearray(blob)
        b[i] ^= 0x01
        try:
            v.verify(make(bytes(b)), at=at)
        except SafeholdError:
            continue
        accepted.append(i)
    return accepted


def test_sweep_every_byte_of_quote_and_signature():
    v = az_verifier()
    attest = (AZ / "azcvm-quote.tpms_attest.bin").read_bytes()
    sig = (AZ / "azcvm-quote.sig.bin").read_bytes()
    assert _sweep(v, lambda b: az_evidence(attest=b), attest, AT) == []
    assert _sweep(v, lambda b: az_evidence(signature=b), sig, AT) == []
    inter = (TPM / "gotpmtools-ca-tpm_ek_intermediate_2.crt").read_bytes()
    g = gce_verifier(ak_intermediates=[inter])
    gsig = gce("nonce9009", "sha384").endorsements["signature"]
    assert _sweep(g, lambda b: gce("nonce9009", "sha384", signature=b), gsig, GCE_AT) == []
    gatt = gce("nonce9009", "sha384").data

    def with_attest(b: bytes) -> Evidence:
        e = gce("nonce9009", "sha384")
        return Evidence(MT, b, e.endorsements)

    assert _sweep(g, with_attest, gatt, GCE_AT) == []


@pytest.mark.parametrize("cut", [0, 3, 6, 10, 50, 121])
def test_truncated_or_padded_tpms_attest(cut):
    attest = (AZ / "azcvm-quote.tpms_attest.bin").read_bytes()
    with pytest.raises(EvidenceFormatError):
        tpm.parse_tpms_attest(attest[:cut])
    with pytest.raises(EvidenceFormatError, match="trailing"):
        tpm.parse_tpms_attest(attest + b"\0")


def test_missing_endorsements_and_bad_pcr_json():
    e = az_evidence()
    for k in ("signature", "ak_pub", "pcrs"):
        ends = dict(e.endorsements)
        del ends[k]
        with pytest.raises(EvidenceFormatError, match=k):
            az_verifier().verify(Evidence(MT, e.data, ends), at=AT)
    for bad in (b"[]", b"{", json.dumps({"md5": {}}).encode(), json.dumps({"sha256": {"0": "00"}}).encode()):
        with pytest.raises(EndorsementError):
            az_verifier().verify(az_evidence(pcrs=bad), at=AT)
