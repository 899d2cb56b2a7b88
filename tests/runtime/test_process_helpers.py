"""The pieces a service process that serves its own socket uses (safehold.runtime.core):
listen_socket, write_ready_file, exit_status, simulated_ratls_context."""

from __future__ import annotations

import json
import os
import socket
import ssl
import warnings
from pathlib import Path

import pytest

from safehold.attestation.errors import SimulatedTEEWarning
from safehold.errors import ConfigError
from safehold.runtime import (
    NoKeysError,
    exit_status,
    listen_socket,
    simulated_ratls_context,
    write_ready_file,
)


def test_listen_socket_listens_with_nodelay() -> None:
    with listen_socket("127.0.0.1", 0, backlog=8) as sock:
        port = sock.getsockname()[1]
        assert port > 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # inherited


def test_ready_file(tmp_path: Path) -> None:
    f = tmp_path / "ready.json"
    write_ready_file(f, host="::1", port=8443, tls=True, name="svr-0", measurement="ab", mode=0o644)
    assert json.loads(f.read_text()) == {
        "url": "https://[::1]:8443",
        "port": 8443,
        "pid": os.getpid(),
        "name": "svr-0",
        "measurement": "ab",
    }
    assert f.stat().st_mode & 0o777 == 0o644
    write_ready_file(f, host="127.0.0.1", port=80, tls=False, name="d", measurement="")
    assert json.loads(f.read_text())["url"] == "http://127.0.0.1:80"
    assert f.stat().st_mode & 0o777 == 0o600


def test_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status("svr", NoKeysError("refused: measurement")) == 2
    assert exit_status("discovery", ConfigError("bad")) == 1
    assert capsys.readouterr().err == "svr: refused: measurement\ndiscovery: bad\n"


def test_simulated_ratls_context(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.toml"
    cfg.write_text('name = "x"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)
        ctx, measurement = simulated_ratls_context(
            tmp_path, [cfg], common_name="safehold x", ip_addresses=("127.0.0.1",)
        )
    assert isinstance(ctx, ssl.SSLContext) and ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert len(bytes.fromhex(measurement)) == 48  # SHA-384
