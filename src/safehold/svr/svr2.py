"""SVR2 (Signal's DB2) over durable, anchored state: backup, expose, restore, delete, query.

The client stretches the PIN (Argon2id, :mod:`safehold.svr.pin`) and sends the 32-byte access
key; this service only compares it, in constant time (``hmac.compare_digest``). Every change is
one FreshStore transaction, and the answer is computed inside it but given only after the
change is committed and anchored (:meth:`BackupTable.update`): a wrong guess is charged
durably before ``PIN_MISMATCH`` leaves the service, so a crash or a restart never gives a
free guess, and a database restored from an older copy is refused rather than re-reading a
higher tries counter.

=========  ==========================================================================================
backup     ``token`` must be the row's current token (:data:`~safehold.svr.protocol.ZERO_TOKEN` for a
           backup id that never held a row), else ``ALREADY_EXISTS``; stores data + access key,
           ``tries = max_tries``, state *populated* (not restorable yet); new token
expose     two-phase commit (SVR2): only if the stored data equals ``data`` (constant time) — state
           *available*; already available with equal data: ``OK`` (a retry); otherwise ``ERROR``
           (the backup was reset, deleted or brute-forced in between)
restore    not available → ``MISSING`` (nothing charged). Otherwise one write either way: equal
           access key → ``OK`` with data and tries (unchanged; a success does not refill); unequal
           → ``tries - 1``; at 0 the secrets are erased (``MISSING``), else ``PIN_MISMATCH``
delete     the row becomes empty (secrets erased), new token
query      state, tries, token; no guess
=========  ==========================================================================================
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace

from safehold.svr.errors import InvalidRequestError
from safehold.svr.protocol import (
    ACCESS_KEY_SIZE,
    BACKUP_ID_SIZE,
    MAX_DATA,
    MIN_DATA,
    TOKEN_SIZE,
    ZERO_TOKEN,
    Status,
    check_tries,
)
from safehold.svr.rows import AVAILABLE, EMPTY, POPULATED, BackupTable, Svr2Row, new_token

__all__ = ["Svr2", "Svr2Answer", "Svr2Query", "Svr2Restore"]

NAMESPACE = "svr2"


@dataclass(frozen=True)
class Svr2Answer:
    """Outcome of backup / expose / delete: ``status`` and the row's current ``token``."""

    status: Status
    token: bytes


@dataclass(frozen=True)
class Svr2Query:
    """``status`` OK (a restorable or populated row) or MISSING; ``tries`` left of
    ``max_tries``; ``exposed`` (restorable); the current ``token``."""

    status: Status
    tries: int
    max_tries: int
    exposed: bool
    token: bytes


@dataclass(frozen=True)
class Svr2Restore:
    """``status`` OK (with ``data``), PIN_MISMATCH or MISSING; ``tries`` left; ``token``."""

    status: Status
    tries: int
    token: bytes
    data: bytes = field(default=b"", repr=False)


def _bytes(value: object, size: int | None, what: str, lo: int = 0, hi: int = 0) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise InvalidRequestError(f"{what} must be bytes")
    if (size is not None and len(value) != size) or (size is None and not lo <= len(value) <= hi):
        want = f"{size}" if size is not None else f"{lo}..{hi}"
        raise InvalidRequestError(f"{what} must be {want} bytes, got {len(value)}")
    return bytes(value)


class Svr2:
    """The SVR2 operations over a :class:`BackupTable` of :class:`Svr2Row` (module docstring).

    ``bid`` is the 16-byte backup id the HTTP layer derived from the authenticated caller.
    Raises InvalidRequestError for malformed arguments (before anything is read or charged)
    and the FreshStore / store errors of :meth:`BackupTable.update`.
    """

    def __init__(self, table: BackupTable[Svr2Row]) -> None:
        self.table = table

    @staticmethod
    def _bid(bid: bytes) -> bytes:
        return _bytes(bid, BACKUP_ID_SIZE, "backup id")

    def query(self, bid: bytes) -> Svr2Query:
        """State of the backup; charges nothing."""
        row, _ = self.table.read(self._bid(bid))
        if row is None or row.state == EMPTY:
            return Svr2Query(Status.MISSING, 0, 0, False, ZERO_TOKEN if row is None else row.token)
        return Svr2Query(Status.OK, row.tries, row.max_tries, row.state == AVAILABLE, row.token)

    def backup(self, bid: bytes, data: bytes, access_key: bytes, max_tries: int, token: bytes) -> Svr2Answer:
        """Store ``data`` (17..272 bytes) under ``access_key`` (32 bytes), not yet restorable."""
        bid = self._bid(bid)
        data = _bytes(data, None, "data", MIN_DATA, MAX_DATA)
        access_key = _bytes(access_key, ACCESS_KEY_SIZE, "pin")
        token = _bytes(token, TOKEN_SIZE, "token")
        max_tries = check_tries(max_tries)
        with self.table.update(bid) as slot:
            if not hmac.compare_digest(token, slot.token):
                return Svr2Answer(Status.ALREADY_EXISTS, slot.token)
            slot.new = Svr2Row(POPULATED, new_token(), max_tries, max_tries, data, access_key)
        return Svr2Answer(Status.OK, slot.new.token)

    def expose(self, bid: bytes, data: bytes) -> Svr2Answer:
        """Make a populated backup restorable if its data equals ``data``."""
        bid = self._bid(bid)
        data = _bytes(data, None, "data", MIN_DATA, MAX_DATA)
        with self.table.update(bid) as slot:
            row = slot.row
            if row is None or row.state not in (POPULATED, AVAILABLE) \
                    or not hmac.compare_digest(data, row.data):
                return Svr2Answer(Status.ERROR, slot.token)
            if row.state == AVAILABLE:
                return Svr2Answer(Status.OK, row.token)
            slot.new = replace(row, state=AVAILABLE, token=new_token())
        return Svr2Answer(Status.OK, slot.new.token)

    def restore(self, bid: bytes, access_key: bytes) -> Svr2Restore:
        """One guess: compare ``access_key`` in constant time; charge a wrong one durably."""
        bid = self._bid(bid)
        access_key = _bytes(access_key, ACCESS_KEY_SIZE, "pin")
        with self.table.update(bid) as slot:
            row = slot.row
            if row is None or row.state != AVAILABLE:
                return Svr2Restore(Status.MISSING, 0, slot.token)
            if hmac.compare_digest(access_key, row.access_key):
                # A write either way: a right and a wrong guess look alike to the operator
                # (one commit, one anchor advance, a new token).
                slot.new = replace(row, token=new_token())
                answer = Svr2Restore(Status.OK, row.tries, slot.new.token, row.data)
            elif row.tries <= 1:
                slot.new = Svr2Row(EMPTY, new_token())  # the last guess: erase the secrets
                answer = Svr2Restore(Status.MISSING, 0, slot.new.token)
            else:
                slot.new = replace(row, token=new_token(), tries=row.tries - 1)
                answer = Svr2Restore(Status.PIN_MISMATCH, row.tries - 1, slot.new.token)
        return answer  # only now: the change is committed and anchored

    def delete(self, bid: bytes) -> Svr2Answer:
        """Erase the backup's secrets (also for a backup id that never held one: it gets a
        token, so an old held-back backup request for it is refused)."""
        with self.table.update(self._bid(bid)) as slot:
            slot.new = Svr2Row(EMPTY, new_token())
        return Svr2Answer(Status.OK, slot.new.token)

