"""The local stack's shape: :class:`Stack`, its errors, the data directory's lock, and how
its workloads are launched (:func:`broker_spec`, :func:`records_spec`: isolated interpreters
with an environment allow-list, ``safehold.attestation.workload.LaunchSpec``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from safehold.attestation.workload import LaunchSpec, package_app_dir
from safehold.client.connection import owner_dir
from safehold.devstack.errors import DataDirBusyError
from safehold.errors import ConfigError
from safehold.records.config import ENV_PREFIX, RUNTIME_SETTINGS

__all__ = [
    "LOCK_FILE",
    "SCONE_AUTH_CHOICES",
    "SESSION_NAME",
    "WORKLOAD",
    "Stack",
    "BROKER_ENV",
    "BROKER_MODULE",
    "RECORDS_ENV",
    "RECORDS_MODULE",
    "app_dir",
    "base_env",
    "broker_spec",
    "lock_data_dir",
    "records_spec",
    "unlock_data_dir",
]


LOCK_FILE = "up.lock"
SCONE_AUTH_CHOICES = ("none", "token")


SESSION_NAME = "safehold"
WORKLOAD = "records"

#: The broker workload: ``safehold broker ...`` (its ``serve`` and ``serve --init-only``).
BROKER_MODULE = "safehold.cli.broker"
#: The broker's run-time settings the host may pass (values not measured; no secret).
BROKER_ENV = ("SAFEHOLD_BROKER_STORE_URL", "SAFEHOLD_BROKER_TLS_NAMES")
#: The records workload.
RECORDS_MODULE = "safehold.records.server"
#: The records service's run-time plumbing (``SAFEHOLD_RECORDS_<setting>``; values not measured).
RECORDS_ENV = tuple(sorted(ENV_PREFIX + n.upper() for n in RUNTIME_SETTINGS))


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
        anchor: the freshness anchor members (:class:`~safehold.freshness.anchor.launch.
            LocalAnchor`, :mod:`safehold.devstack.anchor`). keeper: the checkpoint keeper.
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
    #: the services started after records (``devstack.services``) and their ports
    services: tuple[str, ...] = ()
    service_ports: Any = None
    anchor: Any = None
    keeper: Any = None
    svr_keeper: Any = None

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


def app_dir(package_root: str | None) -> str | None:
    """The workloads' application directory: the parent of ``package_root`` (a snapshot copy
    of the package), else the directory holding the imported ``safehold`` package (``src/`` of
    an editable install), or None when it is installed in site-packages."""
    if package_root:
        return str(Path(package_root).resolve().parent)
    return package_app_dir()


def broker_spec(s: Stack) -> LaunchSpec:
    """How the broker is launched (and measured: its sealing identity is this closure)."""
    return LaunchSpec(BROKER_MODULE, app_dir=app_dir(s.package_root), passthrough=BROKER_ENV)


def records_spec(s: Stack) -> LaunchSpec:
    """How the records service is launched; its closure with ``records.toml`` is the
    Reference Value the dev manifest pins."""
    return LaunchSpec(RECORDS_MODULE, app_dir=app_dir(s.package_root), passthrough=RECORDS_ENV)


def base_env(s: Stack) -> dict[str, str]:
    """Environment of the broker process: the launch's fixed variables and the broker's
    run-time settings from this process's environment; nothing else (no ``PYTHONPATH``,
    ``LD_PRELOAD``, ``PYTHON*``, tokens)."""
    return broker_spec(s).env()

