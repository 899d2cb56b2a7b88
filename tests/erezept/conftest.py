"""Fixtures for the E-Rezept tests. PostgreSQL fixtures (``postgres_dsn``, ``pg_schema``) come
from the root conftest; bundles, signer and IdP from tests/support."""

from __future__ import annotations

import pytest

from safehold.crypto.keyset import Keyset
from safehold.erezept.tasks import TaskService
from safehold.erezept.tokens import AccessTokenVerifier
from safehold.records.engine import RecordEngine
from safehold.store.sqlite import SqliteStore
from tests.support.idp import TestIdp
from tests.support.kbv import TestSigner


@pytest.fixture
def idp() -> TestIdp:
    return TestIdp("BP256R1")


@pytest.fixture
def verifier(idp: TestIdp) -> AccessTokenVerifier:
    return AccessTokenVerifier([idp.public_key], issuer=idp.issuer)


@pytest.fixture(scope="session")
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture
def sqlite_path(tmp_path):
    return tmp_path / "erezept.sqlite"


@pytest.fixture
def tasks(sqlite_path):
    store = SqliteStore(sqlite_path)
    yield TaskService(RecordEngine(store, Keyset.generate(), namespace_prefix="erezept:"))
    store.close()
