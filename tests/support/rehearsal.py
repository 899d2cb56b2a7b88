"""Process rehearsal of the Helm chart (issue 18 item 5; docs/deploy-aks.md, "Rehearsal"):
the containers of the rendered ``kind-dev`` chart run as processes on loopback.

What is taken from the chart unchanged: each container's measured launch (``command``: the
isolated interpreter flags, the bootstrap that enforces the environment allow-list, the module,
the run-time arguments) and its ``env``. What is adapted, and only that:

* the image's interpreter and ``sys.path`` entries → this machine's interpreter, its standard
  library, the venv's site-packages and a snapshot copy of the package (the measurement trap);
* in-container paths → directories: an ``emptyDir`` / volume claim → one directory per replica;
  a ConfigMap or Secret → one shared directory (a nested Secret mount → a symlink);
* ports and the listen host (``0.0.0.0`` → ``127.0.0.1``) → free ports on loopback; Service
  DNS names → a :class:`RoundRobinFront` per Service; the DSN Secret → the test's PostgreSQL.

The owner's bootstrap steps (docs/deploy-aks.md, "First deployment order") are done the way the
owner would: the first broker replica creates the state, its CA is pinned in the measured
``records.toml`` / ``anchor.toml``, the manifest is installed through the broker's admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

from safehold.attestation.workload import LaunchSpec
from tests.support.shared import free_port

IMAGE_PYTHON = "/opt/safehold/bin/python"


class RoundRobinFront:
    """A TCP front on loopback that hands each new connection to the next live backend (a
    Kubernetes Service without session affinity, as far as a client can tell)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = free_port()
        self.connections = 0
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"front-{self.port}")
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = len(self.backends)
        for _ in range(n):  # the next backend that accepts (a killed replica refuses)
            port = self.backends[self._next % n]
            self._next += 1
            try:
                br, bw = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        await asyncio.gather(pipe(reader, bw), pipe(br, writer))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def pod_launch(command: list[str], package: Path) -> LaunchSpec:
    """The :class:`~safehold.attestation.workload.LaunchSpec` that runs the container's workload
    here: its module and its environment policy (checked equal, byte for byte, to the image's),
    this machine's interpreter, standard library and site-packages, the package snapshot."""
    assert command[0] == IMAGE_PYTHON, command[0]
    i_c = command.index("-c")
    pol = json.loads(command[i_c + 3])
    spec = LaunchSpec(command[i_c + 2], app_dir=str(package.parent), passthrough=tuple(pol["passthrough"]),
                      fixed_env=dict(pol["fixed"]))
    assert spec.env_policy() == command[i_c + 3]  # the image's measured policy, unchanged
    return spec


def adapt_command(command: list[str], package: Path, paths: dict[str, Path],
                  ports: dict[str, str]) -> list[str]:
    """The container's command with only the image's interpreter (and its byte-code prefix),
    ``sys.path``, in-container paths and ports replaced (module docstring): the same module,
    BOOT and environment policy under :func:`pod_launch`. ``paths``: in-container prefix →
    directory; ``ports``: argument value → replacement (e.g. ``"8443"`` → a free port,
    ``"0.0.0.0"`` → ``"127.0.0.1"``)."""
    sep = command.index("--")
    args = [ports.get(arg, map_path(arg, paths)) for arg in command[sep + 1:]]
    return pod_launch(command, package).argv(*args)


def map_path(value: str, paths: dict[str, Path]) -> str:
    """``value`` with the longest matching in-container prefix replaced."""
    for prefix in sorted(paths, key=len, reverse=True):
        if value == prefix or value.startswith(prefix + "/"):
            return str(paths[prefix]) + value[len(prefix):]
    return value


def env_policy(command: list[str]) -> dict:
    """The launch's environment policy (``{"fixed": {...}, "passthrough": [...]}``)."""
    return json.loads(command[command.index("-c") + 3])


class Proc:
    """One replica process: its log, SIGKILL, liveness."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name, self.argv, self.env, self.workdir = name, argv, env, workdir
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.p = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      cwd=workdir)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_https(name: str, port: int, path: str, verify: object, proc: Proc, timeout: float = 90) -> None:
    """Until ``GET https://127.0.0.1:port/path`` answers 200 (fails with the log if the process
    exits or the time runs out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive():
            raise AssertionError(f"{name} exited: {proc.log()[-3000:]}")
        try:
            r = httpx.get(f"https://127.0.0.1:{port}{path}", verify=verify, timeout=3)  # type: ignore[arg-type]
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} not ready on port {port}: {proc.log()[-3000:]}")


def wait_tcp(name: str, port: int, proc: Proc, timeout: float = 60) -> None:
    """Until something accepts TCP on ``port``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive():
            raise AssertionError(f"{name} exited: {proc.log()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} does not listen on {port}: {proc.log()[-3000:]}")
