"""Anchor member processes for the freshness process tests: loopback, RA-TLS on the simulated
TEE, run from a snapshot copy of the package (the measurement trap, docs/developing.md)."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.broker.ca import WorkloadCA
from safehold.freshness.anchor.client import QuorumAnchor
from safehold.freshness.anchor.launch import LocalAnchor
from tests.support.freshness import Owner


class ClientIdentity:
    """A workload certificate from a test broker CA (CN = the workload = the ledger).

    ``attested``: with the attested-workload key purpose, as the broker's KBS issues it after
    appraisal (the default); False: as ``/admin/client-certificates`` issues it to an operator.
    """

    def __init__(self, ca: WorkloadCA, name: str, *, attested: bool = True) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (ca.issue(key.public_key(), common_name=name, attested=True) if attested
                else ca.issue(key.public_key(), common_name=name, client_only=True))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())


class AnchorCluster(LocalAnchor):
    """``n`` members (``LocalAnchor``) with a test broker CA and a test owner."""

    def __init__(self, root: Path, package: Path, owner: Owner, n: int = 3) -> None:
        self.owner = owner
        self.ca = WorkloadCA.generate("freshness test")
        ca_file = root / "broker-ca.pem"
        ca_file.write_text(self.ca.cert_pem())
        super().__init__(root / "anchor", data_dir=root / "tee", client_ca_file=ca_file,
                         owner_public_key=owner.public_pem(), n=n, package_root=package)

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
        logs = [self.log(i)[-500:] for i in range(self.n)]
        raise AssertionError(f"fewer than {want} members ready: {logs}")
