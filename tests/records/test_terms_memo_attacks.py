"""Operator / DBA attacks on the search-terms memo (``PatientRepository.terms_of``, used by
``search_raw`` = ``GET /v1/patients?family=...``), over real SQLite files: a row the memo has
seen and the DBA then edits, copies or rolls back; many threads on a tiny memo; and the memo's
memory, which must be bounded in bytes, not only in entries (a stored form may be 1 MiB)."""

from __future__ import annotations

import sqlite3
import sys
import threading
from contextlib import closing

import pytest

from safehold.errors import RecordTamperedError
from safehold.records.model import parse_record
from safehold.store.migrations import ROWS_TABLE as T


def put(repo, rid, rec):
    return repo.put("u", parse_record(rid, rec))


def pat(rid, family, **extra):
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family}], "gender": "female", **extra}


def ids(rows):
    return [r[0] for r in rows]


def _row(repo, rid):
    with closing(sqlite3.connect(repo.db_path)) as c:
        return c.execute(f"SELECT version, value FROM {T} WHERE key = ?", (repo.blind_index(rid),)).fetchone()


def _set_row(repo, rid, version, value):
    with closing(sqlite3.connect(repo.db_path)) as c, c:
        c.execute(f"UPDATE {T} SET version = ?, value = ? WHERE key = ?",
                  (version, value, repo.blind_index(rid)))


def test_a_remembered_row_edited_by_the_dba_is_refused_not_answered_from_the_memo(repo):
    for i in range(3):
        put(repo, f"p{i}", pat(f"p{i}", "Same"))
    assert ids(repo.search_raw("u", {"family": "same"})) == ["p0", "p1", "p2"]  # all remembered
    v, val = _row(repo, "p1")
    _set_row(repo, "p1", v, val[:-3] + bytes([val[-3] ^ 1]) + val[-2:])
    with pytest.raises(RecordTamperedError):
        repo.search_raw("u", {"family": "same"})
    # another record's (authentic, remembered) row copied onto p1's key: refused too
    _set_row(repo, "p1", *_row(repo, "p0"))
    with pytest.raises(RecordTamperedError):
        repo.search_raw("u", {"family": "same"})


def test_a_rolled_back_row_answers_as_the_decoding_path_does(repo):
    """Without a FreshStore a rollback to an authentic older version is not detected (by
    design, docs/freshness.md); the memo must not make it worse: search_raw answers exactly as
    the decoding search, and a stale posting still adds nothing."""
    put(repo, "a", pat("a", "Alpha"))
    put(repo, "b", pat("b", "Alpha"))
    old = _row(repo, "a")
    assert ids(repo.search_raw("u", {"family": "alpha"})) == ["a", "b"]  # v1 remembered
    put(repo, "a", pat("a", "Beta"))
    assert ids(repo.search_raw("u", {"family": "beta"})) == ["a"]  # v2 remembered
    _set_row(repo, "a", *old)  # the DBA rolls the record back; postings stay at v2 (beta)
    for crit in ({"family": "alpha"}, {"family": "beta"}, {"gender": "female"}):
        assert ids(repo.search_raw("u", crit)) == [i for i, _ in repo.search("u", crit)], crit
    assert ids(repo.search_raw("u", {"family": "beta"})) == []  # a's stored form says Alpha


def test_threads_on_a_tiny_memo_never_answer_a_non_matching_record(repo, monkeypatch):
    import safehold.records.repository as mod

    monkeypatch.setattr(mod, "TERMS_MEMO", 4)
    for i in range(12):
        put(repo, f"r{i:02d}", pat(f"r{i:02d}", "Smith" if i % 2 else "Jones"))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(fam):
        import json

        try:
            while not stop.is_set():
                for rid, raw, _ in repo.search_raw("u", {"family": fam}):
                    if json.loads(raw)["name"][0]["family"].lower() != fam:
                        errors.append(AssertionError(f"{rid} answered for {fam}"))
        except BaseException as e:  # noqa: BLE001 - collected for the main thread
            errors.append(e)

    def writer():
        try:
            for n in range(40):
                i = n % 12
                put(repo, f"r{i:02d}", pat(f"r{i:02d}", "Smith" if (i + n) % 2 else "Jones"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(f,)) for f in ("smith", "jones", "smith", "jones")]
    w = threading.Thread(target=writer)
    for t in ts:
        t.start()
    w.start()
    w.join(60)
    stop.set()
    for t in ts:
        t.join(60)
    assert not errors, errors[:3]
    assert len(repo._terms) <= 4  # noqa: SLF001


def _memo_bytes(repo) -> int:
    """What the memo holds, counted independently of its own accounting."""
    total = 0
    for k, entry in repo._terms.items():  # noqa: SLF001
        terms = entry[1] if isinstance(entry, tuple) else entry  # (fields, terms, cost) or terms
        total += len(k) + sum(sys.getsizeof(f) + sys.getsizeof(v) for f, v in terms)
    return total


def test_the_memo_is_bounded_in_bytes_not_only_in_entries(repo):
    """A Patient may legitimately be up to MAX_RECORD_BYTES (1 MiB: e.g. photo data); 2,048
    of them remembered is 2 GiB per worker (the records pod's limit is 4 GiB). Identifier
    values also expand under NFKC (U+FDFA: 3 UTF-8 bytes -> 18 characters), and each is kept
    twice (value, system|value): 25 MB of terms for one 1 MiB stored form. Any writer could pin
    that memory; searches keep it."""
    import safehold.records.repository as mod
    from safehold.records.model import MAX_RECORD_BYTES

    photo = "A" * (MAX_RECORD_BYTES - 4096)
    for i in range(12):
        put(repo, f"big{i:02d}",
            pat(f"big{i:02d}", "Big", photo=[{"contentType": "image/png", "data": photo}]))
    wide = "\ufdfa" * 100_000  # 300 KB stored
    put(repo, "nfkc", pat("nfkc", "Big", identifier=[{"system": "urn:s", "value": wide}]))
    for crit in ({"family": "big"}, {"identifier": wide}, {"gender": "female"}):
        assert len(repo.search_raw("u", crit, limit=100)) == (1 if "identifier" in crit else 13)
        budget = getattr(mod, "TERMS_MEMO_BYTES", 16 * 2**20)
        assert _memo_bytes(repo) <= budget, f"memo holds {_memo_bytes(repo) / 2**20:.1f} MiB after {crit}"
    # small records are still remembered (the point of the memo)
    put(repo, "s1", pat("s1", "Small"))
    repo.search_raw("u", {"family": "small"})
    assert any(b'"s1"' in k for k in repo._terms)  # noqa: SLF001


def test_a_family_search_does_not_normalise_other_fields(repo, monkeypatch):
    """The decoding path re-checks only the asked fields; the memo computed every field of each
    candidate: a family search over a record with a 1 MiB identifier spent ~1.3 s in NFKC per
    candidate (2 ms for the family alone), on every miss."""
    import safehold.records.model as model

    wide = "\ufdfa" * 50_000
    put(repo, "w", pat("w", "Wide", identifier=[{"system": "urn:s", "value": wide}]))
    seen: list[int] = []
    real = model.normalise
    monkeypatch.setattr(model, "normalise", lambda v: (seen.append(len(v)), real(v))[1])
    assert ids(repo.search_raw("u", {"family": "wide"})) == ["w"]
    assert sum(seen) < 1000, f"normalised {sum(seen)} characters for a family search"
