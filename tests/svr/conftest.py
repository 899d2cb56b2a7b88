"""Fixtures of the SVR tests: the service on a real SQLite file and on the real PostgreSQL
server, the in-process anchor TEST DOUBLE (tests/support/freshness.py) for unit tests, apps and
SDK clients in-process. Process tests start real anchor members (tests/support/svr.py)."""

from __future__ import annotations

import pytest

from safehold.client.svr import Svr2Client, Svr3Client
from safehold.svr.http import create_app, parse_access
from tests.support.freshness import InProcessAnchor, Owner, PostgresEngine, SqliteEngine
from tests.support.svr import TEST_ARGON2, USER_TOKEN, SyncAsgiTransport, access_list, open_service


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    """The store engine with the operator's powers (raw SQL, backups, restores)."""
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "svr.db")
    return PostgresEngine(request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema"))


@pytest.fixture
def sqlite_engine(tmp_path):
    return SqliteEngine(tmp_path / "svr.db")


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def anchor(owner) -> InProcessAnchor:
    """The in-process TEST DOUBLE of the anchor members, for ledger ``svr-0``."""
    return InProcessAnchor(3, owner, client="svr-0")


@pytest.fixture
def service(engine, anchor):
    svc = open_service(engine.open(), anchor)
    yield svc
    svc.close()


@pytest.fixture
def trio(tmp_path, owner):
    """Three in-process SVR services (own SQLite file, own anchor double each) and their apps."""
    services = []
    for i in range(3):
        name = f"svr-{i}"
        services.append(open_service(SqliteEngine(tmp_path / f"{name}.db").open(),
                                     InProcessAnchor(3, owner, client=name), name=name))
    apps = [create_app(s, parse_access(access_list())) for s in services]
    yield services, apps
    for s in services:
        s.close()


@pytest.fixture
def svr3(trio):
    """An SVR3 client over the three in-process apps (cheap TEST-ONLY Argon2 unless a test
    passes another)."""
    _, apps = trio
    c = Svr3Client([f"https://svr-{i}.test" for i in range(3)], token=USER_TOKEN,
                   transports=[SyncAsgiTransport(a) for a in apps], argon2=TEST_ARGON2)
    yield c
    c.close()


@pytest.fixture
def svr2(trio):
    _, apps = trio
    c = Svr2Client("https://svr-0.test", token=USER_TOKEN, transports=[SyncAsgiTransport(apps[0])],
                   argon2=TEST_ARGON2)
    yield c
    c.close()
