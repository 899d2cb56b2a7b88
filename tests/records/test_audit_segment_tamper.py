"""Operator-attack review (8 Dec 2026): audit retention (export / seal of a segment) must not
report tampering as a mere retention mistake (409 ``audit-segment-refused``), nor seal a segment
whose entries a DBA rewrote. Real SQLite files and the real PostgreSQL server, raw SQL as the
DBA."""

from __future__ import annotations

import json

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError, AuditSegmentRefusedError
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.model import parse_record
from safehold.records.repository import PatientRepository
from tests.support.engine_backends import Backend


def _pat(rid: str) -> dict:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": "Lee", "given": ["Ann"]}],
            "birthDate": "1970-01-01", "gender": "female"}


def _repo(b: Backend) -> PatientRepository:
    store = b.open()
    c = GroupCommit(store)
    repo = PatientRepository(store, Keyset.generate(), committer=c,
                             audit=AccessAuditLog(store, c, mac_key=b"k" * 32))
    for i in range(8):
        repo.put("w", parse_record(f"p{i}", _pat(f"p{i}")))
    repo.audit.flush()
    return repo


_ENTRY = "SELECT value FROM {t} WHERE ns = (SELECT id FROM {n} WHERE name = 'records.audit') AND key = ?"
_SET = "UPDATE {t} SET value = ? WHERE ns = (SELECT id FROM {n} WHERE name = 'records.audit') AND key = ?"


def _rewrite(b: Backend, seq: int, **fields: str) -> None:
    """The DBA rewrites audit entry ``seq`` (keeps its ``prev`` and stale ``mac``)."""
    key = seq.to_bytes(8, "big")
    (raw,) = b.sql(_ENTRY, (key,))[0]
    body = json.loads(bytes(raw))
    body.update(fields)
    b.sql(_SET, (json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), key))


def test_an_entry_rewritten_between_export_and_seal_is_a_broken_chain(backend: Backend):
    """Attack: after the admin exported entries 0..4, the DBA rewrites entry 4 (the last one of
    the segment: no later entry of the segment names its hash). The seal must say the chain is
    broken (entry edited), not "the file is not the export … seal the file `audit export`
    wrote", which sends the admin to re-export — and seal — the DBA's version."""
    repo = _repo(backend)
    _, _, _, digest = repo.audit.export_segment(4)
    _rewrite(backend, 4, who="someone-else")
    with pytest.raises(AuditChainError) as e:
        repo.audit.seal("admin", 4, digest)
    assert not isinstance(e.value, AuditSegmentRefusedError)


def test_a_segment_with_a_rewritten_entry_is_neither_exported_nor_sealed(backend: Backend):
    """Attack: the DBA rewrites entries 0..4 consistently (each ``prev`` recomputed; the MACs
    cannot be) before the admin exports them. Export checked only the ``prev`` links inside
    the segment, so the forged segment was exported and, with its digest, sealed: the
    genuine entries deleted from the database."""
    repo = _repo(backend)
    _rewrite(backend, 4, who="someone-else")
    with pytest.raises(AuditChainError, match="entry 4"):
        repo.audit.export_segment(4)
    with pytest.raises(AuditChainError, match="entry 4"):
        repo.audit.export_segment(6)


def test_a_deleted_head_is_a_broken_chain_not_an_empty_log(backend: Backend):
    """Attack: the DBA deletes the authenticated head row. Export answered "not sealable (the
    log is empty …)" — 409 audit-segment-refused — while entries are there."""
    repo = _repo(backend)
    backend.sql("DELETE FROM {t} WHERE ns = (SELECT id FROM {n} WHERE name = 'records.audit.head') "
                "AND key = ?", (b"head",))
    with pytest.raises(AuditChainError, match="head missing") as e:
        repo.audit.export_segment(3)
    assert not isinstance(e.value, AuditSegmentRefusedError)
    with pytest.raises(AuditChainError, match="head missing"):
        repo.audit.seal("admin", 3, "0" * 64)


def test_retention_mistakes_on_an_intact_chain_stay_refused(backend: Backend):
    repo = _repo(backend)
    with pytest.raises(AuditSegmentRefusedError, match="not the one given"):
        repo.audit.seal("admin", 4, "0" * 64)
    with pytest.raises(AuditSegmentRefusedError, match="stays live"):
        repo.audit.export_segment(100)
    data, first, last, digest = repo.audit.export_segment(4)
    assert repo.audit.seal("admin", 4, digest).last == 4
    assert repo.audit.verify(full=True) > 0
