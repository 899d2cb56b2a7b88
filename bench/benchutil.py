"""Helpers the benchmarks share (each bench script imports this module from its own folder:
``python bench/NAME.py`` puts ``bench/`` first on ``sys.path``)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The PostgreSQL the benchmarks use unless ``--postgres-dsn`` says otherwise (as the tests).
DSN = os.environ.get("SAFEHOLD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def best_of(fn: Callable[[], object], runs: int) -> float:
    """Fastest of ``runs`` calls of ``fn``, seconds (``time.perf_counter``; a shared machine only
    ever slows a call down)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def add_postgres_options(ap: argparse.ArgumentParser, *, no_postgres_help: str | None = None) -> None:
    """``--postgres-dsn DSN`` (default :data:`DSN`) and ``--no-postgres`` on ``ap``."""
    ap.add_argument("--postgres-dsn", default=DSN)
    ap.add_argument("--no-postgres", action="store_true", help=no_postgres_help)


def snapshot_package(prefix: str) -> Path:
    """Copy ``src/safehold`` to a new temporary directory (``prefix``) and import ``safehold``
    from there from now on (``sys.path`` first, already imported ``safehold`` modules dropped), so
    that the workloads a benchmark starts measure a package nobody edits while it runs (their
    Reference Value is the SHA-384 of their closure). Returns the temporary directory; the copy
    is in its ``pkg/``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(
        ROOT / "src" / "safehold",
        tmp / "pkg" / "safehold",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    sys.path.insert(0, str(tmp / "pkg"))
    for m in [m for m in sys.modules if m == "safehold" or m.startswith("safehold.")]:
        del sys.modules[m]
    return tmp
