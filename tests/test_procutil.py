"""``safehold.procutil``: SIGTERM, bounded wait, SIGKILL — on real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safehold.procutil import EXIT_WITH_PARENT, clean_exit_code, exit_with_parent, terminate

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


# --- exit_with_parent: a child whose parent is killed stops (gracefully) by itself ----------------

# The workload: watches its parent when given --exit-with-parent, marks a graceful stop in its
# SIGTERM handler (as uvicorn's would run), then waits.
_WORKLOAD = """
import signal, sys, time
from pathlib import Path
from safehold.procutil import exit_with_parent
args = sys.argv[1:]
marker = Path(args[0])
exit_with_parent(int(args[2]) if len(args) > 2 else None, interval=0.1)
def stop(*_):
    marker.write_text("graceful")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""

# The parent (stands for `safehold up`): starts the workload in its own session, passing its
# own pid or not, prints the workload's pid, then waits to be killed.
_PARENT = """
import os, subprocess, sys
extra = ["{opt}", str(os.getpid())] if sys.argv[2] == "watch" else []
p = subprocess.Popen([sys.executable, "-c", {workload!r}, sys.argv[1], *extra],
                     stdout=subprocess.PIPE, start_new_session=True)
assert p.stdout.readline() == b"ready\\n"
print(p.pid, flush=True)
os.close(0); import time; time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _orphan(tmp_path: Path, watch: bool, workload: str = _WORKLOAD) -> tuple[int, Path]:
    """Start parent + workload, SIGKILL the parent; return the workload's pid and marker."""
    marker = tmp_path / "stopped"
    code = _PARENT.format(opt=EXIT_WITH_PARENT, workload=workload)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", code, str(marker), "watch" if watch else "plain"],
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE, env=env)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), line
    child = int(line)
    time.sleep(1)  # several polls: it runs on while its parent lives
    assert _alive(child)
    parent.kill()
    parent.wait()
    return child, marker


def test_a_child_started_with_exit_with_parent_stops_gracefully_when_its_parent_is_killed(tmp_path) -> None:
    child, marker = _orphan(tmp_path, watch=True)
    end = time.monotonic() + 5
    while _alive(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(child), "the orphaned workload still runs"
    assert marker.read_text() == "graceful"  # its SIGTERM handler ran: the normal shutdown path


def test_a_child_started_without_the_option_keeps_running(tmp_path) -> None:
    child, marker = _orphan(tmp_path, watch=False)
    try:
        time.sleep(2)
        assert _alive(child) and not marker.exists()
    finally:
        os.kill(child, signal.SIGKILL)


def test_exit_with_parent_refuses_to_start_when_the_parent_is_already_gone() -> None:
    assert exit_with_parent(None) is None  # no option: nothing watches
    assert exit_with_parent(os.getppid(), watch=False) is None  # the parent is there: start
    with pytest.raises(SystemExit, match="parent process is gone"):
        exit_with_parent(os.getpid())  # never this process's parent
    with pytest.raises(ValueError):
        exit_with_parent(0)


# A forking service (the records service with workers): no watcher thread (run_workers refuses to
# fork with one); its supervisor loop polls the parent and stops the workers the normal way.
_FORKING = """
import signal, sys, time
from pathlib import Path
from safehold.procutil import exit_with_parent
from safehold.records.workers import run_workers
args = sys.argv[1:]
parent = int(args[2]) if len(args) > 2 else None
exit_with_parent(parent, watch=False)
def target(i, notify):
    notify("ready")
    time.sleep(600)
    return 0
def change(info):
    Path(args[0] + ".workers").write_text(" ".join(map(str, info["worker_pids"])))
    print("ready", flush=True)
code = run_workers(1, target, on_change=change, watch_parent=parent)
Path(args[0]).write_text(f"graceful {code}")
"""


def test_a_forking_service_stops_itself_and_its_workers_when_its_parent_is_killed(tmp_path) -> None:
    child, marker = _orphan(tmp_path, watch=True, workload=_FORKING)
    worker = int(Path(str(marker) + ".workers").read_text())
    end = time.monotonic() + 5
    while (_alive(child) or _alive(worker)) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(worker)
    assert marker.read_text() == "graceful 0"  # run_workers returned through its SIGTERM path
