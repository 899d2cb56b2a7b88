"""Comparing what the store returned with the verifier map's candidates, and naming the finding.

Pure functions: :class:`~safehold.freshness.state.LedgerState` supplies the candidates, the
store the rows; these functions say whether they match (and which epoch must be anchored first)
or build the error that names namespace, key (hex) and expected vs. found.
"""

from __future__ import annotations

from collections.abc import Sequence

from safehold.freshness.digests import MSH_MOD, FreshKeys
from safehold.freshness.errors import (
    PostingsStaleError,
    RowDeletedError,
    RowFreshnessError,
    RowRestoredError,
    RowRolledBackError,
    RowsOmittedError,
)
from safehold.freshness.state import Point
from safehold.store.base import Row

__all__ = ["group_error", "group_state", "match", "page_error", "page_rows", "point_error",
           "point_state", "prefix_floor"]

PageRow = tuple[bytes, int, bytes]


def point_state(keys: FreshKeys, ns: str, row: Row | None) -> Point:
    """The (version, leaf) of a returned row, or None."""
    return None if row is None else (row.version, keys.leaf(ns, row.key, row.version, row.value))


def page_rows(keys: FreshKeys, ns: str, rows: Sequence[Row]) -> list[PageRow]:
    """``(key, version, leaf)`` of each returned row."""
    return [(r.key, r.version, keys.leaf(ns, r.key, r.version, r.value)) for r in rows]


def group_state(keys: FreshKeys, ns: str, rows: Sequence[Row]) -> tuple[int, int]:
    """(count, keyed multiset hash) of a returned posting group."""
    h = 0
    for r in rows:
        h += keys.posting(ns, r.key, r.version)
    return len(rows), h % MSH_MOD


def match(found: object, candidates: Sequence[tuple[object, int]]) -> int | None:
    """The epoch to wait for if ``found`` equals a candidate (smallest wait first), else None."""
    waits = [w for c, w in candidates if c == found]
    return min(waits) if waits else None


def _words(p: Point) -> str:
    return "no row" if p is None else f"version {p[0]}"


def point_error(ns: str, key: bytes, found: Point, expected: Point) -> RowFreshnessError:
    """The finding for one row that matched no candidate (``expected`` = the map's state)."""
    if expected is None:
        return RowRestoredError(ns, key, "no row (deleted or never written)", _words(found))
    if found is None:
        return RowDeletedError(ns, key, _words(expected), "no row")
    detail = "same version, another value" if found[0] == expected[0] else ""
    return RowRolledBackError(ns, key, _words(expected), _words(found), detail)


def page_error(ns: str, found: Sequence[PageRow], expected: Sequence[PageRow], *,
               complete: bool) -> RowFreshnessError:
    """The first difference between a returned page and the map's page.

    Args:
        complete: the returned page is shorter than its limit (claims the namespace ends).
    """
    n = min(len(found), len(expected))
    for i in range(n):
        fk, fv, fl = found[i]
        ek, ev, el = expected[i]
        if fk == ek:
            if (fv, fl) != (ev, el):
                return point_error(ns, fk, (fv, fl), (ev, el))
            continue
        if fk < ek:
            return RowRestoredError(ns, fk, "no row (deleted or never written)", _words((fv, fl)),
                                    "in a scan")
        return RowsOmittedError(ns, ek, _words((ev, el)), "no row in the scan",
                                f"the page went on with {fk.hex()}")
    if len(expected) > n:
        return RowsOmittedError(ns, expected[n][0], _words(expected[n][1:]), "no row in the scan",
                                "the page ended early" if complete else "")
    fk, fv, fl = found[n]
    return RowRestoredError(ns, fk, "no row (deleted or never written)", _words((fv, fl)), "in a scan")


def group_error(ns: str, prefix: bytes, found: tuple[int, int],
                expected: tuple[int, int]) -> PostingsStaleError:
    """The finding for a posting group that matched no candidate."""
    def words(s: tuple[int, int]) -> str:
        return f"{s[0]} posting(s) (multiset hash {s[1]:032x})"
    detail = ("rows omitted" if found[0] < expected[0] else "stale rows restored" if found[0] > expected[0]
              else "same count, other rows or versions")
    return PostingsStaleError(ns, prefix, words(expected), words(found), detail)


def prefix_floor(prefix: bytes) -> bytes | None:
    """The greatest row key (<= 64 bytes) below every key that starts with ``prefix``, to pass as
    a scan's ``after``; None when ``prefix`` is all zero bytes of length 1 (scan from the start)."""
    if prefix[-1] == 0:
        return prefix[:-1] or None
    return prefix[:-1] + bytes((prefix[-1] - 1,)) + b"\xff" * (64 - len(prefix))
