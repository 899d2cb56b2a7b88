"""The patient repository: records, their blind-index search postings and the audit, composed.

Framework-free (the FastAPI layers in :mod:`~safehold.records.api` and
:mod:`~safehold.records.scone` call it). It sits on a :class:`KV` — the encrypted record engine
behind a small adapter (:class:`EngineKV`) — so the database only ever sees blind indexes and
envelopes.

Record value format: the record's JSON text (UTF-8, member order as received, no insignificant
white space), encrypted by the engine. Search: one posting row per (term, record) in store
namespace ``<prefix><namespace>.search`` (:mod:`safehold.records.search`), addressed by keyed
blind indexes. Indexed fields: :data:`INDEXED_FIELDS`; ``gender`` only filters (a two-value
field is not selective: a lookup would scan half the database), as does the ``system|value``
form of identifiers (looked up by value).

Consistency: a write (put or delete) reads the record, then commits the record (compare-and-set
on its version), its added and removed postings and its audit entry in **one store
transaction**; if the record changed meanwhile, nothing is written and the write is redone from
fresh reads. So the index never disagrees with the records and concurrent writers lose no
update. Concurrent writes are group-committed
(:class:`~safehold.records.audit.GroupCommit`): one durable commit serves a whole batch, each
write in its own savepoint. :meth:`PatientRepository.search` still re-checks every hit against
the decrypted record (defence in depth against a row rolled back by the database operator).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from safehold.errors import ConflictError, RecordError, RecordNotFoundError, RecordTamperedError
from safehold.records.audit import AuditLog
from safehold.records.importers import (
    MAX_RECORD_BYTES,
    NON_FINITE_MESSAGE,
    SEARCH_FIELDS,
    InvalidRecordError,
    check_record,
    check_record_id,
    normalise,
    search_terms,
)
from safehold.records.search import PostingIndex

#: Default namespace of patient records.
NAMESPACE = "patients"
#: Most records in one ``POST /v1/patients:batch``.
MAX_BATCH = 500
#: Largest page for listing.
MAX_PAGE = 1000
_INDEX_RETRIES = 64
#: Fields with search postings; the other :data:`SEARCH_FIELDS` only filter.
INDEXED_FIELDS = ("family", "given", "birthDate", "identifier")
log = logging.getLogger("safehold.records")


class KV(Protocol):
    """What the repository needs from the encrypted engine (string keys, bytes values)."""

    def get(self, namespace: str, key: str) -> tuple[bytes, int]:
        """Return ``(plaintext, version)``; raise RecordNotFoundError / RecordTamperedError."""
        ...

    def put(self, namespace: str, key: str, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set (0 = must not exist); return the new version; ConflictError."""
        ...

    def put_many(self, namespace: str, items: list[tuple[str, bytes, int]]) -> list[int]:
        """Compare-and-set several rows in one transaction (all or nothing); ConflictError."""
        ...

    def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete; True if a row went; ConflictError on a version mismatch."""
        ...

    def list(self, namespace: str, *, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` record keys and an opaque cursor for the next page (None at the end)."""
        ...

    def blind_index(self, namespace: str, key: str) -> bytes:
        """The keyed blind index the database stores for ``key`` (for audit entries)."""
        ...


class PreconditionFailed(RecordError):
    """``If-Match`` / expected version does not match the record's current version."""


class AlreadyExists(RecordError):
    """Create-only write on a record id that exists."""


@dataclass(frozen=True)
class PutResult:
    """Outcome of one write: ``status`` is ``created`` | ``updated`` | ``unchanged``."""

    id: str
    version: int
    status: str


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The stored plaintext of a record: compact JSON (RFC 8259), UTF-8, member order kept.

    Raises:
        ValueError: the record holds NaN or an infinity (not JSON, RFC 8259 §6).
        TypeError: a value is not JSON-serialisable.
    """
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def score(record: Mapping[str, Any]) -> float:
    """The SCONE demo's ``score`` for a record, made deterministic.

    SCONE's demo returns a random number as a stand-in for a model's risk score. Safehold
    returns ``int(SHA-256(stored plaintext)[0:4], big-endian) / 2**32`` rounded to 6 decimals:
    a value in [0, 1) that is stable for the same record and changes when it changes. It is not
    a clinical score.
    """
    digest = hashlib.sha256(encode_record(record)).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32, 6)


class PatientRepository:
    """Patient records with search and audit.

    Args:
        kv: the encrypted engine adapter (:class:`EngineKV`).
        audit: the audit log every access goes to (None only in benchmarks' baselines).
        namespace: record namespace.
        index: the search postings; default: a :class:`~safehold.records.search.PostingIndex`
            on the engine's store and keyset in store namespace ``<prefix><namespace>.search``.
    """

    def __init__(self, kv: KV, audit: AuditLog | None, *, namespace: str = NAMESPACE,
                 index: PostingIndex | None = None):
        self.kv = kv
        self.audit = audit
        self.ns = namespace
        eng = getattr(kv, "engine", None)
        if index is None:
            if eng is None:
                raise ValueError("PatientRepository needs an index (or an EngineKV to build one)")
            index = PostingIndex(eng.store, eng.keyset, f"{eng.prefix}{namespace}.search")
        self.index = index

    # -- audit ----------------------------------------------------------------------------

    def _audit(self, who: str, op: str, rid: str | None, outcome: str) -> None:
        if self.audit is None:
            return
        bi = self.kv.blind_index(self.ns, rid) if rid is not None else None
        self.audit.append(who, op, bi, outcome)

    # -- single records -------------------------------------------------------------------

    def get(self, who: str, rid: str) -> tuple[dict[str, Any], int]:
        """Return ``(record, version)``.

        Raises:
            InvalidRecordError: bad id.  RecordNotFoundError: unknown id.
            RecordTamperedError: the stored row failed authentication (names its blind index).
        """
        raw, version = self.get_raw(who, rid)
        return _decode(raw), version

    def get_raw(self, who: str, rid: str) -> tuple[bytes, int]:
        """Like :meth:`get`, but return the stored JSON text (UTF-8 bytes) undecoded."""
        check_record_id(rid)
        try:
            raw, version = self.kv.get(self.ns, rid)
        except RecordNotFoundError:
            self._audit(who, "get", rid, "not-found")
            raise
        except RecordTamperedError:
            self._audit(who, "get", rid, "tampered")
            raise
        self._audit(who, "get", rid, "ok")
        return raw, version

    def exists(self, rid: str) -> bool:
        """True if a record is stored under ``rid`` (no audit entry; used for create-only)."""
        try:
            self.kv.get(self.ns, rid)
        except RecordNotFoundError:
            return False
        return True

    def put(
        self,
        who: str,
        rid: str,
        record: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        create_only: bool = False,
        skip_identical: bool = False,
    ) -> PutResult:
        """Create or replace a record.

        Args:
            expected_version: only write if the current version is this (0 = must not exist).
            create_only: raise :class:`AlreadyExists` if the id exists (SCONE's 403).
            skip_identical: return status ``unchanged`` without writing if the stored record
                is byte-identical (resumable imports).

        Raises:
            InvalidRecordError, AlreadyExists, PreconditionFailed, RecordTamperedError (the old
            row cannot be read, so its index entries cannot be maintained).
        """
        check_record_id(rid)
        if not isinstance(record, dict):
            if not isinstance(record, Mapping):  # e.g. JSON null: refuse, never a TypeError
                raise InvalidRecordError(f"record must be a JSON object, got {type(record).__name__}")
            record = check_record(dict(record))
        try:
            new_raw = encode_record(record)
        except ValueError:
            raise InvalidRecordError(f"record holds a non-finite number: {NON_FINITE_MESSAGE}") from None
        except TypeError as e:
            raise InvalidRecordError(f"record is not JSON-serialisable: {type(e).__name__}") from None
        if len(new_raw) > MAX_RECORD_BYTES:
            raise InvalidRecordError(f"record is {len(new_raw)} bytes, over the limit of {MAX_RECORD_BYTES}")
        new_terms = _indexed(search_terms(record))
        for _ in range(_INDEX_RETRIES):
            try:
                old_raw, cur = self.kv.get(self.ns, rid)
                old = _decode(old_raw)
            except RecordNotFoundError:
                old_raw, old, cur = None, None, 0
            if create_only and cur:
                self._audit(who, "create", rid, "exists")
                raise AlreadyExists(f"record exists (blind index {self.kv.blind_index(self.ns, rid).hex()})")
            if expected_version is not None and expected_version != cur:
                self._audit(who, "put", rid, "precondition-failed")
                raise PreconditionFailed(f"expected version {expected_version}, current version is {cur}")
            if skip_identical and old_raw == new_raw:
                self._audit(who, "put", rid, "unchanged")
                return PutResult(rid, cur, "unchanged")
            old_terms = _indexed(search_terms(old)) if old is not None else set()
            status = "created" if cur == 0 else "updated"
            try:
                version = self._write(who, "put", rid, status, put=(new_raw, cur),
                                      add=new_terms - old_terms, remove=old_terms - new_terms)
            except ConflictError:
                continue  # the record changed meanwhile: redo from fresh reads
            return PutResult(rid, version, status)
        self._audit(who, "put", rid, "conflict")
        raise PreconditionFailed(f"record stayed contended ({_INDEX_RETRIES} tries)")

    def delete(self, who: str, rid: str, *, expected_version: int | None = None) -> None:
        """Delete a record and its search postings.

        Raises:
            RecordNotFoundError, PreconditionFailed, InvalidRecordError.
        """
        check_record_id(rid)
        cur, terms = self._delete_target(who, rid, expected_version)
        for _ in range(_INDEX_RETRIES):
            try:
                self._write(who, "delete", rid, "ok", delete=cur, remove=terms)
                return
            except ConflictError:
                pass
            except RecordNotFoundError:
                self._audit(who, "delete", rid, "not-found")
                raise
            cur, terms = self._delete_target(who, rid, expected_version)  # fresh reads for the next try
        self._audit(who, "delete", rid, "conflict")
        raise PreconditionFailed("record changed concurrently; re-read and retry")

    def _delete_target(self, who: str, rid: str,
                       expected_version: int | None) -> tuple[int | None, set[tuple[str, str]]]:
        """Read ``rid`` for a delete: its current version and search postings, or ``(None, set())``
        for a tampered row (which may still be deleted, with no version check).

        Raises (after auditing the refusal): RecordNotFoundError, PreconditionFailed.
        """
        try:
            raw, cur = self.kv.get(self.ns, rid)
            terms = _indexed(search_terms(_decode(raw)))
        except RecordNotFoundError:
            self._audit(who, "delete", rid, "not-found")
            raise
        except RecordTamperedError:
            return None, set()
        if expected_version is not None and expected_version != cur:
            self._audit(who, "delete", rid, "precondition-failed")
            raise PreconditionFailed(f"expected version {expected_version}, current version is {cur}")
        return cur, terms

    def _write(self, who: str, op: str, rid: str, outcome: str, *,
               put: tuple[bytes, int] | None = None, delete: int | None | bool = False,
               add: set[tuple[str, str]] = frozenset(), remove: set[tuple[str, str]] = frozenset()) -> int:
        """Atomically: write (CAS on ``put[1]``) or delete (CAS on ``delete`` unless None) the
        record, add/remove its postings and stage the audit entry; group-committed with
        concurrent writers. Returns the new version (0 for a delete).

        Raises:
            ConflictError: the record's version changed (nothing written).
            RecordNotFoundError: a delete found no row.
        """
        bi = self.kv.blind_index(self.ns, rid)

        def unit() -> int:
            version = 0
            if put is not None:
                version = self.kv.put_many(self.ns, [(rid, put[0], put[1])])[0]
            elif delete is not False:
                ev = delete if isinstance(delete, int) and not isinstance(delete, bool) else None
                if not self.kv.delete(self.ns, rid, expected_version=ev):
                    raise RecordNotFoundError("no such record")
            self.index.remove(rid, sorted(_term(t) for t in remove))
            self.index.add(rid, sorted(_term(t) for t in add))
            if self.audit is not None:
                self.audit.stage(AuditLog.body(who, op, bi, outcome))  # last: advances the chain
            return version

        if self.audit is None:
            with self.index.store.transaction():
                return unit()
        return self.audit.committer.run(unit)

    # -- many records ---------------------------------------------------------------------

    def list_ids(self, who: str, *, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """A page of record ids and the cursor of the next page (None at the end)."""
        limit = max(1, min(limit, MAX_PAGE))
        ids, nxt = self.kv.list(self.ns, after=cursor, limit=limit)
        self._audit(who, "list", None, f"ok:{len(ids)}")
        return ids, nxt

    def search(self, who: str, criteria: Mapping[str, str], *,
               limit: int = MAX_PAGE) -> list[tuple[str, dict[str, Any]]]:
        """``(id, record)`` of the records matching every ``field=value`` exactly (after
        :func:`normalise`), at most ``limit`` (1..:data:`MAX_PAGE`), in id order.

        Raises:
            InvalidRecordError: no criteria, or a field outside :data:`SEARCH_FIELDS`.
        """
        return [(rid, rec) for rid, rec, _ in self.search_hits(who, criteria, limit=limit)]

    def search_hits(self, who: str, criteria: Mapping[str, str], *,
                    limit: int = MAX_PAGE) -> list[tuple[str, dict[str, Any], int]]:
        """As :meth:`search`, with each record's current version: ``(id, record, version)``.

        Raises:
            InvalidRecordError: no criteria, or a field outside :data:`SEARCH_FIELDS`.
        """
        if not criteria:
            raise InvalidRecordError("search needs at least one field")
        bad = sorted(set(criteria) - set(SEARCH_FIELDS))
        if bad:
            raise InvalidRecordError(f"cannot search on {bad}; searchable: {list(SEARCH_FIELDS)}")
        want = {(f, normalise(v)) for f, v in criteria.items()}
        lookups = set()
        for f, v in want:
            if f == "identifier" and "|" in v:
                lookups.add((f, v.rsplit("|", 1)[1]))
            elif f in INDEXED_FIELDS:
                lookups.add((f, v))
        if not lookups:
            raise InvalidRecordError(
                f"search needs at least one of {list(INDEXED_FIELDS)} (gender only narrows a search)"
            )
        candidates: set[str] | None = None
        for f, v in sorted(lookups):
            ids = self.index.lookup(_term((f, v)))
            candidates = ids if candidates is None else candidates & ids
            if not candidates:
                break
        out: list[tuple[str, dict[str, Any], int]] = []
        limit = max(1, min(limit, MAX_PAGE))
        for rid in sorted(candidates or ()):
            if len(out) >= limit:
                break
            try:
                raw, version = self.kv.get(self.ns, rid)
            except RecordNotFoundError:
                continue  # stale index entry (superset by design)
            rec = _decode(raw)
            if want <= search_terms(rec):
                out.append((rid, rec, version))
                self._audit(who, "search-hit", rid, "ok")
        self._audit(who, "search", None, f"ok:{len(out)}")
        return out

    def batch(self, who: str, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Upsert many records, skipping byte-identical ones; one result dict per item
        (``{"id", "status": created|updated|unchanged|failed, "version"?, "error"?}``).

        Not atomic: each item is its own transaction (a failed item does not undo the others).
        The shape of every item is checked before anything is written, so a malformed batch
        writes nothing.

        Raises:
            InvalidRecordError: more than :data:`MAX_BATCH` items, or item ``i``'s id is not a
                non-empty string or its record is not a JSON object (message names ``i``).
        """
        items = list(items)
        check_batch_shape(items)
        results: list[dict[str, Any]] = []
        for rid, rec in items:
            try:
                r = self.put(who, rid, rec, skip_identical=True)
                results.append({"id": rid, "status": r.status, "version": r.version})
            except (RecordError, ValueError) as e:
                results.append({"id": rid, "status": "failed", "error": str(e)})
        return results

def check_batch_shape(items: list[tuple[Any, Any]]) -> None:
    """Check a batch's shape before any write: at most :data:`MAX_BATCH` items, each id a
    non-empty string and each record a JSON object (a mapping).

    Raises:
        InvalidRecordError: naming the first bad item's index (0-based) and what was wrong.
    """
    if len(items) > MAX_BATCH:
        raise InvalidRecordError(f"batch has {len(items)} items, at most {MAX_BATCH} are allowed")
    for i, (rid, rec) in enumerate(items):
        if not isinstance(rid, str) or not rid:
            raise InvalidRecordError(f"batch item {i}: id must be a non-empty string")
        if not isinstance(rec, Mapping):
            got = "null" if rec is None else type(rec).__name__
            raise InvalidRecordError(f"batch item {i}: record must be a JSON object, got {got}")


def _term(t: tuple[str, str]) -> str:
    return f"{t[0]}={t[1]}"


def _indexed(terms: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(f, v) for f, v in terms if f in INDEXED_FIELDS and not (f == "identifier" and "|" in v)}


class EngineKV:
    """:class:`KV` over :class:`safehold.records.engine.RecordEngine`.

    ``write_lock`` (a lock shared with the :class:`~safehold.records.audit.AuditLog`) serialises
    this process's write transactions before they reach SQLite, whose busy handler would
    otherwise sleep-poll for its single write lock and inflate tail latency.

    Listing uses :meth:`RecordEngine.list_page` in blind-index order (the cursor is the last
    row's blind index, hex); a row that fails authentication is left out of the page and logged
    by blind index (it stays an error through :meth:`get`), so one tampered row never hides the
    others.
    """

    def __init__(self, engine: Any, *, write_lock: Any = None):
        self.engine = engine
        self._wlock = write_lock if write_lock is not None else contextlib.nullcontext()

    def get(self, namespace: str, key: str) -> tuple[bytes, int]:
        """See :meth:`KV.get`."""
        return self.engine.get(namespace, key)

    def put(self, namespace: str, key: str, value: bytes, *, expected_version: int) -> int:
        """See :meth:`KV.put`."""
        with self._wlock:
            return self.engine.put(namespace, key, value, expected_version=expected_version)

    def put_many(self, namespace: str, items: list[tuple[str, bytes, int]]) -> list[int]:
        """See :meth:`KV.put_many`."""
        with self._wlock:
            return self.engine.put_many(namespace, items, max_retries=0)

    def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """See :meth:`KV.delete`."""
        with self._wlock:
            return self.engine.delete(namespace, key, expected_version=expected_version)

    def blind_index(self, namespace: str, key: str) -> bytes:
        """See :meth:`KV.blind_index` (the engine's 16-byte row index)."""
        return self.engine.row_index(namespace, key)

    def list(self, namespace: str, *, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """See :meth:`KV.list`.

        Raises:
            InvalidRecordError: ``after`` is not a cursor this method returned.
        """
        try:
            start = bytes.fromhex(after) if after else None
        except ValueError:
            raise InvalidRecordError("cursor is not one returned by a previous page") from None
        page = self.engine.list_page(namespace, after=start, limit=limit, skip_tampered=True)
        for e in page.tampered:
            log.warning("list: a row failed authentication and was left out: %s", e)
        return page.keys, (page.next_after.hex() if page.next_after else None)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RecordError("stored record is not JSON (written by another tool?)") from None
    if not isinstance(obj, dict):
        raise RecordError("stored record is not a JSON object")
    return obj
