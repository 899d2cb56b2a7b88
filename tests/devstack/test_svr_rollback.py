"""An SVR database copy restored while the whole `safehold up` stack is stopped must not bring
its guess budget back (issue 13; found by an operator-attack review: every `up` re-anchored the
SVR ledgers with the development owner key, whatever the copy's age).

The owner's checkpoint of each SVR ledger (kept by `up` while it runs and at stop) guards the
re-anchoring at the next start: an older head is refused, the server stays not fresh, the
summary says so, and the copy's tries are never served."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.client.connection import owner_dir
from safehold.svr.errors import PinMismatchError
from tests.support.devstack import wait_up
from tests.support.shared import free_port

pytestmark = pytest.mark.slow


def _ports() -> list[int]:
    picked: list[int] = []
    while len(picked) < 8:
        p = free_port()
        if p not in picked:
            picked.append(p)
    return picked


def _up(env: dict[str, str], data: Path, ports: list[int]) -> tuple[subprocess.Popen[str], dict]:
    up = subprocess.Popen(
        [sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data), "--services", "svr",
         "--broker-port", str(ports[0]), "--port", str(ports[1]), "--scone-port", "0",
         "--svr-ports", ",".join(map(str, ports[2:5])), "--svr-anchor-ports", ",".join(map(str, ports[5:8]))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return up, wait_up(up, data, timeout=240)


def _down(up: subprocess.Popen[str]) -> str:
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=90)
    return out


def _client(data: Path, info: dict):
    from safehold.client.svr import Svr2Client

    token = json.loads((owner_dir(data) / "tokens.json").read_text())["writer"]
    return Svr2Client(info["svr"]["urls"][0], token=token, policy=info["svr"]["policy"])


def _wrong(c) -> int:
    with pytest.raises(PinMismatchError) as e:
        c.restore("9999")
    return e.value.tries


def test_svr_copy_restored_while_the_stack_is_stopped_does_not_bring_tries_back(env, tmp_path):
    data, ports = tmp_path / "data", _ports()
    up, info = _up(env, data, ports)
    try:
        with _client(data, info) as c:
            c.backup("1234", b"export key", max_tries=3)
    finally:
        _down(up)
    old = tmp_path / "old"
    old.mkdir()
    for f in data.glob("svr-0.db*"):
        shutil.copy2(f, old / f.name)  # the operator's copy: 3 tries

    up, info = _up(env, data, ports)
    try:
        with _client(data, info) as c:
            assert _wrong(c) == 2 and _wrong(c) == 1
    finally:
        _down(up)
    for f in data.glob("svr-0.db*"):
        f.unlink()
    for f in old.iterdir():
        shutil.copy2(f, data / f.name)  # put the copy back while everything is stopped

    up, info = _up(env, data, ports)
    try:
        assert info["svr"]["ledgers"][0].startswith("refused"), info["svr"]["ledgers"]
        assert info["svr"]["ledgers"][1:] == ["reanchor", "reanchor"]
        with _client(data, info) as c:
            with pytest.raises(Exception) as e:  # noqa: PT011 - the server answers 503 not-fresh
                c.restore("9999")
            assert not isinstance(e.value, PinMismatchError)  # no guess is answered, no try served
            assert "fresh" in str(e.value).lower() or "503" in str(e.value), e.value
    finally:
        out = _down(up)
    assert "NOT re-anchored" in out
