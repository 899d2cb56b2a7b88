"""SVR rows: their formats and the table that reads and writes them through the records engine
over a :class:`~safehold.freshness.store.FreshStore`.

A row is one backup id's state in one protocol (namespace ``svr2`` or ``svr3`` of the engine,
store namespaces ``svr:svr2`` / ``svr:svr3``). The records engine seals it (AES-256-GCM, AAD
binding namespace, blind index and version; the row key is the blind index of the backup id),
and the FreshStore checks every read against its verifier map and commits every change
store-then-anchor. What the database holds per backup: a blind index, a version, a sealed
value; never a backup id, an access key, a share or a tries counter in clear.

Rows are never removed: deleting or erasing a backup (zero tries) replaces its secrets with an
``empty`` row that keeps only a fresh random ``token``. A backup request must present the
current token (SVR1's nonce), so a backup request the network held back cannot later
re-create a deleted or brute-forced backup with its tries refilled.

Row format: a JSON object ``{"v": 1, "state": ..., "token": hex, ...}`` (byte fields in hex),
inside the engine's envelope.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

from safehold.errors import RecordNotFoundError
from safehold.freshness.store import FreshStore
from safehold.records.engine import RecordEngine
from safehold.svr.errors import SvrStateError
from safehold.svr.protocol import TOKEN_SIZE, ZERO_TOKEN

__all__ = ["BackupTable", "Slot", "Svr2Row", "Svr3Row", "new_token"]

EMPTY = "empty"
#: SVR2: backed up, not yet restorable (two-phase: expose makes it ``available``).
POPULATED = "populated"
AVAILABLE = "available"
#: SVR3: a live share.
LIVE = "live"


def new_token() -> bytes:
    """A fresh random 16-byte token (``os.urandom``); never the zero token."""
    while True:
        t = os.urandom(TOKEN_SIZE)
        if t != ZERO_TOKEN:
            return t


@dataclass
class Svr2Row:
    """SVR2 state of one backup id: ``state`` (empty / populated / available), ``token``,
    ``tries`` left of ``max_tries``, ``data`` (the client's sealed secret), ``access_key`` (32
    bytes)."""

    state: str
    token: bytes = field(repr=False)
    tries: int = 0
    max_tries: int = 0
    data: bytes = field(default=b"", repr=False)
    access_key: bytes = field(default=b"", repr=False)


@dataclass
class Svr3Row:
    """SVR3 (DB4) state of one backup id at this server: ``state`` (empty / live), ``token``,
    ``tries`` left of ``max_tries``, ``version``, the shares k_i (``oprf_share``), z_i
    (``zero_share``), s_i (``encryption_share``), the auth commitment C_i and the sealed secret."""

    state: str
    token: bytes = field(repr=False)
    tries: int = 0
    max_tries: int = 0
    version: int = 0
    oprf_share: bytes = field(default=b"", repr=False)
    zero_share: bytes = field(default=b"", repr=False)
    encryption_share: bytes = field(default=b"", repr=False)
    auth_commitment: bytes = field(default=b"", repr=False)
    sealed: bytes = field(default=b"", repr=False)


R = TypeVar("R", Svr2Row, Svr3Row)


def encode_row(row: Svr2Row | Svr3Row) -> bytes:
    """The row's JSON form (bytes fields as hex)."""
    out: dict[str, Any] = {"v": 1}
    for f in fields(row):
        v = getattr(row, f.name)
        out[f.name] = v.hex() if isinstance(v, bytes) else v
    return json.dumps(out, separators=(",", ":"), sort_keys=True).encode()


def decode_row(cls: type[R], raw: bytes, where: str) -> R:
    """Parse :func:`encode_row` output for ``cls``.

    Raises:
        SvrStateError: not a row of this format (names ``where`` only).
    """
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.pop("v") != 1:
            raise ValueError("version")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = obj.pop(f.name)
            kw[f.name] = bytes.fromhex(v) if f.type == "bytes" else v
        if obj:
            raise ValueError("extra fields")
        row = cls(**kw)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SvrStateError(f"stored row {where} does not decode") from None
    if len(row.token) != TOKEN_SIZE or not isinstance(row.tries, int) or isinstance(row.tries, bool):
        raise SvrStateError(f"stored row {where} is malformed")
    return row


@dataclass
class Slot(Generic[R]):
    """A row read inside :meth:`BackupTable.update`: ``row`` (None: this backup id never held a
    row) and, once the caller sets it, ``new`` — written when the block ends."""

    row: R | None
    version: int
    new: R | None = None

    @property
    def token(self) -> bytes:
        """The current token (the zero token for a backup id without a row)."""
        return ZERO_TOKEN if self.row is None else self.row.token


class BackupTable(Generic[R]):
    """One protocol's rows (``namespace`` of the records engine ``engine`` over ``fresh``).

    Operations on one backup id are serialised by a per-id lock (64 stripes) and each
    :meth:`update` is one FreshStore transaction: committed, and anchored, before the block's
    caller continues. The records engine's CAS (expected version) stays as a second guard.
    """

    STRIPES = 64

    def __init__(self, engine: RecordEngine, fresh: FreshStore, namespace: str, row_type: type[R]) -> None:
        self.engine = engine
        self.fresh = fresh
        self.namespace = namespace
        self.row_type: type[R] = row_type
        self._locks = [threading.Lock() for _ in range(self.STRIPES)]

    def _where(self, bid: bytes) -> str:
        return f"{self.namespace}/{self.engine.row_index(self.namespace, bid.hex()).hex()}"

    def read(self, bid: bytes) -> tuple[R | None, int]:
        """The current row and its version (``(None, 0)`` if the backup id never held one); the
        read is checked by the FreshStore (raises its row errors on stale data)."""
        addr = self.engine.address(self.namespace, bid.hex())
        try:
            value, version = self.engine.get_at(addr)
        except RecordNotFoundError:
            return None, 0
        return decode_row(self.row_type, value, self._where(bid)), version

    @contextmanager
    def update(self, bid: bytes) -> Iterator[Slot[R]]:
        """Read the row under the id's lock inside a FreshStore transaction; write ``slot.new``
        if the block set it. Returns (leaves the block) only once the change is committed in
        the database and anchored: the caller answers after that, so every answer it gives
        reflects durable state.

        Raises (on exit): FreshStore errors (AnchorUnavailableError: nothing written;
        NotAnchoredError: written, not confirmed in time), RecordConflictError, StoreError.
        """
        addr = self.engine.address(self.namespace, bid.hex())
        with self._locks[bid[0] % self.STRIPES], self.fresh.transaction():
            try:
                value, version = self.engine.get_at(addr)
                slot: Slot[R] = Slot(decode_row(self.row_type, value, self._where(bid)), version)
            except RecordNotFoundError:
                slot = Slot(None, 0)
            yield slot
            if slot.new is not None:
                self.engine.put_at(addr, encode_row(slot.new), expected_version=slot.version)

