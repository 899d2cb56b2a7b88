"""Anchor member processes for the freshness process tests: loopback, RA-TLS on the simulated
TEE, run from a snapshot copy of the package (the measurement trap, docs/developing.md)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.broker.ca import WorkloadCA
from safehold.freshness.anchor.client import QuorumAnchor
from support.freshness import Owner


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ClientIdentity:
    """A workload certificate from a test broker CA (CN = the workload = the ledger)."""

    def __init__(self, ca: WorkloadCA, name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.issue(key.public_key(), common_name=name)
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())


class AnchorCluster:
    """``n`` anchor member processes on loopback.

    Args:
        root: a temporary directory. package: the snapshot copy of the package
            (``snapshot_package``). owner: the data owner (its public key is pinned).
    """

    def __init__(self, root: Path, package: Path, owner: Owner, n: int = 3) -> None:
        self.root, self.owner, self.n = root, owner, n
        self.pythonpath = str(package.parent)
        self.ca = WorkloadCA.generate("freshness test")
        self.ca_file = root / "broker-ca.pem"
        self.ca_file.write_text(self.ca.cert_pem())
        self.data_dir = root / "tee"
        self.ports = free_ports(n)
        self.urls = [f"https://127.0.0.1:{p}" for p in self.ports]
        der = self.ca.cert.public_bytes(serialization.Encoding.DER)
        root_pem = self.data_dir / "simulated-tee" / "root-ca.pem"
        self.config = root / "anchor-member.toml"
        self.config.write_text(
            f"members = {json.dumps(self.urls)}\n"
            f'client_ca_sha256 = "{hashlib.sha256(der).hexdigest()}"\n'
            f'owner_public_key = """{owner.public_pem()}"""\n'
            'host = "127.0.0.1"\n'
            "[peer_policy]\n"
            "allow_simulated = true\n"
            f"simulated_root = {json.dumps(str(root_pem))}\n")
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.measurement = ""

    def start(self, i: int, *, wait: bool = True) -> None:
        ready = self.root / f"member{i}.json"
        if ready.exists():
            ready.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
        env["PYTHONPATH"] = self.pythonpath
        log = open(self.root / f"member{i}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "safehold.freshness.anchor.server", "--config", str(self.config),
             "--data-dir", str(self.data_dir), "--port", str(self.ports[i]), "--client-ca",
             str(self.ca_file), "--ready-file", str(ready)], env=env, stdout=log, stderr=log,
            cwd=self.root)
        log.close()
        if wait:
            self.wait_listening(i)

    def wait_listening(self, i: int, timeout: float = 60) -> None:
        ready = self.root / f"member{i}.json"
        end = time.monotonic() + timeout
        while not ready.exists():
            p = self.procs[i]
            if p is not None and p.poll() is not None:
                raise AssertionError(f"member {i} exited: {self.log(i)[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"member {i} did not listen: {self.log(i)[-3000:]}")
            time.sleep(0.05)
        self.measurement = json.loads(ready.read_text())["measurement"]

    def log(self, i: int) -> str:
        p = self.root / f"member{i}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start_all(self) -> None:
        for i in range(self.n):
            self.start(i, wait=False)
        for i in range(self.n):
            self.wait_listening(i)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop(self) -> None:
        for i in range(self.n):
            self.kill(i)

    def policy_toml(self, measurement: str | None = None) -> str:
        root_pem = self.data_dir / "simulated-tee" / "root-ca.pem"
        return ("allow_simulated = true\n"
                f"simulated_root = {json.dumps(str(root_pem))}\n"
                "[reference_values]\n"
                f'measurements = ["{measurement or self.measurement}"]\n')

    def verifier(self, measurement: str | None = None) -> Verifier:
        return Verifier(AppraisalPolicy.from_toml(self.policy_toml(measurement)))

    def client(self, name: str = "records", *, identity: ClientIdentity | None = None, timeout: float = 2.0,
               measurement: str | None = None) -> QuorumAnchor:
        ident = identity or ClientIdentity(self.ca, name)
        return QuorumAnchor(self.urls, self.verifier(measurement), client_cert_pem=ident.cert_pem,
                            client_key_pem=ident.key_pem, timeout=timeout)

    def wait_ready(self, quorum: QuorumAnchor, count: int | None = None, timeout: float = 30) -> None:
        """Until ``count`` (default n) members report ready."""
        want = self.n if count is None else count
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if sum(m.ready for m in quorum.members()) >= want:
                    return
            except Exception:  # noqa: BLE001 - not enough members up yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"fewer than {want} members ready: {[self.log(i)[-500:] for i in range(self.n)]}")
