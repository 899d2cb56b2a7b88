"""Helpers for the broker tests: start ``safehold broker serve`` as a real process on loopback."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from safehold.attestation.workload import LaunchSpec, package_app_dir
from safehold.devstack.stack import BROKER_ENV, BROKER_MODULE
from tests.support.shared import ROOT, free_port


def broker_launch(app_dir: str | Path | None = None) -> LaunchSpec:
    """The broker's launch (as ``safehold up`` launches it): isolated, environment allow-list;
    ``app_dir`` is the snapshot's parent (default: the imported package's ``src/``). Its
    ``closure()`` is the broker's measurement (and sealing identity)."""
    return LaunchSpec(BROKER_MODULE, app_dir=str(app_dir) if app_dir else package_app_dir(),
                      passthrough=BROKER_ENV)


@dataclass
class BrokerProc:
    proc: subprocess.Popen
    url: str
    data_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def cacert(self) -> str:
        return str(self.data_dir / "ca.pem")

    def client(self, **kw) -> httpx.Client:
        verify = ssl.create_default_context(cafile=self.cacert) if Path(self.cacert).exists() else False
        return httpx.Client(base_url=self.url, verify=kw.pop("verify", verify), timeout=30.0, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_broker(data_dir: Path, *, manifest: Path | None = None, store: str | None = None,
                 extra: list[str] = (), env: dict | None = None, expect_mode: str | None = "ready",
                 tls: bool = True) -> BrokerProc:
    """Start the broker process through its workload launch (:func:`broker_launch`; ``env``'s
    ``PYTHONPATH`` names the app directory, nothing else of it reaches the process) and wait
    until /status answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = broker_launch((env or {}).get("PYTHONPATH"))
    for _ in range(3):
        port = free_port()
        args = spec.argv("serve", "--data-dir", str(data_dir), "--port", str(port), *extra)
        if manifest is not None:
            args += ["--manifest", str(manifest)]
        if store is not None:
            args += ["--store", store]
        if not tls:
            args += ["--no-tls"]
        log_path = data_dir / f"broker-{port}.log"
        logf = log_path.open("w")
        e = spec.env({k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=e, cwd=str(ROOT))
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        bp = BrokerProc(proc, url, data_dir, log_path, args)
        deadline = time.time() + 40
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                r = httpx.get(url + "/status", verify=False, timeout=2)
                if r.status_code == 200:
                    if expect_mode is not None and r.json()["mode"] != expect_mode:
                        bp.stop()  # never leave a process behind
                        raise AssertionError(f"broker mode {r.json()}, expected {expect_mode}")
                    return bp
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        bp.stop()
        if "address already in use" not in bp.log().lower():
            raise AssertionError(f"broker did not start:\n{bp.log()}")
    raise AssertionError("broker did not start (ports)")


def write_keys(d: Path) -> dict:
    """Owner (Ed25519) and three recovery (RSA-3072) key pairs, plus tokens."""
    d.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    out: dict = {}
    owner = ed25519.Ed25519PrivateKey.generate()
    (d / "owner.key").write_bytes(owner.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    out["owner_pub"] = owner.public_key().public_bytes(pem, spki).decode()
    out["owner_key"] = d / "owner.key"
    out["recovery"] = []
    for i in range(3):
        k = rsa.generate_private_key(65537, 3072)
        p = d / f"recovery{i}.key"
        p.write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        out["recovery"].append((p, k.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo).decode()))
    out["owner_token"] = "owner-token-" + os.urandom(8).hex()
    out["reader_token"] = "reader-token-" + os.urandom(8).hex()
    out["operator_token"] = "operator-token-" + os.urandom(8).hex()
    return out


def manifest_dict(*, measurement: str, simulated_root: str, keys: dict, threshold: int = 2) -> dict:
    import hashlib

    def h(t: str) -> str:
        return hashlib.sha256(t.encode()).hexdigest()

    policy = {"allow_simulated": True, "simulated_root": simulated_root, "report_data": "key-binding",
              "accepted_tcb_statuses": ["UpToDate", "Simulated"],
              "reference_values": {"measurements": [measurement]}}
    return {
        "name": "safehold-test",
        "repository": "default",
        "workloads": {
            "records": {"policy": policy, "secrets": ["records-keyset", "records-tls", "db-password"]},
            "other": {"policy": {**policy, "reference_values": {"measurements": ["ab" * 48]}},
                      "secrets": ["other-key"]},
        },
        "secrets": {
            "records-keyset": {"type": "keyset"},
            "other-key": {"type": "keyset"},
            "records-tls": {"type": "certificate", "dns_names": ["api", "localhost"],
                            "ip_addresses": ["127.0.0.1"], "validity_days": 7},
            "db-password": {"type": "value", "max_bytes": 256},
        },
        "users": {
            "alice": {"roles": ["owner"], "public_key": keys["owner_pub"],
                      "token_sha256": h(keys["owner_token"])},
            "olga": {"roles": ["operator"], "token_sha256": h(keys["operator_token"])},
            "rita": {"roles": ["reader"], "token_sha256": h(keys["reader_token"])},
        },
        "recovery": {"threshold": threshold,
                     "keys": {f"r{i}": pub for i, (_, pub) in enumerate(keys["recovery"])}},
    }


def write_manifest(path: Path, m: dict) -> Path:
    path.write_text(json.dumps(m, indent=1))
    return path
