"""Operator review of d8d03f1: a data directory's records and service Reference Values are
derived from the anchor members' measured closure (``LocalAnchor.closure`` as ``base``). They
must equal a from-scratch measurement of each workload's own launch, and a code file the host
changes after the anchor's measurement must leave the derived value *stale* (the workload,
measuring the changed file at start, then fails its appraisal) rather than covering it."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.devstack.services import service_spec
from safehold.devstack.stack import Stack, records_spec
from safehold.freshness.anchor.launch import LocalAnchor
from tests.support.shared import snapshot_package


def _ca(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_values_derived_from_the_anchor_closure_equal_fresh_ones_and_go_stale(tmp_path: Path) -> None:
    pkg = snapshot_package(tmp_path / "snap")
    d = tmp_path / "data"
    d.mkdir()
    pub = _ca(tmp_path / "ca.pem")
    la = LocalAnchor(d / "anchor", data_dir=d, client_ca_file=tmp_path / "ca.pem", owner_public_key=pub,
                     package_root=pkg)
    base = la.closure()
    assert base.hex() == la.reference_value()
    cfg = d / "records.toml"
    cfg.write_text('host = "127.0.0.1"\n')
    rec = records_spec(Stack(d, 0, 0, None, package_root=str(pkg)))
    svc = service_spec(str(pkg), "safehold.svr.server")
    for spec in (rec, svc):
        derived = spec.closure([cfg], base=base)
        fresh = spec.closure([cfg])
        assert derived.digest == fresh.digest and derived.entries == fresh.entries
        assert not any(f.name.startswith("config/anchor") for f in derived.files)
    # the host edits a measured code file after the anchor's measurement: the derived value
    # keeps the old hash (it never covers the new bytes), so what the workload measures at
    # start differs from it: its appraisal fails (fail closed), it is not silently admitted
    target = pkg / "records" / "repository.py"
    target.write_bytes(target.read_bytes() + b"\n# planted\n")
    derived = rec.closure([cfg], base=base)
    at_start = rec.closure([cfg])
    assert derived.digest != at_start.digest
    changed = {f.name for f in at_start.files} ^ {f.name for f in derived.files} or {
        a.name for a, b in zip(derived.files, at_start.files, strict=True) if a.sha384 != b.sha384}
    assert changed == {"app/safehold/records/repository.py"}
    # a base over other roots (another app directory) is ignored, never reused
    other = snapshot_package(tmp_path / "other")
    spec2 = records_spec(Stack(d, 0, 0, None, package_root=str(other)))
    assert spec2.closure([cfg], base=base).digest == spec2.closure([cfg]).digest
