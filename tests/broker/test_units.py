"""Broker building blocks without a server: manifest validation and signed updates, the audit
hash chain on a real SQLite store (tampered in the file), sealing and k-of-n recovery, the
KBS protocol helpers and the workload CA."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey, RSAKey

from safehold.broker import protocol
from safehold.broker.audit import BrokerAuditLog, verify_log
from safehold.broker.ca import WorkloadCA
from safehold.broker.errors import CertificateRequestError, RecoveryError, StateIntegrityError
from safehold.broker.manifest import (
    load_manifest,
    manifest_from_dict,
    sign_update,
    verify_update,
)
from safehold.broker.protocol import canonical_json
from safehold.broker.shares import combine_shares, decrypt_share, master_fingerprint, normalize_fingerprint
from safehold.broker.state import AUDIT_NAMESPACE, BrokerState, SealingIdentity
from safehold.errors import AuditChainError, BrokerError, ManifestError, SealingError
from safehold.store.sqlite import SqliteStore

PEM = serialization.Encoding.PEM
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
PK8 = serialization.PrivateFormat.PKCS8
NOENC = serialization.NoEncryption()


def _policy(meas: str = "ab" * 48) -> dict:
    return {"allow_simulated": True, "reference_values": {"measurements": [meas]}}


@pytest.fixture(scope="module")
def rsa_keys():
    return [rsa.generate_private_key(65537, 3072) for _ in range(3)]


@pytest.fixture
def owner():
    return ed25519.Ed25519PrivateKey.generate()


def _manifest(owner_key, rsa_keys=(), threshold=None) -> dict:
    m = {
        "workloads": {"w": {"policy": _policy(), "secrets": ["k", "tls"]}},
        "secrets": {"k": {"type": "keyset"},
                    "tls": {"type": "certificate", "dns_names": ["api"], "validity_days": 3}},
        "users": {"alice": {"roles": ["owner"],
                            "public_key": owner_key.public_key().public_bytes(PEM, SPKI).decode()},
                  "rita": {"roles": ["reader"], "token_sha256": "00" * 32}},
    }
    if rsa_keys:
        m["recovery"] = {"keys": {f"r{i}": k.public_key().public_bytes(PEM, SPKI).decode()
                                  for i, k in enumerate(rsa_keys)}}
        if threshold is not None:
            m["recovery"]["threshold"] = threshold
    return m


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_toml_and_json_agree(owner, tmp_path):
    m = _manifest(owner)
    toml = f'''
[workloads.w]
secrets = ["k", "tls"]
[workloads.w.policy]
allow_simulated = true
simulated_root = "root.pem"
[workloads.w.policy.reference_values]
measurements = ["{"ab" * 48}"]
[secrets.k]
type = "keyset"
[secrets.tls]
type = "certificate"
dns_names = ["api"]
validity_days = 3
[users.alice]
roles = ["owner"]
public_key = """{m["users"]["alice"]["public_key"]}"""
[users.rita]
roles = ["reader"]
token_sha256 = "{"00" * 32}"
'''
    a = load_manifest(toml.encode(), base_dir=tmp_path)
    assert a.raw["workloads"]["w"]["policy"]["simulated_root"] == str(tmp_path / "root.pem")
    m["workloads"]["w"]["policy"]["simulated_root"] = str(tmp_path / "root.pem")
    b = load_manifest(json.dumps(m))
    assert a.digest == b.digest
    assert [w.name for w in a.workloads.values() if "k" in w.secrets] == ["w"]
    assert a.secrets["tls"].dns_names == ("api",)


@pytest.mark.parametrize("mutate, where", [
    (lambda m: m.pop("workloads"), "workloads"),
    (lambda m: m.update(extra=1), "unknown top-level"),
    (lambda m: m["secrets"]["k"].update(type="password"), "secrets.k.type"),
    (lambda m: m["secrets"]["k"].update(dns_names=["x"]), "secrets.k"),
    (lambda m: m["secrets"]["tls"].update(dns_names=["bad name!"]), "secrets.tls.dns_names"),
    (lambda m: m["secrets"]["tls"].update(validity_days=0), "secrets.tls.validity_days"),
    (lambda m: m["secrets"]["tls"].update(dns_names=[]), "secrets.tls"),
    (lambda m: m["secrets"]["tls"].update(ip_addresses=["1.2.3"]), "secrets.tls.ip_addresses"),
    (lambda m: m["workloads"]["w"].update(secrets=["nope"]), "workloads.w.secrets"),
    (lambda m: m["workloads"]["w"].pop("policy"), "workloads.w.policy"),
    (lambda m: m["workloads"]["w"].update(policy={"allow_simulated": True}), "workloads.w.policy"),
    (lambda m: m["workloads"]["w"]["policy"].update(bogus=1), "workloads.w.policy"),
    (lambda m: m["users"]["alice"].update(roles=["king"]), "users.alice.roles"),
    (lambda m: m["users"]["alice"].update(roles=[]), "users.alice.roles"),
    (lambda m: m["users"]["alice"].update(public_key="not pem"), "users.alice"),
    (lambda m: m["users"]["rita"].update(token_sha256="abcd"), "users.rita.token_sha256"),
    (lambda m: m["users"]["rita"].pop("token_sha256"), "users.rita"),
    (lambda m: m.update(recovery={"threshold": 2}), "recovery.threshold"),
    (lambda m: m.update(recovery={"keys": {"x": "garbage"}}), "recovery.keys.x"),
    (lambda m: m.update(name="bad name"), "name"),
    (lambda m: m.update(repository=""), "repository"),
    (lambda m: m["secrets"].update({"../x": {"type": "keyset"}}), "secrets.<name>"),
    (lambda m: m["secrets"]["tls"].update(validity_days=1.5), "floating-point"),
])
def test_malformed_manifest_names_the_field(owner, mutate, where):
    m = _manifest(owner)
    mutate(m)
    with pytest.raises(ManifestError) as e:
        manifest_from_dict(m)
    assert where in str(e.value)


def test_recovery_keys_validated(owner, rsa_keys):
    ok = manifest_from_dict(_manifest(owner, rsa_keys, threshold=3))
    assert ok.recovery_threshold == 3 and len(ok.recovery_keys) == 3
    assert manifest_from_dict(_manifest(owner, rsa_keys)).recovery_threshold == 2  # default
    with pytest.raises(ManifestError, match="recovery.threshold"):
        manifest_from_dict(_manifest(owner, rsa_keys, threshold=4))
    small = rsa.generate_private_key(65537, 2048)
    m = _manifest(owner)
    m["recovery"] = {"keys": {"s": small.public_key().public_bytes(PEM, SPKI).decode()}}
    with pytest.raises(ManifestError, match="3072"):
        manifest_from_dict(m)


@pytest.mark.parametrize("blob", [b"", b"\xff\xfe", b"[workloads", b"{\"a\":", b"x" * (256 * 1024 + 1),
                                  b"[1, 2]", b"{\"workloads\": []}"])
def test_garbled_manifest_text(blob):
    with pytest.raises(ManifestError):
        load_manifest(blob)


def test_signed_update(owner):
    cur = manifest_from_dict(_manifest(owner))
    new_raw = _manifest(owner)
    new_raw["secrets"]["k2"] = {"type": "keyset"}
    new = manifest_from_dict(new_raw)
    pk = owner.private_bytes(PEM, PK8, NOENC)
    bid = "ab" * 16
    sig = sign_update(new, 2, pk, broker_id=bid, previous_sha256=cur.digest)
    verify_update(cur, new, 2, "alice", sig, broker_id=bid)
    with pytest.raises(ManifestError, match="version 3"):
        verify_update(cur, new, 3, "alice", sig, broker_id=bid)  # signature is for version 2
    with pytest.raises(ManifestError, match="does not verify"):
        verify_update(cur, cur, 2, "alice", sig, broker_id=bid)  # signature over another manifest
    with pytest.raises(ManifestError, match="does not verify.*broker " + "cd" * 16):
        verify_update(cur, new, 2, "alice", sig, broker_id="cd" * 16)  # signed for another broker
    # signed on top of another previous manifest (another history of the same broker)
    prev_raw = _manifest(owner)
    prev_raw["name"] = "staging"
    prev = manifest_from_dict(prev_raw)
    with pytest.raises(ManifestError, match="does not verify.*previous manifest"):
        verify_update(prev, new, 2, "alice", sig, broker_id=bid)
    with pytest.raises(ManifestError, match="expected owner"):
        verify_update(cur, new, 2, "rita", sig, broker_id=bid)
    with pytest.raises(ManifestError, match="not a user"):
        verify_update(cur, new, 2, "mallory", sig, broker_id=bid)
    with pytest.raises(ManifestError, match="base64url"):
        verify_update(cur, new, 2, "alice", "!!", broker_id=bid)
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(PEM, PK8, NOENC)
    with pytest.raises(ManifestError, match="does not verify"):
        verify_update(cur, new, 2, "alice", sign_update(new, 2, other, broker_id=bid,
                                                        previous_sha256=cur.digest), broker_id=bid)
    # ECDSA owners work the same way
    eck = ec.generate_private_key(ec.SECP256R1())
    raw = _manifest(owner)
    raw["users"]["alice"]["public_key"] = eck.public_key().public_bytes(PEM, SPKI).decode()
    cur2 = manifest_from_dict(raw)
    verify_update(cur2, new, 2, "alice", sign_update(new, 2, eck.private_bytes(PEM, PK8, NOENC),
                                                     broker_id=bid, previous_sha256=cur2.digest),
                  broker_id=bid)
    with pytest.raises(ManifestError, match="cannot load"):
        sign_update(new, 2, b"garbage", broker_id=bid, previous_sha256=cur.digest)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_canonical_json_is_deterministic_and_fuzzed_manifests_fail_cleanly(obj):
    assert canonical_json(obj) == canonical_json(json.loads(canonical_json(obj)))
    try:
        manifest_from_dict(obj)
    except ManifestError:
        pass


# --- audit log --------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path):
    store = SqliteStore(tmp_path / "b.db")
    st_ = BrokerState.open(store, SealingIdentity(b"platform-secret-0123456789abcdef", b"\x01" * 48))
    yield st_
    store.close()


def _log(state, key=None):
    return BrokerAuditLog(state.store, AUDIT_NAMESPACE, state.seal_bytes, state.open_bytes, key)


def test_audit_chain_verifies_and_names_the_first_broken_entry(state, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    log = _log(state, key)
    for i in range(6):
        log.append("release", {"i": i})
    assert verify_log(log, key.public_key()) == 6
    assert [e.detail["i"] for e in log.entries()] == list(range(6))
    # another broker's key: the signature check names entry #1
    with pytest.raises(AuditChainError, match="#1: broker signature"):
        verify_log(log, ed25519.Ed25519PrivateKey.generate().public_key())
    db = sqlite3.connect(tmp_path / "b.db")
    ns = AUDIT_NAMESPACE

    def row(seq):
        return db.execute("SELECT value FROM safehold_rows WHERE "
                          "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                          (ns, seq.to_bytes(8, "big"))).fetchone()[0]

    def put(seq, val):
        with db:
            db.execute("UPDATE safehold_rows SET value=? WHERE "
                       "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                       (val, ns, seq.to_bytes(8, "big")))

    # swap two rows: each fails authentication at its new position
    r3, r4 = row(3), row(4)
    put(3, r4)
    put(4, r3)
    with pytest.raises(AuditChainError, match="#3: row fails authentication"):
        verify_log(log, key.public_key())
    put(3, r3)
    put(4, r4)
    # delete a middle row
    with db:
        db.execute("DELETE FROM safehold_rows WHERE "
                   "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                   (ns, (2).to_bytes(8, "big")))
    with pytest.raises(AuditChainError, match="#2: missing"):
        verify_log(log, key.public_key())


def test_audit_truncation_at_the_end_is_noticed(state, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    log = _log(state, key)
    for i in range(4):
        log.append("attest", {"i": i})
    db = sqlite3.connect(tmp_path / "b.db")
    with db:
        db.execute("DELETE FROM safehold_rows WHERE "
                   "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                   (AUDIT_NAMESPACE, (4).to_bytes(8, "big")))
    with pytest.raises(AuditChainError, match="#4: missing"):
        verify_log(log, key.public_key())
    with pytest.raises(AuditChainError, match="without a signing key"):
        _log(state).append("x", {})


def test_audit_rows_are_ciphertext(state, tmp_path):
    log = _log(state, ed25519.Ed25519PrivateKey.generate())
    log.append("release", {"resource": "default/keyset/very-distinctive-name"})
    raw = (tmp_path / "b.db").read_bytes()
    assert b"very-distinctive-name" not in raw


# --- sealing and recovery ---------------------------------------------------------------------


def _pub(k):
    return k.public_key().public_bytes(PEM, SPKI).decode()


def _priv(k):
    return k.private_bytes(PEM, PK8, NOENC)


def test_seal_recover_kofn(tmp_path, rsa_keys):
    store = SqliteStore(tmp_path / "s.db")
    ident = SealingIdentity(b"s" * 32, b"\x01" * 48)
    s = BrokerState.open(store, ident)
    assert s.created and s.mode == "ready"
    s.put("secret", "x", b"value", expected_version=0)
    s.write_recovery_shares({f"r{i}": _pub(k) for i, k in enumerate(rsa_keys)}, 2)
    assert b"value" not in (tmp_path / "s.db").read_bytes()
    # same identity: unseals
    assert BrokerState.open(store, ident).get("secret", "x")[0] == b"value"
    # another host (platform secret) or another measurement: recovery mode
    for other in (SealingIdentity(b"t" * 32, b"\x01" * 48), SealingIdentity(b"s" * 32, b"\x02" * 48)):
        r = BrokerState.open(store, other)
        assert r.mode == "recovery" and "measurement" in r.reason
        with pytest.raises(SealingError):
            r.get("secret", "x")
    # the reason says which part of the sealing identity differs (host or code), with the full
    # values, so the operator knows which one to check
    host = BrokerState.open(store, SealingIdentity(b"t" * 32, b"\x01" * 48)).reason
    assert "host identity differs" in host and f"unchanged ({'01' * 48})" in host
    assert "measurement changed" not in host
    code = BrokerState.open(store, SealingIdentity(b"s" * 32, b"\x02" * 48)).reason
    assert "measurement changed" in code and f"sealed to {'01' * 48}, this broker is {'02' * 48}" in code
    new = BrokerState.open(store, SealingIdentity(b"s" * 32, b"\x02" * 48))
    data = new.recovery_data()
    shares = [decrypt_share(data["shares"][f"r{i}"], _priv(k)) for i, k in enumerate(rsa_keys)]
    fp = s.master_fingerprint()
    assert len(fp) == 32 and master_fingerprint(combine_shares(shares[:2], 2)) == fp
    with pytest.raises(RecoveryError, match="2 distinct"):
        new.recover([shares[0], shares[0]], expect_fingerprint=fp)
    with pytest.raises(RecoveryError, match="fingerprint"):  # a wrong share: another key
        new.recover([shares[0], bytes([1]) + bytes(len(shares[0]) - 2) + shares[1][-1:]],
                    expect_fingerprint=fp)
    with pytest.raises(RecoveryError, match="malformed"):
        new.recover([b"\x07abc", b"\x07abd"], expect_fingerprint=fp)
    with pytest.raises(RecoveryError, match="wrong length|do not combine|fingerprint"):
        new.recover([b"\x01ab", b"\x01abc"], expect_fingerprint=fp)
    with pytest.raises(RecoveryError):  # a share decrypted with the wrong key
        decrypt_share(data["shares"]["r0"], _priv(rsa_keys[1]))
    with pytest.raises(RecoveryError, match="fingerprint"):  # right shares, another fingerprint
        new.recover([shares[2], shares[1]], expect_fingerprint="00" * 16)
    for bad in (None, "", "xyz", fp[:-1], fp + "0"):
        with pytest.raises(RecoveryError, match="expect_fingerprint"):
            new.recover([shares[2], shares[1]], expect_fingerprint=bad)
    assert new.mode == "recovery"
    new.recover([shares[2], shares[1]], expect_fingerprint="-".join(fp[i:i + 4].upper()
                                                                  for i in range(0, 32, 4)))
    assert new.mode == "ready" and new.get("secret", "x")[0] == b"value"
    # re-sealed: the new identity unseals without recovery, the old one no longer does
    assert BrokerState.open(store, SealingIdentity(b"s" * 32, b"\x02" * 48)).mode == "ready"
    assert BrokerState.open(store, ident).mode == "recovery"
    store.close()


def test_threshold_one_and_no_recovery_keys(tmp_path, rsa_keys):
    store = SqliteStore(tmp_path / "s.db")
    s = BrokerState.open(store, SealingIdentity(b"s" * 32, b"\x01" * 48))
    r = BrokerState.open(store, SealingIdentity(b"s" * 32, b"\x02" * 48))
    with pytest.raises(RecoveryError, match="no recovery shares"):
        r.recover([b"x"], expect_fingerprint=s.master_fingerprint())
    s.write_recovery_shares({"only": _pub(rsa_keys[0])}, 1)
    share = decrypt_share(r.recovery_data()["shares"]["only"], _priv(rsa_keys[0]))
    r.recover([share], expect_fingerprint=s.master_fingerprint())
    assert r.mode == "ready"
    store.close()


def test_forged_recovery_record_is_refused_by_fingerprint(tmp_path, rsa_keys):
    """A database operator replaces the whole state with one under their own master key, with
    shares to the same (public) recovery keys, and breaks m/sealed: the shares decrypt and
    combine and even open the forged keyset, but the fingerprint differs, so nothing changes."""
    from safehold.broker.state import NAMESPACE

    store = SqliteStore(tmp_path / "s.db")
    ident = SealingIdentity(b"s" * 32, b"\x01" * 48)
    real = BrokerState.open(store, ident)
    recorded = real.master_fingerprint()  # what the holders wrote down at first start
    pubs = {f"r{i}": _pub(k) for i, k in enumerate(rsa_keys)}
    real.write_recovery_shares(pubs, 2)
    for row in list(store.scan_all(NAMESPACE)):
        store.delete(NAMESPACE, row.key)
    forged = BrokerState.open(store, SealingIdentity(os.urandom(32), b"\x09" * 48))  # attacker's
    assert forged.created and forged.master_fingerprint() != recorded
    forged.write_recovery_shares(pubs, 2)
    victim = BrokerState.open(store, ident)
    assert victim.mode == "recovery"
    data = victim.recovery_data()
    shares = [decrypt_share(data["shares"][f"r{i}"], _priv(k)) for i, k in enumerate(rsa_keys[:2])]
    sealed_before = store.get(NAMESPACE, b"m/sealed")
    with pytest.raises(RecoveryError, match=f"expected {recorded}"):
        victim.recover(shares, expect_fingerprint=recorded)
    assert victim.mode == "recovery" and store.get(NAMESPACE, b"m/sealed") == sealed_before
    assert normalize_fingerprint(recorded.upper()) == recorded
    # a garbled record is a clear RecoveryError, not a crash
    cur = store.get(NAMESPACE, b"m/recovery")
    store.put(NAMESPACE, b"m/recovery", b"{not json", expected_version=cur.version)
    with pytest.raises(RecoveryError, match="malformed"):
        victim.recovery_data()
    store.close()


def test_tampered_object_row_fails(state, tmp_path):
    state.put("secret", "x", b"value", expected_version=0)
    db = sqlite3.connect(tmp_path / "b.db")
    key = state.row_key("secret", "x")
    (val,) = db.execute("SELECT value FROM safehold_rows WHERE key=?", (key,)).fetchone()
    with db:
        db.execute("UPDATE safehold_rows SET value=? WHERE key=?", (val[:-1] + bytes([val[-1] ^ 1]), key))

    with pytest.raises(StateIntegrityError, match=r"row secret/x \(o/[0-9a-f]{8}…\) fails authentication"):
        state.get("secret", "x")


# --- protocol and CA --------------------------------------------------------------------------


def test_report_data_binding():
    k = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(k)
    rd = protocol.report_data("nonce-1", jwk)
    assert len(rd) == 64 and rd[32:] == bytes(32)
    assert rd != protocol.report_data("nonce-2", jwk)
    # key order in the JWK does not matter (canonical JSON)
    assert rd == protocol.report_data("nonce-1", dict(reversed(list(jwk.items()))))
    assert len(protocol.thumbprint(k)) == 32


@pytest.mark.parametrize("jwk", [
    None, [], {"kty": "oct", "k": "AA"}, {"kty": "EC", "crv": "P-521", "x": "A", "y": "A"},
    {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
    {"kty": "EC", "crv": "P-256"},
])
def test_bad_tee_pubkey(jwk):
    with pytest.raises(protocol.JWKError):
        protocol.import_tee_pubkey(jwk)


def test_private_jwk_refused_and_jwe_round_trip():
    k = ECKey.generate_key("P-384")
    with pytest.raises(protocol.JWKError, match="private"):
        protocol.import_tee_pubkey(dict(k.as_dict(private=True)))
    pub = protocol.import_tee_pubkey(protocol.public_jwk(k))
    resp = protocol.encrypt_response(b"secret", pub)
    assert set(resp) >= {"protected", "iv", "ciphertext", "tag"}
    assert protocol.decrypt_response(resp, k) == b"secret"
    with pytest.raises(BrokerError):
        protocol.decrypt_response(resp, ECKey.generate_key("P-384"))
    resp["ciphertext"] = resp["ciphertext"][:-2] + ("A" if resp["ciphertext"][-2] != "A" else "B") + "A"
    with pytest.raises(BrokerError):
        protocol.decrypt_response(resp, k)
    r = RSAKey.generate_key(2048)
    rp = protocol.import_tee_pubkey(protocol.public_jwk(r))
    assert protocol.decrypt_response(protocol.encrypt_response(b"x", rp), r) == b"x"


def test_workload_ca_issues_and_refuses():
    ca = WorkloadCA.generate("t")
    again = WorkloadCA.from_pem(ca.to_pem())
    assert again.cert == ca.cert
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    cert = ca.issue(leaf_key.public_key(), common_name="w", dns_names=("api",), ip_addresses=("127.0.0.1",),
                    validity_days=2, extensions=[("2.23.133.5.4.9", b"\x01\x02")])
    cert.verify_directly_issued_by(ca.cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(CertificateRequestError, match="not allowed"):
        ca.issue(leaf_key.public_key(), common_name="w", extensions=[("1.2.3", b"")])
    with pytest.raises(CertificateRequestError, match="twice"):
        ca.issue(leaf_key.public_key(), common_name="w",
                 extensions=[("2.23.133.5.4.9", b""), ("2.23.133.5.4.9", b"")])
    with pytest.raises(CertificateRequestError, match="curve"):
        ca.issue(ec.generate_private_key(ec.SECP521R1()).public_key(), common_name="w")
    with pytest.raises(BrokerError):
        WorkloadCA.from_pem(b"garbage")


# --- the broker core never fails with anything but its own errors ---------------------------


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    import warnings

    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.broker.server import open_broker

    warnings.simplefilter("ignore")
    d = tmp_path_factory.mktemp("core")
    wl = SimulatedAttester(d / "wl")
    mp = d / "m.json"
    mp.write_text(json.dumps({"workloads": {"w": {"secrets": ["k"], "policy": {
        "allow_simulated": True, "simulated_root": str(wl.root_ca_path),
        "accepted_tcb_statuses": ["UpToDate", "Simulated"], "report_data": "key-binding",
        "reference_values": {"measurements": [wl.measurement.hex()]}}}},
        "secrets": {"k": {"type": "keyset"}}}))
    b = open_broker(d / "b", manifest_path=mp)
    yield b, wl
    b.state.store.close()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(req=_json, pubkey=_json, evidence=_json | st.text(max_size=80))
def test_fuzzed_kbs_bodies_give_only_safehold_errors(core, req, pubkey, evidence):
    b, _ = core
    try:
        b.auth(req)
    except BrokerError:
        pass
    sid, _ch = b.auth({"version": "0.1.0", "tee": "simulated"})
    body = {"tee-pubkey": pubkey, "tee-evidence": evidence}
    try:
        b.attest(sid, body)
        raise AssertionError("fuzzed Evidence was accepted")
    except BrokerError:
        pass
    except Exception as e:  # noqa: BLE001 - anything else would be a 500
        from safehold.errors import SafeholdError

        assert isinstance(e, SafeholdError), repr(e)


def test_core_release_and_truncated_evidence(core):
    b, wl = core
    sid, ch = b.auth({"version": "0.1.0", "tee": "simulated", "extra-params": {"workload": "w"}})
    k = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(k)
    cmw = wl.attest(protocol.report_data(ch["nonce"], jwk)).to_cmw()
    # truncated Evidence: a clear 400/401, and the nonce is used up
    from safehold.broker.errors import MalformedRequestError, NotAuthenticatedError
    from safehold.errors import EvidenceFormatError

    with pytest.raises((MalformedRequestError, EvidenceFormatError, NotAuthenticatedError)):
        b.attest(sid, {"tee-pubkey": jwk, "tee-evidence": cmw[: len(cmw) // 2]})
    with pytest.raises(NotAuthenticatedError, match="already used"):
        b.attest(sid, {"tee-pubkey": jwk, "tee-evidence": cmw})
    sid, ch = b.auth({"version": "0.1.0", "tee": "simulated"})
    cmw = wl.attest(protocol.report_data(ch["nonce"], jwk)).to_cmw()
    assert "token" in b.attest(sid, {"tee-pubkey": jwk, "tee-evidence": json.loads(cmw)})
    keyset = protocol.decrypt_response(b.resource(sid, None, "default", "keyset", "k"), k)
    assert json.loads(keyset)["type"] == "keyset"
    entries = b.audit_entries()
    assert entries[-1]["event"] == "release" and entries[-2]["detail"]["verdict"] == "affirmed"
    assert any(e["event"] == "attest" and e["detail"]["verdict"] == "denied" for e in entries)
    assert b.audit_verify()["ok"]


def test_client_unreachable_broker_is_a_clear_error(core):
    import socket

    from safehold.client.broker import BrokerClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with BrokerClient(f"https://127.0.0.1:{port}", core[1], verify=False, timeout=2) as c, \
                pytest.raises(BrokerError, match="unreachable"):
            c.attest()


def test_update_signed_for_staging_does_not_replay_on_production(tmp_path, owner):
    """Two brokers (staging, production) with the same v1 manifest: an update the owner signed
    for staging v2 is refused by production (its broker id differs), and nothing changes."""
    import warnings

    from safehold.broker.errors import PermissionDeniedError
    from safehold.broker.server import open_broker

    warnings.simplefilter("ignore")
    mp = tmp_path / "m.json"
    mp.write_text(json.dumps(_manifest(owner)))
    staging, production = (open_broker(tmp_path / n, manifest_path=mp) for n in ("staging", "production"))
    try:
        assert staging.broker_id != production.broker_id
        assert staging.manifest.digest == production.manifest.digest and production.manifest_version == 1
        new_raw = _manifest(owner)
        new_raw["secrets"]["k2"] = {"type": "keyset"}
        new = manifest_from_dict(new_raw)
        pk = owner.private_bytes(PEM, PK8, NOENC)
        st = staging.status()
        sig = sign_update(new, 2, pk, broker_id=st["broker_id"], previous_sha256=st["manifest_digest"])
        assert staging.update_manifest(new.raw, 2, "alice", sig) == 2
        with pytest.raises(PermissionDeniedError, match="does not verify"):
            production.update_manifest(new.raw, 2, "alice", sig)
        assert production.manifest_version == 1 and "k2" not in production.manifest.secrets
        assert production.audit_entries()[-1]["event"] == "manifest-denied"
        assert production.audit_entries()[0]["event"] == "init"
        assert production.audit_entries()[0]["detail"]["master_fingerprint"] == \
            production.status()["master_fingerprint"]
    finally:
        staging.state.store.close()
        production.state.store.close()


# --- recovery attempts and keys, manifest check, manifest versions in the audit ---------------


def test_failed_recovery_attempts_are_audited(tmp_path, owner, rsa_keys):
    """While sealed the audit key is unavailable: failed attempts are kept and written to the
    audit log by the recovery that succeeds; in ready mode a recovery attempt is audited at once."""
    import warnings

    from safehold.broker.core import Broker
    from safehold.broker.errors import MalformedRequestError, StateConflictError

    warnings.simplefilter("ignore")
    store = SqliteStore(tmp_path / "r.db")
    b = Broker(BrokerState.open(store, SealingIdentity(b"a" * 32, b"\x01" * 48)), None)
    b.set_manifest(_manifest(owner, rsa_keys, threshold=2))
    fp = b.status()["master_fingerprint"]
    r = Broker(BrokerState.open(store, SealingIdentity(b"b" * 32, b"\x01" * 48)), None)  # another host
    assert r.mode == "recovery" and "host identity differs" in r.status()["reason"]
    data = r.state.recovery_data()
    shares = [decrypt_share(data["shares"][f"r{i}"], _priv(k)) for i, k in enumerate(rsa_keys)]
    bkey = ECKey.import_key(protocol.public_jwk(r.recovery.key))
    enc = [protocol.encrypt_response(s, bkey) for s in shares[:2]]
    with pytest.raises(RecoveryError, match="fingerprint"):
        r.recover({"shares": enc, "expect_fingerprint": "00" * 16})
    with pytest.raises(MalformedRequestError, match="not a JWE"):
        r.recover({"shares": ["garbage"], "expect_fingerprint": fp})
    with pytest.raises(MalformedRequestError, match="expect_fingerprint"):
        r.recover({"shares": enc})
    r.recover({"shares": enc, "expect_fingerprint": fp})
    entries = r.audit_entries()
    assert [e["event"] for e in entries[-4:]] == ["recovery-denied"] * 3 + ["recovery"]
    assert "fingerprint" in entries[-4]["detail"]["reason"] and "not a JWE" in entries[-3]["detail"]["reason"]
    assert entries[-1]["detail"]["failed_attempts_before"] == 3
    with pytest.raises(StateConflictError):
        r.recover({"shares": enc, "expect_fingerprint": fp})
    assert r.audit_entries()[-1]["event"] == "recovery-denied"
    assert r.audit_verify()["ok"]
    store.close()


def test_recover_cli_names_a_key_that_does_not_load(tmp_path, rsa_keys):
    from click.testing import CliRunner

    from safehold.cli.broker import broker

    good = tmp_path / "r0.key"
    good.write_bytes(_priv(rsa_keys[0]))
    cut = tmp_path / "cut.key"
    cut.write_bytes(_priv(rsa_keys[0])[:300])
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(PEM, PK8, NOENC))
    for bad, why in ((cut, "cannot load recovery key"), (ec_key, "not an RSA private key")):
        res = CliRunner().invoke(broker, ["recover", "--key", str(good), "--key", str(bad),
                                          "--insecure-no-attestation", "--expect-fingerprint", "00" * 16,
                                          "--url", "https://127.0.0.1:1"])
        assert isinstance(res.exception, BrokerError), res.output
        assert f"cannot load recovery key {bad}" in str(res.exception) and why in str(res.exception)


def test_manifest_check_loads_policies_and_broker_refuses_relative_roots(tmp_path, owner):
    from click.testing import CliRunner

    from safehold.broker.installed import build_verifiers
    from safehold.cli.broker import broker

    m = _manifest(owner)
    m["workloads"]["w"]["policy"]["simulated_root"] = "simulated-tee/root-ca.pem"
    p = tmp_path / "m.json"
    p.write_text(json.dumps(m))
    res = CliRunner().invoke(broker, ["manifest", "check", str(p)])
    assert res.exit_code != 0 and "cannot read simulated_root" in str(res.exception)
    assert str(tmp_path / "simulated-tee" / "root-ca.pem") in str(res.exception)  # next to the manifest
    (tmp_path / "simulated-tee").mkdir()
    from safehold.attestation.attesters.simulated import SimulatedAttester

    (tmp_path / "simulated-tee" / "root-ca.pem").write_bytes(
        SimulatedAttester(tmp_path / "tee").root_ca_path.read_bytes())
    res = CliRunner().invoke(broker, ["manifest", "check", str(p)])
    assert res.exit_code == 0, res.output
    # a relative root that reaches the broker unresolved (raw API body) is refused, not cwd-relative
    with pytest.raises(ManifestError, match="simulated_root.*relative"):
        build_verifiers(manifest_from_dict(m))


def test_audit_verify_catches_the_manifest_version_going_backwards(tmp_path, owner):
    import warnings

    from safehold.broker.core import Broker

    warnings.simplefilter("ignore")
    store = SqliteStore(tmp_path / "a.db")
    b = Broker(BrokerState.open(store, SealingIdentity(b"a" * 32, b"\x01" * 48)), None)
    b.set_manifest(_manifest(owner))
    assert b.audit_verify()["ok"]
    b.record("manifest", {"version": 1, "digest": "x", "signer": None, "source": "api"})  # a re-install
    res = b.audit_verify()
    assert not res["ok"] and "manifest version 1 after version 1" in res["error"]
    assert "backwards" in res["error"]
    store.close()
