"""``safehold.procutil``: SIGTERM, bounded wait, SIGKILL — on real child processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from safehold.procutil import clean_exit_code, terminate

pytestmark = pytest.mark.slow  # starts child processes

_READY = "import signal, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(600)\n"


def _child(setup: str = "") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _READY.format(setup=setup)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_sigterm_stops_a_running_child() -> None:
    proc = _child()
    assert terminate(proc) == -signal.SIGTERM
    assert clean_exit_code(proc.returncode) == 0


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout() -> None:
    proc = _child("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    assert terminate(proc, timeout=0.5) == -signal.SIGKILL
    assert clean_exit_code(proc.returncode) == -signal.SIGKILL


def test_an_exited_child_keeps_its_status() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert terminate(proc) == 3 and clean_exit_code(3) == 3 and clean_exit_code(None) is None
