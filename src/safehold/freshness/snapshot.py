"""Snapshots of the verifier map, so that start-up replays a bounded journal.

When ``snapshot_every`` entries (or ``snapshot_seconds`` with changes) have passed since the
snapshot in use, or the journal since then holds ``snapshot_bytes`` and at least as many bytes
as that snapshot (so replay time and the journal's file space stay O(map), and the O(map)
snapshot is paid once per O(map) journal bytes), a background thread:

1. exports the map at the committed head ``s`` (under the map lock: a consistent copy);
2. writes it as chunk rows ``_fresh.snap/(s, i)`` (not yet referenced by anything);
3. commits a journal entry naming ``(s, d_s, SHA-256, chunks, size)`` — anchored like any
   commit, so the hash chain authenticates the snapshot;
4. only then deletes journal entries ``<= s`` and the chunks of older snapshots;
5. gives the pages those deletions freed back to the file system
   (:meth:`~safehold.store.base.Store.reclaim`: SQLite's ``incremental_vacuum`` in short
   transactions; a no-op on PostgreSQL and on SQLite files created without ``auto_vacuum``).
   Without it the file keeps them as free pages, which the next journal entries reuse
   (issue 17: ~420 B per record at 100,000 records). It moves pages, not rows: nothing the
   freshness checks read changes, and a failure here leaves the snapshot done (logged; the
   next snapshot tries again).

A crash between any two steps leaves a journal that still replays from the previous snapshot
(unreferenced chunks are garbage the next round deletes); a crash between two of step 4's
deletion batches leaves entries ``first..s`` of which the oldest are gone, which the replay
accepts from this snapshot (:mod:`safehold.freshness.recovery`).

Several writers of one ledger (replicas on one database) may each write a snapshot: chunks are
inserted only (a writer that meets chunks of the same epoch leaves that snapshot to their
writer), and a snapshot at ``s`` deletes only journal entries ``<= s`` and chunks of epochs
``< s`` — never a newer snapshot another writer may be writing or relying on.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from safehold.errors import ConflictError
from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.journal import (
    JOURNAL_NS,
    SNAP_NS,
    SnapshotRef,
    epoch_key,
    snapshot_chunks,
    snapshot_key,
)

if TYPE_CHECKING:
    from safehold.freshness.store import FreshStore

__all__ = ["Snapshotter"]

log = logging.getLogger("safehold.freshness")
_BATCH = 500


class Snapshotter:
    """Decides when a snapshot is due and writes it on its own thread (module docstring)."""

    def __init__(self, store: FreshStore) -> None:
        self._fs = store
        self.base = store.history.snapshot
        self.size = store.history.snapshot_bytes
        self._mark = 0  # FreshStore.journal_bytes at the last snapshot's export
        self._since = time.monotonic()
        self._busy = threading.Lock()
        self.last_error: Exception | None = None

    def on_anchored(self, head: AnchorHead) -> None:
        """Anchorer hook: start a snapshot if one is due."""
        if self._due(head.epoch) and not self._busy.locked():
            self._start()

    def _due(self, epoch: int) -> bool:
        fs = self._fs
        n = epoch - self.base
        grown = fs.journal_bytes - self._mark
        return (fs.snapshot_every > 0 and n >= fs.snapshot_every) or (
            fs.snapshot_seconds > 0 and n > 1 and time.monotonic() - self._since >= fs.snapshot_seconds) or (
            fs.snapshot_bytes > 0 and n > 1 and grown >= max(fs.snapshot_bytes, self.size))

    def _start(self) -> None:
        threading.Thread(target=self._run_and_recheck, name=f"safehold-snapshot-{self._fs.ledger}",
                         daemon=True).start()

    def _run_and_recheck(self) -> None:
        # a trigger that came while this snapshot was being written was skipped: look again
        if self.run() and self._due(self._fs.state.committed.epoch) and not self._busy.locked():
            self._start()

    def run(self) -> bool:
        """Write one snapshot now (steps 1-4); False if another one is running or it failed."""
        if not self._busy.acquire(blocking=False):
            return False
        self.last_error = None  # set again below if this round fails
        try:
            self._write()
            return True
        except Exception as e:  # noqa: BLE001 - retried at the next due point; logged loudly
            self.last_error = e
            log.error("snapshot of ledger %r failed (the journal keeps growing until one "
                      "succeeds): %s", self._fs.ledger, e)
            return False
        finally:
            self._since = time.monotonic()
            self._busy.release()

    def _write(self) -> None:
        from safehold.freshness.commit import TxContext

        fs, st = self._fs, self._fs.state
        with st.lock:
            head = st.committed
            data = b"".join(st.vmap.export())
            mark = fs.journal_bytes
        if head.epoch <= self.base:
            return
        h, size, n = hashlib.sha256(), 0, 0
        for i, chunk in snapshot_chunks([data], ledger=fs.ledger, epoch=head.epoch, digest=head.digest):
            try:
                with fs.inner.transaction() as tx:
                    tx.put(SNAP_NS, snapshot_key(head.epoch, i), chunk, expected_version=0)
            except ConflictError:  # another writer's snapshot of this epoch (or a crashed attempt)
                log.info("ledger %r: snapshot of epoch %d already being written; skipped",
                         fs.ledger, head.epoch)
                self.base = max(self.base, head.epoch)
                self._mark = mark
                return
            h.update(chunk)
            size += len(chunk)
            n = i + 1
        ref = SnapshotRef(head.epoch, head.digest, h.digest(), n, size)
        with TxContext(fs, wait=True, snapshot=ref):
            pass
        old, self.base = self.base, head.epoch
        self.size, self._mark = size, mark
        self._delete_journal(upto=head.epoch, start=fs.history.first)
        fs.history.first = head.epoch + 1
        self._delete_chunks(below=head.epoch)
        log.info("ledger %r: snapshot of epoch %d written (%d bytes, %d chunks); journal entries "
                 "%d..%d deleted", fs.ledger, head.epoch, size, n, old + 1, head.epoch)
        self._reclaim()

    def _reclaim(self) -> None:
        """Step 5 (module docstring): give the freed pages back; failures are logged only."""
        from safehold.store.errors import StoreCorruptError

        try:
            pages = self._fs.inner.reclaim()
        except StoreCorruptError as e:  # e.g. a free-page list pointing at live pages: say so loudly
            self.last_error = e
            log.error("ledger %r: the database file is corrupt (found while giving free pages back; "
                      "restore it from a backup or run the integrity check): %s", self._fs.ledger, e)
            return
        except Exception as e:  # noqa: BLE001 - free pages stay free (reused); the next round retries
            log.warning("ledger %r: giving free pages back to the file system failed (they stay "
                        "free and are reused; retried after the next snapshot): %s", self._fs.ledger, e)
            return
        if pages:
            log.info("ledger %r: %d free pages given back to the file system", self._fs.ledger, pages)

    def _delete_journal(self, *, upto: int, start: int) -> None:
        inner = self._fs.inner
        e = max(start, 1)
        while e <= upto:
            with inner.transaction() as tx:
                for x in range(e, min(upto, e + _BATCH - 1) + 1):
                    tx.delete(JOURNAL_NS, epoch_key(x))
            e += _BATCH

    def _delete_chunks(self, *, below: int) -> None:
        inner = self._fs.inner
        doomed = [r.key for r in inner.scan_all(SNAP_NS) if int.from_bytes(r.key[:8], "big") < below]
        for i in range(0, len(doomed), _BATCH):
            with inner.transaction() as tx:
                for k in doomed[i: i + _BATCH]:
                    tx.delete(SNAP_NS, k)
