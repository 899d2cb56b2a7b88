"""FreshStore: a :class:`~safehold.store.base.Store` that refuses stale, missing, restored and
forked data from the untrusted database it wraps.

.. code-block:: python

    fs = FreshStore(SqliteStore("records.db"), ledger="records", mac_key=k, anchor=quorum,
                    policy=NamespacePolicy({"*.postings": 10}))
    fs.check()                    # raises StoreRolledBackError / AnchorLostError / ... if not fresh
    with fs.transaction() as tx:  # one journal entry, one anchor advance
        tx.put("records:patients", key, value, expected_version=0)
    fs.get("records:patients", key)   # RowRolledBackError / RowDeletedError / RowRestoredError

Every read is checked against the verifier map (``safehold.freshness.vmap``): a point row's
(version, leaf), a scan page's exact rows, a posting group's (count, multiset hash). Every
transaction is committed **store-then-anchor** (``safehold.freshness.commit``): the data rows
and one journal entry in one database transaction, then the anchor advance, then the caller is
answered. Start-up rebuilds the map from snapshot + journal and compares the journal head with
the anchor (``safehold.freshness.recovery``). Design and threat model: docs/freshness.md.

Thread-safe; calls on the store from a thread with an open transaction join it (as the engines).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from safehold.freshness import check
from safehold.freshness.anchor.base import Anchor, AnchorHead
from safehold.freshness.digests import FreshKeys
from safehold.freshness.errors import (
    AnchorConflictError,
    AnchorLostError,
    AnchorUnavailableError,
    FreshnessError,
    JournalCorruptError,
    LedgerUninitialisedError,
    NotAnchoredError,
    RowFreshnessError,
    StoreForkedError,
    StoreRolledBackError,
    StoreStateError,
)
from safehold.freshness.journal import JOURNAL_NS, RESERVED_PREFIX, decode_entry, epoch_key
from safehold.freshness.state import LedgerState, TxChanges
from safehold.freshness.vmap import POSTINGS, NamespacePolicy
from safehold.store._checks import check_key, check_namespace, check_scan
from safehold.store.base import Row, Store, StoreOps

__all__ = ["FreshStore"]

log = logging.getLogger("safehold.freshness")
_PAGE = 500
_SYNC_TRIES = 10  # catch-ups per read while other writers keep changing what it reads


class _Local(threading.local):
    stack: list[tuple[StoreOps, TxChanges]]

    def __init__(self) -> None:
        self.stack = []


class FreshStore(Store):
    """A verifying wrapper around ``inner`` (see the module docstring and docs/freshness.md).

    Args:
        inner: the untrusted store (SQLite or PostgreSQL engine).
        ledger: the anchor ledger, ``[A-Za-z0-9._:/-]{1,128}``; an anchor member lets a client
            advance only the ledger named by its workload certificate (or ``<name>/...``).
        mac_key: >= 32 bytes from the attested keyset (never stored).
        anchor: the anchor (:class:`~safehold.freshness.anchor.client.QuorumAnchor`).
        policy: which namespaces hold postings read by prefix.
        wait_timeout: seconds a commit (or a read of a not yet anchored row) waits for the
            anchor before :class:`NotAnchoredError`.
        max_unanchored: committed entries allowed ahead of the anchor (pipelining window).
        anchor_interval: minimum seconds between two anchor advances (coalesces commits).
        snapshot_every / snapshot_seconds: write a map snapshot after this many entries / this
            long with changes (0 = never).
        snapshot_bytes: also write one once the journal entries since the last snapshot hold
            this many bytes and at least as many as that snapshot (0 = never): the journal a
            start-up replays, and the file space it occupies between snapshots, stay within
            about the map's own size however large the transactions (a batch import's entries
            are ~2 KB per record); the snapshot's cost, O(map), is paid once per O(map) bytes
            of journal.
        sync_interval: seconds between two reads of the anchor's head to pick up entries other
            writers of the ledger committed (replicas of one service on one database; 0 = never:
            a single writer). It bounds how long a database that serves an old row can go
            unnoticed on this replica after another replica acknowledged a newer one
            (docs/freshness.md, "Several writers"); :meth:`sync` is the linearizable barrier.

    Construction never raises a freshness finding: it records it (:attr:`problem`, raised by
    every operation and :meth:`check`) so that the owner can still re-anchor.

    Raises (constructor):
        ValueError: bad ledger name or key. StoreError: the database failed.
    """

    def __init__(self, inner: Store, *, ledger: str, mac_key: bytes, anchor: Anchor,
                 policy: NamespacePolicy | None = None, wait_timeout: float = 5.0,
                 max_unanchored: int = 64, anchor_interval: float = 0.002,
                 snapshot_every: int = 10_000, snapshot_seconds: float = 300.0,
                 snapshot_bytes: int = 8 << 20, sync_interval: float = 0.2) -> None:
        from safehold.freshness import recovery
        from safehold.freshness.commit import Anchorer
        from safehold.freshness.snapshot import Snapshotter

        recovery.check_ledger(ledger)
        self.inner = inner
        self.ledger = ledger
        self.keys = FreshKeys(mac_key)
        self.anchor = anchor
        self.policy = policy or NamespacePolicy()
        self.wait_timeout = float(wait_timeout)
        self.max_unanchored = max(1, int(max_unanchored))
        self.snapshot_every = int(snapshot_every)
        self.snapshot_seconds = float(snapshot_seconds)
        self.snapshot_bytes = max(0, int(snapshot_bytes))
        self.problem: FreshnessError | None = None
        self.commit_lock = threading.Lock()
        self._lock_owner: int | None = None
        self.sync_interval = max(0.0, float(sync_interval))
        self.caught_up = 0  # entries of other writers applied (status)
        self.fatal = threading.Event()
        self.doubt: Any = None
        self.rolled_forward = 0
        self._local = _Local()
        self._closed = False
        self._names: set[str] = set()
        self._kinds: dict[str, tuple[int, int]] = {}
        rebuilt = recovery.rebuild(self)
        self.state = LedgerState(rebuilt.vmap, rebuilt.head, AnchorHead(0, b""), rebuilt.digests)
        self.history = rebuilt
        #: journal bytes written or read since this process started, plus those replayed at
        #: start-up (only ever grows; the snapshotter compares it with its mark)
        self.journal_bytes = rebuilt.journal_bytes
        self.anchorer = Anchorer(self, interval=anchor_interval)
        self.snapshotter = Snapshotter(self)
        self.anchorer.on_anchored.append(self.snapshotter.on_anchored)
        recovery.compare_with_anchor(self)
        self.anchorer.start()

    # -- state ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise the recorded problem (StoreRolledBackError, StoreForkedError, AnchorLostError,
        LedgerUninitialisedError, JournalCorruptError, AnchorUnavailableError) if any."""
        if self.problem is not None:
            raise self.problem

    def fail(self, problem: FreshnessError, *, fatal: bool = True) -> None:
        """Record ``problem``; from now on every operation raises it (fatal: wakes waiters)."""
        if self.problem is None or isinstance(problem, StoreStateError):
            self.problem = problem
        log.error("FRESHNESS: %s", problem)
        if fatal:
            self.fatal.set()
            with self.state.cond:
                self.state.cond.notify_all()

    def status(self) -> dict[str, Any]:
        """``{ledger, serving, problem, committed_epoch, anchored_epoch, unanchored,
        rolled_forward, caught_up, rows, map_bytes, snapshot_error}`` for health endpoints
        (``snapshot_error``: the last failed snapshot or free-page step, else None)."""
        st = self.state
        with st.lock:
            rows = {ns: st.vmap.rows(ns) for ns in st.vmap.namespaces()}
            return {"ledger": self.ledger, "serving": self.problem is None,
                    "problem": None if self.problem is None else str(self.problem),
                    "committed_epoch": st.committed.epoch, "anchored_epoch": st.anchored.epoch,
                    "unanchored": st.unanchored(), "rolled_forward": self.rolled_forward,
                    "caught_up": self.caught_up, "rows": rows, "map_bytes": st.vmap.nbytes(),
                    "snapshot_error": None if (err := self.snapshotter.last_error) is None else str(err)}

    def recover(self) -> None:
        """Retry the start-up comparison with the anchor (after AnchorUnavailableError)."""
        from safehold.freshness import recovery

        recovery.compare_with_anchor(self)
        self.check()

    def rejoin(self) -> bool:
        """Several writers: after the anchor lost the ledger (its members restarted) or was
        unreachable, compare with the anchor again — once the data owner re-anchored the ledger
        through another writer, this one catches up from the journal (every entry's MAC and link
        checked) and serves again. Nothing is accepted that the anchor does not hold; any other
        problem (rollback, fork, corrupt journal) is left for the owner.

        Returns:
            True if the store is fresh now.
        """
        from safehold.freshness import recovery

        if not isinstance(self.problem, AnchorLostError | LedgerUninitialisedError | AnchorUnavailableError):
            return self.problem is None
        try:  # quietly, while the anchor still holds nothing for the ledger (no log per round)
            if self.anchor.head(self.ledger) is None:
                return False
        except (AnchorUnavailableError, AnchorLostError):
            return False
        with self.committing():
            recovery.compare_with_anchor(self)
            if self.problem is None:
                self.fatal.clear()
                self.anchorer.kick()
                log.info("ledger %r: fresh again at %s (the anchor holds this store's head)",
                         self.ledger, self.state.committed.describe())
        return self.problem is None

    def reanchor_proposal(self) -> dict[str, Any]:
        """What re-anchoring would accept: ``{ledger, epoch, digest, rows, namespaces,
        last_entry_time_ms, problem}`` (shown to the owner before signing)."""
        from safehold.freshness import recovery

        return recovery.proposal(self)

    def reanchor(self, statement: Any) -> AnchorHead:
        """Apply the owner's :class:`~safehold.freshness.anchor.statements.SignedOwnerStatement`
        for this store's current head, then serve; the statement is recorded in the journal.

        Raises:
            OwnerStatementError: wrong ledger / head, or the anchor refused it.
            AnchorUnavailableError: no majority answered.
        """
        from safehold.freshness import recovery

        return recovery.reanchor(self, statement)

    # -- several writers of one ledger ------------------------------------------------------

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Hold the commit lock (re-entrant for the holding thread: a catch-up inside a commit)."""
        me = threading.get_ident()
        if self._lock_owner == me:
            yield
            return
        with self.commit_lock:
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def catch_up(self, ops: StoreOps | None = None) -> int:
        """Apply the journal entries other writers of this ledger committed after this replica's
        committed head: every entry's MAC, epoch and link to the previous one are checked (the
        database cannot forge, reorder or splice entries); their keys stay unanchored until
        the anchor covers them. Returns the number of entries applied.

        Raises (and records, see :meth:`fail`):
            StoreForkedError: an entry that does not chain to this replica's head (another
                history). JournalCorruptError: a gap, a bad MAC, a missing snapshot.
        """
        try:
            with self.committing():
                n = self._catch_up_locked(ops if ops is not None else self._ops())
        except StoreStateError as e:
            self.fail(e)
            raise
        if n:
            self.anchorer.kick()
        return n

    def _journal_after(self, ops: StoreOps, epoch: int) -> list[Row]:
        out: list[Row] = []
        after = epoch_key(epoch)
        while True:
            page = ops.scan(JOURNAL_NS, after=after, limit=_PAGE)
            out += page
            if len(page) < _PAGE:
                return out
            after = page[-1].key

    def _catch_up_locked(self, ops: StoreOps) -> int:
        if self.doubt is not None:  # settle our own in-doubt entry first: never apply it twice
            from safehold.freshness.commit import _settle_doubt

            _settle_doubt(self)
        st, led = self.state, self.ledger
        c = st.committed
        rows = self._journal_after(ops, c.epoch)
        if not rows:
            return 0
        if int.from_bytes(rows[0].key, "big") != c.epoch + 1:
            if c.epoch and ops.get(JOURNAL_NS, epoch_key(c.epoch)) is not None:
                raise JournalCorruptError(f"ledger {led!r}: journal entry {c.epoch + 1} is missing "
                                          f"(entry {c.epoch} and later ones are present)",
                                          ledger=led, store_epoch=c.epoch + 1)
            return self._reload_locked(ops)
        e, d, n = c.epoch, c.digest, 0
        for r in rows:
            epoch = int.from_bytes(r.key, "big")
            if epoch != e + 1:
                raise JournalCorruptError(f"ledger {led!r}: journal entry {e + 1} is missing",
                                          ledger=led, store_epoch=e + 1)
            entry, digest = decode_entry(r.value, self.keys, ledger=led, epoch=epoch)
            if entry.prev != d:
                raise StoreForkedError(
                    f"ledger {led!r}: journal entry {epoch} (written by another writer) does not chain "
                    f"to entry {e} this replica committed or read: another history of the ledger",
                    ledger=led, store_epoch=epoch)
            st.apply_foreign(AnchorHead(epoch, digest), entry.changes)
            self.journal_bytes += len(r.value)
            if entry.snapshot is not None:
                self.snapshotter.base = max(self.snapshotter.base, entry.snapshot.epoch)
            e, d, n = epoch, digest, n + 1
        self.caught_up += n
        return n

    def _reload_locked(self, ops: StoreOps) -> int:
        """The entries after this replica's head were folded into another writer's snapshot:
        rebuild the map from snapshot + journal (as at start-up) and swap it in."""
        from safehold.freshness import recovery

        st, before = self.state, self.state.committed
        rebuilt = recovery.rebuild(self)
        if rebuilt.problem is not None:
            raise rebuilt.problem
        if rebuilt.head.epoch < before.epoch or (
                before.epoch in rebuilt.digests and rebuilt.digests[before.epoch] != before.digest):
            raise StoreForkedError(
                f"ledger {self.ledger!r}: the journal rebuilt from another writer's snapshot ends at "
                f"{rebuilt.head.describe()} and does not extend this replica's {before.describe()}",
                ledger=self.ledger, store_epoch=rebuilt.head.epoch)
        st.replace(rebuilt.vmap, rebuilt.head, rebuilt.digests)
        # entries past what this replica saw anchored stay unanchored (the snapshot itself was
        # anchored before its journal entries were deleted)
        for r in self._journal_after(ops, max(st.anchored.epoch, rebuilt.snapshot)):
            epoch = int.from_bytes(r.key, "big")
            entry, _ = decode_entry(r.value, self.keys, ledger=self.ledger, epoch=epoch)
            st.mark_unanchored(epoch, [(c.namespace, c.key) for c in entry.changes if c.kind != POSTINGS],
                               list({(c.namespace, c.key[: st.vmap.kind(c.namespace)[1]])
                                     for c in entry.changes if c.kind == POSTINGS}))
        self.snapshotter.base = max(self.snapshotter.base, rebuilt.snapshot)
        self.caught_up += rebuilt.head.epoch - before.epoch
        log.info("ledger %r: reloaded from another writer's snapshot (epoch %d -> %d)",
                 self.ledger, before.epoch, rebuilt.head.epoch)
        return rebuilt.head.epoch - before.epoch

    def endorse(self, head: AnchorHead) -> None:
        """Adopt an anchor head another writer advanced to, if this replica's chain passes
        through it (call after :meth:`catch_up`).

        Raises (and records):
            StoreRolledBackError: the anchor is ahead of every entry in the database.
            StoreForkedError: this replica's chain holds another entry at the head's epoch.
        """
        st = self.state
        with st.lock:
            if head.epoch <= st.anchored.epoch:
                return
            if head.epoch > st.committed.epoch:
                err: StoreStateError = StoreRolledBackError(
                    f"ledger {self.ledger!r}: the anchor holds {head.describe()} but the database's "
                    f"journal ends at {st.committed.describe()}: entries the anchor confirmed are "
                    "missing from the database", ledger=self.ledger, store_epoch=st.committed.epoch,
                    anchor_epoch=head.epoch)
            elif st.digests.get(head.epoch, head.digest) != head.digest:
                err = StoreForkedError(
                    f"ledger {self.ledger!r}: the anchor holds {head.describe()}, this replica's chain "
                    "holds another entry at that epoch: another history of the ledger",
                    ledger=self.ledger, store_epoch=st.committed.epoch, anchor_epoch=head.epoch)
            else:
                st.anchor(head)
                return
        self.fail(err)
        raise err

    def sync(self, *, full: bool = True) -> AnchorHead | None:
        """Catch up with every write the anchor has confirmed for this ledger, whichever
        replica made it, so that the next read is checked against it (the linearizable read
        barrier: one anchor head read, plus a journal read when something is new).

        Args:
            full: read the journal even when the anchor has nothing new (entries other writers
                committed but have not anchored yet; used when a read met an unknown row).

        Returns:
            The anchor's head, or None when the anchor is unavailable (then only the journal
            was read: what it adds stays unanchored, and reads of it wait).

        Raises:
            StoreForkedError / StoreRolledBackError / JournalCorruptError / AnchorLostError
            (recorded: the store stops serving).
        """
        self.live()
        sent = time.monotonic()
        try:
            head = self.anchor.head(self.ledger)
        except AnchorUnavailableError:
            head = None
        except AnchorLostError as e:
            self.fail(e)
            raise
        except AnchorConflictError as e:
            err = StoreForkedError(f"ledger {self.ledger!r}: {e}", ledger=self.ledger)
            self.fail(err)
            raise err from None
        if full or (head is not None and head.epoch > self.state.committed.epoch):
            self.catch_up()
        if head is not None:
            self.endorse(head)
            self.anchorer.confirmed = max(self.anchorer.confirmed, sent)
        return head

    def _sync_after_mismatch(self) -> bool:
        """A read or write met a row the map does not expect: maybe another writer changed it.
        True if catching up changed this replica's state (then the caller checks again)."""
        st = self.state
        before = (st.committed.epoch, st.anchored.epoch)
        self.sync(full=True)
        return (st.committed.epoch, st.anchored.epoch) != before

    # -- helpers --------------------------------------------------------------------------

    def live(self) -> None:
        """Raise StoreClosedError after :meth:`close`, or the recorded problem."""
        if self._closed:
            from safehold.store.errors import StoreClosedError

            raise StoreClosedError(f"fresh store of ledger {self.ledger!r} is closed")
        if self.problem is not None:
            raise self.problem

    def _guard(self, namespace: object) -> str:
        self.live()
        if self.caught_up and self.sync_interval > 0:
            self._lease()
        if namespace in self._names:
            return namespace
        ns = check_namespace(namespace)
        if ns.startswith(RESERVED_PREFIX):
            raise ValueError(f"namespace {ns!r} is reserved for the freshness journal")
        if len(self._names) < 10_000:
            self._names.add(ns)
        return ns

    def _lease(self) -> None:
        """Several writers: serve only while the anchor's head was confirmed (a head read or an
        accepted advance, dated when it was sent) within ``2 * sync_interval``; else confirm it
        now. The bounded-staleness promise then holds even for a process the operator froze
        (SIGSTOP) past its poll: on waking, its first operation reads the head first.

        Raises:
            AnchorUnavailableError: the head cannot be confirmed (no majority answers).
            StoreForkedError / StoreRolledBackError / AnchorLostError: as :meth:`sync`.
        """
        a = self.anchorer
        if time.monotonic() - a.confirmed <= 2 * self.sync_interval:
            return
        with a.lease_lock:
            if time.monotonic() - a.confirmed <= 2 * self.sync_interval:
                return  # another thread confirmed it meanwhile
            if self.sync(full=False) is None:
                raise AnchorUnavailableError(
                    f"ledger {self.ledger!r}: the anchor's head could not be confirmed within "
                    f"{2 * self.sync_interval:.1f} s and other writers share this ledger: not serving "
                    "what may be stale")

    def _kind(self, ns: str) -> tuple[int, int]:
        k = self._kinds.get(ns)
        if k is None:
            k = self._kinds[ns] = self.state.vmap.kind(ns)
        return k

    def _ops(self) -> StoreOps:
        stack = self._local.stack
        return stack[-1][0] if stack else self.inner

    def own(self) -> TxChanges | None:
        """The merged changes of this thread's open transaction (None outside one)."""
        stack = self._local.stack
        if not stack:
            return None
        if len(stack) == 1:
            return stack[0][1]
        merged = TxChanges()
        for _, c in stack:
            merged.merge(c)
        return merged

    def wait_for(self, epoch: int, what: str) -> None:
        """Block until ``epoch`` is anchored, or raise NotAnchoredError / the recorded problem."""
        st = self.state
        if epoch <= st.anchored.epoch:
            return
        if not st.wait_anchored(epoch, self.wait_timeout, self.fatal):
            if self.problem is not None:
                raise self.problem
            raise NotAnchoredError(
                f"{what} is stored (epoch {epoch}), not yet anchored: the anchor has confirmed "
                f"epoch {st.anchored.epoch}; it becomes visible when the anchor answers")

    def _verified(self, read: Callable[[], Any], found_of: Callable[[Any], Any],
                  candidates: Callable[[], Sequence[tuple[Any, int]]],
                  error: Callable[[Any, Any], FreshnessError], what: str) -> Any:
        """Read, compare with the candidates; on a mismatch re-read with the map frozen (a
        concurrent commit explains most mismatches), then raise ``error(found, expected)``."""
        got = read()
        found = found_of(got)
        wait = check.match(found, candidates())
        if wait is None:
            with self.state.lock:
                got = read()
                found = found_of(got)
                cands = candidates()
                wait = check.match(found, cands)
            for _ in range(_SYNC_TRIES):  # another writer's entries? (it may keep writing the row)
                if wait is not None or not self._sync_after_mismatch():
                    break
                with self.state.lock:
                    got = read()
                    found = found_of(got)
                    cands = candidates()
                    wait = check.match(found, cands)
            if wait is None:
                err = error(found, cands[0][0])
                log.warning("FRESHNESS: %s", err)
                raise err
        self.wait_for(wait, what)
        return got

    # -- reads ----------------------------------------------------------------------------

    def get(self, namespace: str, key: bytes) -> Row | None:
        """The row, checked (see :meth:`StoreOps.get`).

        Raises:
            RowRolledBackError / RowDeletedError / RowRestoredError: the store's row is not the
                latest (for posting namespaces: PostingsStaleError for the row's group).
            NotAnchoredError: the row's latest write is not anchored within ``wait_timeout``.
            StoreStateError subclasses: the store is not being served (see :meth:`check`).
        """
        ns, key = self._guard(namespace), check_key(key)
        kind, plen = self._kind(ns)
        if kind == POSTINGS:
            return next((r for r in self.scan_prefix(ns, key[:plen]) if r.key == key), None)
        own, ops, keys = self.own(), self._ops(), self.keys
        if own is None:  # the common case: lock-free comparison with the settled map state
            got = ops.get(ns, key)
            exp = self.state.fast_point(ns, key)
            if exp is not False and exp == (None if got is None else
                                            (got.version, keys.leaf(ns, key, got.version, got.value))):
                return got
        row: Row | None = self._verified(
            lambda: ops.get(ns, key), lambda r: check.point_state(keys, ns, r),
            lambda: self.state.point_candidates(ns, key, own),
            lambda f, e: check.point_error(ns, key, f, e), f"row {key.hex()} of namespace {ns!r}")
        return row

    def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[Row | None]:
        """:meth:`get` for many keys of one point namespace: one batched read of the inner
        store, each row compared with the map's settled state; a row that does not match (or
        is being committed, or inside a transaction, or a posting namespace) takes
        :meth:`get`'s full path, with the same errors.
        """
        ns = self._guard(namespace)
        keys = [check_key(k) for k in keys]
        if self._kind(ns)[0] == POSTINGS or self.own() is not None:
            return [self.get(ns, k) for k in keys]
        fk, st = self.keys, self.state
        out: list[Row | None] = []
        for key, got in zip(keys, self._ops().get_many(ns, keys), strict=True):
            exp = st.fast_point(ns, key)
            if exp is not False and exp == (None if got is None else
                                            (got.version, fk.leaf(ns, key, got.version, got.value))):
                out.append(got)
            else:
                out.append(self.get(ns, key))
        return out

    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """A page of rows, checked to be exactly the map's page (see :meth:`StoreOps.scan`).

        Raises:
            RowsOmittedError / RowRestoredError / RowRolledBackError: the page differs (names the
                first differing key); PostingsStaleError for posting namespaces.
            NotAnchoredError, StoreStateError: as :meth:`get`.
        """
        ns = self._guard(namespace)
        after, limit = check_scan(after, limit)
        kind, plen = self.state.vmap.kind(ns)
        if kind == POSTINGS:
            return self._posting_scan(ns, plen, after, limit)
        own, ops, keys = self.own(), self._ops(), self.keys
        rows: list[Row] = self._verified(
            lambda: ops.scan(ns, after=after, limit=limit), lambda rs: check.page_rows(keys, ns, rs),
            lambda: self.state.page_candidates(ns, after, limit, own),
            lambda f, e: check.page_error(ns, f, e, complete=len(f) < limit),
            f"a page of namespace {ns!r}")
        return rows

    def scan_prefix(self, namespace: str, prefix: bytes) -> list[Row]:
        """Every row whose key starts with ``prefix``, in key order, checked as a whole.

        Posting namespaces: ``prefix`` must be the namespace's prefix length; the group's count
        and keyed multiset hash must match. Point namespaces: page by page as :meth:`scan`.

        Raises:
            PostingsStaleError: the group differs (rows omitted, stale rows restored).
            ValueError: a prefix of the wrong length for a posting namespace.
        """
        ns, prefix = self._guard(namespace), check_key(prefix)
        kind, plen = self.state.vmap.kind(ns)
        if kind != POSTINGS:
            return [r for r in self._iter_point(ns, check.prefix_floor(prefix), prefix)]
        if len(prefix) != plen:
            raise ValueError(f"namespace {ns!r} groups postings by {plen}-byte prefixes, got {len(prefix)}")
        own, ops, keys = self.own(), self._ops(), self.keys
        # the map's row count sizes the first page: most groups are a few rows, and a page of
        # _PAGE rows past a 3-row group made a search's lookup ~100 x the reads it needed
        first = self.state.vmap.group(ns, prefix)[0] + 2
        rows: list[Row] = self._verified(
            lambda: _read_group(ops, ns, prefix, first), lambda rs: check.group_state(keys, ns, rs),
            lambda: self.state.group_candidates(ns, prefix, own),
            lambda f, e: check.group_error(ns, prefix, f, e), f"posting group {prefix.hex()} of {ns!r}")
        return rows

    def _iter_point(self, ns: str, after: bytes | None, prefix: bytes) -> Iterator[Row]:
        while True:
            page = self.scan(ns, after=after, limit=_PAGE)
            for r in page:
                if not r.key.startswith(prefix):
                    if r.key > prefix:
                        return
                    continue
                yield r
            if len(page) < _PAGE:
                return
            after = page[-1].key

    def _posting_scan(self, ns: str, plen: int, after: bytes | None, limit: int) -> list[Row]:
        """A generic page of a posting namespace: every group it touches is read and checked
        whole, and the page must be exactly those groups' rows in (after, last] (so edge groups
        cost a second read; posting readers should use :meth:`scan_prefix`)."""
        try:
            return self._posting_page(ns, plen, after, limit)
        except RowFreshnessError:
            try:
                with self.state.lock:  # a concurrent commit between the reads, or a real finding
                    return self._posting_page(ns, plen, after, limit)
            except RowFreshnessError:
                if not self._sync_after_mismatch():  # another writer's entries explain it?
                    raise
        for _ in range(_SYNC_TRIES):
            try:
                with self.state.lock:
                    return self._posting_page(ns, plen, after, limit)
            except RowFreshnessError:
                if not self._sync_after_mismatch():
                    raise
        with self.state.lock:
            return self._posting_page(ns, plen, after, limit)

    def _posting_page(self, ns: str, plen: int, after: bytes | None, limit: int) -> list[Row]:
        page = self._ops().scan(ns, after=after, limit=limit)
        hi = page[-1].key if len(page) >= limit else None
        lo_p = after[:plen] if after is not None else None
        seen = {r.key[:plen] for r in page}
        mapped: list[bytes] = []
        with self.state.lock:
            for p, _, _ in self.state.vmap.groups_from(ns, check.prefix_floor(lo_p) if lo_p else None):
                if hi is not None and p > hi[:plen] or len(mapped) > limit + len(seen):
                    break
                mapped.append(p)
        want: list[Row] = []
        for p in sorted(seen | set(mapped)):
            want += [r for r in self.scan_prefix(ns, p)
                     if (after is None or r.key > after) and (hi is None or r.key <= hi)]
            if len(want) > limit:
                break
        found, expected = check.page_rows(self.keys, ns, page), check.page_rows(self.keys, ns, want[:limit])
        if found != expected:
            raise check.page_error(ns, found, expected, complete=len(page) < limit)
        return page

    # -- writes ---------------------------------------------------------------------------

    def transaction(self, *, wait: bool = True) -> AbstractContextManager[StoreOps]:
        """An atomic block: one journal entry and one anchor advance for the whole block
        (nested calls are savepoints). With ``wait=False`` the block returns once the database
        committed; ``tx.ticket`` (the entry's epoch) is then passed to :meth:`wait_for`.

        Raises (on exit): ConflictError and the body's exceptions (after rollback);
            AnchorUnavailableError (nothing written: the anchor is down); NotAnchoredError
            (stored, not anchored in time); Row*Error from a write that met a tampered row.
        """
        from safehold.freshness.commit import TxContext

        self.live()
        return TxContext(self, wait=wait)

    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set (see :meth:`StoreOps.put`), checked against the map; outside a
        transaction it is a transaction of its own (anchored before returning)."""
        if self._local.stack:
            from safehold.freshness.commit import FreshTx

            return FreshTx(self).put(namespace, key, value, expected_version=expected_version)
        with self.transaction() as tx:
            return tx.put(namespace, key, value, expected_version=expected_version)

    def insert_new(self, namespace: str, rows: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Insert-only writes of many rows (see :meth:`StoreOps.insert_new`), recorded as
        :meth:`put` would record them; as :meth:`put` outside a transaction."""
        if self._local.stack:
            from safehold.freshness.commit import FreshTx

            return FreshTx(self).insert_new(namespace, rows)
        with self.transaction() as tx:
            return tx.insert_new(namespace, rows)

    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """Delete (see :meth:`StoreOps.delete`), checked against the map; as :meth:`put`."""
        if self._local.stack:
            from safehold.freshness.commit import FreshTx

            return FreshTx(self).delete(namespace, key, expected_version=expected_version)
        with self.transaction() as tx:
            return tx.delete(namespace, key, expected_version=expected_version)

    def reclaim(self, max_pages: int | None = None) -> int:
        """The inner store's :meth:`~safehold.store.base.Store.reclaim` (pages move, rows do
        not: nothing the checks read changes). The snapshotter calls it after each snapshot.
        Raises StoreError."""
        return self.inner.reclaim(max_pages)

    def audit(self, namespaces: Sequence[str] | None = None) -> list[FreshnessError]:
        """Full scan of every (or the given) namespace against the map; returns the findings
        (empty = all rows fresh). See :mod:`safehold.freshness.audit`."""
        from safehold.freshness.audit import full_scan

        return full_scan(self, namespaces)

    def close(self) -> None:
        """Stop the anchorer (pending commits stay in the journal: the next start rolls them
        forward) and close the inner store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.anchorer.stop()
        self.inner.close()


def _read_group(ops: StoreOps, ns: str, prefix: bytes, first: int = _PAGE) -> list[Row]:
    """Every row of ``ns`` whose key starts with ``prefix`` (paged reads of the inner store: a
    first page of ``first`` rows, then pages growing 4 x up to :data:`_PAGE`)."""
    out: list[Row] = []
    after = check.prefix_floor(prefix)
    limit = max(2, min(first, _PAGE))
    while True:
        page = ops.scan(ns, after=after, limit=limit)
        for r in page:
            if not r.key.startswith(prefix):
                return out
            out.append(r)
        if len(page) < limit:
            return out
        after = page[-1].key
        limit = min(limit * 4, _PAGE)
