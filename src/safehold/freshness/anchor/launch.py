"""Start ``n`` anchor member processes on loopback: the development default (3 members), and the
tests and benchmarks. In production every member is its own TEE on its own host.

.. code-block:: python

    la = LocalAnchor(workdir, data_dir=tee_dir, client_ca_file=ca_pem_path,
                     owner_public_key=owner_pub_pem, package_root=snapshot_dir)
    la.start_all()
    verifier = la.verifier()          # the members' Reference Value, for QuorumAnchor

Writes into ``workdir``: the measured member configuration (``anchor-member.toml``, identical
for every member), one ready file and one log per member. The members run
``safehold.freshness.anchor.server`` through :class:`safehold.attestation.workload.LaunchSpec`
(isolated interpreter; the app directory is the parent of ``package_root`` when given: a
snapshot copy of the package keeps one measurement while the working tree is edited; no
environment but the fixed variables).
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.closure import Closure
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.workload import LaunchSpec, package_app_dir
from safehold.errors import ConfigError
from safehold.procutil import EXIT_WITH_PARENT

__all__ = ["LocalAnchor", "free_ports"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (racy by nature)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalAnchor:
    """``n`` member processes on loopback (module docstring).

    Args:
        workdir: directory for the configuration, ready files and logs.
        data_dir: the simulated TEE's key directory (shared by the members).
        client_ca_file: the broker workload CA (PEM) the members pin and verify clients with.
        owner_public_key: the data owner's public key (SPKI PEM), pinned in the configuration.
        n: members (default 3). ports: fixed ports (default: free ones).
        package_root: run the members from this copy of the ``safehold`` package.

    Attributes:
        exit_with_parent: None (default), or the pid passed to members started from now on as
            ``--exit-with-parent``: they stop by themselves once it is no longer their parent
            (``safehold up`` sets its own; :func:`safehold.procutil.exit_with_parent`).

    Raises:
        ConfigError: the CA file does not load.
    """

    def __init__(self, workdir: Path, *, data_dir: Path, client_ca_file: Path, owner_public_key: str,
                 n: int = 3, ports: list[int] | None = None, package_root: Path | None = None) -> None:
        self.workdir, self.data_dir, self.n = Path(workdir), Path(data_dir), n
        self.client_ca_file = Path(client_ca_file)
        self.package_root = package_root
        self.ports = list(ports) if ports else free_ports(n)
        self.urls = [f"https://127.0.0.1:{p}" for p in self.ports]
        try:
            der = x509.load_pem_x509_certificate(self.client_ca_file.read_bytes()).public_bytes(
                serialization.Encoding.DER)
        except (OSError, ValueError) as e:
            raise ConfigError(f"anchor client CA {client_ca_file}: {e}") from None
        self.simulated_root = self.data_dir / "simulated-tee" / "root-ca.pem"
        self.config = self.workdir / "anchor-member.toml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"members = {json.dumps(self.urls)}\n"
            f'client_ca_sha256 = "{hashlib.sha256(der).hexdigest()}"\n'
            f'owner_public_key = """{owner_public_key.strip()}\n"""\n'
            'host = "127.0.0.1"\n'
            "[peer_policy]\n"
            "allow_simulated = true\n"
            f"simulated_root = {json.dumps(str(self.simulated_root))}\n", "utf-8")
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.measurement = ""
        self.exit_with_parent: int | None = None

    def _ready(self, i: int) -> Path:
        return self.workdir / f"member{i}.json"

    def log(self, i: int) -> str:
        """Member ``i``'s log so far."""
        p = self.workdir / f"member{i}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def _launch(self) -> LaunchSpec:
        """The servers' workload launch (isolated interpreter, no environment but the fixed
        variables; the app directory is ``package_root``'s parent when given)."""
        app = str(Path(self.package_root).resolve().parent) if self.package_root is not None else None
        return LaunchSpec("safehold.freshness.anchor.server", app_dir=app or package_app_dir())

    def reference_value(self) -> str:
        """The members' Reference Value as the data owner computes it: the closure of their
        launch with the member configuration (hex SHA-384; what their simulated TEE reports)."""
        return self.closure().hex()

    def closure(self, base: Closure | None = None) -> Closure:
        """The members' measured closure (:meth:`reference_value` is its hex); ``base``: a
        closure over the same interpreter and ``sys.path`` whose code hashes are reused
        (:meth:`~safehold.attestation.workload.LaunchSpec.closure`).

        Raises:
            ConfigError: see :func:`safehold.attestation.closure.closure`.
        """
        return self._launch().closure([self.config], base=base)

    def start(self, i: int, *, wait: bool = True) -> None:
        """Start member ``i`` (and wait until it listens)."""
        self._ready(i).unlink(missing_ok=True)
        spec = self._launch()
        with open(self.workdir / f"member{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                spec.argv("--config", str(self.config),
                          "--data-dir", str(self.data_dir), "--port", str(self.ports[i]), "--client-ca",
                          str(self.client_ca_file), "--ready-file", str(self._ready(i)),
                          *([EXIT_WITH_PARENT, str(self.exit_with_parent)]
                            if self.exit_with_parent is not None else [])),
                env=spec.env({}), stdout=log, stderr=log, cwd=self.workdir,
                # own session: a terminal's Ctrl-C reaches only the parent (`safehold up`), which
                # stops the services first, takes the last checkpoint, then the members
                start_new_session=True)
        if wait:
            self.wait_listening(i)

    def start_all(self) -> None:
        """Start every member; return once all listen (they then catch up among themselves)."""
        for i in range(self.n):
            self.start(i, wait=False)
        for i in range(self.n):
            self.wait_listening(i)

    def wait_listening(self, i: int, timeout: float = 60.0) -> None:
        """Wait for member ``i``'s ready file. Raises ConfigError (with its log) if it exits."""
        end = time.monotonic() + timeout
        while not self._ready(i).exists():
            p = self.procs[i]
            if p is not None and p.poll() is not None:
                raise ConfigError(f"anchor member {i} exited: {self.log(i)[-3000:]}")
            if time.monotonic() > end:
                raise ConfigError(f"anchor member {i} did not start listening: {self.log(i)[-3000:]}")
            time.sleep(0.05)
        self.measurement = json.loads(self._ready(i).read_text())["measurement"]

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its memory — the heads — is gone)."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop(self) -> None:
        """Stop every member."""
        for i in range(self.n):
            self.kill(i)

    def policy_toml(self, measurement: str | None = None) -> str:
        """An appraisal policy accepting exactly these members (SIMULATED TEE)."""
        return ('name = "anchor"\nallow_simulated = true\n'
                f"simulated_root = {json.dumps(str(self.simulated_root))}\n"
                f'[reference_values]\nmeasurements = ["{measurement or self.measurement}"]\n')

    def verifier(self, measurement: str | None = None) -> Verifier:
        """A Verifier with :meth:`policy_toml` (for ``QuorumAnchor``)."""
        return Verifier(AppraisalPolicy.from_toml(self.policy_toml(measurement)))
