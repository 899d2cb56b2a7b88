"""The records access list knows identities only by pin: a client certificate by the SHA-256 of
its public key, never by its CN; the configuration cannot grant roles."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from safehold.broker.manifest import manifest_from_dict
from safehold.errors import ConfigError
from safehold.records.access import AccessList
from safehold.records.config import ServiceConfig
from safehold.records.errors import AuthenticationError


def cert_der(key, cn: str) -> bytes:
    """A certificate for ``key`` with subject CN ``cn`` (self-signed: the TLS layer has already
    checked the issuer when the access list is asked)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    signer = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1)).sign(signer, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def spki_sha256(key) -> str:
    return hashlib.sha256(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@pytest.fixture
def owner_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def acl(owner_key) -> AccessList:
    """The list as the broker releases it from a manifest's ``access`` secret."""
    m = manifest_from_dict({
        "workloads": {"records": {"secrets": ["records-access"], "policy": {
            "allow_simulated": True, "reference_values": {"measurements": ["ab" * 48]}}}},
        "secrets": {"records-access": {"type": "access", "principals": {
            "owner": {"role": "admin", "public_key_sha256": spki_sha256(owner_key)},
            "writer": {"role": "writer", "token_sha256": hashlib.sha256(b"w-token").hexdigest()}}}},
    })
    return AccessList.from_json(m.secrets["records-access"].access_document())


def test_a_pinned_key_is_its_principal_whatever_the_cn(acl, owner_key):
    for cn in ("owner", "any-label", "reader"):
        p = acl.by_certificate(cert_der(owner_key, cn))
        assert p is not None and (p.name, p.role) == ("cert:owner", "admin")


def test_a_certificate_named_admin_for_another_key_is_nobody(acl):
    minted = cert_der(ec.generate_private_key(ec.SECP256R1()), "admin")
    assert acl.by_certificate(minted) is None
    with pytest.raises(AuthenticationError, match="not pinned"):
        acl.principal(certificate=minted, authorization="")
    # a valid token still authenticates its own principal alongside an unpinned certificate
    assert acl.principal(certificate=minted, authorization="Bearer w-token").role == "writer"


def test_the_cn_mapping_form_is_refused():
    with pytest.raises(ConfigError, match="roles by certificate CN"):
        AccessList.from_json({"tokens": {}, "certificates": {"admin": "admin"}})
    with pytest.raises(ConfigError, match="unknown member"):
        AccessList.from_json({"users": {}})
    with pytest.raises(ConfigError, match="role must be one of"):
        AccessList.from_json({"keys": {"ab" * 32: {"name": "x", "role": "owner"}}})


def test_the_measured_config_cannot_carry_an_access_list(tmp_path):
    f = tmp_path / "records.toml"
    f.write_text(f'broker_ca_sha256 = "{"ab" * 32}"\n[access.certificates]\nadmin = "admin"\n')
    with pytest.raises(ConfigError, match="data owner pins who holds which role in the broker manifest"):
        ServiceConfig.load(f, env={})
    f.write_text(f'freshness = false\nbroker_ca_sha256 = "{"ab" * 32}"\n')
    assert ServiceConfig.load(f, env={}).access_resource == "default/access/records-access"
    with pytest.raises(ConfigError, match="'access_resource' is a measured setting"):
        ServiceConfig.load(f, env={"SAFEHOLD_RECORDS_ACCESS_RESOURCE": "default/access/mine"})
