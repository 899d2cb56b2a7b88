"""Running Safehold processes from a snapshot of the package (the measurement trap,
docs/developing.md): edits to the working tree never change a running workload's files.
The snapshot itself is :func:`tests.support.shared.snapshot_package`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from safehold.procutil import terminate


def child_env(snapshot: Path, **extra: str) -> dict[str, str]:
    """A child environment that imports ``safehold`` from ``snapshot`` only (the directory that
    holds the copied ``safehold`` package) and inherits no ``SAFEHOLD_*`` variable; ``extra``
    is added on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
    env["PYTHONPATH"] = str(snapshot)
    env.update(extra)
    return env


def wait_ready(proc: subprocess.Popen, ready_file: Path, timeout: float = 60.0) -> dict:
    """Wait for a JSON ready file; fail with the process's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"process exited with {proc.returncode}: {err[-2000:]}")
        if ready_file.exists():
            try:
                return json.loads(ready_file.read_text())
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no ready file {ready_file} after {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds (:func:`safehold.procutil.terminate`)."""
    terminate(proc, timeout)


def kill_when_paused(args: list[str], at_pause: Callable[[], None] | None = None,
                     timeout: float = 60.0) -> None:
    """Run ``args`` (a child that prints ``paused`` at the point under test, then blocks on
    stdin) and SIGKILL it there: the kill lands exactly at that point, no timing involved.
    ``at_pause()`` runs while the child is paused. Asserts the child paused and died of SIGKILL."""
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "paused"
        if at_pause is not None:
            at_pause()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=timeout) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
