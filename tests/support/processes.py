"""Running Safehold processes from a snapshot of the package (the measurement trap,
docs/developing.md): edits to the working tree never change a running workload's files.
The snapshot itself is :func:`tests.support.shared.snapshot_package`."""

from __future__ import annotations

import json
import os
import subprocess
import time
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
