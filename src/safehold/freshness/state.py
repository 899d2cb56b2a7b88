"""The live state of one ledger inside a :class:`~safehold.freshness.store.FreshStore`: the
verifier map plus the bookkeeping of commits on their way to the anchor, and the rules that
decide whether what the store returned is acceptable.

Epochs: ``committed`` (C) is the last journal entry committed to the database and applied to
the map; ``anchored`` (A <= C) the last one a majority of anchor members confirmed. Entries in
(A, C] are *unanchored*: their rows are in the database, and a read that meets one of them waits
until it is anchored (it never returns a state that a restore could still undo). While one
commit is between its database COMMIT and its map update, its changes are *tentative*: a read
may see the database before or after that COMMIT, so both states are acceptable.

A read's *candidates* are the states the store may legitimately return, each with the epoch
that must be anchored before the value may be served (0 = already anchored). What the store
returned must equal one of them; otherwise the finding is raised (``safehold.freshness.errors``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.digests import MSH_MOD
from safehold.freshness.vmap import POINT, Change, VerifierMap

#: Chain digests kept below the anchored head (other writers' heads are checked against them).
_DIGESTS_KEPT = 256

__all__ = ["Delta", "LedgerState", "Point", "TxChanges"]

#: A point row's state: (version, leaf), or None = no row.
Point = tuple[int, bytes] | None
#: A posting group's change: (count delta, hash delta mod 2**128).
Delta = tuple[int, int]


@dataclass
class TxChanges:
    """Changes of one open transaction (and its savepoints, merged on success).

    Attributes:
        points: (ns, key) → new point state (None = deleted).
        postings: (ns, key) → (version before the transaction, version now); 0 = no row.
    """

    points: dict[tuple[str, bytes], Point] = field(default_factory=dict)
    postings: dict[tuple[str, bytes], tuple[int, int]] = field(default_factory=dict)

    def merge(self, child: TxChanges) -> None:
        """Fold a committed savepoint's changes into this one."""
        self.points.update(child.points)
        for k, (old, new) in child.postings.items():
            first = self.postings[k][0] if k in self.postings else old
            self.postings[k] = (first, new)

    def posting_version(self, ns: str, key: bytes) -> int | None:
        """The posting row's version as this transaction left it, or None if untouched."""
        v = self.postings.get((ns, key))
        return None if v is None else v[1]

    def changes(self, kinds: Mapping[str, int]) -> list[Change]:
        """The journal form, in a stable order (points, then postings, each sorted)."""
        out = [Change(ns, k, POINT, 0 if s is None else s[0], b"" if s is None else s[1])
               for (ns, k), s in sorted(self.points.items())]
        out += [Change(ns, k, kinds[ns], new, b"", old)
                for (ns, k), (old, new) in sorted(self.postings.items()) if old != new]
        return out

    def __bool__(self) -> bool:
        return bool(self.points) or any(o != n for o, n in self.postings.values())


@dataclass
class _Tentative:
    epoch: int
    points: dict[tuple[str, bytes], Point]
    groups: dict[tuple[str, bytes], Delta]


class LedgerState:
    """See the module docstring. Every method takes :attr:`lock` itself unless named ``*_locked``.

    Attributes:
        vmap: the verifier map (committed state). lock / cond: guard everything here.
        committed / anchored: heads C and A (``anchored`` carries the members' signatures).
    """

    def __init__(self, vmap: VerifierMap, committed: AnchorHead, anchored: AnchorHead,
                 digests: Mapping[int, bytes] | None = None) -> None:
        self.vmap = vmap
        self.lock = threading.RLock()  # re-entered by a re-read with the map frozen
        self.cond = threading.Condition(self.lock)
        self.committed = committed
        self.anchored = anchored
        self._tentative: _Tentative | None = None
        self._up: dict[tuple[str, bytes], int] = {}  # unanchored point keys → epoch
        self._ug: dict[tuple[str, bytes], int] = {}  # unanchored posting groups → epoch
        self._pending: deque[tuple[int, list[tuple[str, bytes]], list[tuple[str, bytes]]]] = deque()
        #: chain digest per epoch from (about) the anchored head to the committed head: another
        #: writer's anchor head is accepted only if this chain passes through it
        self.digests: dict[int, bytes] = dict(digests or {})
        self.digests[committed.epoch] = committed.digest

    # -- commits ------------------------------------------------------------------------------

    def group_deltas(self, tx: TxChanges) -> dict[tuple[str, bytes], Delta]:
        """Posting group deltas of ``tx`` (needs the map's prefix lengths)."""
        out: dict[tuple[str, bytes], Delta] = {}
        plens: dict[str, int] = {}  # prefix length per namespace, looked up once
        posting = self.vmap.keys.posting
        for (ns, key), (old, new) in tx.postings.items():
            if old == new:
                continue
            plen = plens.get(ns)
            if plen is None:
                plen = plens[ns] = self.vmap.kind(ns)[1]
            g = (ns, key[:plen])
            dc, dh = out.get(g, (0, 0))
            if old:
                dc, dh = dc - 1, dh - posting(ns, key, old)
            if new:
                dc, dh = dc + 1, dh + posting(ns, key, new)
            out[g] = (dc, dh % MSH_MOD)
        return out

    def begin_commit(self, epoch: int, tx: TxChanges, groups: dict[tuple[str, bytes], Delta]) -> None:
        """Mark ``tx`` tentative (its database COMMIT is about to run)."""
        with self.lock:
            self._tentative = _Tentative(epoch, dict(tx.points), groups)

    def abort_commit(self) -> None:
        """The COMMIT failed: forget the tentative changes."""
        with self.lock:
            self._tentative = None

    def finish_commit(self, head: AnchorHead, changes: list[Change]) -> None:
        """The COMMIT succeeded: apply to the map; its keys are unanchored until :meth:`anchor`.

        The keys are marked unanchored *before* the map changes, so a lock-free reader that
        sees a new map value also sees the mark (:meth:`fast_point`).
        """
        with self.cond:
            t = self._tentative
            pts = list(t.points) if t else []
            grs = list(t.groups) if t else []
            for k in pts:
                self._up[k] = head.epoch
            for k in grs:
                self._ug[k] = head.epoch
            if t is not None:  # the group deltas were computed when the commit began
                self.vmap.apply(c for c in changes if c.kind == POINT)
                self.vmap.apply_deltas(t.groups)
            else:
                self.vmap.apply(changes)
            self._pending.append((head.epoch, pts, grs))
            self.committed = head
            self.digests[head.epoch] = head.digest
            self._tentative = None
            self.cond.notify_all()

    def apply_foreign(self, head: AnchorHead, changes: Sequence[Change]) -> None:
        """Apply an entry another writer of the ledger committed (read back from the journal,
        its MAC and link already checked): as :meth:`finish_commit`, its keys unanchored until
        :meth:`anchor` covers ``head``."""
        with self.cond:
            pts = [(c.namespace, c.key) for c in changes if c.kind == POINT]
            grs = list({(c.namespace, c.key[: self.vmap.kind(c.namespace)[1]])
                        for c in changes if c.kind != POINT})
            self.mark_unanchored(head.epoch, pts, grs)
            self.vmap.apply(changes)
            self.committed = head
            self.digests[head.epoch] = head.digest
            self.cond.notify_all()

    def mark_unanchored(self, epoch: int, pts: list[tuple[str, bytes]], grs: list[tuple[str, bytes]]) -> None:
        """Reads of these point keys / posting groups wait until ``epoch`` is anchored."""
        with self.lock:
            if epoch <= self.anchored.epoch:
                return
            for k in pts:
                self._up[k] = epoch
            for k in grs:
                self._ug[k] = epoch
            self._pending.append((epoch, pts, grs))

    def replace(self, vmap: VerifierMap, committed: AnchorHead, digests: Mapping[int, bytes]) -> None:
        """Swap in a map rebuilt from snapshot + journal (another writer folded the entries this
        replica had not read into a snapshot). Callers mark the unanchored entries afterwards."""
        with self.cond:
            self.vmap = vmap
            self.committed = committed
            self.digests = dict(digests)
            self.digests[committed.epoch] = committed.digest
            self.cond.notify_all()

    def anchor(self, head: AnchorHead) -> None:
        """The anchor confirmed ``head`` (epoch <= committed): release what it covers."""
        with self.cond:
            if head.epoch < self.anchored.epoch:
                return
            self.anchored = head
            if len(self.digests) > 2 * _DIGESTS_KEPT:
                floor = head.epoch - _DIGESTS_KEPT
                self.digests = {e: d for e, d in self.digests.items() if e >= floor}
            while self._pending and self._pending[0][0] <= head.epoch:
                e, pts, grs = self._pending.popleft()
                for k in pts:
                    if self._up.get(k) == e:
                        del self._up[k]
                for k in grs:
                    if self._ug.get(k) == e:
                        del self._ug[k]
            self.cond.notify_all()

    def unanchored(self) -> int:
        """Committed entries not yet anchored."""
        return self.committed.epoch - self.anchored.epoch

    # -- candidates ---------------------------------------------------------------------------

    def fast_point(self, ns: str, key: bytes) -> Point | bool:
        """Lock-free: the row's settled state, or False when it is being committed or is not
        anchored (then the caller takes the locked path). The map is read before the marks."""
        exp = self.vmap.point(ns, key)
        if (ns, key) in self._up:
            return False
        t = self._tentative
        if t is not None and (ns, key) in t.points:
            return False
        return exp

    def point_candidates(self, ns: str, key: bytes, own: TxChanges | None) -> list[tuple[Point, int]]:
        """Acceptable states of one point row with the epoch to wait for."""
        if own is not None and (ns, key) in own.points:
            return [(own.points[(ns, key)], 0)]
        with self.lock:
            out = [(self.vmap.point(ns, key), self._up.get((ns, key), 0))]
            t = self._tentative
            if t is not None and (ns, key) in t.points:
                out.append((t.points[(ns, key)], t.epoch))
        return out

    def page_candidates(self, ns: str, after: bytes | None, limit: int,
                        own: TxChanges | None) -> list[tuple[list[tuple[bytes, int, bytes]], int]]:
        """Acceptable pages of a point namespace scan with the epoch to wait for."""
        mine = {k: s for (n, k), s in own.points.items() if n == ns} if own else {}
        with self.lock:
            t = self._tentative
            theirs = {k: s for (n, k), s in t.points.items() if n == ns} if t else {}
            extra = len(mine) + len(theirs)
            base = self.vmap.point_page(ns, after, limit + extra)
            out = [(_overlay(base, [mine], after, limit, limit + extra), 0)]
            if theirs:
                out.append((_overlay(base, [theirs, mine], after, limit, limit + extra), t.epoch if t else 0))
            hi = None
            for page, _ in out:
                if len(page) >= limit:
                    hi = page[-1][0] if hi is None else max(hi, page[-1][0])
                else:
                    hi = None
                    break
            wait = max((e for (n, k), e in self._up.items()
                        if n == ns and (after is None or k > after) and (hi is None or k <= hi)), default=0)
        return [(p, max(w, wait)) for p, w in out]

    def group_candidates(self, ns: str, prefix: bytes,
                         own: TxChanges | None) -> list[tuple[tuple[int, int], int]]:
        """Acceptable (count, hash) of a posting group with the epoch to wait for."""
        mine = (0, 0)
        if own is not None:
            mine = self.group_deltas(TxChanges(postings={k: v for k, v in own.postings.items()
                                                         if k[0] == ns and k[1].startswith(prefix)})
                                     ).get((ns, prefix), (0, 0))
        with self.lock:
            c, h = self.vmap.group(ns, prefix)
            out = [((c + mine[0], (h + mine[1]) % MSH_MOD), self._ug.get((ns, prefix), 0))]
            t = self._tentative
            if t is not None and (ns, prefix) in t.groups:
                dc, dh = t.groups[(ns, prefix)]
                out.append(((c + dc + mine[0], (h + dh + mine[1]) % MSH_MOD), t.epoch))
        return out

    def wait_anchored(self, epoch: int, timeout: float, failed: threading.Event | None = None) -> bool:
        """Block until ``anchored.epoch >= epoch``; False on timeout (or when ``failed`` is set)."""
        with self.cond:
            return self.cond.wait_for(
                lambda: self.anchored.epoch >= epoch or (failed is not None and failed.is_set()),
                timeout) and self.anchored.epoch >= epoch


def _overlay(base: list[tuple[bytes, int, bytes]], layers: Iterable[Mapping[bytes, Point]],
             after: bytes | None, limit: int, fetched: int) -> list[tuple[bytes, int, bytes]]:
    """``base`` (a map page of up to ``fetched`` rows: ``limit`` plus one per overridden key)
    with override layers applied, cut to ``limit``. Keys past a truncated ``base`` cannot be
    among the first ``limit`` (at most ``fetched - limit`` rows are removed).
    """
    rows = {k: (v, leaf) for k, v, leaf in base}
    cut = base[-1][0] if base and len(base) >= fetched else None
    for layer in layers:
        for k, s in layer.items():
            if after is not None and k <= after:
                continue
            if s is None:
                rows.pop(k, None)
            else:
                rows[k] = s
    keys = sorted(k for k in rows if cut is None or k <= cut)
    return [(k, rows[k][0], rows[k][1]) for k in keys[:limit]]
