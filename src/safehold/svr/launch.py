"""Start ``n`` SVR server processes on loopback: tests, benchmarks, and (until the workload
runtime launches them) development. In production every server is its own TEE on its own host,
ideally of different TEE vendors.

.. code-block:: python

    ls = LocalSvr(workdir, group_id=g, anchor_urls=anchor.urls, anchor_policy=policy_dict,
                  data_dir=tee_dir, n=3)
    ls.write_configs()
    for i in range(3):
        ls.start(i, secrets_i)     # {"secret", "access", "anchor_client_cert", "anchor_client_key"}
    ls.policy()                     # the servers' Reference Values, for the client SDK

Writes into ``workdir``: each server's measured configuration (``svr-<i>.toml``), ready file and
log. The secrets go to each child's standard input (a pipe) and nowhere else. The servers run
``safehold.svr.server`` through :class:`safehold.attestation.workload.LaunchSpec` (isolated
interpreter, the app directory = the parent of ``package_root`` when given: a snapshot copy of
the package keeps one measurement while the tree is edited; no environment but the fixed
variables). They receive no secret from the broker yet: the next phase moves them onto
``safehold.runtime`` (docs/svr.md, "Wiring").
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.workload import LaunchSpec, package_app_dir
from safehold.errors import ConfigError
from safehold.procutil import terminate

__all__ = ["LocalSvr"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} into an SVR configuration")


class LocalSvr:
    """``n`` SVR server processes on loopback (module docstring).

    Args:
        workdir: directory for configurations, ready files and logs.
        group_id: the SVR group id (u64), the same for every server.
        anchor_urls: the anchor members' URLs. anchor_policy: their appraisal policy (a table
            of :class:`~safehold.attestation.policy.AppraisalPolicy` keys, one level of
            sub-tables such as ``reference_values``).
        data_dir: the simulated TEE's key directory (RA-TLS); ``None`` serves plain HTTP.
        n: servers (default 3), named ``svr-0`` … ``svr-<n-1>``.
        store_urls: one store URL per server (default: ``workdir/svr-<i>.db``).
        package_root: run the servers from this copy of the ``safehold`` package.
        ports: fixed ports (default: any free port, kept across restarts).
    """

    def __init__(self, workdir: Path, *, group_id: int, anchor_urls: list[str],
                 anchor_policy: Mapping[str, Any], data_dir: Path | None, n: int = 3,
                 store_urls: list[str] | None = None, package_root: Path | None = None,
                 ports: list[int] | None = None, wait_timeout: float = 5.0) -> None:
        self.workdir, self.n = Path(workdir), n
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.group_id, self.anchor_urls, self.anchor_policy = group_id, list(anchor_urls), dict(anchor_policy)
        self.data_dir, self.package_root, self.wait_timeout = data_dir, package_root, wait_timeout
        self.names = [f"svr-{i}" for i in range(n)]
        self.store_urls = store_urls or [f"sqlite:///{self.workdir / f'svr-{i}.db'}" for i in range(n)]
        self.ports = list(ports) if ports else [0] * n
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.urls = [""] * n
        self.measurements = [""] * n

    def config(self, i: int) -> Path:
        return self.workdir / f"svr-{i}.toml"

    def ready_file(self, i: int) -> Path:
        return self.workdir / f"svr-{i}.ready.json"

    def log_file(self, i: int) -> Path:
        return self.workdir / f"svr-{i}.log"

    def log(self, i: int) -> str:
        """Server ``i``'s log so far."""
        p = self.log_file(i)
        return p.read_text(errors="replace") if p.exists() else ""

    def write_configs(self) -> None:
        """Write every server's measured configuration."""
        for i, name in enumerate(self.names):
            lines = [f"name = {json.dumps(name)}", f"group_id = {self.group_id}", 'host = "127.0.0.1"',
                     f"anchor_members = {_toml_value(self.anchor_urls)}",
                     f"wait_timeout = {float(self.wait_timeout)!r}", "[anchor_policy]"]
            tables = []
            for k, v in self.anchor_policy.items():
                if isinstance(v, Mapping):
                    tables.append(f"[anchor_policy.{k}]")
                    tables += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
                else:
                    lines.append(f"{k} = {_toml_value(v)}")
            self.config(i).write_text("\n".join(lines + tables) + "\n", "utf-8")

    def _launch(self) -> LaunchSpec:
        """The servers' workload launch (isolated interpreter, no environment but the fixed
        variables; the app directory is ``package_root``'s parent when given)."""
        app = str(Path(self.package_root).resolve().parent) if self.package_root is not None else None
        return LaunchSpec("safehold.svr.server", app_dir=app or package_app_dir())

    def start(self, i: int, secrets: Mapping[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        """Start server ``i`` with ``secrets`` on its standard input; wait until it listens.

        Raises:
            ConfigError: it exited or did not listen in time (with its log).
        """
        ready = self.ready_file(i)
        ready.unlink(missing_ok=True)
        spec = self._launch()
        mode = ["--data-dir", str(self.data_dir)] if self.data_dir is not None else ["--insecure-plain-http"]
        with open(self.log_file(i), "ab") as log:
            proc = subprocess.Popen(
                spec.argv("--config", str(self.config(i)),
                 "--store-url", self.store_urls[i], "--port", str(self.ports[i]), *mode,
                          "--ready-file", str(ready)),
                stdin=subprocess.PIPE, stdout=log, stderr=log, env=spec.env({}), cwd=self.workdir)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(dict(secrets)).encode())
        proc.stdin.close()
        self.procs[i] = proc
        end = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise ConfigError(f"SVR server {i} exited: {self.log(i)[-3000:]}")
            if time.monotonic() > end:
                raise ConfigError(f"SVR server {i} did not start listening: {self.log(i)[-3000:]}")
            time.sleep(0.05)
        info: dict[str, Any] = json.loads(ready.read_text())
        self.urls[i], self.ports[i], self.measurements[i] = info["url"], info["port"], info["measurement"]
        return info

    def kill(self, i: int) -> None:
        """SIGKILL server ``i``."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop(self, i: int, timeout: float = 10.0) -> None:
        """SIGTERM server ``i`` (SIGKILL after ``timeout`` seconds)."""
        p = self.procs[i]
        if p is not None:
            terminate(p, timeout)
        self.procs[i] = None

    def stop_all(self) -> None:
        """Stop every server."""
        for i in range(self.n):
            self.stop(i)

    def policy_toml(self, measurements: list[str] | None = None) -> str:
        """An appraisal policy accepting exactly these servers (SIMULATED TEE)."""
        if self.data_dir is None:
            raise ConfigError("plain-HTTP servers present no Evidence")
        ms = measurements or sorted(set(self.measurements))
        root = Path(self.data_dir) / "simulated-tee" / "root-ca.pem"
        return (f'name = "svr"\nallow_simulated = true\nsimulated_root = {json.dumps(str(root))}\n'
                f"[reference_values]\nmeasurements = {json.dumps(ms)}\n")

    def policy(self, measurements: list[str] | None = None) -> AppraisalPolicy:
        """:meth:`policy_toml` as an AppraisalPolicy (for the client SDK)."""
        return AppraisalPolicy.from_toml(self.policy_toml(measurements))
