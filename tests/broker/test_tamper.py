"""Broker state tampered with in the untrusted store. Before the authenticated state head,
deleting the manifest rows left a broker that served without a manifest and accepted an
unsigned ``manifest set``, and other deleted or corrupted rows ended in tracebacks
(RecursionError, TypeError) instead of an error naming the row.

Each state row is deleted or corrupted in turn in the SQLite file (with sqlite3), then
``safehold broker serve`` and ``safehold broker audit verify --data-dir`` run as real processes:
each must refuse with one clear line naming the row (or, for rows the broker can restore, say
so loudly) — never a traceback, never a broker that serves as if no manifest had been set."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.attestation.attesters.simulated import SimulatedAttester
from tests.support.broker_process import manifest_dict, start_broker, write_keys, write_manifest
from tests.support.shared import ROOT, free_port

pytestmark = pytest.mark.slow  # starts processes on loopback

NS = "safehold.broker"


def _cli(*args: str, penv: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safehold.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, **penv}, cwd=str(ROOT), timeout=60)


def _rows(db: Path, ns: str = NS) -> dict[bytes, bytes]:
    with sqlite3.connect(db) as c:
        return {bytes(k): bytes(v) for k, v in
                c.execute("SELECT key, value FROM safehold_rows WHERE "
                          "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (ns,))}


def _edit(db: Path, key: bytes, action: str, ns: str = NS, value: bytes | None = None,
          pos: int | None = None) -> None:
    with sqlite3.connect(db) as c:
        if action == "delete":
            assert c.execute("DELETE FROM safehold_rows WHERE "
                             "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                             (ns, key)).rowcount == 1
            return
        if value is None:
            (old,) = c.execute("SELECT value FROM safehold_rows WHERE "
                               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?",
                               (ns, key)).fetchone()
            v = bytearray(old)
            v[len(v) // 2 if pos is None else pos] ^= 0x55
            value = bytes(v)
        c.execute("UPDATE safehold_rows SET value=? WHERE "
                  "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key=?", (value, ns, key))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, snap):
    """A broker data dir after: first manifest (v1, with recovery keys), a value secret, a
    signed update (v2). Also the state rows as they were at v1, and row key → row name."""
    from safehold.broker.manifest import manifest_from_dict, sign_update

    t = tmp_path_factory.mktemp("tamper")
    wl = SimulatedAttester(t / "workload")
    keys = write_keys(t / "keys")
    m = manifest_dict(measurement=wl.measurement.hex(), simulated_root=str(wl.root_ca_path), keys=keys)
    mp = write_manifest(t / "manifest.json", m)
    penv = {"PYTHONPATH": snap["PYTHONPATH"]}
    data = t / "broker"
    b = start_broker(data, manifest=mp, env=penv)
    try:
        with b.client() as h:
            r = h.put("/admin/secrets/db-password", content=b"pw",
                      headers={"Authorization": f"Bearer {keys['operator_token']}"})
            assert r.status_code == 200, r.text
            st = h.get("/status").json()
    finally:
        b.stop()
    v1_rows = _rows(data / "broker.db")
    b = start_broker(data, env=penv)
    try:
        new = {**m, "secrets": {**m["secrets"], "extra": {"type": "keyset"}}}
        sig = sign_update(manifest_from_dict(new), 2, keys["owner_key"].read_bytes(),
                          broker_id=st["broker_id"], previous_sha256=st["manifest_digest"])
        with b.client() as h:
            r = h.post("/admin/manifest/update", json={"manifest": new, "version": 2, "signer": "alice",
                                                       "signature": sig})
            assert r.status_code in (200, 201), r.text
    finally:
        b.stop()
    # name the blind-indexed rows (opened in this process with the snapshot's measurement)
    from safehold.broker.server import open_broker

    ob = open_broker(data, measurement=bytes.fromhex(st["broker_measurement"]), repair=False)
    try:
        names = {ob.state.row_key(k, n): f"{k}/{n}" for k, n in [
            ("keys", "broker"), ("ca", "root"), ("manifest", "current"), ("manifest", "1"),
            ("manifest", "2"), ("secret", "records-keyset"), ("secret", "other-key"),
            ("secret", "extra"), ("secret", "db-password")]}
    finally:
        ob.state.store.close()
    for k in (b"m/sealed", b"m/keyset", b"m/head", b"m/recovery"):
        names[k] = k.decode()
    assert set(_rows(data / "broker.db")) == set(names), "a state row kind is not covered"
    with sqlite3.connect(data / "broker.db") as c:  # everything in broker.db: copies skip the WAL
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"data": data, "penv": penv, "names": names, "v1_rows": v1_rows, "keys": keys, "m": m,
            "t": t}


def _copy(pristine, tmp_path: Path) -> Path:
    d = tmp_path / "b2"
    shutil.copytree(pristine["data"], d, ignore=shutil.ignore_patterns("*.log", "*-wal", "*-shm"))
    return d


def _serve_refuses(d: Path, penv: dict) -> str:
    """Run `broker serve`: it must exit 1 at once with one clear line; return that line."""
    r = _cli("broker", "serve", "--data-dir", str(d), "--port", str(free_port()), penv=penv)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(err) == 1, r.stderr
    return err[0]


def _verify_refuses(d: Path, penv: dict) -> str:
    r = _cli("broker", "audit", "verify", "--data-dir", str(d), penv=penv)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["ok"] is False
    return r.stderr.strip()


REFUSED = ["m/keyset", "m/head", "keys/broker", "ca/root", "manifest/current", "manifest/1", "manifest/2",
           "secret/records-keyset", "secret/other-key", "secret/extra"]


@pytest.mark.parametrize("action", ["delete", "corrupt"])
@pytest.mark.parametrize("row", REFUSED)
def test_each_state_row_deleted_or_corrupted_is_refused_naming_it(pristine, tmp_path, row, action):
    d = _copy(pristine, tmp_path)
    key = next(k for k, n in pristine["names"].items() if n == row)
    _edit(d / "broker.db", key, action)
    line = _serve_refuses(d, pristine["penv"])
    assert row in line, line
    assert row in _verify_refuses(d, pristine["penv"])


def test_value_secret_corrupted_is_refused(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    key = next(k for k, n in pristine["names"].items() if n == "secret/db-password")
    _edit(d / "broker.db", key, "corrupt")
    assert "secret/db-password" in _serve_refuses(d, pristine["penv"])
    assert "secret/db-password" in _verify_refuses(d, pristine["penv"])


@pytest.mark.parametrize("action", ["delete", "corrupt"])
def test_sealed_key_row_gives_recovery_mode_naming_it(pristine, tmp_path, action):
    d = _copy(pristine, tmp_path)
    _edit(d / "broker.db", b"m/sealed", action, pos=-10)  # in the sealed blob
    assert "m/sealed" in _verify_refuses(d, pristine["penv"])
    b = start_broker(d, env=pristine["penv"], expect_mode="recovery")
    try:
        with b.client(verify=False) as h:
            st = h.get("/status").json()
            assert "m/sealed" in st["reason"]
            assert h.get("/ca").status_code == 503
    finally:
        b.stop()


@pytest.mark.parametrize("action", ["delete", "corrupt"])
def test_recovery_record_missing_or_replaced_is_reported_and_rewritten(pristine, tmp_path, action):
    d = _copy(pristine, tmp_path)
    _edit(d / "broker.db", b"m/recovery", action)
    assert "m/recovery" in _verify_refuses(d, pristine["penv"])  # offline verify never writes
    b = start_broker(d, env=pristine["penv"])
    try:
        assert "STATE TAMPERING" in b.log() and "m/recovery" in b.log()
        with b.client() as h:
            st = h.get("/status").json()
            assert any("m/recovery" in w for w in st["warnings"])
            shares = json.loads(_rows(d / "broker.db")[b"m/recovery"])["shares"]
            assert sorted(shares) == ["r0", "r1", "r2"]
            auth = {"Authorization": f"Bearer {pristine['keys']['reader_token']}"}
            entries = h.get("/admin/audit", headers=auth).json()["entries"]
            assert entries[-1]["event"] == "state-repaired"
    finally:
        b.stop()
    # repaired: a restart is clean again, and the new shares restore the same master key
    from safehold.broker.shares import combine_shares, decrypt_share

    shares = json.loads(_rows(d / "broker.db")[b"m/recovery"])["shares"]
    plain = [decrypt_share(shares[f"r{i}"], pristine["keys"]["recovery"][i][0].read_bytes()) for i in (0, 1)]
    from safehold.broker.shares import master_fingerprint

    ok = _cli("broker", "audit", "verify", "--data-dir", str(d), penv=pristine["penv"])
    assert ok.returncode == 0, ok.stderr
    b = start_broker(d, env=pristine["penv"])
    try:
        with b.client() as h:
            st = h.get("/status").json()
        assert "warnings" not in st
        assert master_fingerprint(combine_shares(plain, 2)) == st["master_fingerprint"]
    finally:
        b.stop()


def test_manifest_rows_deleted_never_allow_an_unsigned_manifest(pristine, tmp_path):
    """Deleting the manifest head and current version rows used to give a ready
    broker with manifest_version 0 that accepted an unsigned `manifest set`."""
    d = _copy(pristine, tmp_path)
    names = {n: k for k, n in pristine["names"].items()}
    for row in ("manifest/current", "manifest/2"):
        _edit(d / "broker.db", names[row], "delete")
    assert "manifest/current" in _serve_refuses(d, pristine["penv"])
    # rolling the current-version row back to its v1 ciphertext: refused as well
    d = _copy(pristine, tmp_path / "x")
    key = names["manifest/current"]
    _edit(d / "broker.db", key, "update", value=pristine["v1_rows"][key])
    line = _serve_refuses(d, pristine["penv"])
    assert "manifest/current" in line and "says version 1" in line and "records manifest version 2" in line


def test_whole_state_rolled_back_to_v1_is_caught_by_audit_verify(pristine, tmp_path):
    """The known limit, narrowed: every state row rolled back together to the v1 snapshot (the
    audit log kept) opens as a consistent v1 broker — but `manifest set` stays refused (a
    manifest was set) and `audit verify` notices the state head is behind the log."""
    d = _copy(pristine, tmp_path)
    db = d / "broker.db"
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM safehold_rows WHERE "
                  "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (NS,))
        c.executemany("INSERT INTO safehold_rows (ns, key, value, version) "
                      "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, ?, 1)",
                      [(NS, k, v) for k, v in pristine["v1_rows"].items()])
    err = _verify_refuses(d, pristine["penv"])
    assert "last manifest entry is version 2" in err and "records version 1" in err
    b = start_broker(d, env=pristine["penv"])
    try:
        with b.client() as h:
            assert h.get("/status").json()["manifest_version"] == 1
            rogue = {**pristine["m"], "name": "rogue"}
            r = h.post("/admin/manifest", json=rogue)
            assert r.status_code == 403 and "already set" in r.json()["detail"], r.text
    finally:
        b.stop()


def test_audit_rows_deleted_or_corrupted_are_named(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    audit = sorted(_rows(d / "broker.db", "safehold.broker.audit"))
    entries = [k for k in audit if len(k) == 8]
    head = next(k for k in audit if len(k) != 8)
    _edit(d / "broker.db", entries[2], "corrupt", ns="safehold.broker.audit")
    assert "audit entry #3" in _verify_refuses(d, pristine["penv"])
    d = _copy(pristine, tmp_path / "x")
    _edit(d / "broker.db", entries[2], "delete", ns="safehold.broker.audit")
    assert "audit entry #3: missing" in _verify_refuses(d, pristine["penv"])
    d = _copy(pristine, tmp_path / "y")
    _edit(d / "broker.db", head, "delete", ns="safehold.broker.audit")
    assert "head row missing" in _verify_refuses(d, pristine["penv"])
