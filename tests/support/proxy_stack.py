"""Helpers for the proxy tests: start an upstream and ``safehold proxy`` as real loopback processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from safehold.crypto.keyset import Keyset
from tests.support.shared import free_port


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers anything over HTTP; raise RuntimeError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop_all(procs: Sequence[subprocess.Popen]) -> None:
    """Terminate every process, then reap each (killing any that outlive 10 s)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proxy_argv(schema: Path, keyset: Path, upstream: str, port: int) -> list[str]:
    """The command line of ``safehold proxy`` listening on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "safehold.cli.main", "proxy", "--schema", str(schema),
            "--keyset", str(keyset), "--upstream", upstream, "--listen", f"127.0.0.1:{port}"]


@dataclass
class ProxyStack:
    proxy: str      # base URL of the proxy
    upstream: str   # base URL of the upstream service
    up_port: int
    tmp: Path
    schema: Path
    keyset: Path    # wrapped under the KEK in env["SAFEHOLD_PROXY_KEK"]
    env: dict[str, str]


@contextmanager
def proxy_stack(tmp: Path, upstream_script: str, upstream_args: Sequence[str], schema: str, *,
                health: str = "/healthz", timeout: float = 30.0) -> Iterator[ProxyStack]:
    """Run ``upstream_script`` (argv: port, *upstream_args) and a proxy in front of it, both on loopback.

    Both processes are waited for on ``health`` and always stopped on exit.
    """
    (tmp / "upstream.py").write_text(upstream_script)
    schema_path = tmp / "schema.toml"
    schema_path.write_text(schema)
    kek = os.urandom(32)
    keyset = tmp / "keyset.bin"
    keyset.write_bytes(Keyset.generate().wrap(kek))
    env = dict(os.environ, SAFEHOLD_PROXY_KEK=kek.hex())
    up_port, px_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    procs: list[subprocess.Popen] = []
    try:
        up = subprocess.Popen([sys.executable, str(tmp / "upstream.py"), str(up_port), *upstream_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(up)
        wait_http(upstream + health, up, timeout)
        px = subprocess.Popen(proxy_argv(schema_path, keyset, upstream, px_port), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(px)
        wait_http(f"http://127.0.0.1:{px_port}{health}", px, timeout)
        yield ProxyStack(f"http://127.0.0.1:{px_port}", upstream, up_port, tmp, schema_path, keyset, env)
    finally:
        stop_all(procs)
