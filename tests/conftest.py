"""Shared fixtures: paths to ../shared, the PostgreSQL DSN, free loopback ports.

PostgreSQL tests read ``SAFEHOLD_TEST_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``). On a laptop without PostgreSQL they skip;
when ``CI`` is set they fail instead, so CI can never silently skip them.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("SAFEHOLD_SHARED_DIR")
    if env:
        return Path(env)
    for cand in (ROOT.parent / "shared", ROOT / "shared"):
        if cand.is_dir():
            return cand
    return ROOT.parent / "shared"


SHARED = _shared_dir()
EVIDENCE = SHARED / "evidence"
VECTORS = SHARED / "vectors"
DATA = SHARED / "data"
POSTGRES_DSN = os.environ.get(
    "SAFEHOLD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def need_shared(path: Path) -> Path:
    """Return ``path`` or skip (fail under CI) when ../shared is not beside the checkout."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared test material missing under CI: {path}")
        pytest.skip(f"shared test material not found: {path}")
    return path


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of a reachable PostgreSQL; skips on laptops without one, fails under CI."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable under CI at {POSTGRES_DSN}: {e}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_DSN}: {e}")
    return POSTGRES_DSN


@pytest.fixture
def pg_schema(postgres_dsn: str):
    """A fresh PostgreSQL schema name for one test, dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def snapshot_package(dest: Path) -> Path:
    """Copy src/safehold to ``dest/safehold`` without byte code and hidden files; return it.

    Processes started from the copy (``PYTHONPATH=dest``) keep one workload measurement while
    the working tree is edited — the measurement covers every package file
    (docs/developing.md, "the measurement trap").
    """
    import shutil

    pkg = dest / "safehold"
    shutil.copytree(ROOT / "src" / "safehold", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return pkg


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (racy by nature; servers should still retry on EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
