"""Operator-as-adversary review of the issue-17 changes (namespace dictionary, compressed
frames, posting format 4, byte-triggered snapshots, grouped batch audit entries): attacks a
database administrator can run with SQL on the real SQLite file, each a test of what the
service must do instead of silently accepting the edit."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError
from safehold.freshness.errors import RowDeletedError, RowRolledBackError
from safehold.freshness.group import FreshGroupCommit
from safehold.records.access_audit import AccessAuditLog
from safehold.records.model import parse_record
from safehold.records.reindex import ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.store import open_store
from tests.support.engine_backends import Backend
from tests.support.freshness import InProcessAnchor, open_fresh

META = "search-index-format"


def _pat(rid: str, family: str) -> dict:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family}], "birthDate": "1970"}


class _Service:
    """The records repository over a FreshStore on one SQLite file, reopened like a restart."""

    def __init__(self, db: Path, keyset: Keyset, anchor: InProcessAnchor) -> None:
        self.db, self.keyset, self.anchor = db, keyset, anchor
        self.fs = None
        self.repo: PatientRepository | None = None

    def start(self) -> PatientRepository:
        self.fs = open_fresh(open_store(f"sqlite:///{self.db}"), self.anchor)
        c = FreshGroupCommit(self.fs)
        self.repo = PatientRepository(self.fs, self.keyset, committer=c,
                                      audit=AccessAuditLog(self.fs, c, mac_key=b"k" * 32,
                                                           checkpointed=True))
        return self.repo

    def stop(self) -> None:
        if self.fs is not None:
            self.fs.close()
            self.fs = None


@pytest.fixture
def service(tmp_path: Path) -> Iterator[_Service]:
    s = _Service(tmp_path / "records.db", Keyset.generate(), InProcessAnchor())
    yield s
    s.stop()


def _dba(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


def _value(db: Path, sns: str, key: bytes) -> bytes:
    with closing(_dba(db)) as c:
        (v,) = c.execute("SELECT value FROM safehold_rows WHERE key = ? AND ns = "
                         "(SELECT id FROM safehold_namespaces WHERE name = ?)", (key, sns)).fetchone()
    return bytes(v)


def _set_value(db: Path, sns: str, key: bytes, value: bytes) -> None:
    with closing(_dba(db)) as c:
        n = c.execute("UPDATE safehold_rows SET value = ? WHERE key = ? AND ns = "
                      "(SELECT id FROM safehold_namespaces WHERE name = ?)", (value, key, sns)).rowcount
    assert n == 1


def _flip_last(v: bytes) -> bytes:
    return v[:-1] + bytes([v[-1] ^ 1])


def test_dba_cannot_force_a_reindex_that_drops_a_records_postings(service: _Service):
    """Attack (held): with the service stopped, the DBA flips one ciphertext byte of the
    posting-format marker and one of a target record's row, hoping that the damaged marker makes
    ensure_search_index drop every posting and post the records again, skipping the target
    (which fails authentication), and then puts the target's original bytes back. The freshness
    map holds a digest of every point row's value, so the edited marker is refused before any
    posting is dropped; with the bytes restored, search finds the target again."""
    repo = service.start()
    repo.put("u", parse_record("p1", _pat("p1", "Target")))
    repo.put("u", parse_record("p2", _pat("p2", "Other")))
    assert ensure_search_index(repo) == 2
    assert [i for i, _ in repo.search("u", {"family": "target"})] == ["p1"]
    rec = repo.engine.address(repo.ns, "p1")
    mark = repo.engine.address(f"{repo.ns}.meta", META)
    service.stop()

    original_mark = _value(service.db, mark.store_namespace, mark.row_key)
    original = _value(service.db, rec.store_namespace, rec.row_key)
    _set_value(service.db, mark.store_namespace, mark.row_key, _flip_last(original_mark))
    _set_value(service.db, rec.store_namespace, rec.row_key, _flip_last(original))

    repo = service.start()
    with pytest.raises(RowRolledBackError):
        ensure_search_index(repo)
    service.stop()

    _set_value(service.db, rec.store_namespace, rec.row_key, original)  # the DBA covers its tracks
    _set_value(service.db, mark.store_namespace, mark.row_key, original_mark)
    repo = service.start()
    assert ensure_search_index(repo) == 0
    assert [i for i, _ in repo.search("u", {"family": "target"})] == ["p1"]



def _hide_inserts(b: Backend, ns: str) -> None:
    """Plant what silently drops every insert into namespace ``ns``: a SQLite trigger
    (``RAISE(IGNORE)``: plain SQL, which ``trusted_schema=OFF`` does not stop), a PostgreSQL
    row trigger returning NULL."""
    if b.name == "sqlite":
        b.sql("CREATE TRIGGER hide BEFORE INSERT ON {t} WHEN NEW.ns = "
              f"(SELECT id FROM {{n}} WHERE name = '{ns}') BEGIN SELECT RAISE(IGNORE); END")
    else:
        b.sql(f'CREATE FUNCTION "{b.schema}".hide() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
              f"IF NEW.ns = (SELECT id FROM {{n}} WHERE name = '{ns}') THEN RETURN NULL; END IF; "
              "RETURN NEW; END $$")
        b.sql(f'CREATE TRIGGER hide BEFORE INSERT ON {{t}} FOR EACH ROW EXECUTE FUNCTION "{b.schema}".hide()')


def _unhide(b: Backend) -> None:
    b.sql("DROP TRIGGER hide" if b.name == "sqlite" else "DROP TRIGGER hide ON {t}")


def test_dba_trigger_that_drops_new_postings_is_not_silently_accepted(backend: Backend):
    """Attack: the DBA plants a trigger that silently drops inserts into the posting namespace.
    The batched posting insert then reports fewer rows, is redone row by row, and each row's
    insert "conflicts" with a row that does not exist: the store answered "already there", the
    FreshStore recorded no posting change, the group's multiset hash stayed consistent (also
    for the background audit), and the new record was readable but never found by search
    (before the fix). An insert-only write that inserted nothing while no row holds the key is
    now refused, and the write with it."""
    fs = open_fresh(backend.open(), InProcessAnchor())
    c = FreshGroupCommit(fs)
    repo = PatientRepository(fs, Keyset.generate(), committer=c,
                             audit=AccessAuditLog(fs, c, mac_key=b"k" * 32, checkpointed=True))
    repo.put("u", parse_record("p1", _pat("p1", "Target")))
    _hide_inserts(backend, repo.index.ns)
    with pytest.raises(RowDeletedError, match="dropped an insert"):
        repo.put("u", parse_record("p2", _pat("p2", "Target")))
    _unhide(backend)
    assert repo.put("u", parse_record("p2", _pat("p2", "Target"))).status == "created"
    assert sorted(i for i, _ in repo.search("u", {"family": "target"})) == ["p1", "p2"]
    assert fs.audit() == []


@pytest.mark.parametrize("fresh", [True, False], ids=["freshstore", "plain"])
def test_dba_cannot_drop_an_item_from_a_batch_audit_entry(tmp_path: Path, fresh: bool):
    """Attack (held): a batch write audits one entry per outcome naming every item in ``hits``;
    the DBA rewrites that entry's row with one item left out (valid canonical JSON, count
    adjusted). Over a FreshStore the read is refused (the value's digest); over a plain store the
    MAC chain's verify refuses it."""
    import json

    from safehold.records.commit import GroupCommit

    db = tmp_path / "a.db"
    inner = open_store(f"sqlite:///{db}")
    store = open_fresh(inner, InProcessAnchor()) if fresh else inner
    c = FreshGroupCommit(store) if fresh else GroupCommit(store)
    audit = AccessAuditLog(store, c, mac_key=b"k" * 32, checkpointed=True)
    repo = PatientRepository(store, Keyset.generate(), committer=c, audit=audit)
    try:
        out = repo.put_many("u", [(parse_record(f"p{i}", _pat(f"p{i}", "Batch")), None) for i in range(3)])
        assert [r.status for r in out] == ["created"] * 3
        with closing(_dba(db)) as con:
            rows = con.execute("SELECT key, value FROM safehold_rows WHERE ns = (SELECT id FROM "
                               "safehold_namespaces WHERE name = 'records.audit')").fetchall()
            key, raw = next((k, v) for k, v in rows if b'"created:3"' in bytes(v))
            entry = json.loads(bytes(raw))
            entry["hits"] = entry["hits"][1:]
            entry["outcome"] = "created:2"
            con.execute("UPDATE safehold_rows SET value = ? WHERE key = ? AND ns = (SELECT id FROM "
                        "safehold_namespaces WHERE name = 'records.audit')",
                        (json.dumps(entry, sort_keys=True, separators=(",", ":")).encode(), key))
        with pytest.raises(RowRolledBackError if fresh else AuditChainError):
            audit.verify(full=True)
    finally:
        store.close()
