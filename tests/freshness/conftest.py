"""Fixtures of the freshness tests: each attack runs on a real SQLite file and on the real
PostgreSQL server (``postgres_dsn`` / ``pg_schema`` from the root conftest)."""

from __future__ import annotations

import pytest

from tests.support.fresh_cluster import AnchorCluster
from tests.support.freshness import InProcessAnchor, Owner, PostgresEngine, SqliteEngine


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "store.db")
    dsn = request.getfixturevalue("postgres_dsn")
    return PostgresEngine(dsn, request.getfixturevalue("pg_schema"))


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def anchor(owner: Owner) -> InProcessAnchor:
    """The in-process TEST DOUBLE of the anchor members (unit tests only)."""
    return InProcessAnchor(3, owner)


@pytest.fixture
def cluster(tmp_path, package):
    """Three real anchor member processes on loopback (``package``: the root conftest's snapshot)."""
    c = AnchorCluster(tmp_path, package, Owner())
    c.start_all()
    yield c
    c.stop()
