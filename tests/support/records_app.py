"""The records service's native API app in process, over a real SQLite file and a fresh keyset
(what ``records/server.py`` builds after attestation), driven through ``httpx.ASGITransport``."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from safehold.crypto.keyset import Keyset
from safehold.records.access import AccessList
from safehold.records.http import create_native_app
from safehold.records.repository import PatientRepository
from safehold.records.server import open_repository
from safehold.store import open_store

#: One bearer token per role; the access list holds their SHA-256.
ROLE_TOKENS = {role: f"{role}-token-of-the-in-process-records-app" for role in ("admin", "writer", "reader")}


def role_access() -> AccessList:
    """The access list for :data:`ROLE_TOKENS` (principal name = role)."""
    return AccessList.from_json({"tokens": {hashlib.sha256(t.encode()).hexdigest(): {"name": r, "role": r}
                                            for r, t in ROLE_TOKENS.items()}})


@dataclass
class RecordsApp:
    """The app and its repository; :meth:`request` sends one request (``role``: a bearer token
    of that role, None: no credentials)."""

    app: object
    repo: PatientRepository

    def request(self, method: str, path: str, *, role: str | None = "admin", **kw) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if role:
            headers["Authorization"] = f"Bearer {ROLE_TOKENS[role]}"

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="https://records.test") as c:
                return await c.request(method, path, headers=headers, **kw)

        return asyncio.run(go())


@contextmanager
def records_app(tmp_path: Path, access: AccessList | None = None) -> Iterator[RecordsApp]:
    """A native API app on ``tmp_path/records.db``; the store is closed afterwards."""
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    try:
        repo = open_repository(store, Keyset.generate())
        yield RecordsApp(create_native_app(repo, access or role_access()), repo)
    finally:
        store.close()
