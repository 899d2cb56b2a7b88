"""Several worker processes for one records workload (issue 17: more than one core).

One Python process serves HTTPS on about one core (the GIL; ~90 % of a GET's CPU is the
HTTP / TLS / ASGI stack, so threads do not help). With ``workers = N`` in the measured
``records.toml`` the service process:

1. attests **once** and receives the keyset, the TLS identity and the access list
   (:func:`safehold.records.server.provision`) — nothing is opened yet;
2. reserves the ports (:func:`bind_listeners`) and forks worker 0, which opens the
   store and the FreshStore (``quick_check``, start-up roll-forward, index rebuild) and serves;
3. once worker 0 reports the store **fresh** (after the data owner's initialise / re-anchor
   when the ledger needs one), forks workers 1..N-1; each opens its own connection and its own
   FreshStore on the same ledger (several writers of one ledger: docs/freshness.md) and
   appends to the same access-audit chain (compare-and-set inserts, like replicas), then
   listens on the same port (``SO_REUSEPORT``): the kernel spreads new connections over the
   workers;
4. supervises: a worker that exits is forked again (at most :data:`MAX_RESTARTS` times in
   :data:`RESTART_WINDOW` seconds, then the whole service stops with status 1); SIGTERM /
   SIGINT are passed to every worker, which finish in-flight requests and flush their audit.

The workers are copies of the attested process (``fork``): the same measured code and keys, no
second attestation. Under a TEE runtime that supports fork (Gramine: the child is a new enclave
of the same measurement and receives the parent's memory over an attested, encrypted channel)
this is the same trust boundary; on the simulated TEE it is the same process image. The parent
forks before it starts any thread (checked) and never opens the store, so no database
connection or lock crosses a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

from safehold.errors import ConfigError, SafeholdError
from safehold.procutil import parent_gone

log = logging.getLogger("safehold.records.workers")

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "bind_listeners", "run_workers", "worker_listeners"]

#: A worker that exits is forked again at most this many times within :data:`RESTART_WINDOW`.
MAX_RESTARTS = 5
#: Seconds over which :data:`MAX_RESTARTS` is counted.
RESTART_WINDOW = 300.0
#: Seconds the workers get to finish after SIGTERM before they are killed.
STOP_GRACE = 10.0


def _tcp_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not listening yet).

    proto is ``IPPROTO_TCP``, not 0 (as ``socket.create_server`` makes it): asyncio sets
    ``TCP_NODELAY`` on accepted connections only for sockets that say so; without it Nagle and
    delayed ACKs add ~40 ms to every response.
    """
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               proto=socket.IPPROTO_TCP)[0]
    sk = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sk.bind(addr)
    except OSError:
        sk.close()
        raise
    return sk


def bind_listeners(host: str, ports: list[int]) -> list[socket.socket]:
    """Reserve one port per entry of ``ports`` (0: a free port) for the workers: a bound,
    **not listening** ``SO_REUSEPORT`` socket each, held by the service process for its whole
    life (a restarted worker binds the same port again; a process without ``SO_REUSEPORT``
    cannot take it). Each worker listens on its own socket (:func:`worker_listeners`), so the
    kernel spreads new connections evenly over the workers' accept queues — one shared
    listening socket let whichever worker woke first take most of them.

    Raises:
        ConfigError: a port cannot be bound (in use?), naming it.
    """
    socks: list[socket.socket] = []
    for port in ports:
        try:
            socks.append(_tcp_socket(host, port))
        except OSError as e:
            for s in socks:
                s.close()
            raise ConfigError(f"records service: cannot listen on {host}:{port}: {e}") from None
    return socks


def worker_listeners(host: str, reserved: list[socket.socket]) -> list[socket.socket]:
    """In a worker: one listening socket per port reserved by :func:`bind_listeners` (same
    port, ``SO_REUSEPORT``); the inherited reservations are closed here.

    Raises:
        ConfigError: the port cannot be bound again (another user's process holds it).
    """
    ports = [sk.getsockname()[1] for sk in reserved]
    for sk in reserved:
        sk.close()
    out: list[socket.socket] = []
    for port in ports:
        try:
            sk = _tcp_socket(host, port)
            sk.listen(2048)
        except OSError as e:
            for s in out:
                s.close()
            raise ConfigError(f"records worker: cannot listen on {host}:{port}: {e}") from None
        out.append(sk)
    return out


def run_workers(n: int, target: Callable[[int, Callable[[str], None]], int], *,
                on_change: Callable[[dict[str, object]], None], watch_parent: int | None = None) -> int:
    """Fork and supervise ``n`` workers (module docstring) until SIGTERM / SIGINT.

    Args:
        n: the number of workers (>= 1).
        target: ``target(index, notify) -> exit status`` runs in each forked worker;
            ``notify("ready")`` once it listens, ``notify("fresh")`` once its store is fresh.
        on_change: called in this process with ``{"workers", "workers_ready", "worker_pids"}``
            once worker 0 listens and whenever another worker starts listening or is restarted
            (``safehold.records.server`` writes the ready file from it).
        watch_parent: ``--exit-with-parent`` (``safehold up``'s pid): once this process is re-parented
            (``up`` was killed) it stops as on SIGTERM, within the loop's 0.5 s poll. Polled here,
            not from a thread: this process forks.

    Returns:
        0 after a clean stop; 1 when workers kept exiting, or worker 0 exited before it
        listened (its log says why).

    Raises:
        ConfigError: this process already runs threads (forking would copy them half-way).
    """
    if threading.active_count() != 1:
        raise ConfigError("records workers: the service process runs threads before forking "
                          f"({[t.name for t in threading.enumerate()]}); refusing to fork")
    rfd, wfd = os.pipe()
    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        os.write(wfd, b"stop -1\n")  # wakes the select below

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pids: dict[int, int] = {}  # pid -> worker index
    ready: set[int] = set()
    served = False  # worker 0 listened once: before that an exit is a start-up failure
    restarts: list[float] = []

    parent = os.getpid()

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _die_with_parent(parent)
                os.close(rfd)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)

                def notify(what: str) -> None:
                    os.write(wfd, f"{what} {i}\n".encode())

                code = target(i, notify)
            except SafeholdError as e:
                log.error("records worker %d stopped: %s", i, e)
            except BaseException:
                log.exception("records worker %d failed", i)
            finally:
                os._exit(code)
        pids[pid] = i
        log.info("records worker %d started (pid %d)", i, pid)

    def report() -> None:
        on_change({"workers": n, "workers_ready": len(ready),
                   "worker_pids": sorted(pids, key=lambda p: pids[p])})

    spawn(0)
    buf = b""
    status = 0
    orphaned = False
    while not stopping:
        r, _, _ = select.select([rfd], [], [], 0.5)
        if watch_parent is not None and not orphaned and parent_gone(watch_parent):
            orphaned = True  # `safehold up` is gone: the normal SIGTERM path stops the workers
            os.kill(os.getpid(), signal.SIGTERM)
        if r:
            buf += os.read(rfd, 4096)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                what, idx = line.decode().split()
                i = int(idx)
                if what == "ready":
                    ready.add(i)
                    served = True
                    report()
                elif what == "fresh" and i == 0 and len(pids) == 1:
                    for j in range(1, n):  # the others open a store that is fresh already
                        spawn(j)
        while not stopping:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            i = pids.pop(pid)
            ready.discard(i)
            code = os.waitstatus_to_exitcode(st)
            log.error("records worker %d (pid %d) exited with status %d", i, pid, code)
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if not served or len(restarts) > MAX_RESTARTS:
                log.error("records workers %s; stopping the service",
                          "keep exiting" if served else "failed to start")
                stopping, status = True, 1
                break
            time.sleep(min(0.5 * len(restarts), 5.0))
            spawn(i)
            report()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + STOP_GRACE
    while pids and time.monotonic() < end:
        try:
            pid, _st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        pids.pop(pid, None)
    for pid in pids:  # did not finish in time
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    os.close(rfd)
    os.close(wfd)
    return status


#: prctl(2) option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Make the kernel send this worker SIGTERM when the service process dies (even by
    SIGKILL): an orphaned worker would hold the port and the keys, unsupervised, so that a
    restarted service could not listen. Exits at once if the parent is already gone.

    Raises:
        ConfigError: prctl(PR_SET_PDEATHSIG) failed (not Linux?).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise ConfigError(f"records worker: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)
