"""SVR3 after Signal's DB4, one server's part: create, restore1, restore2, remove, query.

This server holds, per backup, an OPRF-key share k_i, a zero share z_i, an encryption share
s_i, the auth commitment C_i = sk_i·G and the sealed secret, with its **own guess limit**
(:mod:`safehold.svr.db4` gives the whole protocol). No single server can test a PIN: it sees
only a blinded element and its own shares.

=========  ==========================================================================================
create     ``token`` must be current (else ``ALREADY_EXISTS``); stores the shares, ``tries =
           max_tries``, ``version``; new token
restore1   validate the blinded element, then **charge one guess durably** (every evaluation is a
           guess: the server cannot tell a right PIN from a wrong one); at 0 tries the shares are
           erased. Answer (after commit and anchor): ``e_i = k_i·B + z_i·M(B)``, tries left,
           version, and a random 32-byte ``session`` that restore2 must present. As in DB4 the last
           allowed guess is still answered, so ``max_tries`` guesses are possible, no more
restore2   no write: take the session (single use, :data:`SESSION_TTL` seconds, memory only), check
           the Schnorr proof ``z·G == c·C_i + R`` with ``c = H(R || B || session)``; only then release
           s_i and the sealed secret, else ``ERROR``
remove     shares erased, new token
query      tries, version, token; no guess
=========  ==========================================================================================

A crash between restore1 and restore2 loses the session (it never reaches the database): the
guess stays charged, the client starts over.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from dataclasses import dataclass, field, replace

from safehold.crypto import oprf
from safehold.crypto.errors import DeserializeError
from safehold.svr import db4
from safehold.svr.errors import InvalidRequestError
from safehold.svr.protocol import (
    BACKUP_ID_SIZE,
    ELEMENT_SIZE,
    MAX_DATA,
    MIN_DATA,
    SESSION_SIZE,
    SHARE_SIZE,
    TOKEN_SIZE,
    ZERO_TOKEN,
    Status,
    check_tries,
)
from safehold.svr.rows import EMPTY, LIVE, BackupTable, Svr3Row, new_token

__all__ = ["SESSION_TTL", "Svr3", "Svr3Answer", "Svr3Query", "Svr3Restore1", "Svr3Restore2"]

NAMESPACE = "svr3"
#: Seconds a restore1 session waits for its restore2.
SESSION_TTL = 120.0
#: Most open restore1 sessions (oldest dropped first).
MAX_SESSIONS = 100_000


@dataclass(frozen=True)
class Svr3Answer:
    """Outcome of create / remove: ``status``, ``tries`` and the current ``token``."""

    status: Status
    tries: int
    token: bytes


@dataclass(frozen=True)
class Svr3Query:
    """``status`` OK or MISSING, ``tries`` left of ``max_tries``, ``version``, ``token``."""

    status: Status
    tries: int
    max_tries: int
    version: int
    token: bytes


@dataclass(frozen=True)
class Svr3Restore1:
    """``status`` OK or MISSING; with OK the masked ``element``, ``tries`` left (after this
    guess), ``version`` and the restore2 ``session``."""

    status: Status
    tries: int
    version: int
    token: bytes
    element: bytes = b""
    session: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Svr3Restore2:
    """``status`` OK (with this server's ``encryption_share`` and the ``sealed`` secret),
    ERROR, RESTORE1_MISSING or VERSION_MISMATCH."""

    status: Status
    encryption_share: bytes = field(default=b"", repr=False)
    sealed: bytes = field(default=b"", repr=False)


@dataclass
class _Session:
    bid: bytes
    version: int
    blinded: bytes
    commitment: bytes
    encryption_share: bytes = field(repr=False)
    sealed: bytes = field(repr=False)
    expires: float


class _Sessions:
    """restore1 → restore2 state, in memory only (DB4 keeps it per client connection)."""

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl, self.limit = ttl, limit
        self._lock = threading.Lock()
        self._items: dict[bytes, _Session] = {}

    def add(self, s: _Session) -> bytes:
        sid = os.urandom(SESSION_SIZE)
        now = time.monotonic()
        with self._lock:
            if len(self._items) >= self.limit:
                for k in [k for k, v in self._items.items() if v.expires < now] or list(self._items)[:1]:
                    del self._items[k]
            self._items[sid] = s
        return sid

    def take(self, sid: bytes) -> _Session | None:
        with self._lock:
            s = self._items.pop(sid, None)
        return s if s is not None and s.expires >= time.monotonic() else None

    def __len__(self) -> int:
        return len(self._items)


def _check(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise InvalidRequestError(f"{what} must be {size} bytes")
    return bytes(value)


class Svr3:
    """This server's SVR3 (DB4) operations over a :class:`BackupTable` of :class:`Svr3Row`.

    Raises InvalidRequestError (including an element or scalar that fails RFC 9497
    deserialisation) before anything is read or charged, and the FreshStore / store errors of
    :meth:`BackupTable.update`.
    """

    def __init__(self, table: BackupTable[Svr3Row], *, session_ttl: float = SESSION_TTL,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.table = table
        self.sessions = _Sessions(session_ttl, max_sessions)

    @staticmethod
    def _bid(bid: bytes) -> bytes:
        return _check(bid, BACKUP_ID_SIZE, "backup id")

    def query(self, bid: bytes) -> Svr3Query:
        """Tries and version; charges nothing."""
        row, _ = self.table.read(self._bid(bid))
        if row is None or row.state != LIVE:
            return Svr3Query(Status.MISSING, 0, 0, 0, ZERO_TOKEN if row is None else row.token)
        return Svr3Query(Status.OK, row.tries, row.max_tries, row.version, row.token)

    def create(self, bid: bytes, *, version: int, max_tries: int, oprf_share: bytes, zero_share: bytes,
               encryption_share: bytes, auth_commitment: bytes, sealed: bytes, token: bytes) -> Svr3Answer:
        """Store this server's shares of a backup (replacing any earlier ones)."""
        bid = self._bid(bid)
        max_tries = check_tries(max_tries)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**32:
            raise InvalidRequestError("version must be an integer in 1..2^32-1")
        token = _check(token, TOKEN_SIZE, "token")
        encryption_share = _check(encryption_share, SHARE_SIZE, "encryption_share")
        if not isinstance(sealed, bytes | bytearray) or not MIN_DATA <= len(sealed) <= MAX_DATA:
            raise InvalidRequestError(f"sealed must be {MIN_DATA}..{MAX_DATA} bytes")
        try:
            oprf_share = oprf.check_scalar(oprf_share, "oprf_share")
            zero_share = oprf.check_scalar(zero_share, "zero_share")
            auth_commitment = oprf.check_element(auth_commitment, "auth_commitment")
        except DeserializeError as e:
            raise InvalidRequestError(str(e)) from None
        if oprf_share == db4.ZERO_SCALAR:
            raise InvalidRequestError("oprf_share must not be zero")
        with self.table.update(bid) as slot:
            if not hmac.compare_digest(token, slot.token):
                return Svr3Answer(Status.ALREADY_EXISTS, slot.row.tries if slot.row else 0, slot.token)
            slot.new = Svr3Row(LIVE, new_token(), max_tries, max_tries, version, oprf_share, zero_share,
                               encryption_share, auth_commitment, bytes(sealed))
        return Svr3Answer(Status.OK, max_tries, slot.new.token)

    def restore1(self, bid: bytes, blinded: bytes) -> Svr3Restore1:
        """Charge one guess durably, then answer the masked evaluation and a session."""
        bid = self._bid(bid)
        try:
            blinded = oprf.check_element(_check(blinded, ELEMENT_SIZE, "blinded"), "blinded")
        except DeserializeError as e:
            raise InvalidRequestError(str(e)) from None
        with self.table.update(bid) as slot:
            row = slot.row
            if row is None or row.state != LIVE:
                return Svr3Restore1(Status.MISSING, 0, 0, slot.token)
            tries = row.tries - 1
            element = db4.evaluate_share(row.oprf_share, row.zero_share, blinded)
            if tries <= 0:
                slot.new = Svr3Row(EMPTY, new_token())  # the last allowed guess: erase the shares
            else:
                slot.new = replace(row, token=new_token(), tries=tries)
        # committed and anchored: only now is the evaluation released
        session = self.sessions.add(_Session(bid, row.version, blinded, row.auth_commitment,
                                             row.encryption_share, row.sealed,
                                             time.monotonic() + self.sessions.ttl))
        return Svr3Restore1(Status.OK, max(tries, 0), row.version, slot.new.token, element, session)

    def restore2(self, bid: bytes, *, session: bytes, version: int, auth_point: bytes,
                 auth_scalar: bytes) -> Svr3Restore2:
        """Release this server's encryption share if the authorisation proof verifies."""
        bid = self._bid(bid)
        session = _check(session, SESSION_SIZE, "session")
        auth_point = _check(auth_point, ELEMENT_SIZE, "auth_point")
        auth_scalar = _check(auth_scalar, ELEMENT_SIZE, "auth_scalar")
        state = self.sessions.take(session)
        if state is None or not hmac.compare_digest(state.bid, bid):
            return Svr3Restore2(Status.RESTORE1_MISSING)
        if version != state.version:
            return Svr3Restore2(Status.VERSION_MISMATCH)
        if not db4.verify(state.commitment, state.blinded, session, auth_point, auth_scalar):
            return Svr3Restore2(Status.ERROR)
        return Svr3Restore2(Status.OK, state.encryption_share, state.sealed)

    def remove(self, bid: bytes) -> Svr3Answer:
        """Erase this server's shares of the backup (a new token, as for SVR2 delete)."""
        with self.table.update(self._bid(bid)) as slot:
            slot.new = Svr3Row(EMPTY, new_token())
        return Svr3Answer(Status.OK, 0, slot.new.token)
