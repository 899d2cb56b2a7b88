"""The records service's apps assembled in-process over a real SQLite file and a real keyset
(:func:`safehold.records.server.assemble_apps`, as the service process does after attestation),
with one bearer token per role; the fixtures are in tests/records/conftest.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from safehold.records.access import AccessList
from safehold.records.repository import PatientRepository
from safehold.store.base import Store
from tests.support.asgi import AsgiClient

#: One bearer token per role (the access list holds their SHA-256, as the broker releases it).
TOKENS = {role: f"{role}-token-for-the-http-contract-tests" for role in ("admin", "writer", "reader")}


def access_list() -> AccessList:
    """The access list for :data:`TOKENS` (principal name = role)."""
    return AccessList.from_json({"tokens": {
        hashlib.sha256(t.encode()).hexdigest(): {"name": role, "role": role} for role, t in TOKENS.items()}})


@dataclass
class Service:
    """The assembled apps and what they run on."""

    native: FastAPI
    scone: FastAPI | None
    repo: PatientRepository
    store: Store
    db: Path

    def api(self, role: str | None = "admin") -> AsgiClient:
        """A client of the native API calling as ``role`` (None: without credentials)."""
        c = AsgiClient(self.native, "https://records.test")
        return c.as_role(TOKENS[role]) if role else c

    def scone_api(self, role: str | None = None) -> AsgiClient:
        """A client of the SCONE API (``role``: a bearer token for ``scone_auth = "token"``)."""
        assert self.scone is not None
        c = AsgiClient(self.scone, "https://api.test")
        return c.as_role(TOKENS[role]) if role else c
