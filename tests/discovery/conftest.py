"""Fixtures for the discovery tests: keys, a SQLite-backed service, a PostgreSQL-backed one."""

from __future__ import annotations

import os

import pytest

from safehold.discovery.core import DiscoveryService
from safehold.discovery.keys import DiscoveryKeys
from safehold.store import open_store


@pytest.fixture
def secret() -> bytes:
    return os.urandom(32)


@pytest.fixture
def keys(secret) -> DiscoveryKeys:
    return DiscoveryKeys.from_secret(secret)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'discovery.db'}"


@pytest.fixture
def store(sqlite_url):
    s = open_store(sqlite_url)
    yield s
    s.close()


@pytest.fixture
def service(store, keys) -> DiscoveryService:
    svc = DiscoveryService(store, keys, limit=100, period=3600)
    svc.load()
    return svc


@pytest.fixture
def pg_url(postgres_dsn, pg_schema) -> str:
    sep = "&" if "?" in postgres_dsn else "?"
    return f"{postgres_dsn}{sep}schema={pg_schema}"
