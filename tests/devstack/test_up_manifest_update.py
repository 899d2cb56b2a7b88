"""`safehold up` makes an owner signing key for its dev manifest, so `safehold broker manifest
update` works on an `up` data directory and the next `up` keeps serving the signed version
(before, an `up` data directory had no owner key, so its manifest could never be updated).
`up`, the broker and the records service run as real processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.support.shared import free_port

pytestmark = pytest.mark.slow  # starts processes on loopback


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "safehold.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _up(env, data: Path) -> tuple[subprocess.Popen, dict]:
    up = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data),
                           "--broker-port", str(free_port()), "--port", str(free_port()),
                           "--scone-port", "0"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    deadline = time.monotonic() + 90
    while not (data / "up.json").exists():
        if up.poll() is not None or time.monotonic() > deadline:
            _stop(up)
            raise AssertionError(up.communicate())
        time.sleep(0.1)
    return up, json.loads((data / "up.json").read_text())


def _stop(up: subprocess.Popen) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
    up.communicate(timeout=60)


def test_manifest_update_on_an_up_data_dir_survives_the_next_up(env, tmp_path):
    data = tmp_path / "d"
    up, info = _up(env, data)
    try:
        owner = tmp_path / "d.owner"  # the default owner directory: beside the data directory
        key = owner / "owner.key"
        assert not (data / "owner.key").exists() and not (data / "tokens.json").exists()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        m = tomllib.loads((data / "manifest.toml").read_text())
        assert m["users"]["admin"]["public_key"] == (owner / "owner.pub").read_text()
        m["secrets"]["extra"] = {"type": "keyset"}
        (data / "m2.toml").write_text(tomli_w.dumps(m))
        conn = ["--url", info["broker_url"], "--cacert", str(data / "ca.pem")]
        # another key is refused
        other = tmp_path / "other"
        assert _cli(env, "broker", "keygen", "--kind", "owner", "--out", str(other)).returncode == 0
        r = _cli(env, "broker", "manifest", "update", str(data / "m2.toml"), "--signer", "admin",
                 "--key", str(other) + ".key", *conn)
        assert r.returncode == 1 and "does not verify" in r.stderr
        r = _cli(env, "broker", "manifest", "update", str(data / "m2.toml"), "--signer", "admin",
                 "--key", str(key), *conn)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["version"] == 2
    finally:
        _stop(up)
    # the next `up` writes the same v1 manifest file: the broker keeps the signed version 2
    up, info = _up(env, data)
    try:
        r = _cli(env, "broker", "status", "--url", info["broker_url"], "--cacert", str(data / "ca.pem"))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["manifest_version"] == 2
        r = _cli(env, "broker", "manifest", "show", "--url", info["broker_url"], "--cacert",
                 str(data / "ca.pem"), "--token",
                 json.loads((tmp_path / "d.owner" / "tokens.json").read_text())["admin"])
        assert "extra" in json.loads(r.stdout)["manifest"]["secrets"]
    finally:
        _stop(up)
    assert "superseded by the signed version 2" in (data / "broker.log").read_text()
