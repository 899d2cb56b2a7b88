"""Start-up of a :class:`~safehold.freshness.store.FreshStore`: rebuild the verifier map from
snapshot + journal, compare the journal head with the anchor, and the owner's re-anchoring.

The crash ambiguity (CHIMERA's "inc-store dilemma") is resolved by the commit order: the
database always holds every entry the anchor holds, so on start-up, with ``(e_db, d_db)`` the
journal head and ``(e_a, d_a)`` the anchor's majority head:

======================================  ==========================================================
``e_db == e_a``, same digest            fresh: serve
``e_db > e_a`` and the chain passes     unacknowledged commits (crash before the anchor moved):
through ``(e_a, d_a)``                  roll forward (advance ``e_a -> e_db``), then serve
``e_db < e_a``                          :class:`StoreRolledBackError` (restored from a copy)
same epoch other digest, or no link     :class:`StoreForkedError`
anchor has no state for the ledger      :class:`AnchorLostError` / :class:`LedgerUninitialisedError`
anchor does not answer (no majority)    :class:`AnchorUnavailableError` (retry: ``recover()``)
======================================  ==========================================================
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safehold.errors import ConfigError
from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.anchor.statements import OwnerStatement, SignedOwnerStatement
from safehold.freshness.digests import genesis_digest
from safehold.freshness.errors import (
    AnchorConflictError,
    AnchorLostError,
    AnchorUnavailableError,
    FreshnessError,
    JournalCorruptError,
    LedgerUninitialisedError,
    OwnerStatementError,
    StoreForkedError,
    StoreRolledBackError,
)
from safehold.freshness.journal import JOURNAL_NS, SNAP_NS, Entry, SnapshotRef, decode_entry, parse_snapshot
from safehold.freshness.vmap import VerifierMap

if TYPE_CHECKING:
    from safehold.freshness.store import FreshStore

__all__ = ["Rebuilt", "check_ledger", "compare_with_anchor", "proposal", "reanchor", "rebuild",
           "statement_for"]

log = logging.getLogger("safehold.freshness")
_LEDGER_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def check_ledger(ledger: object) -> str:
    """Return ``ledger`` if it is 1..128 of ``[A-Za-z0-9._:/-]``. Raises ValueError."""
    if not isinstance(ledger, str) or not _LEDGER_RE.fullmatch(ledger):
        raise ValueError("ledger name must be 1..128 characters of [A-Za-z0-9._:/-]")
    return ledger


@dataclass
class Rebuilt:
    """The result of :func:`rebuild`.

    Attributes:
        vmap: the map at ``head``. head: the journal head (epoch 0 = empty journal).
        digests: chain digest per epoch from the snapshot epoch on (for the roll-forward check).
        first: the first journal epoch present. snapshot: the epoch of the snapshot in use (0 = none).
        last_time_ms: time of the newest entry. problem: set when the journal did not verify.
        journal_bytes: bytes of the journal entries after the snapshot (what a replay reads).
        snapshot_bytes: size of the snapshot in use (0 = none).
    """

    vmap: VerifierMap
    head: AnchorHead
    digests: dict[int, bytes] = field(default_factory=dict)
    first: int = 0
    snapshot: int = 0
    last_time_ms: int = 0
    problem: FreshnessError | None = None
    journal_bytes: int = 0
    snapshot_bytes: int = 0


def rebuild(fs: FreshStore) -> Rebuilt:
    """Rebuild the map from the newest usable snapshot plus the journal (no data-row scan).

    Findings (JournalCorruptError: edited or missing entries, a broken chain, a snapshot that
    does not match its reference; ConfigError: a namespace policy that contradicts the journal)
    are returned in ``problem`` with an empty map, so the store refuses to serve but stays
    open for the owner.
    """
    empty = VerifierMap(fs.keys, fs.policy)
    genesis = AnchorHead(0, genesis_digest(fs.ledger))
    try:
        return _replay(fs)
    except JournalCorruptError as e:
        return Rebuilt(empty, genesis, problem=e)
    except (ConfigError, ValueError) as e:
        return Rebuilt(empty, genesis, problem=JournalCorruptError(
            f"ledger {fs.ledger!r}: the freshness journal cannot be replayed: {e}", ledger=fs.ledger))


def _replay(fs: FreshStore) -> Rebuilt:
    rows = list(fs.inner.scan_all(JOURNAL_NS))
    genesis = genesis_digest(fs.ledger)
    if not rows:
        return Rebuilt(VerifierMap(fs.keys, fs.policy), AnchorHead(0, genesis), {0: genesis})
    epochs = []
    for r in rows:
        if len(r.key) != 8:
            raise JournalCorruptError(f"ledger {fs.ledger!r}: journal row key {r.key.hex()} is not an epoch")
        epochs.append(int.from_bytes(r.key, "big"))
    first, last = epochs[0], epochs[-1]
    if epochs != list(range(first, last + 1)):
        gap = next(e for i, e in enumerate(range(first, last + 1)) if epochs[i] != e)
        raise JournalCorruptError(f"ledger {fs.ledger!r}: journal entry {gap} is missing (entries "
                                  f"{first}..{last} expected without gaps)", ledger=fs.ledger,
                                  store_epoch=gap)
    pending: list[tuple[Entry, bytes]] = []
    vmap: VerifierMap | None = None
    digests: dict[int, bytes] = {}
    d = b""
    last_time = 0
    replayed = snap_size = 0
    snap = first - 1
    if first == 1:
        vmap, d, digests[0] = VerifierMap(fs.keys, fs.policy), genesis, genesis
    for r, e in zip(rows, epochs, strict=True):
        entry, digest = decode_entry(r.value, fs.keys, ledger=fs.ledger, epoch=e)
        last_time = entry.time_ms
        replayed += len(r.value)
        if vmap is None:  # looking for a snapshot of an epoch in first-1 .. e-1
            pending.append((entry, digest))
            ref = entry.snapshot
            # a snapshot past first-1: the process died while its garbage collection deleted the
            # journal up to it (batches of separate transactions); the entries it covers are
            # left over, checked to chain up to its digest, and not applied
            if ref is not None and first - 1 <= ref.epoch < e:
                vmap = _load_snapshot(fs, ref)
                snap, snap_size = ref.epoch, ref.size
                covered = [(pe, pd) for pe, pd in pending if pe.epoch <= snap]
                _check_covered(fs, covered, ref)
                digests.update((pe.epoch, pd) for pe, pd in covered)
                d = digests[snap] = ref.digest
                for pe, pd in pending[len(covered):]:
                    d = _apply(fs, vmap, pe, pd, d, digests)
                pending = []
            continue
        d = _apply(fs, vmap, entry, digest, d, digests)
    if vmap is None:
        raise JournalCorruptError(
            f"ledger {fs.ledger!r}: the journal starts at entry {first} but no entry names the snapshot "
            f"of epoch {first - 1}: older entries were deleted", ledger=fs.ledger, store_epoch=first)
    return Rebuilt(vmap, AnchorHead(last, d), digests, first, snap, last_time,
                   journal_bytes=replayed, snapshot_bytes=snap_size)


def _check_covered(fs: FreshStore, covered: list[tuple[Entry, bytes]], ref: SnapshotRef) -> None:
    """Entries ``first .. ref.epoch`` left over by an interrupted garbage collection: each must
    chain to the one before, and the last one's digest must be the snapshot's (a journal that
    forks before the snapshot is refused as it would be when replayed).

    Raises:
        JournalCorruptError: a broken link, or a digest at the snapshot's epoch that differs.
    """
    prev: bytes | None = None
    for pe, pd in covered:
        if prev is not None and pe.prev != prev:
            raise JournalCorruptError(
                f"ledger {fs.ledger!r}: journal entry {pe.epoch} does not chain to entry {pe.epoch - 1}",
                ledger=fs.ledger, store_epoch=pe.epoch)
        prev = pd
    if prev is not None and prev != ref.digest:
        raise JournalCorruptError(
            f"ledger {fs.ledger!r}: journal entry {ref.epoch} does not match the digest its snapshot "
            f"names", ledger=fs.ledger, store_epoch=ref.epoch)


def _apply(fs: FreshStore, vmap: VerifierMap, entry: Entry, digest: bytes, prev: bytes,
           digests: dict[int, bytes]) -> bytes:
    if entry.prev != prev:
        raise JournalCorruptError(
            f"ledger {fs.ledger!r}: journal entry {entry.epoch} does not chain to entry {entry.epoch - 1} "
            f"(names {entry.prev.hex()[:16]}…, expected {prev.hex()[:16]}…)", ledger=fs.ledger,
            store_epoch=entry.epoch)
    vmap.apply(entry.changes)
    digests[entry.epoch] = digest
    return digest


def _load_snapshot(fs: FreshStore, ref: SnapshotRef) -> VerifierMap:
    prefix = ref.epoch.to_bytes(8, "big")
    chunks: list[bytes] = []
    for r in fs.inner.scan_all(SNAP_NS):
        if r.key[:8] == prefix:
            if int.from_bytes(r.key[8:], "big") != len(chunks):
                raise JournalCorruptError(f"ledger {fs.ledger!r}: snapshot {ref.epoch} chunk "
                                          f"{len(chunks)} is missing", ledger=fs.ledger)
            chunks.append(r.value)
    body = parse_snapshot(chunks, ref, ledger=fs.ledger)
    try:
        return VerifierMap.load(body, fs.keys, fs.policy)
    except ValueError as e:
        raise JournalCorruptError(f"ledger {fs.ledger!r}: snapshot {ref.epoch} is malformed: {e}",
                                  ledger=fs.ledger) from None


def compare_with_anchor(fs: FreshStore, _attempt: int = 0) -> None:
    """Compare the journal head with the anchor and set the store's state (module docstring).

    Several writers of the ledger (replicas on one database): an anchor ahead of the journal
    read at start-up, or a roll-forward refused because another writer moved the anchor
    meanwhile, is first caught up from the journal (``FreshStore.catch_up``) and compared again.
    """
    if fs.history.problem is not None:
        fs.fail(fs.history.problem, fatal=False)
        return
    db, led = fs.state.committed, fs.ledger
    where = f"ledger {led!r}: the store's journal is at {db.describe()}"
    try:
        a = fs.anchor.head(led)
    except AnchorUnavailableError as e:
        fs.problem = e
        return
    except AnchorLostError as e:
        if db.epoch == 0:
            fs.fail(LedgerUninitialisedError(f"{where}: a new store; the data owner must initialise the "
                                             f"ledger ({e})", ledger=led, store_epoch=0), fatal=False)
        else:
            fs.fail(AnchorLostError(f"{where}, but {e}", ledger=led, store_epoch=db.epoch), fatal=False)
        return
    except AnchorConflictError as e:
        fs.fail(StoreForkedError(f"{where}: {e}", ledger=led, store_epoch=db.epoch), fatal=False)
        return
    if a is None:
        cls = LedgerUninitialisedError if db.epoch == 0 else AnchorLostError
        fs.fail(cls(f"{where}; the anchor holds no state for it ("
                    + ("a new store: the data owner must initialise the ledger)" if db.epoch == 0 else
                       "lost, or never initialised): the data owner must re-anchor"),
                    ledger=led, store_epoch=db.epoch), fatal=False)
        return
    if a.epoch > db.epoch:  # another writer may have committed since the journal was read
        try:
            fs.catch_up()
        except FreshnessError:
            return  # recorded
        db = fs.state.committed
        where = f"ledger {led!r}: the store's journal is at {db.describe()}"
    if a.same(db):
        fs.state.anchor(a)
        fs.problem = None
        return
    if a.epoch > db.epoch:
        fs.fail(StoreRolledBackError(
            f"{where}, behind the anchor's {a.describe()}: the store was restored from an earlier "
            f"copy or lost {a.epoch - db.epoch} committed transaction(s)", ledger=led,
            store_epoch=db.epoch, anchor_epoch=a.epoch), fatal=False)
        return
    linked = fs.state.digests.get(a.epoch, fs.history.digests.get(a.epoch))
    if linked != a.digest:
        why = ("the anchor's head is older than the store's snapshot" if linked is None
               else f"the store's entry {a.epoch} is another one")
        fs.fail(StoreForkedError(f"{where}; the anchor holds {a.describe()} and {why}: another "
                                 "history of this ledger", ledger=led, store_epoch=db.epoch,
                                 anchor_epoch=a.epoch), fatal=False)
        return
    try:  # roll forward: commits stored but not anchored before a crash
        head = fs.anchor.advance(led, a, db)
    except AnchorUnavailableError as e:
        fs.problem = e
        return
    except (AnchorConflictError, AnchorLostError) as e:
        if _attempt < 3:  # another writer moved the anchor meanwhile: look again
            compare_with_anchor(fs, _attempt + 1)
            return
        fs.fail(StoreForkedError(f"{where}; rolling forward from the anchor's {a.describe()} "
                                 f"failed: {e}", ledger=led, store_epoch=db.epoch,
                                 anchor_epoch=a.epoch), fatal=False)
        return
    fs.state.anchor(head)
    fs.rolled_forward = db.epoch - a.epoch
    log.warning("ledger %r: rolled forward %d entr(y/ies) stored but not anchored before a crash "
                "(epoch %d -> %d)", led, db.epoch - a.epoch, a.epoch, db.epoch)
    fs.problem = None


def proposal(fs: FreshStore) -> dict[str, Any]:
    """What re-anchoring this store would accept (shown to the owner before signing)."""
    st = fs.state
    with st.lock:
        rows = {ns: st.vmap.rows(ns) for ns in st.vmap.namespaces()}
        head = st.committed
    return {"ledger": fs.ledger, "epoch": head.epoch, "digest": head.digest.hex(), "namespaces": rows,
            "rows": sum(rows.values()), "last_entry_time_ms": fs.history.last_time_ms,
            "problem": None if fs.problem is None else str(fs.problem)}


def statement_for(fs: FreshStore, action: str) -> OwnerStatement:
    """An unsigned owner statement for this store's head, addressed to the reachable members.

    Raises:
        AnchorUnavailableError: fewer than a majority of members answer.
    """
    p = proposal(fs)
    members = tuple(m.member for m in fs.anchor.members())
    summary = {k: p[k] for k in ("rows", "last_entry_time_ms")}
    return OwnerStatement(action, fs.ledger, p["epoch"], bytes.fromhex(p["digest"]), members, summary=summary)


def reanchor(fs: FreshStore, signed: SignedOwnerStatement) -> AnchorHead:
    """Apply an owner statement for the store's current head (see ``FreshStore.reanchor``)."""
    from safehold.freshness.commit import TxContext

    if fs.history.problem is not None:
        raise fs.history.problem
    st, db = signed.statement, fs.state.committed
    if st.ledger != fs.ledger:
        raise OwnerStatementError(f"owner statement is for ledger {st.ledger!r}, not {fs.ledger!r}")
    if (st.epoch, st.digest) != (db.epoch, db.digest):
        raise OwnerStatementError(
            f"owner statement names epoch {st.epoch} (digest {st.digest.hex()[:16]}…) but the store's "
            f"head is {db.describe()}: it was signed for another state")
    head = fs.anchor.initialise(signed)
    with fs.state.cond:
        fs.state.anchored = AnchorHead(0, b"")
    fs.state.anchor(head)
    fs.problem = None
    fs.fatal.clear()
    note = json.dumps({"owner-statement": signed.to_json()}, sort_keys=True).encode()
    with TxContext(fs, wait=True, note=note):
        pass
    return head
