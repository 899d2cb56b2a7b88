"""Stopping child processes, and a child stopping itself when its parent is gone (a shared
leaf: no Safehold imports).

The dev stack, the SVR launcher and the tests stop their loopback processes the same way:
SIGTERM, a bounded wait for the graceful shutdown, then SIGKILL (:func:`terminate`).

``safehold up`` launches its workloads (broker, records service, SVR servers and their anchor
members, discovery, the VAU, the records anchor members) in their own sessions and passes each
``--exit-with-parent <its pid>`` (:data:`EXIT_WITH_PARENT`, a run-time argument after the
launch's ``--``: not measured, not secret). Each workload's entry point calls
:func:`exit_with_parent`: if ``up`` is killed (SIGKILL, a hard crash) the child notices within
about half a second that it was re-parented and SIGTERMs itself, so it stops through its normal
graceful path instead of holding the ports and its keys, unsupervised. A workload started any
other way (a shell, Kubernetes, a test) gets no such option and is unaffected.

Why not ``prctl(PR_SET_PDEATHSIG)`` (as the forked records workers use): it fires when the
*thread* that spawned the child exits, and ``up`` restarts the broker and the services from
supervisor threads; polling ``os.getppid()`` has no such trap. This module lives here (a leaf)
rather than in ``safehold.runtime`` because the freshness anchor members, below the services'
layer, use it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["EXIT_WITH_PARENT", "clean_exit_code", "exit_with_parent", "parent_gone", "terminate"]

#: The workloads' run-time option naming the parent they stop with (``--exit-with-parent PID``).
EXIT_WITH_PARENT = "--exit-with-parent"
#: Seconds between two looks at ``os.getppid()``.
WATCH_INTERVAL = 0.5
#: Seconds the graceful stop (after the self-delivered SIGTERM) may take before SIGKILL.
STOP_GRACE = 15.0


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


def parent_gone(parent_pid: int) -> bool:
    """True once this process's parent is no longer ``parent_pid`` (it exited and the process
    was re-parented to init or a subreaper; a pid is not reused while its child lives)."""
    return os.getppid() != parent_pid


def exit_with_parent(parent_pid: int | None, *, watch: bool = True, interval: float = WATCH_INTERVAL,
                     grace: float = STOP_GRACE) -> threading.Thread | None:
    """Stop this process when its parent ``parent_pid`` is gone (module docstring).

    Call it first thing in a workload's entry point, before any signal handler is installed.
    ``None`` (the option not given: a service started by a shell, Kubernetes, a test) does
    nothing. Otherwise a daemon thread looks at ``os.getppid()`` every ``interval`` seconds; when
    the parent changed it sends SIGTERM to this process (so the workload's own SIGTERM handling
    runs: uvicorn's graceful shutdown, the audit flush, the store close), and SIGKILL if the
    process still runs ``grace`` seconds later (nobody else is left to do it).

    Args:
        parent_pid: the pid the parent had when it started this process (``--exit-with-parent``).
        watch: False checks only now and starts no thread (a process that forks must not run
            threads: it polls :func:`parent_gone` in its own loop, as the records workers'
            supervisor does).
        interval / grace: seconds (see above).

    Returns:
        the watcher thread (None when ``parent_pid`` is None or ``watch`` is false).

    Raises:
        SystemExit: the parent is already gone (exit status 1, one line on stderr): the process
            never starts serving.
        ValueError: ``parent_pid`` is not a positive pid.
    """
    if parent_pid is None:
        return None
    if parent_pid <= 0:
        raise ValueError(f"{EXIT_WITH_PARENT}: {parent_pid} is not a process id")
    if parent_gone(parent_pid):
        sys.exit(f"{EXIT_WITH_PARENT} {parent_pid}: the parent process is gone; not starting")
    if not watch:
        return None
    t = threading.Thread(target=_watch, args=(parent_pid, interval, grace), name="exit-with-parent",
                         daemon=True)
    t.start()
    return t


def _watch(parent_pid: int, interval: float, grace: float) -> None:
    while not parent_gone(parent_pid):
        time.sleep(interval)
    # to the process, not this thread: the Python handler runs in the main thread, as for a
    # SIGTERM from outside
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.kill(os.getpid(), signal.SIGKILL)
