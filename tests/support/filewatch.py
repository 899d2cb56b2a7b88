"""Watch directories and keep the content of every file written under them, even one that is
deleted a millisecond later (issue 11, finding 1: an attacker on the host reads a key file that
a service writes to its temp dir during start-up and removes at once).

:class:`FileWatch` uses Linux **fanotify** (``fanotify(7)``; ``fanotify_init`` / ``fanotify_mark``
through libc): with a mark on the mount, every ``FAN_MODIFY`` / ``FAN_CLOSE_WRITE`` event carries
an open file descriptor of the file written, so the watcher reads the bytes through that
descriptor whatever happens to the name afterwards — no race with the writer's ``unlink``.
inotify (``inotify_simple``) reports names only: a file created, written and removed before the
watcher opens it is missed, and so is a tight poll; neither is enough for this test, so without
fanotify (it needs ``CAP_SYS_ADMIN``: root) :func:`fanotify_available` is false and the caller skips
(fails under CI). inotify still adds the names of files created and removed without a write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path

import inotify_simple

__all__ = ["FileWatch", "fanotify_available"]

FAN_MODIFY = 0x02
FAN_CLOSE_WRITE = 0x08
FAN_CLASS_NOTIF = 0x00
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_MARK_ADD = 0x01
FAN_MARK_MOUNT = 0x10
FAN_NOFD = -1
AT_FDCWD = -100
_META = struct.Struct("<IBBHQii")  # struct fanotify_event_metadata (24 bytes)
_MAX_READ = 64 << 20  # bytes read of one file per event

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def _fan_init() -> int:
    fd = _libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK,
                             os.O_RDONLY | getattr(os, "O_LARGEFILE", 0) | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fanotify_init: {os.strerror(e)}")
    return fd


def fanotify_available() -> bool:
    """Whether this process may use fanotify (root / ``CAP_SYS_ADMIN`` on Linux)."""
    try:
        os.close(_fan_init())
    except OSError:
        return False
    return True


class FileWatch:
    """Collects ``path → [content, …]`` of every file written under ``roots`` while running.

    Use as a context manager; :attr:`seen` holds each distinct content per path (deleted
    files keep their last name, without the kernel's `` (deleted)`` suffix), :attr:`created` the
    names inotify reported. :meth:`scan_now` adds the current content of every file under the
    roots (files written before the watch started or held open without a close).
    """

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.seen: dict[str, list[bytes]] = {}
        self.created: set[str] = set()
        self.events = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._fan = -1
        self._ino: inotify_simple.INotify | None = None
        self._wd: dict[int, Path] = {}
        self._threads: list[threading.Thread] = []

    def _mine(self, path: str) -> bool:
        return any(path == str(r) or path.startswith(str(r) + os.sep) for r in self.roots)

    def _keep(self, path: str, data: bytes) -> None:
        with self._lock:
            got = self.seen.setdefault(path, [])
            if data not in got:
                got.append(data)

    def __enter__(self) -> FileWatch:
        self._fan = _fan_init()
        mounts = set()
        for r in self.roots:
            r.mkdir(parents=True, exist_ok=True)
            if os.stat(r).st_dev not in mounts:
                mounts.add(os.stat(r).st_dev)
                rc = _libc.fanotify_mark(self._fan, FAN_MARK_ADD | FAN_MARK_MOUNT,
                                         FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, str(r).encode())
                if rc < 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"fanotify_mark {r}: {os.strerror(e)}")
        self._ino = inotify_simple.INotify()
        for r in self.roots:
            self._watch_tree(r)
        for target in (self._fan_loop, self._ino_loop):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        os.close(self._fan)
        if self._ino is not None:
            self._ino.close()

    def _fan_loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._fan], [], [], 0.1)
            if not r:
                continue
            try:
                buf = os.read(self._fan, 1 << 16)
            except BlockingIOError:
                continue
            off = 0
            while off + _META.size <= len(buf):
                event_len, _vers, _res, _mlen, _mask, fd, _pid = _META.unpack_from(buf, off)
                off += event_len
                if fd == FAN_NOFD or fd < 0:
                    continue
                try:
                    self.events += 1
                    path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
                    if self._mine(path):
                        self._keep(path, os.pread(fd, _MAX_READ, 0))
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def _watch_tree(self, d: Path) -> None:
        assert self._ino is not None
        flags = inotify_simple.flags
        try:
            wd = self._ino.add_watch(d, flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE)
        except OSError:
            return
        self._wd[wd] = d
        for p in d.iterdir() if d.is_dir() else ():
            if p.is_dir() and not p.is_symlink():
                self._watch_tree(p)

    def _ino_loop(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            for ev in self._ino.read(timeout=100):
                base = self._wd.get(ev.wd)
                if base is None or not ev.name:
                    continue
                p = base / ev.name
                self.created.add(str(p))
                if ev.mask & inotify_simple.flags.ISDIR:
                    self._watch_tree(p)

    def scan_now(self) -> None:
        """Add the current content of every regular file under the roots."""
        for r in self.roots:
            for p in r.rglob("*"):
                try:
                    if p.is_file() and not p.is_symlink():
                        with p.open("rb") as f:
                            self._keep(str(p), f.read(_MAX_READ))
                except OSError:
                    pass
