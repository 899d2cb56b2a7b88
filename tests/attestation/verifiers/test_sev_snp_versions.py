"""SEV-SNP report versions 4 and 5 (current AMD firmware; google/go-tpm-tools#608,
virtee/sev#307) were refused at parse; CHIP_ID masking was read from flags bit 1
(MASK_CHIP_KEY) although AMD says a masked CHIP_ID is recognised by its being all zeros
(virtee/sev#303).

Versions 4/5 are built from the real go-sev-guest sample: with its real VCEK the changed
report parses and fails only at the signature (the version is no longer refused); signed by a
fake AMD key hierarchy (standing in for the hardware) it verifies end to end."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers import sev_snp
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier, parse_report
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError
from tests.support.fake_amd import make_fake_amd_hardware
from tests.support.shared import evidence_dir

MT = MEDIA_TYPES["sev-snp"]
AT = datetime(2022, 9, 24, 1, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def sample():
    snp = evidence_dir() / "snp"
    return (snp / "gosev-attestation.bin").read_bytes(), (snp / "gosev-vcek.der").read_bytes()


@pytest.fixture(scope="module")
def fake_amd_hardware():
    return make_fake_amd_hardware()


def with_fields(report: bytes, *, version: int | None = None, flags: int | None = None,
                chip_id: bytes | None = None, mit: tuple[int, int] | None = None,
                policy_or: int = 0) -> bytes:
    b = bytearray(report)
    if version is not None:
        struct.pack_into("<I", b, 0x00, version)
    if flags is not None:
        struct.pack_into("<I", b, 0x48, flags)
    if chip_id is not None:
        b[0x1A0:0x1E0] = chip_id
    if mit is not None:
        struct.pack_into("<QQ", b, 0x1F8, *mit)
    if policy_or:
        struct.pack_into("<Q", b, 0x08, struct.unpack_from("<Q", b, 0x08)[0] | policy_or)
    return bytes(b)


def fake_signed(fake, report: bytes, hwid: bytes | None = None) -> Evidence:
    rep = parse_report(report)
    vcek, key = fake.vcek_for(sev_snp.decode_tcb(rep.reported_tcb, "milan"),
                              rep.chip_id if hwid is None else hwid)
    from cryptography.hazmat.primitives.serialization import Encoding

    return Evidence(MT, fake.sign(report, key), {"vcek": vcek.public_bytes(Encoding.DER),
                                                 "cert_chain": fake.chain_pem()})


@pytest.mark.parametrize("version", [4, 5])
def test_v4_v5_report_parses_and_only_the_signature_of_the_changed_sample_fails(sample, version):
    data, vcek = sample
    changed = with_fields(data, version=version)
    assert parse_report(changed).version == version  # was: "expected 2 or 3"
    with pytest.raises(EvidenceSignatureError, match="does not verify under the VCEK"):
        SevSnpVerifier().verify(Evidence(MT, changed, {"vcek": vcek}), at=AT)


def test_v4_report_signed_by_fake_amd_hardware_verifies(sample, fake_amd_hardware, monkeypatch):
    fake_amd_hardware.pin(monkeypatch)
    c = SevSnpVerifier().verify(fake_signed(fake_amd_hardware, with_fields(sample[0], version=4)), at=AT)
    assert c.raw["version"] == 4 and "launch_mit_vector" not in c.raw
    assert c.measurement == parse_report(sample[0]).measurement


def test_v5_report_exposes_the_mitigation_vectors_and_page_swap_policy(sample, fake_amd_hardware,
                                                                        monkeypatch):
    fake_amd_hardware.pin(monkeypatch)
    report = with_fields(sample[0], version=5, mit=(0x5, 0x7), policy_or=sev_snp.POLICY_PAGE_SWAP_DISABLE)
    c = SevSnpVerifier().verify(fake_signed(fake_amd_hardware, report), at=AT)
    assert c.raw["version"] == 5
    assert (c.raw["launch_mit_vector"], c.raw["current_mit_vector"]) == (5, 7)
    assert c.raw["policy_page_swap_disable"] is True
    # in a version 2-4 report those bytes are reserved and not read as vectors
    assert parse_report(with_fields(sample[0], version=4, mit=(5, 7))).launch_mit_vector is None


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_report_versions_are_refused_at_parse(sample, version):
    with pytest.raises(EvidenceFormatError, match=rf"expected 2\.\.5, got {version}"):
        parse_report(with_fields(sample[0], version=version))


OTHER_CHIP = bytes(range(64))


def test_mask_chip_key_flag_does_not_skip_the_vcek_hwid_check(sample, fake_amd_hardware, monkeypatch):
    # flags bit 1 is MASK_CHIP_KEY, not "CHIP_ID masked": a VCEK certifying another chip's
    # hwID than the report's (non-zero) CHIP_ID must be refused. Before, this was accepted.
    fake_amd_hardware.pin(monkeypatch)
    report = with_fields(sample[0], flags=parse_report(sample[0]).flags | 2)
    assert parse_report(report).mask_chip_key and not parse_report(report).mask_chip_id
    with pytest.raises(EndorsementError, match="chip_id: the VCEK hwID does not match"):
        SevSnpVerifier().verify(fake_signed(fake_amd_hardware, report, hwid=OTHER_CHIP), at=AT)


def test_all_zero_chip_id_is_the_masked_chip_id(sample, fake_amd_hardware, monkeypatch):
    # MASK_CHIP_ID set by the guest policy: CHIP_ID is zeros, flags bit 1 clear. The VCEK's
    # hwID cannot be compared; before, this valid report was refused as "wrong chip".
    fake_amd_hardware.pin(monkeypatch)
    report = with_fields(sample[0], chip_id=bytes(64))
    rep = parse_report(report)
    assert rep.mask_chip_id and not rep.mask_chip_key
    c = SevSnpVerifier().verify(fake_signed(fake_amd_hardware, report, hwid=OTHER_CHIP), at=AT)
    assert c.raw["chip_id_masked"] is True and c.raw["chip_id"] == "00" * 64
