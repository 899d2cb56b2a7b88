"""The patient repository: records, their blind-index search postings and the access audit.

Framework-free (the HTTP layers :mod:`safehold.records.http` and
:mod:`safehold.records.scone_http` call it). It stores what the edges hand it: writes take a
:class:`~safehold.records.model.ValidRecord`, which only
:func:`~safehold.records.model.parse_record` makes, so no rule is checked twice. Its
collaborators are explicit: the untrusted store, the attested keyset, the store-namespace
prefix, the :class:`~safehold.records.commit.GroupCommit` every write goes through and the
:class:`~safehold.records.access_audit.AccessAuditLog`. The database only ever sees blind
indexes and envelopes.

Record value format: the record's stored form (:func:`~safehold.records.model.encode_record`:
compact JSON, UTF-8), encrypted by the engine (:class:`~safehold.records.engine.RecordEngine`,
store namespace ``<prefix><namespace>``) — zlib-compressed when shorter and padded to 256 bytes
inside the AES-GCM plaintext unless ``compress=False`` (frame versions in
:mod:`safehold.records.frame`). The engine hands back the stored form itself, so every path here
(GET answers, search answers built from stored JSON, the ``terms_of`` memo, ``find(keep_raw=…)``,
history, the index rebuild) sees JSON, never compressed bytes. Search: one posting row per
(term, record) in store namespace ``<prefix><namespace>.postings``
(:mod:`safehold.records.search`), addressed by keyed blind indexes; terms:
:func:`~safehold.records.model.postings`.

Consistency: a write (put or delete) reads the record, then commits the record (compare-and-set
on its version), its added and removed postings and its audit entry in **one store
transaction**; if the record changed meanwhile, nothing is written and the write is redone from
fresh reads. So the index never disagrees with the records and concurrent writers lose no
update. Concurrent writes are group-committed: one durable commit serves a whole batch, each
write in its own savepoint. The old record is read (and authenticated) on every write anyway —
for its version, for create-only and ``If-Match``, and so that a tampered row is refused rather
than overwritten — so its postings are taken from it, not stored a second time.
:meth:`PatientRepository.search` still re-checks every hit against the decrypted record
(defence in depth against a row rolled back by the database operator).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safehold.crypto.keyset import Keyset
from safehold.errors import ConflictError, RecordError, RecordNotFoundError, RecordTamperedError
from safehold.jsontypes import JSONObject
from safehold.records.access_audit import AccessAuditLog
from safehold.records.codec import Codec
from safehold.records.commit import Committer
from safehold.records.engine import DEFAULT_PREFIX, RecordEngine, RowAddress
from safehold.records.errors import (
    AlreadyExistsError,
    InvalidRecordError,
    PreconditionFailedError,
    SearchTooCostlyError,
)
from safehold.records.history import VersionHistory
from safehold.records.model import (
    SEARCH_FIELDS,
    RefusedItem,
    ValidRecord,
    check_record_id,
    decode_for_match,
    decode_stored,
    normalise,
    postings,
    search_terms,
)
from safehold.records.search import NAMESPACE_SUFFIX, OLD_NAMESPACE_SUFFIX, PostingIndex
from safehold.records.tokens import native_term
from safehold.store.base import Store

__all__ = [
    "MAX_CANDIDATES",
    "MAX_PAGE",
    "NAMESPACE",
    "FoundPage",
    "PatientRepository",
    "PutResult",
]

#: Default namespace of patient records.
NAMESPACE = "patients"
#: Largest page for listing.
MAX_PAGE = 1000
#: Most candidate records one search decrypts and checks (index hits, or rows of a scan).
MAX_CANDIDATES = 10_000
_INDEX_RETRIES = 64
#: Stored forms whose search terms a repository remembers (LRU; ~3.4 KiB of plaintext each,
#: in the workload's memory like every decrypted record).
TERMS_MEMO = 2048
#: ... and at most this many bytes in all (stored forms and their terms): a stored form may be
#: 1 MiB and its terms many times that (NFKC expands U+FDFA 18-fold), so 2,048 entries alone
#: could pin gigabytes per worker.
TERMS_MEMO_BYTES = 16 * 1024 * 1024
#: One entry's most bytes; a larger stored form is re-checked without the memo.
TERMS_MEMO_ENTRY = 256 * 1024
log = logging.getLogger("safehold.records")


@dataclass(frozen=True)
class FoundPage:
    """A page of :meth:`PatientRepository.find`: ``hits`` ``(id, record, version)`` in id order,
    ``total`` matches (None: not counted), whether ``more`` follow, and each hit's stored form
    (``raws``, compact JSON: an answer can embed it without encoding the record again)."""

    hits: list[tuple[str, dict[str, Any], int]]
    total: int | None
    more: bool
    raws: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class PutResult:
    """Outcome of one write: ``status`` is ``created`` | ``updated`` | ``unchanged``."""

    id: str
    version: int
    status: str


class PatientRepository:
    """Patient records with search and audit.

    Args:
        store: the untrusted store.
        keyset: the attested records keyset (value keys and the blind-index key).
        committer: the group committer every write goes through (on ``store``).
        audit: the access audit log (sharing ``committer``); None only when the measured
            configuration turns the audit off (benchmark baselines).
        prefix: prefix of the store namespaces (records, postings); ASCII ``[A-Za-z0-9._:-]``.
        namespace: record namespace.
        codec: the engine's codec; default AES-256-GCM envelopes under ``keyset``
            (:class:`~safehold.records.codec.UnsafePlainCodec` only for benchmark baselines).
        compress: write records compressed and padded to 256 bytes inside the AEAD (frame
            version 2, :mod:`safehold.records.frame`; default) or at their exact length (version
            1: the measured ``compress = false``). Rows of either version are read either way, and
            every value this class hands out is the record's JSON, never its stored form.

    Attributes:
        engine: the :class:`~safehold.records.engine.RecordEngine` (store namespace
            ``<prefix><namespace>``).
        index: the :class:`~safehold.records.search.PostingIndex` (``<prefix><namespace>.postings``).
        old_index_ns: the store namespace of postings written before format 5
            (``<prefix><namespace>.search``), which the index rebuild empties.
        history: the :class:`~safehold.records.history.VersionHistory` (prior versions, for
            FHIR ``vread``; every write keeps the version it replaces, a delete erases them).
        committer, audit: as given.

    Raises:
        ValueError: the committer or the audit log writes to another store, or the audit log
            uses another committer (its appends would then compete with the record writes).
    """

    def __init__(self, store: Store, keyset: Keyset, *, committer: Committer,
                 audit: AccessAuditLog | None, prefix: str = DEFAULT_PREFIX,
                 namespace: str = NAMESPACE, codec: Codec | None = None,
                 compress: bool = True) -> None:
        if committer.store is not store:
            raise ValueError("the repository's committer writes to another store")
        if audit is not None and audit.committer is not committer:
            raise ValueError("the access audit log must share the repository's committer")
        self.engine = RecordEngine(store, keyset, namespace_prefix=prefix, codec=codec, compress=compress)
        self.index = PostingIndex(store, keyset, f"{prefix}{namespace}{NAMESPACE_SUFFIX}")
        self.old_index_ns = f"{prefix}{namespace}{OLD_NAMESPACE_SUFFIX}"
        self.history = VersionHistory(self.engine, namespace)
        self.committer = committer
        self.audit = audit
        self.ns = namespace
        # stored form -> (fields computed, their terms, bytes charged)
        self._terms: OrderedDict[bytes, tuple[frozenset[str], frozenset[tuple[str, str]], int]] = (
            OrderedDict())
        self._terms_bytes = 0
        self._terms_lock = threading.Lock()

    def terms_of(self, raw: bytes,
                 fields: Collection[str] = SEARCH_FIELDS) -> frozenset[tuple[str, str]]:
        """The ``(field, normalised value)`` search terms of ``fields`` (at least those; more
        may be returned) of the record whose stored form is ``raw``
        (:func:`~safehold.records.model.search_terms`), remembered for the last
        :data:`TERMS_MEMO` stored forms within :data:`TERMS_MEMO_BYTES`: a search re-checks each
        candidate, and a popular search re-checks the same records (a 100-hit search decoded
        100 records, ~23 µs each). The memo is keyed by the stored bytes themselves, so a hit is
        an exact match. Only the asked fields are computed (a family search never normalises a
        megabyte of identifiers); a stored form over :data:`TERMS_MEMO_ENTRY` is not remembered.

        Raises:
            RecordError: ``raw`` is not a JSON object.
        """
        want = frozenset(fields)
        done: frozenset[str] = frozenset()
        have: frozenset[tuple[str, str]] = frozenset()
        if len(raw) <= TERMS_MEMO_ENTRY:
            with self._terms_lock:
                got = self._terms.get(raw)
                if got is not None:
                    self._terms.move_to_end(raw)
                    done, have, _ = got
                    if want <= done:
                        return have
        terms = have | search_terms(decode_for_match(raw), want - done)
        done |= want
        cost = len(raw) + 256 + sum(sys.getsizeof(v) + 64 for _, v in terms)
        if len(raw) > TERMS_MEMO_ENTRY or cost > TERMS_MEMO_ENTRY:
            return terms
        with self._terms_lock:
            prev = self._terms.pop(raw, None)
            if prev is not None:
                self._terms_bytes -= prev[2]
            self._terms[raw] = (done, terms, cost)
            self._terms_bytes += cost
            while self._terms and (len(self._terms) > TERMS_MEMO or self._terms_bytes > TERMS_MEMO_BYTES):
                self._terms_bytes -= self._terms.popitem(last=False)[1][2]
        return terms

    def blind_index(self, rid: str) -> bytes:
        """The 16-byte blind index the database stores for record ``rid`` (as audit entries
        and tamper errors name it).

        Raises:
            ValueError: ``rid`` cannot be a record key.
        """
        return self.engine.row_index(self.ns, rid)

    # -- audit ----------------------------------------------------------------------------

    def _audit(self, who: str, op: str, addr: RowAddress | None, outcome: str) -> None:
        """Audit a write's refusal (durable before the caller learns of it)."""
        if self.audit is not None:
            self.audit.append(who, op, addr.row_key if addr is not None else None, outcome)

    def _audit_read(self, who: str, op: str, addr: RowAddress | None, outcome: str,
                    hits: Sequence[bytes] | None = None) -> None:
        """Audit a read: one buffered entry per request (the durability rule of
        :mod:`safehold.records.access_audit`)."""
        if self.audit is not None:
            self.audit.note(who, op, addr.row_key if addr is not None else None, outcome, hits)

    # -- single records -------------------------------------------------------------------

    def get(self, who: str, rid: str) -> tuple[JSONObject, int]:
        """Return ``(record, version)``.

        Raises:
            InvalidRecordError: bad id.  RecordNotFoundError: unknown id.
            RecordTamperedError: the stored row failed authentication (names its blind index).
        """
        raw, version = self.get_raw(who, rid)
        return decode_stored(raw), version

    def get_raw(self, who: str, rid: str) -> tuple[bytes, int]:
        """Like :meth:`get`, but return the stored form (compact JSON, UTF-8) undecoded."""
        addr = self.engine.address(self.ns, check_record_id(rid))
        try:
            raw, version = self.engine.get_at(addr)
        except RecordNotFoundError:
            self._audit_read(who, "get", addr, "not-found")
            raise
        except RecordTamperedError:
            self._audit_read(who, "get", addr, "tampered")
            raise
        self._audit_read(who, "get", addr, "ok")
        return raw, version

    def get_version(self, who: str, rid: str, vid: int) -> bytes:
        """The stored form of version ``vid`` of ``rid`` (the current one, or one the history
        kept), audited as ``vread``.

        Raises:
            InvalidRecordError, RecordNotFoundError (record or version), RecordTamperedError.
        """
        addr = self.engine.address(self.ns, check_record_id(rid))
        try:
            raw, cur = self.engine.get_at(addr)
            if vid != cur:
                if not 1 <= vid < cur:
                    raise RecordNotFoundError(f"no version {vid} (current version is {cur})")
                raw = self.history.get(rid, vid)
        except RecordNotFoundError:
            self._audit_read(who, "vread", addr, "not-found")
            raise
        except RecordTamperedError:
            self._audit_read(who, "vread", addr, "tampered")
            raise
        self._audit_read(who, "vread", addr, "ok")
        return raw

    def put(
        self,
        who: str,
        record: ValidRecord,
        *,
        expected_version: int | None = None,
        create_only: bool = False,
        skip_identical: bool = False,
    ) -> PutResult:
        """Create or replace a record.

        Args:
            who: the principal, for the audit.
            record: from :func:`~safehold.records.model.parse_record` (trusted as it is).
            expected_version: only write if the current version is this (0 = must not exist).
            create_only: raise :class:`AlreadyExistsError` if the id exists (SCONE's 403).
            skip_identical: return status ``unchanged`` without writing if the stored record
                is byte-identical (resumable imports).

        Raises:
            AlreadyExistsError, PreconditionFailedError, RecordTamperedError (the old row
            cannot be read, so its postings cannot be maintained).
        """
        addr = self.engine.address(self.ns, record.id)
        for _ in range(_INDEX_RETRIES):
            try:
                old_raw: bytes | None
                old_raw, cur = self.engine.get_at(addr)
            except RecordNotFoundError:
                old_raw, cur = None, 0
            if create_only and cur:
                self._audit(who, "create", addr, "exists")
                raise AlreadyExistsError(f"record exists (blind index {addr.row_key.hex()})")
            if expected_version is not None and expected_version != cur:
                self._audit(who, "put", addr, "precondition-failed")
                raise PreconditionFailedError(
                    f"expected version {expected_version}, current version is {cur}")
            if old_raw == record.raw:
                if skip_identical:
                    self._audit(who, "put", addr, "unchanged")
                    return PutResult(record.id, cur, "unchanged")
                old_terms = record.postings  # same bytes, same terms: no need to parse them
            else:
                old_terms = postings(decode_stored(old_raw)) if old_raw is not None else frozenset()
            status = "created" if cur == 0 else "updated"

            def write_row(expected: int = cur) -> int:
                return self.engine.put_at(addr, record.raw, expected_version=expected)

            try:
                version = self._commit(who, "put", addr, status, write_row,
                                       add=record.postings - old_terms, remove=old_terms - record.postings,
                                       archive=(old_raw, cur) if old_raw is not None else None)
            except ConflictError:
                continue  # the record changed meanwhile: redo from fresh reads
            return PutResult(record.id, version, status)
        self._audit(who, "put", addr, "conflict")
        raise PreconditionFailedError(f"record stayed contended ({_INDEX_RETRIES} tries)")

    def delete(self, who: str, rid: str, *, expected_version: int | None = None) -> None:
        """Delete a record and its search postings.

        Raises:
            RecordNotFoundError, PreconditionFailedError, InvalidRecordError.
        """
        addr = self.engine.address(self.ns, check_record_id(rid))
        for _ in range(_INDEX_RETRIES):
            cur, terms = self._delete_target(who, addr, expected_version)

            def remove_row(cur: int | None = cur) -> int:
                if not self.engine.delete_at(addr, expected_version=cur):
                    raise RecordNotFoundError("no such record")
                if cur:  # delete is erasure: the prior versions go too
                    self.history.erase(addr.key.decode("utf-8"), cur - 1)
                return 0

            try:
                self._commit(who, "delete", addr, "ok", remove_row, remove=terms)
                return
            except ConflictError:
                continue  # fresh reads for the next try
            except RecordNotFoundError:
                self._audit(who, "delete", addr, "not-found")
                raise
        self._audit(who, "delete", addr, "conflict")
        raise PreconditionFailedError("record changed concurrently; re-read and retry")

    def _delete_target(self, who: str, addr: RowAddress,
                       expected_version: int | None) -> tuple[int | None, frozenset[str]]:
        """Read a record for a delete: its current version and postings, or ``(None, ∅)`` for a
        tampered row (which may still be deleted, with no version check).

        Raises (after auditing the refusal): RecordNotFoundError, PreconditionFailedError.
        """
        try:
            raw, cur = self.engine.get_at(addr)
            terms = postings(decode_stored(raw))
        except RecordNotFoundError:
            self._audit(who, "delete", addr, "not-found")
            raise
        except RecordTamperedError:
            return None, frozenset()
        if expected_version is not None and expected_version != cur:
            self._audit(who, "delete", addr, "precondition-failed")
            raise PreconditionFailedError(f"expected version {expected_version}, current version is {cur}")
        return cur, terms

    def _commit(self, who: str, op: str, addr: RowAddress, outcome: str, write: Callable[[], int], *,
                add: frozenset[str] = frozenset(), remove: frozenset[str] = frozenset(),
                archive: tuple[bytes, int] | None = None) -> int:
        """Atomically: ``write()`` the record row (a compare-and-set), keep the replaced
        ``archive = (stored form, version)`` in the history, add/remove its postings and stage
        the audit entry; group-committed with concurrent writers. Returns what ``write``
        returned (the new version; 0 for a delete).

        Raises:
            ConflictError: the record's version changed (nothing written).
            RecordNotFoundError: a delete found no row.
        """
        rid = addr.key.decode("utf-8")

        def unit() -> int:
            version = write()
            if archive is not None:
                self.history.archive(rid, archive[1], archive[0])
            self.index.remove(rid, sorted(remove))
            self.index.add(rid, sorted(add))
            if self.audit is not None:  # last: advances the chain
                self.audit.stage(AccessAuditLog.body(who, op, addr.row_key, outcome))
            return version

        return self.committer.run(unit)

    # -- many records ---------------------------------------------------------------------

    def list_ids(self, who: str, *, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """A page of record ids (in blind-index order) and the cursor of the next page (None at
        the end). A row that fails authentication is left out of the page and logged by blind
        index (it stays an error through :meth:`get`), so one tampered row never hides the
        others.

        Raises:
            InvalidRecordError: ``cursor`` is not one a previous page returned.
        """
        limit = max(1, min(limit, MAX_PAGE))
        try:
            start = bytes.fromhex(cursor) if cursor else None
        except ValueError:
            raise InvalidRecordError("cursor is not one returned by a previous page") from None
        page = self.engine.list_page(self.ns, after=start, limit=limit, skip_tampered=True)
        for e in page.tampered:
            log.warning("list: a row failed authentication and was left out: %s", e)
        self._audit_read(who, "list", None, f"ok:{len(page.keys)}")
        return page.keys, (page.next_after.hex() if page.next_after else None)

    def search(self, who: str, criteria: Mapping[str, str], *,
               limit: int = MAX_PAGE) -> list[tuple[str, JSONObject]]:
        """``(id, record)`` of the records matching every ``field=value`` exactly (after
        :func:`~safehold.records.model.normalise`), at most ``limit`` (1..:data:`MAX_PAGE`), in
        id order.

        Raises:
            InvalidRecordError: no criteria, or a field outside
                :data:`~safehold.records.model.SEARCH_FIELDS`.
        """
        return [(rid, rec) for rid, rec, _ in self.search_hits(who, criteria, limit=limit)]

    def search_hits(self, who: str, criteria: Mapping[str, str], *,
                    limit: int = MAX_PAGE) -> list[tuple[str, JSONObject, int]]:
        """As :meth:`search`, with each record's current version: ``(id, record, version)``.
        Postings narrow the search (:func:`~safehold.records.tokens.native_term`); ``gender``
        alone has none, so it scans (bounded by :data:`MAX_CANDIDATES`).

        Raises:
            InvalidRecordError: no criteria, or a field outside
                :data:`~safehold.records.model.SEARCH_FIELDS`.
            SearchTooCostlyError: a scan over more than :data:`MAX_CANDIDATES` records.
        """
        return self._search_page(who, criteria, limit).hits

    def search_raw(self, who: str, criteria: Mapping[str, str], *,
                   limit: int = MAX_PAGE) -> list[tuple[str, bytes, int]]:
        """As :meth:`search_hits`, with each record's stored form (compact JSON, UTF-8) instead
        of the decoded object: ``(id, stored form, version)``. Raises as :meth:`search_hits`."""
        page = self._search_page(who, criteria, limit, raw_only=True)
        return [(rid, raw, v) for (rid, _, v), raw in zip(page.hits, page.raws, strict=True)]

    def _search_page(self, who: str, criteria: Mapping[str, str], limit: int, *,
                     raw_only: bool = False) -> FoundPage:
        if not criteria:
            raise InvalidRecordError("search needs at least one field")
        bad = sorted(set(criteria) - set(SEARCH_FIELDS))
        if bad:
            raise InvalidRecordError(f"cannot search on {bad}; searchable: {list(SEARCH_FIELDS)}")
        want = {(f, normalise(v)) for f, v in criteria.items()}
        fields = frozenset(criteria)
        terms = sorted({t for f, v in criteria.items() if (t := native_term(f, v)) is not None})
        groups = [[t] for t in terms] or None
        if raw_only:  # the answer embeds the stored bytes: match on the remembered terms
            return self.find(who, groups, lambda _rid, rec: True, limit=limit, count=False,
                             keep_raw=lambda _rid, raw: want <= self.terms_of(raw, fields))
        return self.find(who, groups, lambda _rid, rec: want <= search_terms(rec, fields), limit=limit,
                         count=False)

    def find(self, who: str, groups: Sequence[Iterable[str]] | None,
             keep: Callable[[str, dict[str, Any]], bool], *, after: str | None = None,
             limit: int = MAX_PAGE, count: bool = True,
             max_candidates: int = MAX_CANDIDATES,
             decode: Callable[[bytes], JSONObject] = decode_stored,
             keep_raw: Callable[[str, bytes], bool] | None = None) -> FoundPage:
        """Records posted under a term of every group (``groups=None``: every record, a scan),
        re-checked by ``keep(id, record)`` after decryption: postings narrow, ``keep`` decides
        (a stale posting cannot add a record). Audited: one read entry naming every hit's blind
        index.

        Args:
            groups: the terms (:mod:`safehold.records.tokens`): AND over groups, OR within one.
            keep: the match rule on the decrypted record.
            after: only ids greater than this (the last id of the previous page).
            limit: page size (1..:data:`MAX_PAGE`).
            count: count every match (``total``); False stops at the first match past the page.
            max_candidates: refuse a search with more candidates than this.
            decode: how a candidate's stored bytes become the object ``keep`` sees and the hits
                hold; :func:`~safehold.records.model.decode_for_match` when only ``raws`` are
                answered (its numbers may be rounded).
            keep_raw: decides on the stored bytes instead (``keep`` and ``decode`` unused):
                nothing is decoded and each hit's record is an empty dict; for callers that
                answer ``raws`` only.

        Raises:
            SearchTooCostlyError: more candidates than ``max_candidates``.
            RecordTamperedError: a candidate row failed authentication (fail closed).
        """
        limit = max(1, min(limit, MAX_PAGE))
        if groups is None:
            candidates = self._all_ids(max_candidates)
        else:
            cand: set[str] | None = None
            for group in groups:
                ids: set[str] = set()
                for term in sorted(set(group)):
                    ids |= self.index.lookup(term)
                cand = ids if cand is None else cand & ids
                if not cand:
                    break
            candidates = cand or set()
        if len(candidates) > max_candidates:
            raise SearchTooCostlyError(f"search has {len(candidates)} candidates, more than "
                                       f"{max_candidates}: add a more selective parameter")
        hits: list[tuple[str, dict[str, Any], int]] = []
        raws: list[bytes] = []
        hit_keys: list[bytes] = []
        total, more = 0, False
        todo = sorted(candidates)
        # read the candidates in batches (one store query each; issue 17, the 100-hit search)
        chunk, pos, done = max(limit + 1, 16), 0, False
        while pos < len(todo) and not done:
            rids = todo[pos:pos + chunk]
            pos += len(rids)
            addrs = [self.engine.address(self.ns, rid) for rid in rids]
            for rid, addr, got in zip(rids, addrs, self.engine.get_many_at(addrs), strict=True):
                if isinstance(got, RecordNotFoundError):
                    continue  # stale posting (superset by design)
                if isinstance(got, RecordError):
                    raise got  # a tampered candidate: fail closed
                raw, version = got
                if keep_raw is not None:
                    rec: dict[str, Any] = {}
                    if not keep_raw(rid, raw):
                        continue
                else:
                    rec = decode(raw)
                    if not keep(rid, rec):
                        continue
                total += 1
                if after is not None and rid <= after:
                    continue
                if len(hits) < limit:
                    hits.append((rid, rec, version))
                    raws.append(raw)
                    hit_keys.append(addr.row_key)
                else:
                    more = True
                    if not count:
                        done = True
                        break
            chunk = min(chunk * 2, MAX_PAGE)
        self._audit_read(who, "search", None, f"ok:{len(hits)}", hit_keys)
        return FoundPage(hits, total if count else None, more, raws)

    def _all_ids(self, bound: int) -> set[str]:
        """Every record id of the namespace (authenticated rows), at most ``bound`` + 1."""
        out: set[str] = set()
        after: bytes | None = None
        while len(out) <= bound:
            page = self.engine.list_page(self.ns, after=after, limit=MAX_PAGE, skip_tampered=True)
            out.update(page.keys)
            if page.next_after is None:
                break
            after = page.next_after
        return out

    def batch(self, who: str, items: Iterable[ValidRecord | RefusedItem]) -> list[JSONObject]:
        """Upsert many records, skipping byte-identical ones; one result dict per item
        (``{"id", "status": created|updated|unchanged|failed, "version"?, "error"?}``), written
        in **one transaction** by :meth:`put_many`. A failed item does not undo the others.

        Args:
            items: from :func:`~safehold.records.model.parse_batch` (its shape already checked,
                so a malformed batch never gets here); a :class:`RefusedItem` becomes a
                ``failed`` result in its place.
        """
        items = list(items)
        valid = [(it, None) for it in items if not isinstance(it, RefusedItem)]
        done = iter(self.put_many(who, valid, skip_identical=True))
        results: list[JSONObject] = []
        for item in items:
            if isinstance(item, RefusedItem):
                results.append({"id": item.id, "status": "failed", "error": item.error})
                continue
            r = next(done)
            if isinstance(r, PutResult):
                results.append({"id": r.id, "status": r.status, "version": r.version})
            else:
                results.append({"id": item.id, "status": "failed", "error": str(r)})
        return results

    def put_many(self, who: str, writes: Sequence[tuple[ValidRecord, int | None]], *,
                 skip_identical: bool = False) -> list[PutResult | RecordError | ValueError]:
        """Create or replace many records in **one transaction** (issue 17): the current rows
        are read first, then every changed record, its history row, its postings and its audit
        entry are written in one group-commit unit with one audit-head update, so the whole
        call costs one durable commit (and, over a FreshStore, one journal entry and one anchor
        advance). No savepoint per item: an item's first write is its record's compare-and-set,
        so a conflicting item writes nothing; it (another writer, or the same id twice) is then
        redone alone through :meth:`put`. Refusals are audited in the same transaction.

        Args:
            writes: ``(record, expected_version)`` pairs; ``expected_version`` None = any, 0 =
                must not exist (as :meth:`put`).
            skip_identical: a byte-identical record is ``unchanged`` and not written.

        Returns:
            one :class:`PutResult`, or the item's error (``PreconditionFailedError``,
            ``RecordTamperedError``, ...), per write, in order.

        Raises:
            AuditChainError / StoreUnavailableError: the transaction itself failed (nothing of
                it is durable).
        """
        out: list[PutResult | RecordError | ValueError | None] = [None] * len(writes)
        plans: list[tuple[int, ValidRecord, RowAddress, bytes | None, int]] = []
        bodies: list[tuple[bytes, str]] = []  # (blind index, outcome) of unchanged and refused items
        addrs: dict[int, RowAddress] = {}
        for pos, (rec, _) in enumerate(writes):
            try:
                addrs[pos] = self.engine.address(self.ns, rec.id)
            except ValueError as e:
                out[pos] = e
        # the current rows in one batched read (issue 17)
        current = dict(zip(addrs, self.engine.get_many_at(list(addrs.values())), strict=True))
        for pos, (rec, expected) in enumerate(writes):
            if pos not in addrs:
                continue
            addr, got = addrs[pos], current[pos]
            old_raw: bytes | None
            if isinstance(got, RecordNotFoundError):
                old_raw, cur = None, 0
            elif isinstance(got, RecordError):
                out[pos] = got
                continue
            else:
                old_raw, cur = got
            if expected is not None and expected != cur:
                bodies.append((addr.row_key, "precondition-failed"))
                out[pos] = PreconditionFailedError(
                    f"expected version {expected}, current version is {cur}")
                continue
            if skip_identical and old_raw == rec.raw:
                bodies.append((addr.row_key, "unchanged"))
                out[pos] = PutResult(rec.id, cur, "unchanged")
                continue
            plans.append((pos, rec, addr, old_raw, cur))
        redo: list[int] = []

        def unit() -> list[tuple[int, int]]:
            redo.clear()
            done: list[tuple[int, int]] = []
            adds: list[tuple[str, list[str]]] = []
            staged = list(bodies)
            for pos, rec, addr, old_raw, cur in plans:
                if old_raw == rec.raw:
                    old_terms = rec.postings
                else:
                    old_terms = postings(decode_stored(old_raw)) if old_raw is not None else frozenset()
                try:  # the CAS is the item's first write: a conflict leaves nothing behind
                    version = self.engine.put_at(addr, rec.raw, expected_version=cur)
                except ConflictError:
                    redo.append(pos)
                    continue
                if old_raw is not None:
                    self.history.archive(rec.id, cur, old_raw)
                self.index.remove(rec.id, sorted(old_terms - rec.postings))
                adds.append((rec.id, sorted(rec.postings - old_terms)))
                done.append((pos, version))
                staged.append((addr.row_key, "created" if cur == 0 else "updated"))
            self.index.add_many(adds)  # every item's new postings in one batched insert
            if self.audit is not None and staged:  # last: advances the chain once
                self.audit.stage_many(AccessAuditLog.grouped(who, "put", staged))
            return done

        if plans or (bodies and self.audit is not None):
            was = {p: c for p, _, _, _, c in plans}  # version before, by position (not a scan per item)
            for pos, version in self.committer.run(unit):
                out[pos] = PutResult(writes[pos][0].id, version, "created" if was[pos] == 0 else "updated")
        for pos in redo:
            rec, expected = writes[pos]
            try:
                out[pos] = self.put(who, rec, expected_version=expected, skip_identical=skip_identical)
            except (RecordError, ValueError) as e:
                out[pos] = e
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]
