"""`up`'s SVR checkpoint keeper appraises the SVR group's anchor members under a policy the
owner pinned (`svr-anchor-policy.toml`), not under the `anchor_policy` table of `svr-0.toml`:
the keeper's checkpoints decide which re-anchoring the owner signs at the next start, and the
data directory is the operator's (found by the operator-attack review of 8 Dec 2026)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.client.owner_pins import CLIENT_POLICIES, pinned_policy
from safehold.devstack import services as svc
from safehold.devstack.datadir import pin_client_policies
from safehold.errors import ConfigError
from tests.support.certs import pem, self_signed_ca

ANCHOR_M = "a1" * 32


def _written(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "data"
    d.mkdir()
    owner = tmp_path / "data.owner"
    owner.mkdir()
    root = SimulatedAttester(d / "tee").root_ca_path
    (d / "broker").mkdir()
    # the SVR anchor members pin the broker CA
    (d / "broker" / "ca.pem").write_bytes(pem(self_signed_ca("workload CA")[1]))
    pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def measure(module: str, p: Path) -> tuple[str, Path]:
        return (ANCHOR_M if "anchor" in module else "b2" * 32), root

    written = svc.write_configs(d, pin="c3" * 32, owner_pub=pub, ports=svc.ServicePorts(),
                                measure=measure, owner=owner)
    pin_client_policies(d, owner, written["policies"], root)
    return d, written


def test_the_anchor_policy_is_written_pinned_and_equal_to_the_servers(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    d, written = _written(tmp_path)
    f = d / CLIENT_POLICIES["svr-anchor"]
    server_view = tomllib.loads((d / "svr-0.toml").read_text("utf-8"))["anchor_policy"]
    assert tomllib.loads(f.read_text("utf-8")) == server_view  # the keeper sees what svr-0 sees
    assert server_view["reference_values"]["measurements"] == [ANCHOR_M]
    assert pinned_policy(d, "svr-anchor") is not None


def test_widening_svr0_toml_changes_nothing_editing_the_pinned_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    d, _ = _written(tmp_path)
    # widening svr-0.toml's table no longer matters to the keeper; widening its own file is refused
    cfg = tomllib.loads((d / "svr-0.toml").read_text("utf-8"))
    cfg["anchor_policy"]["reference_values"]["measurements"].append("ee" * 32)
    (d / "svr-0.toml").write_text(tomli_w.dumps(cfg), "utf-8")
    assert pinned_policy(d, "svr-anchor") is not None
    f = d / CLIENT_POLICIES["svr-anchor"]
    f.write_text(f.read_text("utf-8").replace(ANCHOR_M, "ee" * 32), "utf-8")
    with pytest.raises(ConfigError, match="is not the appraisal policy the owner pinned"):
        pinned_policy(d, "svr-anchor")


def test_up_notices_a_client_policy_edited_since_the_last_up(tmp_path, monkeypatch) -> None:
    """`up` rewrites the client policies at every start; one that differs from the owner's pin
    (edited since the last `up`) is named, so that an edit does not vanish without a word."""
    from safehold.devstack.datadir import edited_client_policies

    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    d, _ = _written(tmp_path)
    assert edited_client_policies(d, None) == []
    f = d / CLIENT_POLICIES["discovery"]
    f.write_text(f.read_text("utf-8") + "\n# mine\n", "utf-8")
    assert edited_client_policies(d, None) == [CLIENT_POLICIES["discovery"]]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert edited_client_policies(fresh, None) == []  # nothing pinned yet: a first run
