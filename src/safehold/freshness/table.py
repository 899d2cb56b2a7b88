"""A compact sorted map ``key bytes (1..64) -> (int64, 16 bytes)`` for the verifier map.

Layout: an immutable sorted *base* plus a small dict *overlay* of recent changes, merged into a
new base when the overlay grows (an O(n + m) numpy merge, no re-sort). The base holds per row:

* ``keys``: one fixed-width field, ``key`` zero-padded to the table width ``w`` and followed by
  one length byte. These fields compare bytewise in exactly the store's key order (unsigned
  bytes, a proper prefix first), so range queries agree with the store's ``scan``;
* ``pref``: the first 8 bytes of the field as an unsigned integer (``array('Q')``), searched with
  :func:`bisect.bisect_left` entirely in C (~1 µs per lookup at a million rows);
* ``nums``: int64 (a row version, or a posting group's count); ``tags``: 16 bytes (a row leaf,
  or a posting group's multiset hash).

Memory per row: ``w + 1 + 8 + 8 + 16`` bytes (49 B for 16-byte blind indexes), plus about 200 B
per key in the overlay (at most :data:`MAX_OVERLAY` keys, or 1/64 of the rows).

Lookups (:meth:`get`) need no lock: the base is replaced as a whole (one reference), after the
overlay it absorbed has been copied, and the overlay's dict operations are atomic. Range queries
and changes are serialised by :class:`~safehold.freshness.vmap.VerifierMap`'s owner.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

__all__ = ["SortedTable"]

Entry = tuple[int, bytes]
A = TypeVar("A")
#: The overlay is merged once it holds more than max(MAX_OVERLAY, rows // 64) keys.
MAX_OVERLAY = 4096


def _encode(key: bytes, width: int) -> bytes:
    return key + bytes(width - len(key)) + bytes((len(key),))


def _pref(key: bytes) -> int:
    return int.from_bytes(key[:8].ljust(8, b"\x00"), "big")


@dataclass(frozen=True)
class _Base:
    w: int
    n: int
    pref: array[int]
    keys: bytes
    nums: array[int]
    tags: bytes

    def _search(self, enc: bytes, p: int, *, right: bool) -> int:
        """First index whose field is >= ``enc`` (> with ``right``); C bisect on the 8-byte
        prefixes, then a binary search over the fields that share ``p`` (keys with a common
        prefix, e.g. sequence numbers or test keys)."""
        lo = bisect.bisect_left(self.pref, p)
        hi = bisect.bisect_right(self.pref, p, lo)
        size = self.w + 1
        while lo < hi:
            mid = (lo + hi) // 2
            f = self.keys[mid * size: (mid + 1) * size]
            if f < enc or (right and f == enc):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def index(self, key: bytes) -> int:
        """Index of ``key`` or -1."""
        if len(key) > self.w:
            return -1
        enc, size = _encode(key, self.w), self.w + 1
        i = self._search(enc, _pref(key), right=False)
        return i if i < self.n and self.keys[i * size: (i + 1) * size] == enc else -1

    def key(self, i: int) -> bytes:
        size = self.w + 1
        raw = self.keys[i * size: (i + 1) * size]
        return raw[: raw[-1]]

    def start(self, after: bytes | None) -> int:
        """Index of the first key > ``after`` (a longer ``after`` compares as its first w bytes)."""
        if after is None or self.n == 0:
            return 0
        a = after[: self.w]
        return self._search(_encode(a, self.w), _pref(a), right=True)

    def entry(self, i: int) -> Entry:
        return self.nums[i], self.tags[16 * i: 16 * i + 16]


_EMPTY = _Base(0, 0, array("Q"), b"", array("q"), b"")


def _strictly_increasing(keys: np.ndarray, size: int) -> bool:
    """True if the fixed-width byte strings ``keys`` are strictly increasing (bytewise)."""
    n = len(keys)
    cols = -(-size // 8)
    raw = np.zeros((n, cols * 8), dtype=np.uint8)
    raw[:, :size] = keys.view(np.uint8).reshape(n, size)
    a = raw.view(">u8").reshape(n, cols)
    diff = a[1:] != a[:-1]
    if not bool(diff.any(axis=1).all()):
        return False
    first = diff.argmax(axis=1)
    rows = np.arange(n - 1)
    return bool((a[1:][rows, first] > a[:-1][rows, first]).all())


def _make_base(w: int, keys: np.ndarray, nums: np.ndarray, tags: np.ndarray) -> _Base:
    n = len(keys)
    raw = np.zeros((n, 8), dtype=np.uint8)
    m = min(8, w + 1)
    raw[:, :m] = keys.view(np.uint8).reshape(n, w + 1)[:, :m] if n else raw[:, :m]
    if w < 8:  # the length byte sits inside the first 8 bytes: not part of the prefix order
        raw[:, w] = 0
    pref = array("Q")
    pref.frombytes(raw.view(">u8").reshape(n).astype("=u8").tobytes())
    nm = array("q")
    nm.frombytes(nums.astype("=i8").tobytes())
    return _Base(w, n, pref, keys.tobytes(), nm, tags.tobytes())


class SortedTable:
    """Sorted ``key -> (num, tag)`` map (see the module docstring).

    Keys are 1..64 bytes; ``num`` fits int64; ``tag`` is exactly 16 bytes.
    """

    def __init__(self) -> None:
        self._base = _EMPTY
        self._over: dict[bytes, Entry | None] = {}
        self._osorted: list[bytes] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def get(self, key: bytes) -> Entry | None:
        """``(num, tag)`` of ``key`` or None (lock-free, see the module docstring)."""
        over = self._over
        if key in over:
            return over.get(key)
        base = self._base
        i = base.index(key)
        return None if i < 0 else base.entry(i)

    def iter_from(self, after: bytes | None = None) -> Iterator[tuple[bytes, int, bytes]]:
        """Live ``(key, num, tag)`` with key > ``after`` (all if None), in key order."""
        base, over, osorted = self._base, self._over, self._osorted
        i, n = base.start(after), base.n
        j = 0 if after is None else bisect.bisect_right(osorted, after)
        m = len(osorted)
        while i < n or j < m:
            bk = base.key(i) if i < n else None
            ok = osorted[j] if j < m else None
            if ok is not None and (bk is None or ok <= bk):
                ent = over[ok]
                j += 1
                if bk == ok:
                    i += 1
                if ent is not None:
                    yield ok, ent[0], ent[1]
            else:
                assert bk is not None
                num, tag = base.entry(i)
                yield bk, num, tag
                i += 1

    def page(self, after: bytes | None, limit: int) -> list[tuple[bytes, int, bytes]]:
        """The first ``limit`` live entries with key > ``after``."""
        out = []
        for ent in self.iter_from(after):
            out.append(ent)
            if len(out) >= limit:
                break
        return out

    # -- changes ----------------------------------------------------------------------------

    def _touch(self, key: bytes) -> None:
        if key not in self._over:
            bisect.insort(self._osorted, key)

    def set(self, key: bytes, num: int, tag: bytes) -> None:
        """Insert or replace ``key``. Raises ValueError on a bad key or tag length."""
        if not 1 <= len(key) <= 64 or len(tag) != 16:
            raise ValueError("table keys are 1..64 bytes and tags 16 bytes")
        over = self._over
        if key in over:  # changed since the last merge: no base search, already sorted in
            if over[key] is None:
                self._live += 1
        else:
            if self._base.index(key) < 0:
                self._live += 1
            bisect.insort(self._osorted, key)
        over[key] = (num, tag if type(tag) is bytes else bytes(tag))
        self._maybe_merge()

    def update_many(self, changes: Iterable[tuple[bytes, A]], fn: Callable[[Entry | None, A], Entry | None]
                    ) -> None:
        """For each ``(key, arg)`` in order: replace the key's entry ``e`` (None = absent) by
        ``fn(e, arg)`` (None = delete). Same result as :meth:`get` then :meth:`set` / :meth:`delete`
        per key, with one base search per key and one sort and at most one merge per call
        (a commit's posting-group deltas, issue 17).

        Raises:
            ValueError: a bad key or tag length (the keys before it are applied).
        """
        over, base = self._over, self._base
        fresh: list[bytes] = []
        try:
            for key, arg in changes:
                if not 1 <= len(key) <= 64:
                    raise ValueError("table keys are 1..64 bytes and tags 16 bytes")
                if key in over:
                    cur = over[key]
                else:
                    i = base.index(key)
                    cur = None if i < 0 else base.entry(i)
                new = fn(cur, arg)
                if new is not None:
                    num, tag = new
                    if len(tag) != 16:
                        raise ValueError("table keys are 1..64 bytes and tags 16 bytes")
                    new = (num, tag if type(tag) is bytes else bytes(tag))
                elif cur is None and key not in over:
                    continue  # deleting an absent key changes nothing
                if key not in over:
                    fresh.append(key)
                self._live += (new is not None) - (cur is not None)
                over[key] = new
        finally:
            if fresh:
                self._osorted.extend(fresh)
                self._osorted.sort()
            self._maybe_merge()

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; True if it was live."""
        if self.get(key) is None:
            return False
        self._live -= 1
        self._touch(key)
        self._over[key] = None
        self._maybe_merge()
        return True

    def _maybe_merge(self) -> None:
        # a merge copies the whole base: at 1/64 of the rows its cost per change stays flat as
        # the table grows (1/256 made a put's 37 posting updates grow with the database)
        if len(self._over) > max(MAX_OVERLAY, self._base.n >> 6):
            self.merge()

    def _arrays(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The base as numpy arrays, keys re-encoded for ``width`` if it grew."""
        b = self._base
        keys = np.frombuffer(b.keys, dtype=f"V{b.w + 1}") if b.n else np.zeros(0, dtype=f"V{width + 1}")
        if b.n and width != b.w:
            raw = keys.view(np.uint8).reshape(b.n, b.w + 1)
            wide = np.zeros((b.n, width + 1), dtype=np.uint8)
            wide[:, : b.w] = raw[:, : b.w]
            wide[:, width] = raw[:, b.w]
            keys = wide.reshape(-1).view(f"V{width + 1}")
        nums = np.frombuffer(b.nums.tobytes(), dtype="=i8")
        tags = np.frombuffer(b.tags, dtype="V16")
        return keys, nums, tags

    def merge(self) -> None:
        """Fold the overlay into a new base (O(rows + overlay)); then drop the overlay."""
        if not self._over:
            return
        w = max(self._base.w, max(len(k) for k in self._osorted))
        keys, nums, tags = self._arrays(w)
        over = dict(self._over)
        order = list(self._osorted)
        pad = [bytes(w - i) + bytes((i,)) for i in range(w + 1)]  # zero padding + length byte
        enc = np.frombuffer(b"".join([k + pad[len(k)] for k in order]), dtype=f"V{w + 1}")
        ents = [over[k] for k in order]
        n = len(keys)
        pos = np.searchsorted(keys, enc)
        safe = np.minimum(pos, max(n - 1, 0))
        exists = (pos < n) & (keys[safe] == enc) if n else np.zeros(len(enc), dtype=bool)
        gone = (0, bytes(16))
        live = np.fromiter((e is not None for e in ents), dtype=bool, count=len(ents))
        filled = [gone if e is None else e for e in ents]
        onums = np.fromiter((e[0] for e in filled), dtype=np.int64, count=len(filled))
        otags = np.frombuffer(b"".join([e[1] for e in filled]), dtype="V16")
        nums, tags = nums.copy(), tags.copy()
        upd = exists & live
        nums[pos[upd]] = onums[upd]
        tags[pos[upd]] = otags[upd]
        keep = np.ones(n, dtype=bool)
        keep[pos[exists & ~live]] = False
        ins = ~exists & live
        keys = np.insert(keys, pos[ins], enc[ins])
        nums = np.insert(nums, pos[ins], onums[ins])
        tags = np.insert(tags, pos[ins], otags[ins])
        keep = np.insert(keep, pos[ins], True)
        self._base = _make_base(w, keys[keep], nums[keep], tags[keep])
        self._over, self._osorted = {}, []  # after the base: lock-free readers stay consistent

    # -- persistence ------------------------------------------------------------------------

    def export(self) -> tuple[int, bytes, bytes, bytes]:
        """``(width, keys, nums, tags)`` as raw bytes (merges first); nums int64 little-endian."""
        self.merge()
        b = self._base
        return b.w, b.keys, np.frombuffer(b.nums.tobytes(), dtype="=i8").astype("<i8").tobytes(), b.tags

    @classmethod
    def load(cls, width: int, keys: bytes, nums: bytes, tags: bytes) -> SortedTable:
        """Inverse of :meth:`export`.

        Raises:
            ValueError: lengths that do not fit, keys not strictly increasing or with lengths
                out of range (not written by :meth:`export`).
        """
        if not 0 <= width <= 64:
            raise ValueError(f"table width {width} outside 0..64")
        n = len(nums) // 8
        if len(nums) != 8 * n or len(tags) != 16 * n or len(keys) != (width + 1) * n:
            raise ValueError("table arrays have inconsistent lengths")
        k = np.frombuffer(keys, dtype=f"V{width + 1}")
        if n > 1 and not _strictly_increasing(k, width + 1):
            raise ValueError("table keys are not strictly increasing")
        if n and width:
            lens = k.view(np.uint8).reshape(n, width + 1)[:, width]
            if bool(np.any((lens < 1) | (lens > width))):
                raise ValueError("table key lengths out of range")
        t = cls()
        if n:
            t._base = _make_base(width, k, np.frombuffer(nums, dtype="<i8"), np.frombuffer(tags, dtype="V16"))
        t._live = n
        return t

    def nbytes(self) -> int:
        """Approximate memory held, in bytes (base plus ~200 B per overlay key)."""
        b = self._base
        return 8 * b.n + len(b.keys) + 8 * b.n + len(b.tags) + 200 * len(self._over)
