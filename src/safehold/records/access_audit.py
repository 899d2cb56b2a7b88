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
every later ``prev``. :meth:`AccessAuditLog.verify` names the first bad entry.

Authenticated head: every append also rewrites one **head** row (namespace
``<namespace>.head``, key ``b"head"``) in the same transaction: canonical JSON
``{"seq": n, "hash": hash_n hex, "mac": HMAC-SHA256(key, "safehold/records/audit-head/v1" || 0x00
|| canonical {"seq", "hash"})}``. A chain alone cannot show that its *end* is missing (deleting
the last entries leaves a valid shorter chain); the head can: :meth:`AccessAuditLog.check_head` (run at
service start-up and before the first append) and :meth:`AccessAuditLog.verify` refuse a log whose
authenticated head names an entry that is missing or different ("audit log truncated: … entry 24
… is missing"), and a log with entries but no head. While the check fails, every append raises
:class:`~safehold.errors.AuditChainError` — the records service then refuses every audited
access (fail closed) — until an admin calls :meth:`AccessAuditLog.reseal`, which appends an entry
recording the problem and writes a fresh head. Rolling back the *whole* database (head and
entries together) to an older state is not detectable from the database alone (DESIGN.md →
Storage, the same limit as for records).

Several service replicas may append to one store: an append is a compare-and-set insert
(``expected_version=0``) of the next sequence number plus a compare-and-set of the head; on a
conflict the replica re-reads the head and chains on top of the entries that won. Within a
process, appends are group-committed (:class:`~safehold.records.commit.GroupCommit`): all
entries waiting while a write is in progress go into the next transaction together, with the
record writes they audit (each caller returns only once its entry is durable).

(Not to be confused with the key broker's audit log, :mod:`safehold.broker.audit`: a different
log with its own design.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from safehold.errors import AuditChainError, ConflictError
from safehold.jsontypes import JSONObject
from safehold.records.commit import Committer, GroupCommit
from safehold.store.base import Store

__all__ = ["AUDIT_NAMESPACE", "GENESIS", "HEAD_KEY", "AccessAuditEntry", "AccessAuditLog"]

AUDIT_NAMESPACE = "records.audit"
GENESIS = "0" * 64
_SEQ_LEN = 8
#: Row key of the authenticated head in namespace ``<namespace>.head``.
HEAD_KEY = b"head"
_HEAD_DOMAIN = b"safehold/records/audit-head/v1\x00"
#: Conflicts an append tolerates; more means the store contradicts itself (corrupt pages).
_MAX_CONFLICTS = 64


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class AccessAuditEntry:
    """One access-audit entry as stored.

    Attributes:
        seq: 0-based position in the chain.
        body: the JSON object (``who``, ``op``, ``record`` (blind index hex or None),
            ``outcome``, ``at``, ``prev``, optional ``mac``).
        hash: SHA-256 of the canonical body without ``mac``, 32 bytes.
    """

    seq: int
    body: dict[str, Any]
    hash: bytes


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

    Attributes:
        committer: the committer in use.

    Raises:
        ValueError: a MAC key under 32 bytes, or a committer on another store.
    """

    def __init__(self, store: Store, committer: Committer | None = None, *,
                 mac_key: bytes | None = None, namespace: str = AUDIT_NAMESPACE) -> None:
        if mac_key is not None and len(mac_key) < 32:
            raise ValueError(f"audit MAC key must be at least 32 bytes, got {len(mac_key)}")
        if committer is not None and committer.store is not store:
            raise ValueError("the audit log's committer writes to another store")
        self._store = store
        self._mac_key = mac_key
        self._ns = namespace
        self._head_ns = f"{namespace}.head"
        self._next_seq: int | None = None
        self._prev = GENESIS
        self._head_version = 0
        self.committer = committer if committer is not None else GroupCommit(store)
        self.committer.on_abort(self.invalidate)

    # -- writing ----------------------------------------------------------------------------

    @staticmethod
    def body(who: str, op: str, record: bytes | None, outcome: str) -> JSONObject:
        """The entry fields before chaining: who, op, record (blind index hex), outcome, at."""
        return {
            "who": who,
            "op": op,
            "record": record.hex() if record is not None else None,
            "outcome": outcome,
            "at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        }

    def append(self, who: str, op: str, record: bytes | None, outcome: str) -> AccessAuditEntry:
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
        conflicts = 0
        while True:
            if self._next_seq is None:
                self._load_head()
            assert self._next_seq is not None
            seq = self._next_seq
            full = {**body, "seq": seq, "prev": self._prev}
            digest = hashlib.sha256(_canonical(full)).digest()
            if self._mac_key is not None:
                full["mac"] = hmac.new(self._mac_key, digest, hashlib.sha256).hexdigest()
            try:
                with self._store.transaction():  # entry and head: both or neither
                    self._store.put(self._ns, seq.to_bytes(_SEQ_LEN, "big"), _canonical(full),
                                    expected_version=0)
                    head_version = self._store.put(self._head_ns, HEAD_KEY,
                                                   self._head_value(seq, digest.hex()),
                                                   expected_version=self._head_version)
            except ConflictError:
                conflicts += 1
                self._next_seq = None
                self._load_head()
                assert self._next_seq is not None  # _load_head sets it or raises
                if self._next_seq <= seq or conflicts >= _MAX_CONFLICTS:
                    # nobody advanced the head, yet the slot is taken (or endless contention):
                    # the store contradicts itself; never spin on it
                    self._next_seq = None
                    raise AuditChainError(
                        f"audit entry {seq}: the store holds a row there although the authenticated "
                        f"head ends at entry {seq - 1} (store corrupt or edited; {conflicts} tries)"
                    ) from None
                continue
            entry = AccessAuditEntry(seq, full, digest)
            self._next_seq, self._prev, self._head_version = seq + 1, digest.hex(), head_version
            return entry

    def invalidate(self) -> None:
        """Forget the cached chain head (after a rolled-back transaction); it is re-read."""
        self._next_seq = None

    # -- the authenticated head -------------------------------------------------------------

    def _head_mac(self, seq: int, digest_hex: str) -> str | None:
        if self._mac_key is None:
            return None
        msg = _HEAD_DOMAIN + _canonical({"seq": seq, "hash": digest_hex})
        return hmac.new(self._mac_key, msg, hashlib.sha256).hexdigest()

    def _head_value(self, seq: int, digest_hex: str) -> bytes:
        head: dict[str, Any] = {"seq": seq, "hash": digest_hex}
        mac = self._head_mac(seq, digest_hex)
        if mac is not None:
            head["mac"] = mac
        return _canonical(head)

    def read_head(self) -> tuple[int, str, int] | None:
        """The authenticated head: ``(seq of the last entry, its hash hex, head row version)``,
        or None if there is no head row.

        Raises:
            AuditChainError: the head row is not valid JSON, lacks fields, or (with a MAC key)
                its MAC is missing or wrong.
        """
        row = self._store.get(self._head_ns, HEAD_KEY)
        if row is None:
            return None
        try:
            head = json.loads(row.value)
            seq, digest_hex = head["seq"], head["hash"]
            if type(seq) is not int or seq < 0 or not isinstance(digest_hex, str):
                raise TypeError
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            raise AuditChainError("audit head: not a valid head record (edited?)") from None
        want = self._head_mac(seq, digest_hex)
        if want is not None and not hmac.compare_digest(str(head.get("mac", "")), want):
            raise AuditChainError("audit head: MAC missing or wrong (the head row was edited or forged)")
        return seq, digest_hex, row.version

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
        were cut off are gone for good.

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
                n, last = self._verify_chain()
                row = self._store.get(self._head_ns, HEAD_KEY)
                self._next_seq, self._prev = n, last
                self._head_version = row.version if row is not None else 0
                body = self.body(who, "audit-reseal", None, f"resealed after entry {n - 1}: {problem}"[:600])
                return self.stage(body)
            except BaseException:
                self._next_seq = None  # never keep a position that skipped the head check
                raise

        return self.committer.run(unit)

    # -- reading ----------------------------------------------------------------------------

    def entries(self) -> Iterator[AccessAuditEntry]:
        """Yield every entry in order (not verified; see :meth:`verify`).

        Raises:
            AuditChainError: an entry is not valid JSON.
        """
        for row in self._store.scan_all(self._ns):
            seq = int.from_bytes(row.key, "big")
            body = _parse(row.value, seq)
            plain = {k: v for k, v in body.items() if k != "mac"}
            yield AccessAuditEntry(seq, body, hashlib.sha256(_canonical(plain)).digest())

    def _verify_chain(self) -> tuple[int, str]:
        """Check every entry's sequence, ``prev`` link and MAC; return ``(count, last hash hex)``."""
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
        return n, prev

    def verify(self) -> int:
        """Check the whole chain against the authenticated head; return the number of entries.

        The head is read first, so entries appended meanwhile (by this or another replica) do
        not count as a mismatch; the log must reach at least the head's entry, with its hash.

        Raises:
            AuditChainError: names the first bad entry (sequence gap, wrong ``seq``, broken
                ``prev`` link, missing or wrong MAC), or the missing tail ("audit log truncated:
                … entry N … is missing"), or a missing / forged head.
        """
        head = self.read_head()
        self._check_against(head)
        n, _ = self._verify_chain()
        if head is not None and n <= head[0]:
            raise AuditChainError(
                f"audit log truncated: the authenticated head names entry {head[0]} as the last "
                f"one, but the log ends at entry {n - 1}: entries {n}..{head[0]} are missing"
            )
        return n


def _parse(raw: bytes, seq: int) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AuditChainError(f"audit entry {seq}: not valid JSON") from None
    if not isinstance(body, dict):
        raise AuditChainError(f"audit entry {seq}: not a JSON object")
    return body
