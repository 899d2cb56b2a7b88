"""The records service's ASGI app in-process over a real SQLite file (for contract and FHIR API
tests): the real repository, group committer, access audit and access list — no process, no
TLS (the process tests cover those)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from safehold.crypto.keyset import Keyset
from safehold.records.access import AccessList
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.fhir.core import FhirStore
from safehold.records.fhir.http import mount_fhir
from safehold.records.http import create_native_app
from safehold.records.repository import PatientRepository
from safehold.store import open_store
from safehold.store.base import Store

TOKENS = {"admin": "admin-token-0123456789", "writer": "writer-token-0123456789",
          "reader": "reader-token-0123456789"}


@dataclass
class RecordsApp:
    """An app with its parts: ``store`` (close it), ``repo``, ``fhir``, ``db`` (the file)."""

    app: FastAPI
    store: Store
    repo: PatientRepository
    fhir: FhirStore
    db: Path

    def headers(self, role: str = "admin") -> dict[str, str]:
        """The bearer header of ``role``."""
        return {"Authorization": f"Bearer {TOKENS[role]}"}


def records_app(tmp: Path, store_url: str | None = None) -> RecordsApp:
    """Build the app on ``sqlite:///<tmp>/records.db`` (or ``store_url``)."""
    db = tmp / "records.db"
    store = open_store(store_url or f"sqlite:///{db}")
    committer = GroupCommit(store)
    repo = PatientRepository(store, Keyset.generate(), committer=committer,
                             audit=AccessAuditLog(store, committer, mac_key=bytes(range(32))))
    acl = AccessList.from_json({"tokens": {hashlib.sha256(t.encode()).hexdigest(): {"name": r, "role": r}
                                           for r, t in TOKENS.items()}})
    fhir = FhirStore.beside(repo)
    return RecordsApp(mount_fhir(create_native_app(repo, acl), fhir), store, repo, fhir, db)
