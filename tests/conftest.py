"""Fixtures every test folder may use: PostgreSQL (a reachable server, a fresh schema per test),
the captured Evidence under ../shared and a package snapshot per module (``package``).

Paths to ../shared and the helpers ``need_shared``, ``free_port``, ``snapshot_package`` live in
tests/support/shared.py (import them from there; nothing imports from a conftest).
On a laptop without PostgreSQL the PostgreSQL tests skip; when ``CI`` is set they fail instead,
so CI can never silently skip them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.support.shared import POSTGRES_DSN, evidence_dir, snapshot_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of ``src/safehold`` (``snapshot_package``) for the processes one test module
    starts: their measurement covers exactly the code they run, whatever the working tree does."""
    return snapshot_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="session")
def captured_evidence() -> Path:
    """``../shared/evidence``: skips each test without it (fails under CI). A module whose tests
    all read captured Evidence says ``pytestmark = pytest.mark.usefixtures("captured_evidence")``."""
    return evidence_dir()


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
