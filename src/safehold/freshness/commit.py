"""Writes of a :class:`~safehold.freshness.store.FreshStore`: checked row operations inside a
transaction, the store-then-anchor commit, and the anchorer thread.

Commit order of one transaction (docs/freshness.md, "Commit order"):

1. the body runs in a database transaction; every write is checked against the map and
   recorded (:class:`FreshTx`);
2. under the commit lock: refuse if the anchor is failing (nothing written); insert the journal
   entry ``e + 1`` (insert-only CAS) naming ``d_e`` and the changes; mark them tentative;
   COMMIT; apply them to the map (unanchored);
3. the anchorer thread advances the anchor from its head to the newest committed entry
   (several commits coalesce into one advance; at most ``max_unanchored`` entries ahead);
4. the caller returns once its entry is anchored (``wait=True``), or raises NotAnchoredError
   after ``wait_timeout`` ("stored, not yet anchored").

A crash anywhere leaves the database at some entry ``e_db >= e_anchor``; start-up rolls the
unanchored entries forward (``safehold.freshness.recovery``). A row read while unanchored waits
for the anchor, so no reader sees a state that a restore could still silently undo.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from safehold.errors import ConflictError
from safehold.freshness import check
from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.errors import (
    AnchorConflictError,
    AnchorLostError,
    AnchorUnavailableError,
    FreshnessError,
    RowDeletedError,
    RowRestoredError,
    StoreForkedError,
)
from safehold.freshness.journal import JOURNAL_NS, Entry, SnapshotRef, encode_entry, epoch_key
from safehold.freshness.state import Point, TxChanges
from safehold.freshness.vmap import POINT, POSTINGS
from safehold.store._checks import check_key
from safehold.store.base import Row, StoreOps
from safehold.store.errors import VersionConflictError

if TYPE_CHECKING:
    from safehold.freshness.store import FreshStore

__all__ = ["Anchorer", "FreshTx", "TxContext"]

log = logging.getLogger("safehold.freshness")
_COLLISIONS = 100  # journal-slot collisions with other writers before a commit gives up


class FreshTx(StoreOps):
    """The operations of the current thread's open transaction of a FreshStore.

    Writes go to the database transaction and are recorded for the journal; a write that
    meets a row differing from the map raises the finding (and the transaction rolls back).
    Reads are the store's checked reads, which see this transaction's own writes.
    """

    def __init__(self, store: FreshStore) -> None:
        self._fs = store
        self.ticket = 0

    def _top(self) -> tuple[StoreOps, TxChanges]:
        stack = self._fs._local.stack
        if not stack:
            from safehold.errors import StoreError

            raise StoreError("transaction already ended; open a new one")
        return stack[-1]

    def get(self, namespace: str, key: bytes) -> Row | None:
        """Checked read inside the transaction (see :meth:`FreshStore.get`)."""
        self._top()
        return self._fs.get(namespace, key)

    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """Checked page inside the transaction (see :meth:`FreshStore.scan`)."""
        self._top()
        return self._fs.scan(namespace, after=after, limit=limit)

    def _known(self, ns: str, key: bytes) -> list[Point]:
        # the innermost savepoint that wrote the row wins (as own() merged); searching the
        # stack instead of merging it keeps a large transaction O(writes), not O(writes²)
        for _, c in reversed(self._fs._local.stack):
            if (ns, key) in c.points:
                return [c.points[(ns, key)]]
        return [s for s, _ in self._fs.state.point_candidates(ns, key, None)]

    def _known_versions(self, ns: str, key: bytes, fits: Any) -> tuple[bool, list[Point]]:
        """Whether a state the map knows for the row ``fits``; if none does, another writer of
        the ledger may have changed the row: catch up once from the journal and look again."""
        known = self._known(ns, key)
        if any(fits(s) for s in known):
            return True, known
        self._fs.catch_up()  # (a local commit may also have moved the map meanwhile)
        known = self._known(ns, key)
        return any(fits(s) for s in known), known

    def _refuse(self, ns: str, key: bytes, found: Point, known: list[Point]) -> FreshnessError:
        err = check.point_error(ns, key, found, known[0])
        log.warning("FRESHNESS: write refused: %s", err)
        return err

    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set; see :meth:`FreshStore.put`.

        Raises:
            VersionConflictError: a genuine conflict (the row is at the map's version, not
                ``expected_version``).
            RowRolledBackError / RowDeletedError / RowRestoredError: the database's row is not
                the one the map knows (the CAS found, or accepted, another version).
        """
        ops, changes = self._top()
        ns, key = self._fs._guard(namespace), check_key(key)
        kind = self._fs.state.vmap.kind(ns)[0]
        try:
            new = ops.put(ns, key, value, expected_version=expected_version)
        except VersionConflictError as e:
            if kind == POINT:
                actual = e.actual
                # the conflict's version was read before the catch-up: a row another writer has
                # moved past it (or deleted) since is a plain conflict (nothing is served)
                ok, known = self._known_versions(
                    ns, key, lambda s: s is None or (actual > 0 and s[0] >= actual))
                if not ok:
                    raise self._refuse(ns, key, None if actual == 0 else (actual, b"?"), known) from None
            raise
        if kind == POSTINGS:
            old = changes.postings.get((ns, key), (expected_version, 0))[0]
            changes.postings[(ns, key)] = (old, new)
            return new
        ok, known = self._known_versions(ns, key, lambda s: (s[0] if s else 0) == expected_version)
        if not ok:
            raise self._refuse(ns, key, (expected_version, b"?") if expected_version else None, known)
        changes.points[(ns, key)] = (new, self._fs.keys.leaf(ns, key, new, value))
        return new

    def insert_new(self, namespace: str, rows: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Insert-only writes (see :meth:`StoreOps.insert_new`). Posting namespaces: one batched
        statement, each inserted row recorded as a posting change (0 -> 1), exactly as a
        ``put(..., expected_version=0)`` per row would; point namespaces: :meth:`put` per row.

        A posting the store reports as already there is read back: the map holds no per-row
        state for postings, so an insert the database silently dropped (a planted trigger or
        rule) while answering "exists" would otherwise leave the posting out of the group's
        hash, consistently: a record written but never found by search.

        Raises:
            as :meth:`put` (point rows).
            RowDeletedError: a posting reported as existing has no row (the insert was dropped).
        """
        ops, changes = self._top()
        ns = self._fs._guard(namespace)
        if self._fs.state.vmap.kind(ns)[0] != POSTINGS:
            return super().insert_new(ns, rows)
        checked = [(check_key(k), v) for k, v in rows]
        done = ops.insert_new(ns, checked)
        post = changes.postings
        for (key, _), ok in zip(checked, done, strict=True):
            if ok:
                post[(ns, key)] = (post.get((ns, key), (0, 0))[0], 1)
            elif ops.get(ns, key) is None:
                err = RowDeletedError(ns, key, "a row (the insert-only write found one)", "no row",
                                      "the database dropped an insert while reporting the key taken")
                log.warning("FRESHNESS: write refused: %s", err)
                raise err
        return done

    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """Delete; see :meth:`FreshStore.delete`. Raises as :meth:`put`."""
        ops, changes = self._top()
        ns, key = self._fs._guard(namespace), check_key(key)
        if self._fs.state.vmap.kind(ns)[0] == POSTINGS:
            v = expected_version
            if v is None:
                row = ops.get(ns, key)
                if row is None:
                    return False
                v = row.version
            ops.delete(ns, key, expected_version=v)
            old = changes.postings.get((ns, key), (v, 0))[0]
            changes.postings[(ns, key)] = (old, 0)
            return True
        if expected_version is not None:
            self._known_versions(ns, key, lambda s: (s[0] if s else 0) == expected_version)
        known = self._known(ns, key)
        versions = [s[0] for s in known if s is not None]
        if expected_version is not None:
            try:
                ops.delete(ns, key, expected_version=expected_version)
            except VersionConflictError as e:
                actual = e.actual
                self._known_versions(ns, key, lambda s: s is None or s[0] >= actual)
                versions = [s[0] for s in self._known(ns, key) if s is not None]
                if versions and (actual == 0 or max(versions) < actual):
                    raise self._refuse(ns, key, None if e.actual == 0 else (e.actual, b"?"), known) from None
                raise
            if expected_version not in versions:
                raise self._refuse(ns, key, (expected_version, b"?"), known)
        elif not versions:
            if ops.delete(ns, key):
                raise RowRestoredError(ns, key, "no row (deleted or never written)",
                                       "a row (deleting it now)")
            return False
        else:
            for i, v in enumerate(versions):
                try:
                    ops.delete(ns, key, expected_version=v)
                    break
                except VersionConflictError as e:
                    if i + 1 < len(versions):
                        continue
                    raise self._refuse(ns, key, None if e.actual == 0 else (e.actual, b"?"), known) from None
        changes.points[(ns, key)] = None
        return True


class TxContext:
    """Context manager of one FreshStore transaction (see the module docstring)."""

    def __init__(self, store: FreshStore, *, wait: bool, note: bytes = b"",
                 snapshot: SnapshotRef | None = None) -> None:
        self._fs = store
        self._wait = wait
        self._note = note
        self._snapshot = snapshot
        self._cm: Any = None
        self._ops: StoreOps = store.inner
        self._tx = FreshTx(store)

    def __enter__(self) -> FreshTx:
        self._cm = self._fs.inner.transaction()
        self._ops = self._cm.__enter__()
        self._fs._local.stack.append((self._ops, TxChanges()))
        return self._tx

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        fs = self._fs
        _, changes = fs._local.stack.pop()
        if et is not None:
            self._cm.__exit__(et, ev, tb)
            return
        if fs._local.stack:  # a savepoint: its changes join the enclosing transaction
            self._cm.__exit__(None, None, None)
            fs._local.stack[-1][1].merge(changes)
            return
        if not changes and not self._note and self._snapshot is None:  # read-only: no entry
            self._cm.__exit__(None, None, None)
            return
        epoch = self._commit(changes)
        self._tx.ticket = epoch
        if self._wait:
            fs.wait_for(epoch, "this transaction")

    def _commit(self, changes: TxChanges) -> int:
        """Steps 2 of the module docstring; returns the entry's epoch."""
        fs, st = self._fs, self._fs.state
        with fs.committing():
            try:
                fs.anchorer.admit()
                kinds = {ns: st.vmap.kind(ns)[0] for ns, _ in changes.postings}
                entry_changes = changes.changes(kinds)
                for _ in range(_COLLISIONS):
                    head = st.committed
                    epoch = head.epoch + 1
                    value, digest = encode_entry(Entry(fs.ledger, epoch, head.digest, int(time.time() * 1000),
                                                       tuple(entry_changes), self._snapshot, self._note),
                                                 fs.keys)
                    try:
                        self._ops.put(JOURNAL_NS, epoch_key(epoch), value, expected_version=0)
                        break
                    except ConflictError:
                        # another writer of the ledger took the slot: read its entries (MAC and
                        # link checked; a fork raises) and chain after them
                        if fs.catch_up(self._ops) == 0:
                            err = StoreForkedError(
                                f"ledger {fs.ledger!r}: journal entry {epoch} exists in the database "
                                "but does not follow this replica's head: another history",
                                ledger=fs.ledger, store_epoch=epoch)
                            fs.fail(err)
                            raise err from None
                else:
                    raise AnchorUnavailableError(
                        f"not written: ledger {fs.ledger!r} had {_COLLISIONS} journal collisions in a "
                        "row with other writers; retry")
                st.begin_commit(epoch, changes, st.group_deltas(changes))
            except BaseException as e:
                self._cm.__exit__(type(e), e, e.__traceback__)
                raise
            try:
                self._cm.__exit__(None, None, None)
            except BaseException:
                verdict = _in_doubt_committed(fs, epoch, value)
                if verdict is None:  # cannot tell: the next commit settles it first (admit)
                    fs.doubt = (epoch, value, AnchorHead(epoch, digest), entry_changes)
                    raise
                if not verdict:
                    st.abort_commit()
                    raise
                log.warning("ledger %r: COMMIT of entry %d reported an error but the entry is "
                            "in the database; continuing", fs.ledger, epoch)
            st.finish_commit(AnchorHead(epoch, digest), entry_changes)
            fs.journal_bytes += len(value)
        fs.anchorer.kick()
        return epoch


def _in_doubt_committed(fs: FreshStore, epoch: int, value: bytes) -> bool | None:
    """After a failed COMMIT: did it happen anyway (PostgreSQL connection lost after the server
    committed)? Re-reads the journal row on a fresh connection; None when it cannot tell."""
    try:
        row = fs.inner.get(JOURNAL_NS, epoch_key(epoch))
    except Exception:  # noqa: BLE001 - the database does not answer: undecided
        return None
    return row is not None and row.value == value


def _settle_doubt(fs: FreshStore) -> None:
    """Decide the outcome of a commit whose COMMIT failed ambiguously (see :func:`_in_doubt_committed`).

    Raises:
        StoreUnavailableError: the database still does not answer; nothing new is written.
    """
    epoch, value, head, changes = fs.doubt
    verdict = _in_doubt_committed(fs, epoch, value)
    if verdict is None:
        from safehold.errors import StoreUnavailableError

        raise StoreUnavailableError(
            f"not written: the outcome of the previous commit (journal entry {epoch} of ledger "
            f"{fs.ledger!r}) is unknown because the database does not answer")
    if verdict:
        fs.state.finish_commit(head, changes)
        fs.anchorer.kick()
    else:
        fs.state.abort_commit()
    fs.doubt = None


class Anchorer:
    """The thread that advances the anchor to the newest committed entry.

    One advance at a time; commits that arrive meanwhile are covered by the next advance, and
    before advancing it waits up to ``interval`` seconds while a commit is running (group commit
    towards the anchor). After an AnchorUnavailableError it retries the *same* target
    first (members that already took it accept it again), with backoff; a conflict or a lost
    ledger is fatal (the store stops serving).
    """

    def __init__(self, store: FreshStore, *, interval: float) -> None:
        self._fs = store
        self.interval = max(0.0, float(interval))
        self.failing: AnchorUnavailableError | None = None
        self._target: AnchorHead | None = None
        self._adv = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"safehold-anchor-{store.ledger}", daemon=True)
        self._last = 0.0
        self._polled = time.monotonic()
        #: monotonic send time of the newest confirmation of the anchor's head (a head read that
        #: answered, an accepted advance); the start-up comparison reads it just after this
        self.confirmed = time.monotonic()
        #: serialises the read path's lease renewal (FreshStore._lease)
        self.lease_lock = threading.Lock()
        self._conflict: AnchorConflictError | AnchorLostError | None = None
        self.on_anchored: list[Any] = []
        self.busy: list[Any] = []

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits up to 5 s)."""
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def kick(self) -> None:
        """A new entry was committed."""
        self._kick.set()

    def admit(self) -> None:
        """Called under the commit lock before a commit writes anything.

        Raises:
            the store's recorded problem; AnchorUnavailableError when the anchor is failing and
            a synchronous retry fails too (so at most the entries already committed stay
            unanchored); waits while ``max_unanchored`` entries are ahead of the anchor.
        """
        fs, st = self._fs, self._fs.state
        fs.live()
        if fs.doubt is not None:
            _settle_doubt(fs)
        if self.failing is not None and not self.advance():
            raise AnchorUnavailableError(
                f"not written: the anchor of ledger {fs.ledger!r} is unavailable and "
                f"{st.unanchored()} committed entr(y/ies) wait for it ({self.failing})")
        with st.cond:
            st.cond.wait_for(lambda: st.unanchored() < fs.max_unanchored or fs.fatal.is_set(),
                             timeout=fs.wait_timeout)
        fs.live()
        if st.unanchored() >= fs.max_unanchored:
            raise AnchorUnavailableError(
                f"not written: {st.unanchored()} entries of ledger {fs.ledger!r} wait for the anchor")

    def advance(self) -> bool:
        """Advance to the newest committed entry; True if the anchor is caught up.

        A refusal may mean another writer of the ledger moved the anchor past this replica's
        ``prev``: then the head is read, the journal caught up to it and the head adopted if
        this replica's chain passes through it (:meth:`FreshStore.endorse`), and the advance
        retried from there. A head the chain does not pass through is a fork (fatal).
        """
        for _ in range(8):
            done = self._advance_once()
            if done is not None:
                return done
            if not self._resolve():
                return False
        return False

    def _resolve(self) -> bool:
        """See :meth:`advance`; True if the anchored head moved (retry the advance)."""
        fs, st = self._fs, self._fs.state
        conflict, self._conflict = self._conflict, None
        try:
            head = fs.anchor.head(fs.ledger)
        except AnchorUnavailableError:
            head = None
        except (AnchorConflictError, AnchorLostError) as e:
            conflict = conflict or e
            head = None
        if head is not None and head.epoch == st.anchored.epoch and head.same(st.anchored):
            # another thread of this replica (the head poll) adopted this head while the
            # refused advance was in flight: not a fork; retry from the head now held
            return conflict is not None
        if head is None or head.epoch <= st.anchored.epoch:
            if conflict is not None:
                kind = StoreForkedError if isinstance(conflict, AnchorConflictError) else type(conflict)
                fs.fail(kind(f"ledger {fs.ledger!r}: advancing the anchor from {st.anchored.describe()} "
                             f"failed: {conflict}", ledger=fs.ledger, store_epoch=st.committed.epoch,
                             anchor_epoch=st.anchored.epoch))
            return False
        try:
            if head.epoch > st.committed.epoch:
                fs.catch_up()
            fs.endorse(head)
        except FreshnessError:
            return False  # recorded by catch_up / endorse
        if self._target is not None and self._target.epoch <= head.epoch:
            self._target = None
        if st.committed.epoch <= head.epoch:
            self.failing = None
        for hook in self.on_anchored:
            with contextlib.suppress(Exception):
                hook(head)
        return True

    def poll(self) -> None:
        """Bounded staleness with other writers: read the anchor's head every
        ``sync_interval`` and catch up when another writer moved it (errors are recorded).

        An accepted advance counts as such a read, dated when it was sent: a majority accepted
        ``prev -> new``, and every head another writer had anchored past ``prev`` sits on a
        majority, which shares a member with ours — that member would have refused (conflict).
        So while this replica writes at least once per ``sync_interval`` (the records service's
        read-audit flush does, under any read load) no head read is needed at all."""
        fs = self._fs
        if fs.sync_interval <= 0 or time.monotonic() - self._polled < fs.sync_interval:
            return
        self._polled = time.monotonic()
        try:
            fs.sync(full=False)
        except FreshnessError:
            pass  # recorded by sync (a fork or rollback stops the store)
        except Exception as e:  # noqa: BLE001 - closed meanwhile, or the database failed: next round
            log.debug("ledger %r: anchor head poll failed: %s", fs.ledger, e)

    def _advance_once(self) -> bool | None:
        """One advance attempt; None when :meth:`_resolve` should look at the anchor's head."""
        fs, st = self._fs, self._fs.state
        with self._adv:
            a, c = st.anchored, st.committed
            if c.epoch <= a.epoch:
                return True
            target = self._target if self._target is not None and self._target.epoch > a.epoch else c
            self._last = time.monotonic()
            try:
                head = fs.anchor.advance(fs.ledger, a, target)
            except AnchorUnavailableError as e:
                self.failing, self._target = e, target
                log.warning("anchor unavailable for ledger %r (%d entries unanchored): %s",
                            fs.ledger, st.unanchored(), e)
                return None  # some members may hold another writer's newer head
            except (AnchorConflictError, AnchorLostError) as e:
                self._conflict, self._target = e, None
                return None
            self.failing, self._target = None, None
            st.anchor(head)
            # the anchor's head was ours when the members took it: as good as a head read
            # (poll), dated conservatively at the send
            self._polled = max(self._polled, self._last)
            self.confirmed = max(self.confirmed, self._last)
        for hook in self.on_anchored:
            with contextlib.suppress(Exception):
                hook(head)
        return st.committed.epoch <= head.epoch

    def _gather(self) -> None:
        """Group commit towards the anchor: while a commit is running or writers are queued
        (``busy`` hooks, e.g. :class:`~safehold.freshness.group.FreshGroupCommit`), wait up to
        ``interval`` so that one advance covers them too (fewer, fuller round trips)."""
        deadline = time.monotonic() + self.interval
        while time.monotonic() < deadline and (self._fs.commit_lock.locked() or any(b() for b in self.busy)):
            time.sleep(0.0002)

    def _run(self) -> None:
        backoff = 0.0
        poll = self._fs.sync_interval or 0.5
        while not self._stop.is_set():
            self._kick.wait(timeout=min(poll, 0.5) if backoff == 0 else backoff)
            self._kick.clear()
            # a recorded problem (start-up comparison not done: anchor unavailable, lost, a
            # rollback) means the anchored head is unknown: advancing from it would read as a fork
            if self._stop.is_set() or self._fs.fatal.is_set() or self._fs.problem is not None:
                continue
            self.poll()
            st = self._fs.state
            while st.committed.epoch > st.anchored.epoch and not self._stop.is_set():
                self._gather()
                if not self.advance():
                    backoff = min(max(backoff * 2, 0.05), 1.0)
                    break
                backoff = 0.0
