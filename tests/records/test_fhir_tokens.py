"""Search tokens (records/tokens.py): folding, prefixes, the date tree and its range covers, the
token budget, and rebuilding postings written in an older format (records/reindex.py): term
formats 1 and 2, row formats 2, 3 and 4 (the old namespace), and an interrupted rebuild."""

from __future__ import annotations

import json
import random
import string
import uuid
from collections.abc import Iterator
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.crypto.keyset import Keyset
from safehold.freshness.group import FreshGroupCommit
from safehold.records import reindex
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.model import parse_record
from safehold.records.reindex import INDEX_FORMAT, ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.records.search import PREFIX_LEN
from safehold.records.tokens import (
    MAX_PREFIX,
    MIN_PREFIX,
    TOKEN_BUDGET,
    date_cover,
    date_range,
    date_tokens,
    fold,
    native_term,
    prefix_matches,
    record_tokens,
    string_tokens,
)
from safehold.store import open_store
from tests.support.freshness import InProcessAnchor, open_fresh
from tests.support.old_postings import Format4Index, write_old_marker, write_with_old_index
from tests.support.shared import SHARED
from tests.support.shared import need_shared as need

BUNDLES = SHARED / "data" / "synthea-fhir-r4-bundles-google-fhir-data-pipes"
HL7 = SHARED / "data" / "hl7-fhir-r4-patient-examples"


@pytest.mark.parametrize(("raw", "folded"), [
    ("Königsstein", "konigsstein"), ("STRASSE", "strasse"), ("Straße", "strasse"),
    ("Øresund", "oresund"), ("Łódź", "lodz"), ("Æbeltoft", "aebeltoft"),
    ("  van  de\tHeuvel ", "van de heuvel"),
    ("ﬁnn", "finn"), ("İpek", "ipek"), ("Dvořák", "dvorak"), ("张无忌", "张无忌"), ("Ǆuro", "dzuro"),
])
def test_fold(raw, folded):
    assert fold(raw) == folded


def test_prefix_terms_and_matching():
    whole, prefixes = string_tokens("family", "Graf Freiherr von Schaumberg")
    assert whole == ["family=graf freiherr von schaumberg"]
    assert "family^schaumbe" in prefixes and "family^von s" in prefixes and "family^fr" in prefixes
    assert all(MIN_PREFIX <= len(p.split("^", 1)[1]) <= MAX_PREFIX for p in prefixes)
    assert not any(p.endswith(" ") for p in prefixes)
    # umlauts also get the German spelling
    whole, prefixes = string_tokens("family", "Müller")
    assert set(whole) == {"family=muller", "family=mueller"} and "family^muel" in prefixes
    assert prefix_matches("schaumberg", "Graf Freiherr von Schaumberg")
    assert prefix_matches("von sch", "Graf Freiherr von Schaumberg")
    assert not prefix_matches("aumberg", "Graf Freiherr von Schaumberg")  # not a word start
    assert prefix_matches("strasse", "Müller-Straße") and prefix_matches("mueller", "Müller-Straße")


def test_budget_keeps_identifiers_whole_values_and_dates_first():
    word = ["".join(random.Random(i).choices(string.ascii_lowercase, k=10)) for i in range(80)]
    names = [{"family": word[i], "given": [word[40 + i]]} for i in range(40)]
    rec = {"resourceType": "Patient", "name": names, "birthDate": "1970-01-01",
           "identifier": [{"value": "ID-1"}]}
    toks = record_tokens(rec)
    assert len(toks) == TOKEN_BUDGET
    assert "identifier=id-1" in toks and "birthdate@19700101" in toks
    assert all(f"family={word[i]}" in toks and f"given={word[40 + i]}" in toks for i in range(40))
    assert sum("^" in t for t in toks) == TOKEN_BUDGET - 1 - 80 - 7  # only prefixes were cut
    # real data stays far under the budget
    need(HL7)
    for f in HL7.glob("Patient-*.json"):
        assert len(record_tokens(json.loads(f.read_bytes()), budget=10**6)) < TOKEN_BUDGET / 3


def test_date_tokens_and_native_terms():
    assert date_tokens("birthdate", "1974-12-25") == [
        "birthdate<1", "birthdate<19", "birthdate<197", "birthdate<1974", "birthdate<197412",
        "birthdate<19741225", "birthdate@19741225"]
    assert date_tokens("birthdate", "1974") == ["birthdate<1", "birthdate<19", "birthdate<197",
                                                "birthdate<1974", "birthdate@1974"]
    assert date_tokens("birthdate", "1974-02-30") == [] and date_tokens("birthdate", "1974-12-25 ") == []
    assert date_tokens("birthdate", "0000") == []
    assert native_term("birthDate", "1974-12-25") == "birthdate@19741225"
    assert native_term("birthDate", "12/25/1974") == "birthDate=12/25/1974"
    assert native_term("family", "KÖNIG") == "family=konig"
    assert native_term("gender", "male") is None


_dates = st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31))


@settings(max_examples=300, deadline=None)
@given(_dates, _dates, st.lists(_dates, min_size=1, max_size=20),
       st.sampled_from(["day", "month", "year"]))
def test_date_cover_finds_exactly_the_overlapping_dates(a, b, targets, precision):
    """Every stored date whose range overlaps [lo, hi] has a term in the cover; none that does
    not overlap has a membership term in it (precision terms of partly covered years/months are
    the only superset)."""
    lo, hi = sorted((a.toordinal(), b.toordinal()))
    cover = set(date_cover("bd", lo, hi))
    assert len(cover) <= 160
    for t in targets:
        value = {"day": t.isoformat(), "month": t.isoformat()[:7], "year": t.isoformat()[:4]}[precision]
        t0, t1 = date_range(value)
        overlaps = t0 <= hi and t1 >= lo
        hit = bool(cover & set(date_tokens("bd", value)))
        assert hit == overlaps, (value, lo, hi)


def test_reindex_rebuilds_postings_of_the_older_format(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    c = GroupCommit(store)
    repo = PatientRepository(store, Keyset.generate(), committer=c, audit=AccessAuditLog(store, c))
    try:
        pats = [{"resourceType": "Patient", "name": [{"family": f, "given": ["Ann"]}], "birthDate": "1970"}
                for f in ("Königsstein", "Schaumberg", "Meyer")]
        for i, p in enumerate(pats):
            repo.put("t", parse_record(f"p{i}", p))
        assert ensure_search_index(repo) == 3  # no marker yet: rebuilt once
        assert ensure_search_index(repo) == 0  # then current
        # simulate a store written by the older code: format-1 postings only (whole-value
        # terms, in the old namespace), no marker
        idx = repo.index
        c.run(lambda: [store.delete(idx.ns, r.key) for r in store.scan(idx.ns, limit=10_000)])
        c.run(lambda: repo.engine.delete(f"{repo.ns}.meta", "search-index-format"))
        old = Format4Index(store, idx.keyset, repo.old_index_ns)
        c.run(lambda: old.add("p0", ["family=königsstein"]))  # an old whole-value term
        old_rows = store.scan(repo.old_index_ns, limit=10_000)
        assert len(old_rows) == 1
        assert repo.find("t", [["family^konigss"]], lambda _r, _x: True).hits == []
        assert ensure_search_index(repo) == 3
        assert store.scan(repo.old_index_ns, limit=10_000) == []  # the old term is gone, not left to leak
        assert [h[0] for h in repo.find("t", [["family^konigss"]], lambda _r, _x: True).hits] == ["p0"]
        assert repo.engine.get(f"{repo.ns}.meta", "search-index-format")[0] == INDEX_FORMAT
        # a store written in posting row format 2 (GCM envelope of the id, HMAC key suffix):
        # rebuilt as well, its rows dropped (issue 17)
        from safehold.crypto import envelope

        term = "family=konigsstein"
        s2 = old._bi.index(old.ns, b"posting:" + term.encode() + b"\x00p0")
        k2 = old.prefix(term) + s2
        v2 = envelope.seal(old.keyset, b"p0", b"safehold/search/v1" + old.ns.encode() + k2)
        c.run(lambda: store.put(old.ns, k2, v2, expected_version=0))
        c.run(lambda: repo.engine.put(f"{repo.ns}.meta", "search-index-format", b"safehold/search-index/2"))
        assert ensure_search_index(repo) == 3
        assert store.scan(old.ns, limit=10_000) == []
        assert idx.key(term, "p0") in {r.key for r in store.scan(idx.ns, limit=10_000)}
        assert [h[0] for h in repo.find("t", [[term]], lambda _r, _x: True).hits] == ["p0"]
    finally:
        store.close()


@pytest.fixture(params=["plain", "fresh"])
def any_repo(request, tmp_path) -> Iterator[PatientRepository]:
    """A repository over a plain SQLite store, and over a FreshStore (as the service runs it:
    posting groups checked against the verifier map)."""
    inner = open_store(f"sqlite:///{tmp_path / 'm.db'}")
    if request.param == "plain":
        store, c = inner, GroupCommit(inner)
    else:
        store = open_fresh(inner, InProcessAnchor())
        c = FreshGroupCommit(store)
    yield PatientRepository(store, Keyset.generate(), committer=c, audit=AccessAuditLog(store, c))
    store.close()


OldStore = tuple[dict[str, frozenset[str]], dict[str, set[str]]]


def _old_store(repo: PatientRepository, fmt: int) -> OldStore:
    """Records with UUID ids (and two others) whose postings are in row format ``fmt`` (3: AES-SIV
    over the id's UTF-8 text; 4: over ``E(id)``; both with 16-byte prefixes in the old
    namespace ``.search``), written through the store as the older code wrote them, under that
    format's marker. Returns each record's terms and per term the ids the older code answered."""
    rnd = random.Random(3)
    ids = [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(7)] + ["p0", "patient_3"]
    terms: dict[str, frozenset[str]] = {}
    new_index = repo.index
    old = write_with_old_index(repo, fmt)
    try:
        for i, rid in enumerate(ids):
            name = {"family": ("Meyer", "Graf")[i % 2], "given": [f"Ann{i % 3}"]}
            rec = parse_record(rid, {"resourceType": "Patient", "name": [name],
                                     "birthDate": f"19{70 + i % 4}-02-0{1 + i % 5}"})
            repo.put("t", rec)
            terms[rid] = rec.postings
    finally:
        repo.index = new_index
    write_old_marker(repo, fmt)
    store = repo.engine.store
    assert store.scan(new_index.ns, limit=10) == []  # the older code wrote no format-5 row
    before: dict[str, set[str]] = {}
    for rid, ts in terms.items():
        for t in ts:
            before.setdefault(t, set()).add(rid)
    # what the older code's lookup answered
    rows = store.scan(old.ns, limit=10_000)
    assert len(rows) == sum(len(ts) for ts in terms.values())
    assert {len(r.key) for r in rows} == {32}
    for t, want in before.items():
        assert old.lookup(t) == want
    return terms, before


def _check_format5(repo: PatientRepository, f: OldStore) -> None:
    terms, before = f
    idx, store = repo.index, repo.engine.store
    rows = store.scan(idx.ns, limit=10_000)
    # exactly the format-5 rows: nothing left over, nothing twice
    assert sorted(r.key for r in rows) == sorted(idx.key(t, rid) for rid, ts in terms.items() for t in ts)
    assert {len(r.key) for r in rows} == {PREFIX_LEN + 16}
    assert store.scan(repo.old_index_ns, limit=10_000) == []  # every old row dropped
    assert sorted({len(r.value) for r in rows}) == [2, 9, 17]  # "p0", "patient_3", the UUIDs
    for t, want in before.items():  # the same ids under every term, and searches agree
        assert idx.lookup(t) == want
    assert ({h[0] for h in repo.find("t", [["family=meyer"]], lambda _r, _x: True).hits}
            == before["family=meyer"])
    assert repo.engine.get(f"{repo.ns}.meta", "search-index-format")[0] == INDEX_FORMAT
    assert ensure_search_index(repo) == 0


@pytest.mark.parametrize("fmt", [3, 4])
def test_reindex_migrates_row_formats_3_and_4_to_5(any_repo, fmt):
    """A format-3 or format-4 store (16-byte prefixes in ``.search``; format 3 with UUID ids as
    36 characters of text): format 5 reads neither (another namespace, other keys), so the store
    is rebuilt at the next start; searches before (the older code) and after give the same ids."""
    repo = any_repo
    assert INDEX_FORMAT == b"safehold/search-index/5"
    f = terms, before = _old_store(repo, fmt)
    assert all(repo.index.lookup(t) == set() for t in before)  # nothing in format 5 yet
    assert ensure_search_index(repo) == len(terms)
    _check_format5(repo, f)


def test_an_interrupted_reindex_leaves_the_old_marker_and_the_next_start_completes_it(any_repo, monkeypatch):
    """The rebuild drops the rows, posts the records batch by batch, and writes the marker
    last: interrupted after some batches, the marker still says format 4, so the next start
    rebuilds from scratch, without leftovers of either format."""
    repo = any_repo
    f = terms, _ = _old_store(repo, 4)
    monkeypatch.setattr(reindex, "_BATCH", 2)
    real_add, calls = repo.index.add, []

    def failing_add(rid: str, ts) -> None:  # noqa: ANN001
        calls.append(rid)
        if len(calls) == 5:  # in the third batch
            raise OSError("the service stopped")
        real_add(rid, ts)

    monkeypatch.setattr(repo.index, "add", failing_add)
    with pytest.raises(OSError):
        ensure_search_index(repo)
    assert repo.engine.get(f"{repo.ns}.meta", "search-index-format")[0] == b"safehold/search-index/4"
    half = repo.engine.store.scan(repo.index.ns, limit=10_000)
    # every old row dropped, the first two batches posted (the third's savepoint rolled back)
    posted = sorted(repo.index.key(t, rid) for rid in calls[:4] for t in terms[rid])
    assert sorted(r.key for r in half) == posted
    assert repo.engine.store.scan(repo.old_index_ns, limit=10_000) == []
    monkeypatch.setattr(repo.index, "add", real_add)
    assert ensure_search_index(repo) == len(terms)
    _check_format5(repo, f)


def test_token_counts_of_the_shared_data_for_the_docs():
    """The figures docs/search-leakage.md quotes (terms per Patient of the shared sample)."""
    need(BUNDLES)
    recs = [e["resource"] for f in BUNDLES.glob("*.json") for e in json.loads(f.read_bytes())["entry"]
            if e["resource"]["resourceType"] == "Patient"]
    counts = sorted(len(record_tokens(r)) for r in recs)
    assert 15 <= counts[len(counts) // 2] <= 40 and counts[-1] < TOKEN_BUDGET
    rnd = random.Random(7)
    assert len(record_tokens(rnd.choice(recs))) > len({t for t in record_tokens(rnd.choice(recs))
                                                       if "^" not in t}) > 5


def _fold_unicode_path(value: str) -> str:
    """fold() without its ASCII shortcut (the general rule, module docstring of tokens)."""
    import unicodedata

    from safehold.records.tokens import _SPECIAL

    v = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", value).casefold())
    v = "".join(ch for ch in v if not unicodedata.combining(ch)).translate(_SPECIAL)
    return " ".join(v.split())


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_fold_ascii_shortcut_is_the_general_rule(value: str) -> None:
    """ASCII values take fold()'s shortcut and german_variant()'s early None: same results as
    the general Unicode path (every ASCII character, control and blank characters included)."""
    from safehold.records.tokens import fold, german_variant

    assert fold(value) == _fold_unicode_path(value)
    assert german_variant(value) is None
    every = "".join(map(chr, range(128)))
    assert fold(every) == _fold_unicode_path(every)
    assert fold("Königs-STEIN") == "konigs-stein" and german_variant("Müller") == "mueller"
