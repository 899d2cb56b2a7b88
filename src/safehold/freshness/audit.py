"""The background full-scan audit: every row of every namespace the map knows, against the map.

Start-up rebuilds the map from snapshot + journal without reading the data rows, and reads
check only the rows they touch; this audit finds what nobody read yet (a row rolled back in a
cold corner, a restored row, a stale posting group) and reports it loudly.

Per namespace it streams the database rows (unverified, in key order) beside the map's entries;
every difference is re-checked through the verified read (:meth:`FreshStore.get` /
:meth:`FreshStore.scan_prefix`, which re-read with the map frozen), so a write racing with the
audit is not reported. Namespaces the map has never seen cannot be listed through the store
interface and are not covered (a read of one still refuses its rows).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from safehold.freshness.check import group_state
from safehold.freshness.errors import FreshnessError, NotAnchoredError, RowFreshnessError
from safehold.freshness.vmap import POINT
from safehold.store.base import Row

if TYPE_CHECKING:
    from safehold.freshness.store import FreshStore

__all__ = ["AuditThread", "full_scan"]

log = logging.getLogger("safehold.freshness")
MAX_FINDINGS = 100


def full_scan(fs: FreshStore, namespaces: Sequence[str] | None = None) -> list[FreshnessError]:
    """Audit ``namespaces`` (default: every namespace in the map); returns up to
    :data:`MAX_FINDINGS` findings (RowFreshnessError subclasses)."""
    fs.live()
    with fs.state.lock:
        names = list(namespaces) if namespaces is not None else fs.state.vmap.namespaces()
    found: list[FreshnessError] = []
    for ns in names:
        kind, plen = fs.state.vmap.kind(ns)
        suspects = _point_suspects(fs, ns) if kind == POINT else _group_suspects(fs, ns, plen)
        for key in suspects:
            try:
                if kind == POINT:
                    fs.get(ns, key)
                else:
                    fs.scan_prefix(ns, key)
            except NotAnchoredError:
                continue  # being written right now: not a finding
            except RowFreshnessError as e:
                found.append(e)
                if len(found) >= MAX_FINDINGS:
                    return found
    return found


def _map_items(fs: FreshStore, ns: str) -> Iterator[tuple[bytes, int, bytes]]:
    """The map's entries of ``ns`` in order, copied in slices so the lock is held briefly."""
    after: bytes | None = None
    while True:
        with fs.state.lock:
            t = fs.state.vmap._tables.get(ns)
            page = [] if t is None else t.page(after, 2000)
        yield from page
        if len(page) < 2000:
            return
        after = page[-1][0]


def _point_suspects(fs: FreshStore, ns: str) -> Iterator[bytes]:
    """Keys where the database and the map differ (merge join of two sorted streams)."""
    db: Iterator[Row] = fs.inner.scan_all(ns)
    mp = _map_items(fs, ns)
    r, m = next(db, None), next(mp, None)
    while r is not None or m is not None:
        if m is None or (r is not None and r.key < m[0]):
            assert r is not None
            yield r.key
            r = next(db, None)
        elif r is None or m[0] < r.key:
            yield m[0]
            m = next(mp, None)
        else:
            if (r.version, fs.keys.leaf(ns, r.key, r.version, r.value)) != (m[1], m[2]):
                yield r.key
            r, m = next(db, None), next(mp, None)


def _group_suspects(fs: FreshStore, ns: str, plen: int) -> Iterator[bytes]:
    """Posting prefixes whose (count, hash) in the database differ from the map's."""
    groups: dict[bytes, list[Row]] = {}
    for r in fs.inner.scan_all(ns):
        groups.setdefault(r.key[:plen], []).append(r)
    seen = set()
    for p, n, tag in _map_items(fs, ns):
        seen.add(p)
        if group_state(fs.keys, ns, groups.get(p, [])) != (n, int.from_bytes(tag, "big")):
            yield p
    for p in groups:
        if p not in seen:
            yield p


class AuditThread:
    """Runs :func:`full_scan` every ``interval`` seconds on a daemon thread.

    Args:
        store: the FreshStore. interval: seconds between audits (the first starts at once).
        on_findings: called with the findings of a run that found any (after logging them as
            ``FRESHNESS AUDIT: ...`` errors); the service raises its alarm there.
    """

    def __init__(self, store: FreshStore, interval: float,
                 on_findings: Callable[[list[FreshnessError]], None] | None = None) -> None:
        self._fs, self.interval, self._cb = store, float(interval), on_findings
        self._stop = threading.Event()
        self.runs = 0
        self.last: list[FreshnessError] = []
        self._thread = threading.Thread(target=self._run, name=f"safehold-audit-{store.ledger}", daemon=True)

    def start(self) -> AuditThread:
        """Start; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current run."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._fs.problem is not None:  # not served (logged already): audit once it is fresh
                self._stop.wait(min(self.interval, 1.0))
                continue
            try:
                self.last = full_scan(self._fs)
            except FreshnessError as e:  # the store itself is not being served
                self.last = [e]
            except Exception as e:  # noqa: BLE001 - database trouble: try again next round
                log.warning("freshness audit of ledger %r could not run: %s", self._fs.ledger, e)
                self.last = []
            self.runs += 1
            for f in self.last:
                log.error("FRESHNESS AUDIT: %s", f)
            if self.last and self._cb is not None:
                self._cb(self.last)
            self._stop.wait(self.interval)
