"""Access audit for the records service: an append-only, hash-chained log in the untrusted store.

Each entry records **who** (the authenticated principal), **what** (operation and HTTP-level
outcome), **which record** (only its blind index, hex — never the record id or content) and
**when** (UTC, RFC 3339). Entries are stored as canonical JSON (sorted keys, no spaces, UTF-8)
in namespace :data:`AUDIT_NAMESPACE` under an 8-byte big-endian sequence number, so a store
scan returns them in order.

Chain: ``hash_n = SHA-256(canonical JSON of entry_n)`` where ``entry_n["prev"]`` is
``hash_{n-1}`` (hex; 64 zeros for the first entry). With a MAC key (derived inside the TEE from
the attested keyset), ``entry_n["mac"] = HMAC-SHA256(key, hash_n)`` (RFC 2104), so the database
operator can neither edit an entry nor rebuild the chain; without one, editing any entry breaks
every later ``prev``. :meth:`AuditLog.verify` names the first bad entry.

Several service replicas may append to one store: an append is a compare-and-set insert
(``expected_version=0``) of the next sequence numbers; on a conflict the replica reads the
entries that won and chains on top of them. Within a process, appends are group-committed: all
entries waiting while a write is in progress go into the next transaction together (each caller
returns only once its entry is durable).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from safehold.errors import AuditChainError, ConflictError
from safehold.store.base import Store

AUDIT_NAMESPACE = "records.audit"
GENESIS = "0" * 64
_SEQ_LEN = 8


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class AuditEntry:
    """One audit entry as stored.

    Attributes:
        seq: 0-based position in the chain.
        body: the JSON object (``who``, ``op``, ``record`` (blind index hex or None),
            ``outcome``, ``at``, ``prev``, optional ``mac``).
        hash: SHA-256 of the canonical body without ``mac``, 32 bytes.
    """

    seq: int
    body: dict[str, Any]
    hash: bytes


class GroupCommit:
    """Group commit: run concurrent callers' write units in one store transaction.

    A caller hands in a *unit* (a function that writes through the store); whichever caller
    finds no commit in progress becomes the leader, takes every waiting unit, and runs each in
    its own savepoint inside one transaction (a unit that raises is rolled back alone and gets
    its exception), then commits once. Every caller returns only after the commit that holds
    its unit is durable (or raises if that commit failed). One commit (one fsync on SQLite)
    thus serves a whole batch.

    Args:
        store: the store (its nested ``transaction()`` calls must become savepoints).
        lock: optional lock held around each transaction (serialises this process's writers
            before they reach SQLite's sleep-polling busy handler).
        on_abort: called after a failed commit (e.g. to forget tentative state).
    """

    def __init__(self, store: Store, *, lock: Any = None, on_abort: Any = None):
        self._store = store
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._on_abort = on_abort
        self._cond = threading.Condition()
        self._pending: list[Any] = []
        self._results: dict[int, tuple[bool, Any]] = {}
        self._enqueued = 0
        self._processed = 0
        self._flushing = False

    def run(self, unit: Any) -> Any:
        """Run ``unit()`` inside the next group transaction; return its result or raise its
        exception (or the commit's)."""
        with self._cond:
            ticket = self._enqueued
            self._enqueued += 1
            self._pending.append(unit)
            while ticket >= self._processed:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                batch, self._pending = self._pending, []
                base = self._processed
                self._cond.release()
                failed = (False, RuntimeError("group commit did not run"))
                outcomes: list[tuple[bool, Any]] = [failed] * len(batch)
                try:
                    outcomes = self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    for i, o in enumerate(outcomes):
                        self._results[base + i] = o
                    self._processed = base + len(batch)
                    self._cond.notify_all()
            ok, value = self._results.pop(ticket)
        if not ok:
            raise value
        return value

    def _commit(self, batch: list[Any]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._lock, self._store.transaction():
                for unit in batch:
                    try:
                        with self._store.transaction():  # a savepoint per unit
                            outcomes.append((True, unit()))
                    except Exception as e:  # noqa: BLE001 - handed to that unit's caller
                        outcomes.append((False, e))
        except BaseException as e:  # the commit itself failed: nothing of the batch is durable
            if self._on_abort is not None:
                self._on_abort()
            return [(False, e)] * len(batch)
        return outcomes


class AuditLog:
    """Append and verify the access audit chain.

    Args:
        store: the untrusted store (the same one the records live in).
        mac_key: optional 32-byte key for per-entry HMAC-SHA256; must come from the attested
            keyset.
        namespace: store namespace.
        write_lock: optional lock held around each write transaction (see :class:`GroupCommit`).

    Attributes:
        committer: the :class:`GroupCommit` its entries go through; the records repository puts
            its record writes through it too, so a write and its audit entry share one commit.
    """

    def __init__(self, store: Store, *, mac_key: bytes | None = None, namespace: str = AUDIT_NAMESPACE,
                 write_lock: Any = None):
        if mac_key is not None and len(mac_key) < 32:
            raise ValueError(f"audit MAC key must be at least 32 bytes, got {len(mac_key)}")
        self._store = store
        self._mac_key = mac_key
        self._ns = namespace
        self._next_seq: int | None = None
        self._prev = GENESIS
        self.committer = GroupCommit(store, lock=write_lock, on_abort=self.invalidate)

    # -- writing ----------------------------------------------------------------------------

    @staticmethod
    def body(who: str, op: str, record: bytes | None, outcome: str) -> dict[str, Any]:
        """The entry fields before chaining: who, op, record (blind index hex), outcome, at."""
        return {
            "who": who,
            "op": op,
            "record": record.hex() if record is not None else None,
            "outcome": outcome,
            "at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        }

    def append(self, who: str, op: str, record: bytes | None, outcome: str) -> AuditEntry:
        """Append one entry and return it once it is durable (group-committed with concurrent
        appends and record writes).

        Args:
            who: the principal (token subject or certificate subject), free text.
            op: operation name, e.g. ``"get"``, ``"put"``, ``"search"``.
            record: the record's blind index (bytes, shown as hex) or None (list/search).
            outcome: e.g. ``"ok"``, ``"not-found"``, ``"denied"``, ``"tampered"``.

        Raises:
            StoreUnavailableError: the store is down (the caller must then refuse the access).
        """
        body = self.body(who, op, record, outcome)
        return self.committer.run(lambda: self.stage(body))

    def stage(self, body: dict[str, Any]) -> AuditEntry:
        """Chain and write ``body`` as the next entry; call inside a store transaction (a
        :class:`GroupCommit` unit), as the unit's **last** write (the chain head advances here).
        If another replica took the sequence number, re-read the head and chain on top of it."""
        while True:
            if self._next_seq is None:
                self._load_head()
            assert self._next_seq is not None
            full = {**body, "seq": self._next_seq, "prev": self._prev}
            digest = hashlib.sha256(_canonical(full)).digest()
            if self._mac_key is not None:
                full["mac"] = hmac.new(self._mac_key, digest, hashlib.sha256).hexdigest()
            try:
                self._store.put(self._ns, self._next_seq.to_bytes(_SEQ_LEN, "big"), _canonical(full),
                                expected_version=0)
            except ConflictError:
                self._load_head()
                continue
            entry = AuditEntry(self._next_seq, full, digest)
            self._next_seq, self._prev = self._next_seq + 1, digest.hex()
            return entry

    def invalidate(self) -> None:
        """Forget the cached chain head (after a rolled-back transaction); it is re-read."""
        self._next_seq = None

    def _load_head(self) -> None:
        last = None
        after = None if self._next_seq is None else (self._next_seq - 1).to_bytes(_SEQ_LEN, "big")
        if after is not None:
            row = self._store.get(self._ns, after)
            last = row
        while True:
            rows = self._store.scan(self._ns, after=after, limit=500)
            if not rows:
                break
            last = rows[-1]
            after = last.key
        if last is None:
            self._next_seq, self._prev = 0, GENESIS
            return
        body = _parse(last.value, int.from_bytes(last.key, "big"))
        body.pop("mac", None)
        self._next_seq = int.from_bytes(last.key, "big") + 1
        self._prev = hashlib.sha256(_canonical(body)).hexdigest()

    # -- reading ----------------------------------------------------------------------------

    def entries(self) -> Iterator[AuditEntry]:
        """Yield every entry in order (not verified; see :meth:`verify`).

        Raises:
            AuditChainError: an entry is not valid JSON.
        """
        for row in self._store.scan_all(self._ns):
            seq = int.from_bytes(row.key, "big")
            body = _parse(row.value, seq)
            plain = {k: v for k, v in body.items() if k != "mac"}
            yield AuditEntry(seq, body, hashlib.sha256(_canonical(plain)).digest())

    def verify(self) -> int:
        """Check the whole chain and return the number of entries.

        Raises:
            AuditChainError: names the first bad entry (sequence gap, wrong ``seq``, broken
                ``prev`` link, missing or wrong MAC).
        """
        prev = GENESIS
        n = 0
        for e in self.entries():
            if e.seq != n or e.body.get("seq") != n:
                raise AuditChainError(f"audit entry {n}: sequence broken (found entry {e.seq})")
            if e.body.get("prev") != prev:
                raise AuditChainError(f"audit entry {n}: prev hash does not match entry {n - 1}")
            if self._mac_key is not None:
                want = hmac.new(self._mac_key, e.hash, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(str(e.body.get("mac", "")), want):
                    raise AuditChainError(f"audit entry {n}: MAC missing or wrong (entry edited)")
            prev = e.hash.hex()
            n += 1
        return n


def _parse(raw: bytes, seq: int) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AuditChainError(f"audit entry {seq}: not valid JSON") from None
    if not isinstance(body, dict):
        raise AuditChainError(f"audit entry {seq}: not a JSON object")
    return body
