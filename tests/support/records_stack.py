"""A broker + records service stack as processes on loopback for tests (``safehold up``'s
devstack), run from a snapshot of the package (docs/developing.md, the measurement trap)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safehold.devstack import Stack, prepare, start, stop
from tests.support.shared import free_port
from tests.support.shared import snapshot_package as snapshot_src


@contextmanager
def running_stack(pkg_dir: Path, data_dir: Path) -> Iterator[Stack]:
    """Start broker and records service (no SCONE port) from a package snapshot in
    ``pkg_dir`` with data in ``data_dir``; stop both on exit."""
    pkg = snapshot_src(pkg_dir)
    s = prepare(data_dir, broker_port=free_port(), records_port=free_port(), scone_port=None,
                package_root=str(pkg))
    start(s)
    try:
        yield s
    finally:
        stop(s)
