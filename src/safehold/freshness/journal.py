"""Journal entries and snapshots: the freshness metadata the untrusted store keeps for us.

Store layout (namespaces are reserved: a :class:`~safehold.freshness.store.FreshStore` refuses
callers that name them):

* ``_fresh.journal``, key ``u64be epoch``: one entry per committed transaction, value
  ``body || mac`` with ``mac`` = keyed BLAKE2b-256 of ``body``
  (:meth:`~safehold.freshness.digests.FreshKeys.mac`). Inserted with an insert-only
  compare-and-set inside the transaction whose changes it lists.
* ``_fresh.snap``, key ``u64be snapshot epoch || u32be chunk``: the verifier map at one epoch,
  in chunks of :data:`CHUNK` bytes. A later journal entry names the snapshot's epoch, chain
  digest and SHA-256 over its bytes, so the hash chain authenticates it.

Entry body (all integers big-endian)::

    "SHFJ" u8 version=1  u8 len ledger  ledger  u64 epoch  prev[32]  u64 time_ms  key_id[8]
    u8 flags (1 = snapshot reference, 2 = note)
    [snapshot: u64 epoch  digest[32]  content_sha256[32]  u32 chunks  u64 bytes]
    [note: u32 length  bytes]            (e.g. the owner's re-anchoring statement)
    u16 namespaces  (u8 length  ASCII name)*
    u32 changes  (u16 namespace index  u8 kind  u8 key length  key  u64 version
                  [point, version > 0: leaf[16]]  [postings: u64 old version])*

The chain digest of an entry is :func:`~safehold.freshness.digests.chain_digest` of its body.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from safehold.freshness.digests import DIGEST_LEN, LEAF_LEN, MAC_LEN, FreshKeys, chain_digest
from safehold.freshness.errors import JournalCorruptError
from safehold.freshness.vmap import POINT, POSTINGS, Change

__all__ = ["CHUNK", "JOURNAL_NS", "SNAP_NS", "Entry", "SnapshotRef", "decode_entry",
           "encode_entry", "epoch_key", "snapshot_chunks", "snapshot_key"]

JOURNAL_NS = "_fresh.journal"
SNAP_NS = "_fresh.snap"
#: Snapshot chunk size in bytes (well under the store's 16 MiB value limit).
CHUNK = 1 << 20
RESERVED_PREFIX = "_fresh."
_MAGIC = b"SHFJ"
_SNAP_MAGIC = b"SHFS"
_HEAD = struct.Struct(">QQ")
_SNAP = struct.Struct(">Q32s32sIQ")
_CHANGE = struct.Struct(">HBB")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot named by a journal entry.

    Attributes:
        epoch: the epoch whose map state the snapshot holds.
        digest: the chain digest at that epoch.
        content: SHA-256 over the snapshot's bytes (all chunks in order).
        chunks: number of chunk rows. size: total bytes.
    """

    epoch: int
    digest: bytes
    content: bytes
    chunks: int
    size: int


@dataclass(frozen=True)
class Entry:
    """One journal entry (see the module docstring)."""

    ledger: str
    epoch: int
    prev: bytes
    time_ms: int
    changes: tuple[Change, ...]
    snapshot: SnapshotRef | None = None
    note: bytes = b""


def epoch_key(epoch: int) -> bytes:
    """Journal row key of ``epoch``."""
    return _U64.pack(epoch)


def snapshot_key(epoch: int, chunk: int) -> bytes:
    """Snapshot row key of chunk ``chunk`` of the snapshot at ``epoch``."""
    return _U64.pack(epoch) + struct.pack(">I", chunk)


def encode_entry(entry: Entry, keys: FreshKeys) -> tuple[bytes, bytes]:
    """``(row value, chain digest)`` of ``entry``."""
    names: dict[str, int] = {}
    parts = []
    for c in entry.changes:
        idx = names.setdefault(c.namespace, len(names))
        parts.append(_CHANGE.pack(idx, c.kind, len(c.key)) + c.key + _U64.pack(c.version))
        if c.kind == POINT and c.version:
            parts.append(c.leaf)
        elif c.kind == POSTINGS:
            parts.append(_U64.pack(c.old_version))
    led = entry.ledger.encode("ascii")
    flags = (1 if entry.snapshot else 0) | (2 if entry.note else 0)
    head = [_MAGIC, b"\x01", bytes((len(led),)), led, _U64.pack(entry.epoch), entry.prev,
            _U64.pack(entry.time_ms), keys.fingerprint, bytes((flags,))]
    if entry.snapshot:
        s = entry.snapshot
        head.append(_SNAP.pack(s.epoch, s.digest, s.content, s.chunks, s.size))
    if entry.note:
        head.append(struct.pack(">I", len(entry.note)) + entry.note)
    head.append(struct.pack(">H", len(names)))
    head += [bytes((len(n),)) + n.encode("ascii") for n in names]
    head.append(struct.pack(">I", len(entry.changes)))
    body = b"".join(head + parts)
    return body + keys.mac(body), chain_digest(body)


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.d, self.o, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if self.o + n > len(self.d):
            raise JournalCorruptError(f"{self.where}: entry truncated")
        b = self.d[self.o: self.o + n]
        self.o += n
        return b

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size))


def decode_entry(value: bytes, keys: FreshKeys, *, ledger: str, epoch: int) -> tuple[Entry, bytes]:
    """Check and parse the journal row of ``epoch``; returns ``(entry, chain digest)``.

    Raises:
        JournalCorruptError: MAC mismatch (edited, or written under another key), another
            ledger or epoch than the row key says, or a malformed body.
    """
    where = f"journal entry {epoch} of ledger {ledger!r}"
    if len(value) < MAC_LEN + 60:
        raise JournalCorruptError(f"{where}: {len(value)} bytes, too short to be an entry", ledger=ledger)
    body, mac = value[:-MAC_LEN], value[-MAC_LEN:]
    if not keys.check_mac(body, mac):
        hint = ""
        if body[:4] == _MAGIC and len(body) > 6:
            ln = body[5]
            fp = body[6 + ln + 8 + 32 + 8: 6 + ln + 8 + 32 + 16]
            if fp != keys.fingerprint:
                hint = " (it was written under another freshness key)"
        raise JournalCorruptError(f"{where}: MAC does not verify: the entry was edited{hint}", ledger=ledger,
                                  store_epoch=epoch)
    r = _Reader(body, where)
    try:
        if r.take(4) != _MAGIC or r.take(1) != b"\x01":
            raise JournalCorruptError(f"{where}: not a version-1 journal entry")
        led = r.take(r.take(1)[0]).decode("ascii")
        e, = r.unpack(_U64)
        prev = r.take(DIGEST_LEN)
        t, = r.unpack(_U64)
        r.take(8)
        flags = r.take(1)[0]
        snap = None
        if flags & 1:
            se, sd, sc, sn, ss = r.unpack(_SNAP)
            snap = SnapshotRef(se, sd, sc, sn, ss)
        note = r.take(struct.unpack(">I", r.take(4))[0]) if flags & 2 else b""
        names = [r.take(r.take(1)[0]).decode("ascii") for _ in range(struct.unpack(">H", r.take(2))[0])]
        changes = []
        for _ in range(struct.unpack(">I", r.take(4))[0]):
            idx, kind, klen = r.unpack(_CHANGE)
            key = r.take(klen)
            v, = r.unpack(_U64)
            if kind == POINT:
                changes.append(Change(names[idx], key, POINT, v, r.take(LEAF_LEN) if v else b""))
            elif kind == POSTINGS:
                old, = r.unpack(_U64)
                changes.append(Change(names[idx], key, POSTINGS, v, b"", old))
            else:
                raise JournalCorruptError(f"{where}: unknown change kind {kind}")
    except (IndexError, UnicodeDecodeError) as ex:
        raise JournalCorruptError(f"{where}: malformed ({type(ex).__name__})", ledger=ledger) from None
    if r.o != len(body):
        raise JournalCorruptError(f"{where}: {len(body) - r.o} trailing bytes", ledger=ledger)
    if led != ledger or e != epoch:
        raise JournalCorruptError(f"{where}: the entry names ledger {led!r} epoch {e} (moved row)",
                                  ledger=ledger, store_epoch=epoch)
    return Entry(led, e, prev, t, tuple(changes), snap, note), chain_digest(body)


def snapshot_chunks(pieces: Iterable[bytes], *, ledger: str, epoch: int,
                    digest: bytes) -> Iterator[tuple[int, bytes]]:
    """Split a snapshot (header + ``pieces``) into numbered chunks of :data:`CHUNK` bytes."""
    led = ledger.encode("ascii")
    buf = bytearray(_SNAP_MAGIC + b"\x01" + bytes((len(led),)) + led + _U64.pack(epoch) + digest)
    n = 0
    for p in pieces:
        buf += p
        while len(buf) >= CHUNK:
            yield n, bytes(buf[:CHUNK])
            del buf[:CHUNK]
            n += 1
    yield n, bytes(buf)


def parse_snapshot(chunks: Iterable[bytes], ref: SnapshotRef, *, ledger: str) -> memoryview:
    """Join and check snapshot chunks against ``ref``; returns the map bytes after the header.

    Raises:
        JournalCorruptError: missing chunks, wrong size or SHA-256, or a header naming another
            ledger / epoch / digest.
    """
    data = b"".join(chunks)
    where = f"snapshot at epoch {ref.epoch} of ledger {ledger!r}"
    if len(data) != ref.size or hashlib.sha256(data).digest() != ref.content:
        raise JournalCorruptError(f"{where}: content does not match the journal's reference "
                                  f"({len(data)} bytes, expected {ref.size})", ledger=ledger)
    led = ledger.encode("ascii")
    head = _SNAP_MAGIC + b"\x01" + bytes((len(led),)) + led + _U64.pack(ref.epoch) + ref.digest
    if not data.startswith(head):
        raise JournalCorruptError(f"{where}: header names another ledger, epoch or digest", ledger=ledger)
    return memoryview(data)[len(head):]
