"""Helpers for tests that run ``safehold up`` / ``safehold patients`` as real processes from a
snapshot of the package (the measurement trap: docs/developing.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.shared import ROOT, snapshot_package

#: The sample patients shipped in the package (CSV + FHIR bundle, 8 records).
SAMPLE = ROOT / "src" / "safehold" / "data" / "sample"


def snapshot_env(tmp_path_factory) -> dict[str, str]:
    """Environment running ``python -m safehold.cli.main`` from a fresh copy of the package."""
    d = snapshot_package(tmp_path_factory.mktemp("pkg")).parent
    e = dict(os.environ)
    e["PYTHONPATH"] = str(d)
    e.pop("SAFEHOLD_TOKEN", None)
    return e


def cli(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m safehold.cli.main *args`` in ``env``; with ``check``, fail the test on a
    non-zero exit status (showing both streams)."""
    r = subprocess.run([sys.executable, "-m", "safehold.cli.main", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"safehold {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def wait_up(up: subprocess.Popen, data: Path, timeout: float = 150.0) -> dict:
    """Wait for ``safehold up`` to write ``data/up.json`` and return it; fail if ``up`` exits first.

    The default allows for the freshness anchor: three member processes, then the broker's and
    the records service's ledgers settled, on a 2-core machine shared with other test runs."""
    deadline = time.monotonic() + timeout
    while not (data / "up.json").exists():
        assert up.poll() is None, up.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return json.loads((data / "up.json").read_text())
