"""Access audit for the records service: an append-only, hash-chained log in the untrusted store.

Each entry records **who** (the authenticated principal), **what** (operation and HTTP-level
outcome), **which records** (only blind indexes, hex — never a record id or content: ``record``
for one, ``hits`` for the records a search returned or a batch wrote with one outcome) and
**when** (UTC, RFC 3339). Entries are stored as canonical JSON (sorted keys, no spaces, UTF-8)
in namespace :data:`AUDIT_NAMESPACE` under an 8-byte big-endian sequence number, so a store
scan returns them in order.

Chain: ``hash_n = SHA-256(canonical JSON of entry_n)`` where ``entry_n["prev"]`` is
``hash_{n-1}`` (hex; 64 zeros for the first entry). With a MAC key (derived inside the TEE from
the attested keyset), ``entry_n["mac"] = HMAC-SHA256(key, hash_n)`` (RFC 2104), so the database
operator can neither edit an entry nor rebuild the chain; without one, editing any entry breaks
every later ``prev``. :meth:`AccessAuditLog.verify` names the first bad entry.

Authenticated head: every transaction that appends entries also rewrites one **head** row
(namespace ``<namespace>.head``, key ``b"head"``) once, after its last entry: canonical JSON
``{"seq": n, "hash": hash_n hex, "mac": HMAC-SHA256(key, "safehold/records/audit-head/v1" || 0x00
|| canonical {"seq", "hash"})}``. A chain alone cannot show that its *end* is missing (deleting
the last entries leaves a valid shorter chain); the head can: :meth:`AccessAuditLog.check_head` (run at
service start-up and before the first append) and :meth:`AccessAuditLog.verify` refuse a log whose
authenticated head names an entry that is missing or different ("audit log truncated: … entry 24
… is missing"), and a log with entries but no head. While the check fails, every append raises
:class:`~safehold.errors.AuditChainError` — the records service then refuses every audited
access (fail closed) — until an admin calls :meth:`AccessAuditLog.reseal`, which appends an entry
recording the problem and writes a fresh head. Over a
:class:`~safehold.freshness.store.FreshStore` the entries and the head are rows of the same
freshness journal entry as the writes they audit, so the head *is* anchored with the freshness
digest: rolling the whole database back (head and entries together) is then refused at
start-up; without freshness it is not detectable from the database alone.

**Writes and reads are audited differently** (issue 17):

* a write's entry is staged in the write's own transaction (:meth:`AccessAuditLog.stage`): the
  write and its entry are durable together or not at all — a crash never loses a write's entry;
* a read's entry is **buffered** (:meth:`AccessAuditLog.note`, one entry per request, a search's
  hits in one entry) and a background thread flushes the buffer every ``flush_seconds``
  (default 0.05 s) as one group-committed transaction (one head update, one fsync, one
  freshness anchor advance for all of them). **Durability rule**: a read is answered only
  while no buffered entry is older than ``max_lag`` (default 0.25 s); otherwise it waits for the
  flush (and is refused, 503, after ``stall_timeout``). So a crash loses at most the entries of
  reads answered within one ``max_lag`` window (the last 250 ms before the crash, or before
  the flush stalled); a flush that fails (store down, head check failing) makes every further
  read fail closed until a flush succeeds.

Retention (:meth:`AccessAuditLog.export_segment`, :meth:`AccessAuditLog.seal`): an admin exports
the oldest entries as a segment (the stored JSON lines, in order) and then seals it: in one
transaction the entries are deleted, a **base** row (``<namespace>.head``/``b"base"``, MAC'd:
the sequence number and hash the live chain continues from) moves past them, a **seal record**
(namespace ``<namespace>.seals``, never dropped: first and last sequence number, the last
entry's hash, SHA-256 of the segment, MAC'd) is written and an ``audit-seal`` entry carrying the
same digest is chained. :meth:`AccessAuditLog.verify_segment` checks an exported segment
against its seal record. Verification is **checkpointed**: :meth:`AccessAuditLog.verify`
continues from the last verified entry (a MAC'd ``verified`` row), so it costs O(new entries);
``full=True`` walks the live chain from the base. Rows behind the checkpoint are guarded by the
freshness layer (every read and its background audit), not re-hashed.

Several service replicas may append to one store: an append is a compare-and-set insert
(``expected_version=0``) of the next sequence number plus a compare-and-set of the head; on a
conflict the replica re-reads the head and chains on top of the entries that won. Replicas
that should not contend on one head row each get their own chain (``namespace``
``records.audit/<replica>``).

(Not to be confused with the key broker's audit log, :mod:`safehold.broker.audit`: a different
log with its own design.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from safehold.errors import (
    AuditChainError,
    AuditSegmentRefusedError,
    ConflictError,
    SafeholdError,
    StoreUnavailableError,
)
from safehold.jsontypes import JSONObject
from safehold.records.commit import Committer, GroupCommit
from safehold.store.base import Store
from safehold.store.errors import StoreClosedError

__all__ = ["AUDIT_NAMESPACE", "BASE_KEY", "FLUSH_SECONDS", "FRESH_FLUSH_SECONDS", "GENESIS", "HEAD_KEY",
           "MAX_LAG_SECONDS", "VERIFIED_KEY", "AccessAuditEntry", "AccessAuditLog", "SealRecord"]

AUDIT_NAMESPACE = "records.audit"
GENESIS = "0" * 64
_SEQ_LEN = 8
#: Row key of the authenticated head in namespace ``<namespace>.head``.
HEAD_KEY = b"head"
#: Row key of the live chain's start (after sealed segments were dropped), same namespace.
BASE_KEY = b"base"
#: Row key of the last verified entry (``verify``'s checkpoint), same namespace.
VERIFIED_KEY = b"verified"
_HEAD_DOMAIN = b"safehold/records/audit-head/v1\x00"
_BASE_DOMAIN = b"safehold/records/audit-base/v1\x00"
_VERIFIED_DOMAIN = b"safehold/records/audit-verified/v1\x00"
_SEAL_DOMAIN = b"safehold/records/audit-seal/v1\x00"
#: Conflicts an append tolerates; more means the store contradicts itself (corrupt pages).
_MAX_CONFLICTS = 64
#: Read-audit flush interval, seconds.
FLUSH_SECONDS = 0.05
#: The same over a FreshStore, where every flush is also an anchor advance (docs/freshness.md).
FRESH_FLUSH_SECONDS = 0.1
#: A read is answered only while no buffered read entry is older than this (seconds).
MAX_LAG_SECONDS = 0.25
#: A read waits at most this long for a stalled flush, then is refused (StoreUnavailableError).
STALL_TIMEOUT = 5.0
#: Most read entries one flush writes (a larger buffer is flushed in several transactions).
_MAX_FLUSH = 2000
log = logging.getLogger("safehold.records")


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class AccessAuditEntry:
    """One access-audit entry as stored.

    Attributes:
        seq: 0-based position in the chain.
        body: the JSON object (``who``, ``op``, ``record`` (blind index hex or None),
            optional ``hits`` (blind indexes hex), ``outcome``, ``at``, ``prev``, optional
            ``mac``).
        hash: SHA-256 of the canonical body without ``mac``, 32 bytes.
    """

    seq: int
    body: dict[str, Any]
    hash: bytes


@dataclass(frozen=True)
class SealRecord:
    """What stays in the database of a sealed (exported, dropped) segment.

    Attributes:
        first, last: sequence numbers of its first and last entry.
        last_hash: hex SHA-256 of its last entry (the live chain's ``prev`` after it).
        sha256: hex SHA-256 of the exported segment bytes (:meth:`AccessAuditLog.export_segment`).
    """

    first: int
    last: int
    last_hash: str
    sha256: str


class AccessAuditLog:
    """Append and verify the access audit chain of the records service.

    Args:
        store: the untrusted store (the same one the records live in).
        committer: the :class:`~safehold.records.commit.GroupCommit` its appends go through;
            default: one of its own (a log used alone). A log that audits a
            :class:`~safehold.records.repository.PatientRepository` must get the repository's,
            so that a write and its audit entry share one commit (and one writer thread).
        mac_key: optional 32-byte key for per-entry HMAC-SHA256; must come from the attested
            keyset.
        namespace: store namespace.
        flush_seconds: read-audit flush interval (seconds, > 0).
        max_lag: the durability bound of read entries (seconds, >= ``flush_seconds``; module
            docstring).
        stall_timeout: how long a read waits for a stalled flush before it is refused (s).
        checkpointed: :meth:`verify` continues from its last checkpoint. Only over a
            :class:`~safehold.freshness.store.FreshStore`, which refuses an edited entry behind
            the checkpoint on every read and in its background audit; without one every
            verify walks the whole live chain.

    Attributes:
        committer: the committer in use.

    Raises:
        ValueError: a MAC key under 32 bytes, a committer on another store, or bad intervals.
    """

    def __init__(self, store: Store, committer: Committer | None = None, *,
                 mac_key: bytes | None = None, namespace: str = AUDIT_NAMESPACE,
                 flush_seconds: float = FLUSH_SECONDS, max_lag: float = MAX_LAG_SECONDS,
                 stall_timeout: float = STALL_TIMEOUT, checkpointed: bool = False) -> None:
        if mac_key is not None and len(mac_key) < 32:
            raise ValueError(f"audit MAC key must be at least 32 bytes, got {len(mac_key)}")
        if committer is not None and committer.store is not store:
            raise ValueError("the audit log's committer writes to another store")
        if not 0 < flush_seconds <= max_lag:
            raise ValueError(f"need 0 < flush_seconds <= max_lag, got {flush_seconds}, {max_lag}")
        self._store = store
        self._mac_key = mac_key
        self._ns = namespace
        self._head_ns = f"{namespace}.head"
        self._seal_ns = f"{namespace}.seals"
        self._next_seq: int | None = None
        self._prev = GENESIS
        self._head_version = 0
        self.committer = committer if committer is not None else GroupCommit(store)
        self.committer.on_abort(self.invalidate)
        self._flush_seconds = flush_seconds
        self._max_lag = max_lag
        self._stall_timeout = stall_timeout
        self._cond = threading.Condition()
        self._pending: list[tuple[float, JSONObject]] = []
        self._inflight_oldest: float | None = None
        self._inflight_n = 0
        self._failure: BaseException | None = None
        self._flusher: threading.Thread | None = None
        self._flushed = 0  # read entries made durable (a counter for waiters and tests)
        self._checkpointed = checkpointed

    # -- writing ----------------------------------------------------------------------------

    @staticmethod
    def body(who: str, op: str, record: bytes | None, outcome: str,
             hits: Sequence[bytes] | None = None) -> JSONObject:
        """The entry fields before chaining: who, op, record (blind index hex), outcome, at,
        and ``hits`` (blind indexes hex, in the order returned) when given."""
        b: JSONObject = {
            "who": who,
            "op": op,
            "record": record.hex() if record is not None else None,
            "outcome": outcome,
            "at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        }
        if hits is not None:
            b["hits"] = [h.hex() for h in hits]
        return b

    @staticmethod
    def grouped(who: str, op: str, items: Sequence[tuple[bytes, str]]) -> list[JSONObject]:
        """The entries of one batch: one per outcome, in order of first appearance — a single
        record as :meth:`body` gives it (``record``, ``outcome``), several as one entry with
        ``record`` null, ``outcome`` ``"<outcome>:<count>"`` and the blind indexes in ``hits``
        (the shape a search's entry has). Each item stays named; a 100-record import costs one
        entry, not 100 (issue 17: ~300 bytes of database and one MAC'd chain link per record).

        Args:
            items: ``(blind index, outcome)`` per item, in batch order.
        """
        by: dict[str, list[bytes]] = {}
        for key, outcome in items:
            by.setdefault(outcome, []).append(key)
        return [AccessAuditLog.body(who, op, keys[0], outcome) if len(keys) == 1 else
                AccessAuditLog.body(who, op, None, f"{outcome}:{len(keys)}", hits=keys)
                for outcome, keys in by.items()]

    def append(self, who: str, op: str, record: bytes | None, outcome: str) -> AccessAuditEntry:
        """Append one entry and return it once it is durable (group-committed with concurrent
        appends and record writes). For administrative and denied accesses; reads use
        :meth:`note`, writes :meth:`stage`.

        Args:
            who: the principal (token subject or certificate subject), free text.
            op: operation name, e.g. ``"get"``, ``"put"``, ``"search"``.
            record: the record's blind index (bytes, shown as hex) or None (list/search).
            outcome: e.g. ``"ok"``, ``"not-found"``, ``"denied"``, ``"tampered"``.

        Raises:
            StoreUnavailableError: the store is down (the caller must then refuse the access).
            AuditChainError: the head check fails.
        """
        body = self.body(who, op, record, outcome)
        return self.committer.run(lambda: self.stage(body))

    def note(self, who: str, op: str, record: bytes | None, outcome: str,
             hits: Sequence[bytes] | None = None) -> None:
        """Buffer a read's entry (one per request); it is chained and made durable by the next
        flush, within ``flush_seconds``. Returns at once unless a buffered entry is older than
        ``max_lag`` (then waits for the flush: the durability rule in the module docstring).

        Raises:
            AuditChainError / StoreUnavailableError: the last flush failed (the read must be
                refused: fail closed), or the flush stalled past ``stall_timeout``.
        """
        body = self.body(who, op, record, outcome, hits)
        now = time.monotonic()
        if self._next_seq is None:
            # the chain position is unknown (start, or a rolled-back commit): the head check
            # has not run since, so this read waits for a flush that runs it (fail closed)
            with self._cond:
                self._raise_failure()
                self._pending.append((now, body))
            self.flush(self._stall_timeout)
            return
        with self._cond:
            self._raise_failure()
            self._pending.append((now, body))
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_loop, name="safehold-audit-flush",
                                                 daemon=True)
                self._flusher.start()
            if len(self._pending) >= _MAX_FLUSH:
                self._cond.notify_all()
            deadline = now + self._stall_timeout
            while (oldest := self._oldest()) is not None and time.monotonic() - oldest > self._max_lag:
                self._raise_failure()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailableError(
                        f"read audit not durable for {time.monotonic() - oldest:.1f} s (the flush "
                        "stalled); reads are refused until it succeeds")
                self._cond.wait(min(left, self._flush_seconds))

    def _oldest(self) -> float | None:
        """Time of the oldest read entry not yet durable (buffered or being flushed); lock held."""
        if self._inflight_oldest is not None:
            return self._inflight_oldest
        return self._pending[0][0] if self._pending else None

    def _raise_failure(self) -> None:
        f = self._failure
        if f is not None:
            if isinstance(f, AuditChainError):
                raise AuditChainError(f"read audit cannot be written: {f}")
            if isinstance(f, SafeholdError) and not isinstance(f, (StoreUnavailableError, StoreClosedError)):
                # a finding (e.g. a freshness RowDeletedError: audit rows cut by the DBA) keeps
                # its type, so the HTTP layer answers it as such (409 stale-data)
                raise f.with_traceback(None)
            raise StoreUnavailableError(f"read audit cannot be written ({type(f).__name__}); "
                                        "reads are refused until it can")

    def _flush_loop(self) -> None:
        """The flusher thread: every ``flush_seconds`` one transaction for the buffered reads."""
        idle = 0.0
        while True:
            with self._cond:
                if not self._pending:
                    if idle >= 30.0:
                        self._flusher = None
                        return
                    self._cond.wait(self._flush_seconds)
                    idle += self._flush_seconds
                    continue
                idle = 0.0
                wait = self._pending[0][0] + self._flush_seconds - time.monotonic()
                if wait > 0 and len(self._pending) < _MAX_FLUSH:
                    self._cond.wait(wait)
            self._flush_once()
            if isinstance(self._failure, StoreClosedError):
                with self._cond:  # the store is gone: nothing can be written any more
                    self._flusher = None
                return

    def _flush_once(self) -> bool:
        """Flush up to ``_MAX_FLUSH`` buffered entries in one transaction; True if it wrote."""
        with self._cond:
            if not self._pending or self._inflight_oldest is not None:
                return False
            batch, self._pending = self._pending[:_MAX_FLUSH], self._pending[_MAX_FLUSH:]
            self._inflight_oldest, self._inflight_n = batch[0][0], len(batch)
        try:
            self.committer.run(lambda: self.stage_many([b for _, b in batch]))
        except BaseException as e:  # noqa: BLE001 - recorded; reads fail closed until a retry works
            with self._cond:
                self._pending[:0] = batch  # keep them: retried by the next flush
                self._inflight_oldest, self._inflight_n = None, 0
                first = self._failure is None
                self._failure = e
                self._cond.notify_all()
            if first and not isinstance(e, StoreClosedError):
                log.error("read audit flush failed, refusing reads until it succeeds: %s", e)
            if not isinstance(e, Exception):
                raise
            if not isinstance(e, StoreClosedError):
                time.sleep(self._flush_seconds)
            return False
        with self._cond:
            self._inflight_oldest, self._inflight_n = None, 0
            self._flushed += len(batch)
            if self._failure is not None:
                log.warning("read audit flush works again")
            self._failure = None
            self._cond.notify_all()
        return True

    def flush(self, timeout: float = 10.0) -> None:
        """Make every read entry buffered so far durable (service stop, ``verify``, tests).

        Raises:
            AuditChainError / StoreUnavailableError: the flush failed or did not finish within
                ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:  # FIFO: once this many more are durable, all present now are
            target = self._flushed + len(self._pending) + self._inflight_n
        while True:
            with self._cond:
                if not self._pending and self._inflight_oldest is None:
                    return
                if self._flushed >= target:
                    return
            if not self._flush_once():
                with self._cond:
                    self._raise_failure()
                    if time.monotonic() > deadline:
                        raise StoreUnavailableError("read audit flush did not finish in time")
                    self._cond.wait(0.01)

    def stage(self, body: JSONObject) -> AccessAuditEntry:
        """Chain and write ``body`` as the next entry and advance the authenticated head (one
        savepoint for both); call inside a store transaction (a :class:`GroupCommit` unit), as
        the unit's **last** write. If another replica took the sequence number, re-read the head
        and chain on top of it.

        Raises:
            AuditChainError: the head check fails (tail cut, head missing or forged, see
                :meth:`check_head`), or the store keeps contradicting the head (a sequence
                number is taken although the head says it is free: corrupt store).
        """
        return self.stage_many([body])[-1]

    def stage_many(self, bodies: Sequence[JSONObject]) -> list[AccessAuditEntry]:
        """As :meth:`stage` for several entries in order, with one head update after the last.

        Raises:
            ValueError: no bodies. AuditChainError: as :meth:`stage`.
        """
        if not bodies:
            raise ValueError("nothing to stage")
        conflicts = 0
        while True:
            if self._next_seq is None:
                self._load_head()
            assert self._next_seq is not None
            seq0 = seq = self._next_seq
            prev = self._prev
            out: list[AccessAuditEntry] = []
            try:
                with self._store.transaction():  # entries and head: all or nothing
                    for body in bodies:
                        full = {**body, "seq": seq, "prev": prev}
                        digest = hashlib.sha256(_canonical(full)).digest()
                        if self._mac_key is not None:
                            full["mac"] = hmac.new(self._mac_key, digest, hashlib.sha256).hexdigest()
                        self._store.put(self._ns, seq.to_bytes(_SEQ_LEN, "big"), _canonical(full),
                                        expected_version=0)
                        out.append(AccessAuditEntry(seq, full, digest))
                        prev, seq = digest.hex(), seq + 1
                    head_version = self._store.put(self._head_ns, HEAD_KEY,
                                                   self._head_value(seq - 1, prev),
                                                   expected_version=self._head_version)
            except ConflictError:
                conflicts += 1
                self._next_seq = None
                self._load_head()
                assert self._next_seq is not None  # _load_head sets it or raises
                if self._next_seq <= seq0 or conflicts >= _MAX_CONFLICTS:
                    # nobody advanced the head, yet a slot is taken (or endless contention):
                    # the store contradicts itself; never spin on it
                    self._next_seq = None
                    raise AuditChainError(
                        f"audit entry {seq0}: the store holds a row there although the "
                        f"authenticated head ends at entry {seq0 - 1} (store corrupt or edited; "
                        f"{conflicts} tries)"
                    ) from None
                continue
            self._next_seq, self._prev, self._head_version = seq, prev, head_version
            return out

    def invalidate(self) -> None:
        """Forget the cached chain head (after a rolled-back transaction); it is re-read."""
        self._next_seq = None

    # -- the authenticated rows (head, base, verified, seals) -----------------------------------

    def _entry_mac_ok(self, body: dict[str, Any], digest: bytes) -> bool:
        """Whether an entry's ``mac`` is HMAC-SHA256 of its hash ``digest`` under the attested
        MAC key (constant-time; True when the log runs without a MAC key)."""
        if self._mac_key is None:
            return True
        want = hmac.new(self._mac_key, digest, hashlib.sha256).hexdigest()
        return hmac.compare_digest(str(body.get("mac", "")), want)

    def _mac(self, domain: bytes, fields: dict[str, Any]) -> str | None:
        if self._mac_key is None:
            return None
        return hmac.new(self._mac_key, domain + _canonical(fields), hashlib.sha256).hexdigest()

    def _signed_value(self, domain: bytes, fields: dict[str, Any]) -> bytes:
        mac = self._mac(domain, fields)
        return _canonical({**fields, "mac": mac} if mac is not None else fields)

    def _read_signed(self, ns: str, key: bytes, domain: bytes, fields: tuple[str, ...],
                     what: str) -> tuple[dict[str, Any], int] | None:
        row = self._store.get(ns, key)
        if row is None:
            return None
        try:
            doc = json.loads(row.value)
            vals = {f: doc[f] for f in fields}
            if any(type(v) is not int or v < 0 for f, v in vals.items() if f in ("seq", "first", "last")):
                raise TypeError
            if any(not isinstance(v, str) for f, v in vals.items() if f not in ("seq", "first", "last")):
                raise TypeError
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            raise AuditChainError(f"audit {what}: not a valid record (edited?)") from None
        want = self._mac(domain, vals)
        if want is not None and not hmac.compare_digest(str(doc.get("mac", "")), want):
            raise AuditChainError(f"audit {what}: MAC missing or wrong (the row was edited or forged)")
        return vals, row.version

    def _head_value(self, seq: int, digest_hex: str) -> bytes:
        return self._signed_value(_HEAD_DOMAIN, {"seq": seq, "hash": digest_hex})

    def read_head(self) -> tuple[int, str, int] | None:
        """The authenticated head: ``(seq of the last entry, its hash hex, head row version)``,
        or None if there is no head row.

        Raises:
            AuditChainError: the head row is not valid JSON, lacks fields, or (with a MAC key)
                its MAC is missing or wrong.
        """
        got = self._read_signed(self._head_ns, HEAD_KEY, _HEAD_DOMAIN, ("seq", "hash"), "head")
        if got is None:
            return None
        return got[0]["seq"], got[0]["hash"], got[1]

    def read_base(self) -> tuple[int, str]:
        """Where the live chain starts: ``(seq of its first entry, the prev hash it names)``;
        ``(0, GENESIS)`` when nothing was sealed.

        Raises:
            AuditChainError: the base row is malformed or its MAC is wrong.
        """
        got = self._read_signed(self._head_ns, BASE_KEY, _BASE_DOMAIN, ("seq", "hash"), "base")
        return (0, GENESIS) if got is None else (got[0]["seq"], got[0]["hash"])

    def check_head(self) -> int:
        """Check that the log ends where the authenticated head says (O(1): two reads).

        Returns:
            the number of entries the head vouches for (0 for an empty log).

        Raises:
            AuditChainError: "audit log truncated: the authenticated head names entry N (hash …)
                as the last one, but it is missing" (the tail was cut), the entry there differs
                from the head's hash, entries exist but no head does, or the head itself is bad.
        """
        return self._check_against(self.read_head())

    def _check_against(self, head: tuple[int, str, int] | None) -> int:
        if head is None:
            if self._store.scan(self._ns, limit=1):
                raise AuditChainError(
                    "audit head missing: the log has entries but no authenticated head (the head "
                    "row was deleted, perhaps with the log's tail, or the log predates audit "
                    "heads); an admin may reseal it (POST /v1/audit/reseal)"
                )
            return 0
        seq, digest_hex, _ = head
        row = self._store.get(self._ns, seq.to_bytes(_SEQ_LEN, "big"))
        if row is None:
            raise AuditChainError(
                f"audit log truncated: the authenticated head names entry {seq} (hash "
                f"{digest_hex[:16]}…) as the last one, but it is missing: the log's tail was cut"
            )
        body = _parse(row.value, seq)
        body.pop("mac", None)
        got = hashlib.sha256(_canonical(body)).hexdigest()
        if got != digest_hex or body.get("seq") != seq:
            raise AuditChainError(
                f"audit entry {seq}: does not match the authenticated head (hash expected "
                f"{digest_hex[:16]}…, got {got[:16]}…): the log's tail was replaced"
            )
        return seq + 1

    def _load_head(self) -> None:
        """Load the append position from the authenticated head, checking it first."""
        head = self.read_head()
        n = self._check_against(head)
        if head is None:
            self._next_seq, self._prev, self._head_version = 0, GENESIS, 0
        else:
            self._next_seq, self._prev, self._head_version = n, head[1], head[2]

    def reseal(self, who: str) -> AccessAuditEntry:
        """Accept the log as it now is after a failed head check (admin action): verify the
        chain of the entries that exist, append an entry ``op = "audit-reseal"`` whose
        ``outcome`` records what the head check found, and write a fresh head over it.

        The evidence stays in the log (the reseal entry quotes the failed check); entries that
        were cut off are gone for good. Read entries still buffered are then flushed.

        Raises:
            AuditChainError: the remaining entries do not form a valid chain (an edited entry
                is not resealed over; restore the database from a backup instead).
        """
        def unit() -> AccessAuditEntry:
            try:
                self.check_head()
                problem = "head ok"
            except AuditChainError as e:
                problem = str(e)
            try:
                n, last = self._verify_chain(*self.read_base())
                row = self._store.get(self._head_ns, HEAD_KEY)
                self._next_seq, self._prev = n, last
                self._head_version = row.version if row is not None else 0
                body = self.body(who, "audit-reseal", None, f"resealed after entry {n - 1}: {problem}"[:600])
                return self.stage(body)
            except BaseException:
                self._next_seq = None  # never keep a position that skipped the head check
                raise

        entry = self.committer.run(unit)
        with self._cond:
            self._failure = None
        return entry

    # -- reading ----------------------------------------------------------------------------

    def entries(self, *, start: int = 0) -> Iterator[AccessAuditEntry]:
        """Yield every live entry from sequence number ``start`` on, in order (not verified;
        see :meth:`verify`).

        Raises:
            AuditChainError: an entry is not valid JSON.
        """
        after = (start - 1).to_bytes(_SEQ_LEN, "big") if start > 0 else None
        while True:
            rows = self._store.scan(self._ns, after=after, limit=500)
            for row in rows:
                seq = int.from_bytes(row.key, "big")
                body = _parse(row.value, seq)
                plain = {k: v for k, v in body.items() if k != "mac"}
                yield AccessAuditEntry(seq, body, hashlib.sha256(_canonical(plain)).digest())
            if len(rows) < 500:
                return
            after = rows[-1].key

    def _verify_chain(self, start: int, prev: str) -> tuple[int, str]:
        """Check every entry from ``start`` (whose ``prev`` must be ``prev``): sequence,
        ``prev`` link and MAC; return ``(next seq, last hash hex)``."""
        n = start
        for e in self.entries(start=start):
            if e.seq != n or e.body.get("seq") != n:
                raise AuditChainError(f"audit entry {n}: sequence broken (found entry {e.seq})")
            if e.body.get("prev") != prev:
                raise AuditChainError(f"audit entry {n}: prev hash does not match entry {n - 1}")
            if not self._entry_mac_ok(e.body, e.hash):
                raise AuditChainError(f"audit entry {n}: MAC missing or wrong (entry edited)")
            prev = e.hash.hex()
            n += 1
        return n, prev

    def _read_checkpoint(self, base: tuple[int, str]) -> tuple[int, str]:
        """The verified checkpoint ``(next seq, hash of the entry before it)`` if it is valid
        and still matches the stored entry, else the base."""
        got = self._read_signed(self._head_ns, VERIFIED_KEY, _VERIFIED_DOMAIN, ("seq", "hash"),
                                "verify checkpoint")
        if got is None or got[0]["seq"] < base[0]:
            return base
        seq, digest_hex = got[0]["seq"], got[0]["hash"]
        if seq == base[0]:
            return base
        row = self._store.get(self._ns, (seq - 1).to_bytes(_SEQ_LEN, "big"))
        if row is None:
            raise AuditChainError(f"audit entry {seq - 1}: verified before, now missing")
        body = _parse(row.value, seq - 1)
        body.pop("mac", None)
        if hashlib.sha256(_canonical(body)).hexdigest() != digest_hex:
            raise AuditChainError(f"audit entry {seq - 1}: differs from the verified checkpoint "
                                  "(edited after it was verified)")
        return seq, digest_hex

    def verify(self, *, full: bool | None = None) -> int:
        """Check the chain against the authenticated head; return the number of entries ever
        appended (sealed ones included).

        Checkpointed (a log built with ``checkpointed=True``, over a FreshStore): entries are
        verified from the last verified one (a MAC'd checkpoint row, itself re-checked against
        its entry), so a run costs O(entries appended since); ``full=True`` (the default
        without checkpoints) walks the whole live chain from the base. Buffered read entries are
        flushed first. The head is read first, so entries appended meanwhile (by this or
        another replica) do not count as a mismatch; the log must reach at least the head's
        entry, with its hash.

        Raises:
            AuditChainError: names the first bad entry (sequence gap, wrong ``seq``, broken
                ``prev`` link, missing or wrong MAC), or the missing tail ("audit log truncated:
                … entry N … is missing"), or a missing / forged head, base or checkpoint.
        """
        self.flush()
        head = self.read_head()
        self._check_against(head)
        base = self.read_base()
        if full is None:
            full = not self._checkpointed
        start = base if full else self._read_checkpoint(base)
        n, last = self._verify_chain(*start)
        if head is not None and n <= head[0]:
            raise AuditChainError(
                f"audit log truncated: the authenticated head names entry {head[0]} as the last "
                f"one, but the log ends at entry {n - 1}: entries {n}..{head[0]} are missing"
            )
        if (n, last) != start:
            value = self._signed_value(_VERIFIED_DOMAIN, {"seq": n, "hash": last})

            def unit() -> None:
                row = self._store.get(self._head_ns, VERIFIED_KEY)
                self._store.put(self._head_ns, VERIFIED_KEY, value,
                                expected_version=row.version if row is not None else 0)

            self.committer.run(unit)
        return n

    # -- retention ----------------------------------------------------------------------------

    def export_segment(self, through: int) -> tuple[bytes, int, int, str]:
        """The live entries from the base through ``through`` as a segment: the stored JSON
        values, one per line (``\\n``-terminated), in order. Nothing is changed.

        Returns:
            ``(segment bytes, first seq, last seq, hex SHA-256 of the bytes)``.

        Raises:
            AuditSegmentRefusedError: nothing to export (``through`` before the base or at /
                past the head: the newest entry is never sealed).
            AuditChainError: the log does not end where its authenticated head says (a
                deleted head, a cut tail), or an entry of the segment is not the one the chain
                vouches for (sequence, ``prev`` link, MAC, or the next live entry's ``prev``
                does not name the segment's last entry): tampering is never reported as a
                refused segment.
        """
        head = self.read_head()
        self._check_against(head)  # a deleted head / cut tail is a broken chain, not "empty"
        first, prev = self.read_base()
        if head is None or not first <= through < head[0]:
            last = head[0] if head is not None else -1
            why = ("the log is empty" if head is None
                   else f"entries before {first} are sealed already" if through < first
                   else f"the newest entry ({last}) stays live: --through at most {last - 1}")
            raise AuditSegmentRefusedError(f"audit export/seal: entry {through} is not sealable ({why}; "
                                  f"live entries {first}..{last})")
        lines: list[bytes] = []
        n = first
        linked = False  # the first live entry after the segment names the segment's last one
        for e in self.entries(start=first):
            if e.seq != n or e.body.get("seq") != n or e.body.get("prev") != prev:
                raise AuditChainError(f"audit entry {n}: chain broken, not exported")
            if e.seq > through:
                linked = True
                break
            if not self._entry_mac_ok(e.body, e.hash):
                raise AuditChainError(f"audit entry {n}: MAC missing or wrong (entry edited), not exported")
            lines.append(_canonical(e.body) + b"\n")
            prev, n = e.hash.hex(), n + 1
        if not linked:
            raise AuditChainError(f"audit seal: entries {n}..{through + 1} are missing")
        data = b"".join(lines)
        return data, first, through, hashlib.sha256(data).hexdigest()

    def seal(self, who: str, through: int, sha256_hex: str) -> SealRecord:
        """Drop the live entries from the base through ``through`` from the database after the
        caller exported them (:meth:`export_segment`) and names the export's SHA-256: in one
        transaction the entries go, the base moves past them, a seal record is written and an
        ``audit-seal`` entry with the digest is chained.

        Raises:
            AuditSegmentRefusedError: ``sha256_hex`` is not the digest of the segment as it is
                now (the log changed, or the export is another one), or as :meth:`export_segment`.
            AuditChainError: as :meth:`export_segment`.
        """
        def unit() -> SealRecord:
            data, first, last, digest = self.export_segment(through)
            if not hmac.compare_digest(digest, sha256_hex.lower()):
                raise AuditSegmentRefusedError(f"audit seal: segment {first}..{last} has SHA-256 "
                                      f"{digest[:16]}…, not the one given (the file is not the "
                                      f"export of entries {first}..{last}: edited, or it starts "
                                      f"before {first}, the oldest live entry; seal the file "
                                      f"`audit export --through {last}` writes now)")
            last_hash = hashlib.sha256(_canonical(
                {k: v for k, v in json.loads(data.splitlines()[-1]).items() if k != "mac"})).hexdigest()
            rec = {"first": first, "last": last, "hash": last_hash, "sha256": digest}
            self._store.put(self._seal_ns, first.to_bytes(_SEQ_LEN, "big"),
                            self._signed_value(_SEAL_DOMAIN, rec), expected_version=0)
            for seq in range(first, last + 1):
                self._store.delete(self._ns, seq.to_bytes(_SEQ_LEN, "big"))
            row = self._store.get(self._head_ns, BASE_KEY)
            self._store.put(self._head_ns, BASE_KEY,
                            self._signed_value(_BASE_DOMAIN, {"seq": last + 1, "hash": last_hash}),
                            expected_version=row.version if row is not None else 0)
            self.stage(self.body(who, "audit-seal", None,
                                 f"sealed entries {first}..{last} sha256={digest}"))
            return SealRecord(first, last, last_hash, digest)

        return self.committer.run(unit)

    def seals(self) -> list[SealRecord]:
        """Every seal record, oldest first (MACs checked).

        Raises:
            AuditChainError: a seal record is malformed or its MAC is wrong.
        """
        out = []
        for row in self._store.scan_all(self._seal_ns):
            got = self._read_signed(self._seal_ns, row.key, _SEAL_DOMAIN,
                                    ("first", "last", "hash", "sha256"), "seal record")
            assert got is not None
            v = got[0]
            out.append(SealRecord(v["first"], v["last"], v["hash"], v["sha256"]))
        return out

    def verify_segment(self, data: bytes) -> SealRecord:
        """Check an exported segment: its digest is in a seal record, its entries chain (and,
        with a MAC key, carry valid MACs) and end at the sealed hash.

        Raises:
            AuditChainError: no seal record names the digest, or the entries do not chain.
        """
        digest = hashlib.sha256(data).hexdigest()
        rec = next((s for s in self.seals() if hmac.compare_digest(s.sha256, digest)), None)
        if rec is None:
            raise AuditChainError("audit segment: no seal record names its SHA-256")
        prev: str | None = None
        n = rec.first
        for line in data.splitlines():
            body = _parse(line, n)
            plain = {k: v for k, v in body.items() if k != "mac"}
            h = hashlib.sha256(_canonical(plain)).digest()
            if body.get("seq") != n or (prev is not None and body.get("prev") != prev):
                raise AuditChainError(f"audit segment entry {n}: chain broken")
            if not self._entry_mac_ok(body, h):
                raise AuditChainError(f"audit segment entry {n}: MAC missing or wrong")
            prev, n = h.hex(), n + 1
        if n != rec.last + 1 or prev != rec.last_hash:
            raise AuditChainError("audit segment: does not end at the sealed entry")
        return rec


def _parse(raw: bytes, seq: int) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AuditChainError(f"audit entry {seq}: not valid JSON") from None
    if not isinstance(body, dict):
        raise AuditChainError(f"audit entry {seq}: not a JSON object")
    return body
