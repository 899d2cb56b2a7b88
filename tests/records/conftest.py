"""Fixtures for the records tests: the service's apps assembled in-process
(tests/support/records_service.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.crypto.keyset import Keyset
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.repository import PatientRepository
from safehold.records.server import assemble_apps
from safehold.store import open_store
from tests.support.engine_backends import ENGINES, Backend, make_backend
from tests.support.records_service import Service, access_list


def _service(tmp_path: Path, scone_auth: str | None) -> Iterator[Service]:
    db = tmp_path / "records.db"
    store = open_store(f"sqlite:///{db}")
    native, scone, repo = assemble_apps(store, Keyset.generate(), access_list(), scone_auth=scone_auth)
    yield Service(native, scone, repo, store, db)
    store.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """The native and SCONE apps (SCONE without authentication, its default)."""
    yield from _service(tmp_path, "none")


@pytest.fixture
def token_service(tmp_path: Path) -> Iterator[Service]:
    """The apps with ``scone_auth = "token"``: the SCONE port wants the native API's tokens."""
    yield from _service(tmp_path, "token")


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[PatientRepository]:
    """A PatientRepository over a real SQLite file (``repo.db_path``), with the access audit."""
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    committer = GroupCommit(store)
    r = PatientRepository(store, Keyset.generate(), committer=committer,
                          audit=AccessAuditLog(store, committer, mac_key=b"k" * 32))
    r.db_path = tmp_path / "r.db"  # type: ignore[attr-defined]
    yield r
    store.close()


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store engine in turn (a real SQLite file; the real PostgreSQL server, a fresh schema)."""
    b = make_backend(request.param, request, tmp_path)
    yield b
    b.close()


@pytest.fixture
def keyset() -> Keyset:
    """A fresh keyset (one AES-256-GCM key)."""
    return Keyset.generate()
