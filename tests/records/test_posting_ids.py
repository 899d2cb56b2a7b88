"""Posting format 4 (records/search.py): the id a posting seals is encoded compactly — a
canonical UUID as 0x00 || 16 bytes, any other id as its UTF-8 bytes — and decoded exactly, a
posting whose (authenticated) plaintext is not in the form its encoding claims being refused
like one that fails authentication."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.crypto.keyset import Keyset
from safehold.freshness.group import FreshGroupCommit
from safehold.records.access_audit import AccessAuditLog
from safehold.records.errors import RecordCorruptedError
from safehold.records.model import RECORD_ID_RE, check_record_id, parse_record
from safehold.records.repository import PatientRepository
from safehold.records.search import PREFIX_LEN, PostingIndex, decode_id, encode_id
from safehold.store import open_store
from safehold.store.migrations import ROWS_TABLE as T
from tests.support.freshness import InProcessAnchor, open_fresh

U = "0b6e3c1a-9f4d-4e7b-8a2c-5d1f0e9b7c3a"  # canonical: lowercase, hyphenated


def pat(rid: str, family: str) -> dict:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family}], "birthDate": "1970"}


@pytest.mark.parametrize("rid", [U, str(uuid.UUID(int=0)), str(uuid.UUID(int=2**128 - 1))])
def test_a_canonical_uuid_is_17_bytes_and_comes_back_as_itself(rid):
    e = encode_id(rid)
    assert e == b"\x00" + uuid.UUID(rid).bytes and len(e) == 17
    assert decode_id(e) == rid


@pytest.mark.parametrize("rid", [
    U.upper(),                     # upper case: another id as far as the records service goes
    U.replace("-", ""),            # 32 bare digits
    "urn:uuid:" + U,               # uuid.UUID takes it; not the canonical form
    U[:-1] + "g",                  # not hex
    U[:8] + U[9:13] + "-" + U[8] + U[13:],  # hyphens elsewhere: uuid.UUID would take it
    "p0", "patient_3", "a" * 17, "example.with.dots", "x" * 128,
])
def test_any_other_id_stays_its_utf8_bytes(rid):
    assert check_record_id(rid) == rid  # the service accepts each of these
    assert encode_id(rid) == rid.encode() and decode_id(rid.encode()) == rid


@settings(max_examples=300, deadline=None)  # no timing: a loaded machine must not fail it
@given(st.one_of(st.from_regex(RECORD_ID_RE, fullmatch=True).filter(lambda r: r not in (".", "..")),
                 st.uuids().map(str)))
def test_every_accepted_id_round_trips_and_the_forms_are_disjoint(rid):
    e = encode_id(rid)
    assert decode_id(e) == rid
    # the 0x00 form exactly for canonical UUIDs: no accepted text id starts with 0x00
    assert (e[:1] == b"\x00") == _canonical(rid)


def _canonical(rid: str) -> bool:
    try:
        return str(uuid.UUID(rid)) == rid
    except ValueError:
        return False


@pytest.mark.parametrize("plain", [
    b"",                                   # nothing encodes to no bytes
    b"\x00",                               # the 0x00 form, but not 17 bytes
    b"\x00" + bytes(15),
    b"\x00" + bytes(17),
    U.encode(),                            # a canonical UUID in the text form (format 3's row)
    b"\xff\xfe",                           # not UTF-8
])
def test_a_plaintext_encode_id_never_makes_is_refused(plain):
    with pytest.raises(ValueError):
        decode_id(plain)


@pytest.mark.parametrize("rid", ["", "\x00abc"])
def test_an_id_without_an_unambiguous_encoding_is_refused(rid):
    with pytest.raises(ValueError):
        encode_id(rid)


def _values(db, ns: str) -> dict[bytes, bytes]:
    with closing(sqlite3.connect(db)) as c:
        return {bytes(k): bytes(v) for k, v in
                c.execute(f"SELECT key, value FROM {T} WHERE "
                          f"ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (ns,))}


def test_uuid_ids_post_17_byte_values_and_search_answers_the_ids_as_given(repo):
    ids = [U, str(uuid.uuid4()), U.upper(), "p0"]
    for rid in ids:
        repo.put("u", parse_record(rid, pat(rid, "Common")))
    idx = repo.index
    p = idx.prefix("family=common")
    fam = {k: v for k, v in _values(repo.db_path, idx.ns).items() if k[:PREFIX_LEN] == p}
    assert sorted(len(v) for v in fam.values()) == sorted([17, 17, 36, 2])
    assert not any(uuid.UUID(U).bytes in v or U.encode() in v for v in fam.values())
    assert {i for i, _ in repo.search("u", {"family": "common"})} == set(ids)
    # the upper-case id is its own record, not the lower-case one
    assert repo.get("u", U.upper())[0]["id"] == U.upper()
    repo.delete("u", U)  # its postings are found by key and removed
    assert {i for i, _ in repo.search("u", {"family": "common"})} == set(ids) - {U}
    assert len([k for k in _values(repo.db_path, idx.ns) if k[:PREFIX_LEN] == p]) == 3


def _forge(idx: PostingIndex, term: str, plain: bytes) -> tuple[bytes, bytes]:
    """A row that authenticates under ``term`` (sealed with the real key, as only code inside
    the TEE could) but whose plaintext is no encoding ``encode_id`` makes."""
    sealed = idx._siv.encrypt(plain, [*idx._ad, term.encode()])
    return idx.prefix(term) + sealed[:16], sealed[16:]


FORGED = [U.encode(), b"\x00" + bytes(15), b"\x00" + bytes(17)]


@pytest.mark.parametrize("plain", FORGED)
def test_a_posting_not_in_its_claimed_form_is_skipped_over_a_plain_store(repo, plain):
    repo.put("u", parse_record("p1", pat("p1", "Common")))
    idx = repo.index
    k, v = _forge(idx, "family=common", plain)
    repo.committer.run(lambda: idx.store.put(idx.ns, k, v, expected_version=0))
    assert idx.lookup("family=common") == {"p1"}  # the forged row is skipped, as a bad tag is


@pytest.fixture
def fresh_repo(tmp_path) -> Iterator[PatientRepository]:
    fs = open_fresh(open_store(f"sqlite:///{tmp_path / 'f.db'}"), InProcessAnchor())
    c = FreshGroupCommit(fs)
    yield PatientRepository(fs, Keyset.generate(), committer=c,
                            audit=AccessAuditLog(fs, c, mac_key=b"k" * 32, checkpointed=True))
    fs.close()


@pytest.mark.parametrize("plain", FORGED)
def test_a_posting_not_in_its_claimed_form_is_refused_over_a_fresh_store(fresh_repo, plain):
    """The row is in the group's multiset hash (written through the FreshStore), so only the
    decoding can find it: the lookup fails closed, as for an edited value."""
    repo = fresh_repo
    repo.put("u", parse_record(U, pat(U, "Common")))
    idx = repo.index
    assert idx.lookup("family=common") == {U}
    k, v = _forge(idx, "family=common", plain)
    repo.committer.run(lambda: idx.store.put(idx.ns, k, v, expected_version=0))
    with pytest.raises(RecordCorruptedError):
        idx.lookup("family=common")
