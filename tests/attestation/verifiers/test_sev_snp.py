"""AMD SEV-SNP reports: the real samples verify with the expected claims; every byte of a
report and of its VCEK is covered; wrong roots, wrong chips, wrong TCBs and debug fail."""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from safehold.attestation.errors import DebugModeError
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.verifiers import sev_snp
from safehold.attestation.verifiers.sev_snp import SevSnpVerifier, parse_report
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError, SafeholdError
from tests.support.shared import EVIDENCE

SNP = EVIDENCE / "snp"
MT = MEDIA_TYPES["sev-snp"]
GOSEV_AT = datetime(2022, 9, 24, 1, 0, tzinfo=UTC)
AWS_AT = datetime(2025, 6, 1, tzinfo=UTC)  # inside the VLEK's 2024-12-10..2025-12-10 window


pytestmark = pytest.mark.usefixtures("captured_evidence")


def rd(name: str) -> bytes:
    return (SNP / name).read_bytes()


def gosev(**extra: bytes) -> Evidence:
    return Evidence(MT, rd("gosev-attestation.bin"), {"vcek": rd("gosev-vcek.der"), **extra})


def aws_report() -> bytes:
    return base64.b64decode(rd("constellation-aws-vlek-report.txt"))


def aws(**extra: bytes) -> Evidence:
    return Evidence(
        MT,
        aws_report(),
        {
            "vlek": rd("constellation-aws-vlek.pem"),
            "cert_chain": rd("constellation-aws-certchain.pem"),
            **extra,
        },
    )


def test_gosev_report_verifies_with_check_tool_good_values():
    for e in (gosev(), gosev(cert_chain=rd("gosev-milan-ask-ark.pem"))):
        c = SevSnpVerifier().verify(e, at=GOSEV_AT)
        r = c.raw
        assert c.tee_type == "sev-snp" and r["product"] == "milan" and r["version"] == 2
        assert c.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
        assert c.measurement.hex() == (
            "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
        )
        assert r["host_data"] == "00" * 32 and r["family_id"] == r["image_id"] == "00" * 16
        assert r["report_id"] == "8edc638e1857c555d21f6b11bda3c8b1b5a09dba4852b4c8ee7aa2f16f22cc0a"
        assert r["report_id_ma"] == "ff" * 32
        assert r["chip_id"] == (
            "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e5378618"
            "4ca39e359669a2b76a1936776b564ea464cdce40c05f63c9b610c5068b006b5d"
        )
        assert r["reported_tcb"] == r["launch_tcb"] == 4901323769462652930
        assert r["policy"] == 0xB0000 and r["policy_debug"] and r["policy_smt"] and c.debug
        assert not r["policy_migrate_ma"]
        assert r["current_version"].startswith("1.49") and (r["vmpl"], r["platform_info"]) == (0, 1)
        assert c.signer == bytes(48)  # no ID block
        assert r["reported_tcb_parts"] == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}


def test_debug_report_is_refused_by_the_default_policy():
    policy = AppraisalPolicy.from_dict(
        {
            "allowed_tee_types": ["sev-snp"],
            "report_data": "any",
            "min_tcb": {"bootloader": 2, "microcode": 68},
            "reference_values": {
                "measurements": [parse_report(rd("gosev-attestation.bin")).measurement.hex()]
            },
        }
    )
    with pytest.raises(DebugModeError) as ei:
        Verifier(policy).appraise(gosev(), at=GOSEV_AT)
    assert ei.value.failures == [("debug", "false", "true")]  # min_tcb met, no TCB status asked
    assert "debug: expected false, got true" in str(ei.value)


def test_aws_vlek_report_verifies():
    c = SevSnpVerifier().verify(aws(), at=AWS_AT)
    assert c.report_data.hex() == (
        "87ab7caf510e1b3520dc3cceb64ee44128e10976fb0d3fc5e274699d8aaf5061"
        "54af4c1de0a026b49fdf861e9ac75551551b3534d1c61369a3b08f5baed0db2f"
    )
    assert c.raw["version"] == 3 and c.raw["signing_key"] == "vlek" and c.raw["flags"] == 4
    assert not c.debug and c.raw["policy_smt"] and c.raw["vmpl"] == 0
    assert c.measurement.hex().startswith("5a5cdbad") and c.measurement.hex().endswith("88ed0715")
    # without the KDS chain the packaged ASVK is used
    bare = Evidence(MT, aws_report(), {"vlek": rd("constellation-aws-vlek.pem")})
    assert SevSnpVerifier().verify(bare, at=AWS_AT).measurement == c.measurement


def test_aws_vlek_negative_cases():
    rep = bytearray(aws_report())
    zeroed = bytes(rep[:0x50]) + bytes(64) + bytes(rep[0x90:])
    with pytest.raises(EvidenceSignatureError):
        SevSnpVerifier().verify(Evidence(MT, zeroed, aws().endorsements), at=AWS_AT)
    rep[0x2A0] = (rep[0x2A0] + 1) % 256  # Signature[0]++
    with pytest.raises(EvidenceSignatureError, match="under the VLEK"):
        SevSnpVerifier().verify(Evidence(MT, bytes(rep), aws().endorsements), at=AWS_AT)
    with pytest.raises(EndorsementError, match="VLEK validity"):
        SevSnpVerifier().verify(aws(), at=datetime(2025, 12, 11, tzinfo=UTC))
    with pytest.raises(EndorsementError, match="no 'vlek' endorsement"):
        SevSnpVerifier().verify(Evidence(MT, aws_report(), {"vcek": rd("gosev-vcek.der")}), at=AWS_AT)


def test_constellation_vlek_report_signature_does_not_verify():
    data = bytes.fromhex(rd("constellation-AttestationReportVLEK.hex").decode().strip())
    rep = parse_report(data)
    assert rep.signing_key == "vlek"
    at = datetime(2024, 1, 1, tzinfo=UTC)
    for vlek in ("constellation-vlek.pem", "constellation-aws-vlek.pem"):
        e = Evidence(MT, data, {"vlek": rd(vlek), "cert_chain": rd("constellation-vlekcertchain.pem")})
        with pytest.raises((EvidenceSignatureError, EndorsementError)):
            SevSnpVerifier().verify(e, at=at if vlek == "constellation-vlek.pem" else AWS_AT)
    e = Evidence(MT, data, {"vlek": rd("constellation-vlek.pem")})
    with pytest.raises(EvidenceSignatureError, match="does not verify under the VLEK"):
        SevSnpVerifier().verify(e, at=at)


def test_turin_and_milan_chains_reach_pinned_arks():
    turin = sev_snp.load_cert(rd("virtee-vcek_turin.der"), "VCEK")
    chain = sev_snp.load_certs(rd("virtee-cert_chain_turin.pem"), "chain")
    assert sev_snp.verify_chain(turin, chain, datetime(2025, 1, 1, tzinfo=UTC), "VCEK") == "turin"
    assert sev_snp.verify_chain(turin, [], datetime(2025, 1, 1, tzinfo=UTC), "VCEK") == "turin"
    ask, ark = sev_snp.load_certs(rd("virtee-cert_chain_milan.pem"), "chain")
    assert sev_snp.pinned_arks()[ark.public_key().public_bytes(*sev_snp._SPKI)] == "milan"
    assert sev_snp._issued_by(ask, ark)
    # every packaged ARK is one of the three INDEX fingerprints
    fps = {c.fingerprint(hashes.SHA256()).hex()[:8] for c in sev_snp._packaged_arks()}
    assert fps == {"69d063b4", "4c6598d1", "1f084161"}
    assert sev_snp.decode_tcb(0x0900000000000000, "turin")["microcode"] == 9


def test_wrong_chip_vcek_is_refused():
    # a valid Milan VCEK for another chip
    e = Evidence(
        MT,
        rd("gosev-attestation.bin"),
        {"vcek": (EVIDENCE / "azure" / "constellation-azure-vcek-kds.der").read_bytes()},
    )
    with pytest.raises(EndorsementError, match=r"reported_tcb\.snp|chip_id"):
        SevSnpVerifier().verify(e, at=datetime(2023, 9, 1, tzinfo=UTC))


# --- self-made roots: not pinned; with a patched pin, TCB extensions are checked ---------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, pub, key, *, exts=(), ca=False):
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0)
        .not_valid_after(t0 + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for oid, val in exts:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), val), critical=False)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    if isinstance(key, rsa.RSAPrivateKey):
        return b.sign(key, hashes.SHA384(), rsa_padding=pss)
    return b.sign(key, hashes.SHA384())


@pytest.fixture(scope="module")
def forged_chain():
    ark_k = rsa.generate_private_key(65537, 2048)
    ask_k = rsa.generate_private_key(65537, 2048)
    vcek_k = ec.generate_private_key(ec.SECP384R1())
    ark = _cert("ARK-Milan", "ARK-Milan", ark_k.public_key(), ark_k, ca=True)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_k.public_key(), ark_k, ca=True)
    rep = parse_report(rd("gosev-attestation.bin"))
    tcb = sev_snp.decode_tcb(rep.reported_tcb, "milan")
    exts = [(sev_snp.TCB_OIDS[k], bytes([2, 1, v])) for k, v in tcb.items()]
    exts[-1] = (sev_snp.TCB_OIDS["microcode"], bytes([2, 1, tcb["microcode"] + 1]))  # wrong ucode
    exts.append((sev_snp.OID_HWID, rep.chip_id))
    vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_k.public_key(), ask_k, exts=exts)
    return ark, ask, vcek, vcek_k


def _resign(data: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    r, s = decode_dss_signature(key.sign(data[:0x2A0], ec.ECDSA(hashes.SHA384())))
    sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return data[:0x2A0] + sig + data[0x2A0 + 144 :]


def _forged_evidence(forged_chain) -> Evidence:
    """The gosev report re-signed by the forged VCEK, with the forged VCEK and ASK/ARK chain."""
    ark, ask, vcek, key = forged_chain
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ask, ark))
    return Evidence(
        MT,
        _resign(rd("gosev-attestation.bin"), key),
        {"vcek": vcek.public_bytes(serialization.Encoding.DER), "cert_chain": pem},
    )


def test_self_made_root_is_refused(forged_chain):
    e = _forged_evidence(forged_chain)
    with pytest.raises(EndorsementError, match="does not chain to a pinned AMD ARK"):
        SevSnpVerifier().verify(e, at=GOSEV_AT)


def test_vcek_tcb_extension_mismatch_names_the_component(forged_chain, monkeypatch):
    ark = forged_chain[0]
    spki = ark.public_key().public_bytes(*sev_snp._SPKI)
    monkeypatch.setattr(sev_snp, "pinned_arks", lambda: {spki: "milan"})  # test-only pin
    e = _forged_evidence(forged_chain)
    with pytest.raises(EndorsementError, match="reported_tcb.microcode: VCEK certifies 69, report says 68"):
        SevSnpVerifier().verify(e, at=GOSEV_AT)


# --- sweeps ------------------------------------------------------------------------------------


def test_sweep_every_byte_of_the_report():
    data = rd("gosev-attestation.bin")
    ends = {"vcek": rd("gosev-vcek.der")}
    v = SevSnpVerifier()
    v.verify(Evidence(MT, data, ends), at=GOSEV_AT)
    accepted = []
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0x01
        try:
            v.verify(Evidence(MT, bytes(b), ends), at=GOSEV_AT)
        except SafeholdError:
            continue
        accepted.append(i)
    assert accepted == []


def test_sweep_every_byte_of_the_vcek():
    data = rd("gosev-attestation.bin")
    vcek = rd("gosev-vcek.der")
    v = SevSnpVerifier()
    accepted = []
    for i in range(len(vcek)):
        b = bytearray(vcek)
        b[i] ^= 0x01
        try:
            v.verify(Evidence(MT, data, {"vcek": bytes(b)}), at=GOSEV_AT)
        except SafeholdError:
            continue
        accepted.append(i)
    assert accepted == []


@pytest.mark.parametrize("n", [0, 1, 1183, 1185])
def test_wrong_length(n):
    data = (rd("gosev-attestation.bin") + b"\0")[:n]
    with pytest.raises(EvidenceFormatError, match="1184 bytes"):
        SevSnpVerifier().verify(Evidence(MT, data, {"vcek": rd("gosev-vcek.der")}), at=GOSEV_AT)


def test_unsupported_version_and_garbage_vcek():
    data = bytearray(rd("gosev-attestation.bin"))
    struct.pack_into("<I", data, 0, 9)
    with pytest.raises(EvidenceFormatError, match="version"):
        SevSnpVerifier().verify(Evidence(MT, bytes(data), {"vcek": rd("gosev-vcek.der")}), at=GOSEV_AT)
    for junk in (b"", b"\x30\x03\x02\x01\x00", b"-----BEGIN CERTIFICATE-----\nAAAA\n"):
        with pytest.raises(EndorsementError):
            SevSnpVerifier().verify(gosev(vcek=junk), at=GOSEV_AT)


def test_minimum_tcb_check_names_the_component():
    from safehold.attestation.errors import TcbStatusError
    from safehold.attestation.policy import AppraisalPolicy

    c = SevSnpVerifier().verify(gosev(), at=GOSEV_AT)
    ok = sev_snp.SnpMinimumTcb({"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68})
    assert all(v.ok for v in ok.verdicts(c, None)) and len(ok.verdicts(c, None)) == 8
    high = sev_snp.SnpMinimumTcb({"microcode": 69})
    rows = high.verdicts(c, None)
    assert [(v.claim, v.expected, v.got, v.ok) for v in rows] == [
        ("reported_tcb.microcode", ">= 69", "68", False),
        ("launch_tcb.microcode", ">= 69", "68", False),
    ]
    policy = AppraisalPolicy(
        allowed_tee_types=("sev-snp",),
        measurements=(c.measurement,),
        debug_allowed=True,
        report_data="any",
        min_tcb={"microcode": 69},
    )
    with pytest.raises(TcbStatusError, match="reported_tcb.microcode: expected >= 69, got 68"):
        Verifier(policy).appraise(gosev(), at=GOSEV_AT)
