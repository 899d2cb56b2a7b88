"""The local stack's shape: :class:`Stack`, its errors, the data directory's lock, the
children's environment."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from safehold.client.connection import owner_dir
from safehold.devstack.errors import DataDirBusyError
from safehold.errors import ConfigError

__all__ = [
    "LOCK_FILE",
    "SCONE_AUTH_CHOICES",
    "SESSION_NAME",
    "WORKLOAD",
    "Stack",
    "base_env",
    "lock_data_dir",
    "unlock_data_dir",
]


LOCK_FILE = "up.lock"
SCONE_AUTH_CHOICES = ("none", "token")


SESSION_NAME = "safehold"
WORKLOAD = "records"


@dataclass
class Stack:
    """A running (or prepared) broker + records service pair.

    Attributes:
        data_dir: the data directory.
        broker_port / records_port / scone_port: loopback ports.
        store_url: the records store (default: SQLite in the data directory).
        package_root: run the processes from this copy of the ``safehold`` package.
        procs: name → Popen of the running processes.
        info: what ``up.json`` holds.
        lock: the open, flock-ed ``up.lock`` while this Stack owns the data directory.
        owner_dir: the data owner's directory (``owner.key``, ``tokens.json``); None = the
            default of :func:`safehold.client.connection.owner_dir`. No server process is given it.
    """

    data_dir: Path
    broker_port: int
    records_port: int
    scone_port: int | None
    store_url: str = ""
    package_root: str | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    lock: TextIO | None = None
    owner_dir: Path | None = None

    @property
    def broker_url(self) -> str:
        """``https://127.0.0.1:<broker_port>``."""
        return f"https://127.0.0.1:{self.broker_port}"

    @property
    def records_url(self) -> str:
        """``https://127.0.0.1:<records_port>``."""
        return f"https://127.0.0.1:{self.records_port}"

    def path(self, name: str) -> Path:
        """``<data_dir>/<name>``."""
        return self.data_dir / name

    def owner_path(self, name: str) -> Path:
        """``<owner_dir>/<name>`` (the data owner's side, never read by a server process)."""
        return owner_dir(self.data_dir, self.owner_dir) / name


def lock_data_dir(data_dir: Path) -> TextIO:
    """Take the exclusive ``<data_dir>/up.lock`` (``flock``, non-blocking) for a running stack.

    Held from :func:`prepare` until :func:`stop` (or process exit, when the kernel drops it), so
    a second ``safehold up`` on the same directory refuses before writing or starting anything.

    Returns:
        the open lock file (pass to :func:`unlock_data_dir`).

    Raises:
        DataDirBusyError: another process holds the lock (names its pid when recorded).
        ConfigError: the lock file cannot be opened.
    """
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ConfigError(f"data directory {data_dir}: cannot open {LOCK_FILE} ({e.strerror})") from None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip()
        f.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise DataDirBusyError(
            f"another `safehold up` or `safehold demo`{who} is running on {data_dir}; "
            "stop it first (Ctrl-C there) or use another --data-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def unlock_data_dir(lock: TextIO | None) -> None:
    """Release a lock from :func:`lock_data_dir` (idempotent; None is ignored)."""
    if lock is not None and not lock.closed:
        with contextlib.suppress(OSError):
            lock.seek(0)
            lock.truncate()
        lock.close()  # closing the file releases the flock


#: Variables of the user's shell that hold a client's secret or name the owner's side: never
#: passed to a server process (its environment is the host's, outside the TEE).
CLIENT_ONLY_VARS = ("SAFEHOLD_TOKEN", "SAFEHOLD_OWNER_DIR")


def base_env(s: Stack) -> dict[str, str]:
    """Environment of the child processes (PYTHONPATH pointing at ``package_root`` if set),
    without :data:`CLIENT_ONLY_VARS` (a token exported for ``safehold patients`` stays there)."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ONLY_VARS}
    if s.package_root:
        parent = str(Path(s.package_root).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join([parent, *filter(None, [env.get("PYTHONPATH")])])
    return env

