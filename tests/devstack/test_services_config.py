"""The pieces of the services' wiring that need no process: service selection, manifest entries,
access-list mapping, key derivation, the measured configurations, the CLI's stack lookup and the
development IdP's tokens (the process tests are in test_services.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.broker.manifest import load_manifest
from safehold.cli.erezept import mint_token
from safehold.cli.stackinfo import stack_service, stack_token
from safehold.client.workload import access_by_token, derive_secret
from safehold.crypto.keyset import Keyset
from safehold.devstack.services import ALL_SERVICES, idp_key, manifest_entries, parse_services
from safehold.discovery.errors import DiscoveryConfigError
from safehold.discovery.server import ServerConfig as DiscoveryConfig
from safehold.erezept.tokens import AccessTokenVerifier
from safehold.errors import ConfigError
from safehold.vau.server import AttestedConfig, derive_vau_key, vau_certificate

TOK = {"admin": "a" * 43, "writer": "w" * 43, "reader": "r" * 43}


def test_services_option_selects_in_start_order_and_refuses_unknown_names():
    assert parse_services(None) == parse_services("all") == ALL_SERVICES
    assert parse_services("none") == ()
    assert parse_services("erezept, svr") == ("svr", "erezept")
    with pytest.raises(ConfigError, match="unknown service.*'vua'"):
        parse_services("svr,vua")


def test_manifest_entries_give_each_server_its_own_value_and_pin_tokens_not_names():
    ms = {n: f"{i:02x}" * 48 for i, n in enumerate(["svr-0", "svr-1", "svr-2", "discovery", "vau"])}
    workloads, secrets = manifest_entries(TOK, {"root": "/x/root-ca.pem", "workloads": ms})
    assert {w: v["policy"]["reference_values"]["measurements"] for w, v in workloads.items()} == \
        {n: [m] for n, m in ms.items()}
    assert workloads["svr-1"]["secrets"] == ["svr-1-keyset", "svr-1-anchor", "svr-access"]
    assert workloads["vau"]["secrets"] == ["erezept-keyset", "vau-erp-identity", "vau-epa-identity"]
    principals = secrets["svr-access"]["principals"]
    assert principals["user"] == {"role": "backup", "token_sha256": hashlib.sha256(b"w" * 43).hexdigest()}
    # the broker accepts the whole manifest (names, types, pins)
    m = load_manifest(json.dumps({"name": "t", "workloads": workloads, "secrets": secrets}).encode(),
                      filename="m.json")
    assert set(m.workloads) == set(ms)


def test_access_documents_map_roles_and_drop_everything_else():
    doc = {"tokens": {"aa" * 32: {"name": "admin", "role": "admin"},
                      "bb" * 32: {"name": "u", "role": "backup"},
                      "cc" * 32: {"name": "x", "role": "writer"}},
           "keys": {"dd" * 32: {"name": "k", "role": "admin"}}}
    got = access_by_token(doc, {"admin": ["admin"], "backup": ["backup"]})
    assert got == {"aa" * 32: {"name": "admin", "roles": ["admin"]},
                   "bb" * 32: {"name": "u", "roles": ["backup"]}}


def test_service_secrets_follow_the_index_key_not_the_rotating_value_keys():
    a = Keyset({1: bytes(32)}, 1, b"i" * 32)
    b = Keyset({1: bytes(32), 2: b"\x01" * 32}, 2, b"i" * 32)  # rotated: same index key
    assert derive_secret(a, "svr/server-secret") == derive_secret(b, "svr/server-secret")
    assert derive_secret(a, "svr/server-secret") != derive_secret(a, "discovery/secret")


def test_vau_key_is_a_deterministic_brainpool_key_and_its_certificate_carries_it():
    k1, k2 = derive_vau_key(b"s" * 32), derive_vau_key(b"s" * 32)
    assert isinstance(k1.curve, ec.BrainpoolP256R1)
    assert k1.private_numbers().private_value == k2.private_numbers().private_value
    assert derive_vau_key(b"t" * 32).private_numbers().private_value != k1.private_numbers().private_value
    from cryptography import x509

    cert = x509.load_der_x509_certificate(vau_certificate(k1))
    assert cert.public_key().public_numbers() == k1.public_key().public_numbers()
    with pytest.raises(ValueError):
        derive_vau_key(b"short")


def test_epa_signing_key_is_a_deterministic_p256_key_other_than_the_erp_one():
    from safehold.vau.server import derive_epa_signing_key

    k = derive_epa_signing_key(b"s" * 32)
    assert isinstance(k.curve, ec.SECP256R1)
    assert k.private_numbers() == derive_epa_signing_key(b"s" * 32).private_numbers()


def test_vau_attested_config_refuses_unknown_keys_and_non_loopback_hosts(tmp_path):
    pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    ok = f'name = "vau"\nbroker_ca_sha256 = "ab"\nidp_issuer = "https://i"\nidp_keys = [{json.dumps(pub)}]\n'
    p = tmp_path / "vau.toml"
    p.write_text(ok)
    assert AttestedConfig(str(p)).host == "127.0.0.1"
    p.write_text(ok + 'erp_vau_key = "x"\n')
    with pytest.raises(ConfigError, match="unknown keys \\['erp_vau_key'\\]"):
        AttestedConfig(str(p))
    p.write_text(ok + 'host = "10.0.0.1"\n')
    with pytest.raises(ConfigError, match="loopback"):
        AttestedConfig(str(p))


def test_discovery_config_run_time_store_and_host_rules(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text('name = "discovery"\nhost = "0.0.0.0"\nport = 0\n')
    with pytest.raises(DiscoveryConfigError, match="store_url"):
        DiscoveryConfig.load(p, attested=True)
    with pytest.raises(DiscoveryConfigError, match="not loopback"):
        DiscoveryConfig.load(p, store_url="sqlite:///x.db")  # plain HTTP: loopback only
    cfg = DiscoveryConfig.load(p, attested=True, store_url="sqlite:///x.db")  # RA-TLS: any host
    assert cfg.store_url == "sqlite:///x.db"


def test_cli_finds_services_and_tokens_of_the_running_stack(tmp_path):
    assert stack_service(str(tmp_path), "svr") is None  # no stack: the CLI's own defaults apply
    (tmp_path / "up.json").write_text(json.dumps({"discovery": {"url": "https://x", "policy": "p"}}))
    assert stack_service(str(tmp_path), "discovery") == {"url": "https://x", "policy": "p"}
    with pytest.raises(ConfigError, match="does not run svr"):
        stack_service(str(tmp_path), "svr")
    (tmp_path / "tokens.json").write_text(json.dumps(TOK))  # the old layout: never read
    assert stack_token(str(tmp_path), "reader") is None
    owner = tmp_path.with_name(tmp_path.name + ".owner")  # the owner directory beside the data dir
    owner.mkdir()
    (owner / "tokens.json").write_text(json.dumps(TOK))
    assert stack_token(str(tmp_path), "reader") == "r" * 43
    assert stack_token(str(tmp_path), "nobody") is None


def test_dev_idp_tokens_verify_under_the_configured_key_with_the_role(tmp_path):
    key = idp_key(tmp_path)
    assert idp_key(tmp_path).private_numbers() == key.private_numbers()  # made once
    assert oct((tmp_path / "erezept-idp.key").stat().st_mode & 0o777) == "0o600"
    v = AccessTokenVerifier([key.public_key()], issuer="https://idp.test")
    tok = mint_token(tmp_path / "erezept-idp.key", "https://idp.test", "pharmacy", "3-SMC-B-1")
    assert v.principal(tok).role == "pharmacy"
    with pytest.raises(ConfigError):
        mint_token(tmp_path / "missing.key", "https://idp.test", "insured", "A123456780")
