"""Stopping child processes (a shared leaf: no Safehold imports).

The dev stack, the SVR launcher and the tests stop their loopback processes the same way:
SIGTERM, a bounded wait for the graceful shutdown, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["clean_exit_code", "terminate"]


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM ``proc`` if it still runs, wait up to ``timeout`` seconds, then SIGKILL and wait.

    Returns:
        its exit status (``Popen.returncode``: negative for a signal).
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def clean_exit_code(returncode: int | None) -> int | None:
    """``returncode`` with an exit by SIGTERM / SIGINT counted as 0: uvicorn re-raises the signal
    it handled after a graceful shutdown, which is a clean stop."""
    return 0 if returncode in (-signal.SIGTERM, -signal.SIGINT) else returncode
