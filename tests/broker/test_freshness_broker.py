"""The broker's state under freshness (issue 12), as processes (``safehold up``'s stack on real
SQLite files): the issue's headline attack — the owner revokes the records measurement, the
operator puts ``broker.db`` back from an earlier copy while the stack is stopped — must no
longer release keys to the revoked measurement; the owner's re-anchoring is required."""

from __future__ import annotations

import json
import ssl
import tomllib

import httpx
import pytest
import tomli_w

from safehold.devstack import prepare, start, stop, update_manifest
from tests.support.freshness import restore_file, sqlite_copy
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow


def _broker(s) -> httpx.Client:
    return httpx.Client(base_url=s.broker_url, timeout=30,
                        verify=ssl.create_default_context(cafile=str(s.path("ca.pem"))))


def test_restored_broker_state_releases_nothing(tmp_path):
    pkg = snapshot_package(tmp_path / "pkg")
    data = tmp_path / "data"

    def stack():
        return prepare(data, broker_port=free_port(), records_port=free_port(), scone_port=None,
                       package_root=str(pkg))

    s = stack()
    start(s)
    try:
        assert s.info["freshness"] == {"broker": "initialised", "records": "initialised"}
        with _broker(s) as c:
            st = c.get("/freshness").json()
            assert st["serving"] and st["adopted"] > 0  # rows made before the ledger existed
            assert c.get("/status").json()["manifest_version"] == 1
        # the operator's copy, taken while the records measurement is still approved
        sqlite_copy(s.path("broker") / "broker.db", tmp_path / "broker-before-revocation.db")
        # the owner revokes the records workload's measurement (signed manifest update)
        m = tomllib.loads(s.path("manifest.toml").read_text())
        m["workloads"]["records"]["policy"]["reference_values"]["measurements"] = ["00" * 48]
        s.path("manifest.toml").write_text(tomli_w.dumps(m))
        assert update_manifest(s) == 2
    finally:
        stop(s)
    checkpoint = json.loads(s.owner_path("anchor-checkpoint.json").read_text())["ledgers"]["broker"]
    # the attack: broker.db put back from before the revocation, while everything is stopped
    restore_file(tmp_path / "broker-before-revocation.db", s.path("broker") / "broker.db")
    s2 = stack()
    start(s2)
    try:
        outcome = s2.info["freshness"]["broker"]
        assert outcome.startswith("refused") and "older than the owner's checkpoint" in outcome, outcome
        assert s2.info["records_url"] is None and "records" not in s2.procs  # never got keys
        with _broker(s2) as c:
            st = c.get("/status").json()
            assert st["mode"] == "not-fresh" and "AnchorLost" in st["reason"]
            r = c.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "sample", "extra-params": ""})
            assert r.status_code == 503 and r.json()["type"].endswith("not-fresh"), r.text
            assert c.get("/kbs/v0/resource/default/keyset/records-keyset").status_code == 503
            assert c.get("/admin/manifest").status_code == 503
            fs = c.get("/freshness").json()
            assert not fs["serving"] and fs["committed_epoch"] < checkpoint["epoch"]
            # the admin token does not help: only a statement the members verify with the owner key
            tok = json.loads(s2.owner_path("tokens.json").read_text())["admin"]
            r = c.post("/freshness/reanchor", json={"payload": "e30", "signature": "AA"},
                       headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 409 and r.json()["type"].endswith("owner-statement-refused"), r.text
            assert c.post("/kbs/v0/auth", json={}).status_code == 503
        # the owner's CLI: status shows it, re-anchoring refuses the older state by default
        from click.testing import CliRunner

        from safehold.cli.main import cli

        run = CliRunner().invoke
        d = ["--data-dir", str(data)]
        r = run(cli, ["freshness", "status", *d])
        assert r.exit_code == 1 and "broker" in r.output and "NOT SERVING" in r.output, r.output
        r = run(cli, ["freshness", "proposal", "--service", "broker", *d])
        assert r.exit_code == 0 and "StoreRolledBackError" in r.output, r.output
        r = run(cli, ["freshness", "reanchor", "--service", "broker", "--yes", *d])
        assert r.exit_code == 1 and "older than the owner's checkpoint" in r.output, r.output
        r = run(cli, ["freshness", "reanchor", "--service", "broker", "--accept-rollback", *d], input="n\n")
        assert r.exit_code == 1 and "declined" in r.output, r.output
        r = run(cli, ["freshness", "reanchor", "--service", "broker", "--accept-rollback", *d], input="y\n")
        assert r.exit_code == 0 and "re-anchored broker" in r.output, r.output
        with _broker(s2) as c:
            st = c.get("/status").json()
            assert st["mode"] == "ready" and st["manifest_version"] == 1  # the owner's knowing choice
            audit = c.get("/admin/audit", headers={"Authorization": f"Bearer {tok}"}).json()
            assert any(e.get("event") == "freshness-reanchor" for e in audit["entries"]), audit
        cp = json.loads(s2.owner_path("anchor-checkpoint.json").read_text())["ledgers"]["broker"]
        assert cp["digest"] != checkpoint["digest"]  # the owner's explicit step moved it to the new history
    finally:
        stop(s2)
