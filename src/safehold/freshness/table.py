"""A compact sorted map ``key bytes (1..64) -> (int64, 16 bytes)`` for the verifier map.

Layout: sorted numpy base arrays plus a small dict overlay of recent changes, merged into the
base when the overlay grows (an O(n + m) merge, no re-sort):

* ``keys``: one fixed-width field per row, ``key`` zero-padded to the table width ``w`` and
  followed by one length byte. Comparing these fields bytewise (numpy sorts void fields with
  ``memcmp``) orders the keys exactly as the store does (unsigned bytewise, a proper prefix
  first), so range queries agree with the store's ``scan``.
* ``nums``: int64 (a row version, or a posting group's count).
* ``tags``: 16 bytes (a row leaf, or a posting group's multiset hash).

Memory per row: ``w + 1 + 8 + 16`` bytes (41 B for the 16-byte blind indexes of the records
service) plus the overlay (about 200 B per recently changed key, bounded by the merge rule).

Not thread-safe: :class:`~safehold.freshness.vmap.VerifierMap` serialises access.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

__all__ = ["SortedTable"]

Entry = tuple[int, bytes]
#: The overlay is merged once it holds more than max(MIN_OVERLAY, rows / OVERLAY_SHARE) keys.
MIN_OVERLAY = 4096
OVERLAY_SHARE = 32
_EMPTY_TAGS = np.zeros(0, dtype="V16")


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


def _encode(key: bytes, width: int) -> bytes:
    return key + bytes(width - len(key)) + bytes((len(key),))


class SortedTable:
    """Sorted ``key -> (num, tag)`` map (see the module docstring).

    Keys are 1..64 bytes; ``num`` fits int64; ``tag`` is exactly 16 bytes.
    """

    def __init__(self) -> None:
        self._w = 0
        self._keys: np.ndarray = np.zeros(0, dtype="V1")
        self._nums: np.ndarray = np.zeros(0, dtype=np.int64)
        self._tags: np.ndarray = _EMPTY_TAGS
        self._over: dict[bytes, Entry | None] = {}
        self._osorted: list[bytes] = []
        self._live = 0

    # -- lookups --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    def _base_index(self, key: bytes) -> int:
        """Index of ``key`` in the base arrays, or -1."""
        n = len(self._keys)
        if n == 0 or len(key) > self._w:
            return -1
        enc = _encode(key, self._w)
        i = int(np.searchsorted(self._keys, np.void(enc)))
        if i < n and self._keys[i].tobytes() == enc:
            return i
        return -1

    def _base_get(self, key: bytes) -> Entry | None:
        i = self._base_index(key)
        if i < 0:
            return None
        return int(self._nums[i]), self._tags[i].tobytes()

    def get(self, key: bytes) -> Entry | None:
        """``(num, tag)`` of ``key`` or None."""
        if key in self._over:
            return self._over[key]
        return self._base_get(key)

    def _base_start(self, after: bytes | None) -> int:
        if after is None or len(self._keys) == 0:
            return 0
        # keys longer than the width: every base key k > after iff k > after[:w] (module doc)
        a = after[: self._w]
        return int(np.searchsorted(self._keys, np.void(_encode(a, self._w)), side="right"))

    def _base_key(self, i: int) -> bytes:
        raw = bytes(self._keys[i].tobytes())
        return raw[: raw[-1]]

    def iter_from(self, after: bytes | None = None) -> Iterator[tuple[bytes, int, bytes]]:
        """Live ``(key, num, tag)`` with key > ``after`` (all if None), in key order."""
        i, n = self._base_start(after), len(self._keys)
        osorted = self._osorted
        j = 0 if after is None else bisect.bisect_right(osorted, after)
        m = len(osorted)
        while i < n or j < m:
            bk = self._base_key(i) if i < n else None
            ok = osorted[j] if j < m else None
            if ok is not None and (bk is None or ok <= bk):
                ent = self._over[ok]
                j += 1
                if bk == ok:
                    i += 1
                if ent is not None:
                    yield ok, ent[0], ent[1]
            else:
                assert bk is not None
                yield bk, int(self._nums[i]), self._tags[i].tobytes()
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
        if self.get(key) is None:
            self._live += 1
        self._touch(key)
        self._over[key] = (num, bytes(tag))
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
        if len(self._over) > max(MIN_OVERLAY, len(self._keys) // OVERLAY_SHARE):
            self.merge()

    def _widen(self, width: int) -> None:
        """Re-encode the base keys for a larger width (a longer key arrived)."""
        n, w = len(self._keys), self._w
        raw = self._keys.view(np.uint8).reshape(n, w + 1) if n else np.zeros((0, w + 1), np.uint8)
        wide = np.zeros((n, width + 1), dtype=np.uint8)
        wide[:, :w] = raw[:, :w]
        wide[:, width] = raw[:, w]
        self._keys = wide.reshape(-1).view(f"V{width + 1}")
        self._w = width

    def merge(self) -> None:
        """Fold the overlay into the sorted base arrays (O(rows + overlay))."""
        if not self._over:
            return
        longest = max(len(k) for k in self._osorted)
        if longest > self._w or len(self._keys) == 0 and self._w == 0:
            self._widen(max(longest, self._w))
        w = self._w
        enc = np.array([_encode(k, w) for k in self._osorted], dtype=f"V{w + 1}")
        ents = [self._over[k] for k in self._osorted]
        pos = np.searchsorted(self._keys, enc)
        n = len(self._keys)
        safe = np.minimum(pos, max(n - 1, 0))
        exists = (pos < n) & (self._keys[safe] == enc) if n else np.zeros(len(enc), dtype=bool)
        live = np.array([e is not None for e in ents], dtype=bool)
        nums = np.array([e[0] if e is not None else 0 for e in ents], dtype=np.int64)
        tags = np.array([e[1] if e is not None else bytes(16) for e in ents], dtype="V16")
        upd = exists & live
        self._nums[pos[upd]] = nums[upd]
        self._tags[pos[upd]] = tags[upd]
        keep = np.ones(n, dtype=bool)
        keep[pos[exists & ~live]] = False
        ins = ~exists & live
        # insert positions refer to the arrays before deletion; insert first, then drop
        keys = np.insert(self._keys, pos[ins], enc[ins])
        newnums = np.insert(self._nums, pos[ins], nums[ins])
        newtags = np.insert(self._tags, pos[ins], tags[ins])
        keep = np.insert(keep, pos[ins], True)
        self._keys, self._nums, self._tags = keys[keep], newnums[keep], newtags[keep]
        self._over, self._osorted = {}, []

    # -- persistence ------------------------------------------------------------------------

    def export(self) -> tuple[int, bytes, bytes, bytes]:
        """``(width, keys, nums, tags)`` as raw bytes (merges first). nums are int64 little-endian."""
        self.merge()
        return (self._w, self._keys.tobytes(), self._nums.astype("<i8").tobytes(),
                self._tags.tobytes())

    @classmethod
    def load(cls, width: int, keys: bytes, nums: bytes, tags: bytes) -> SortedTable:
        """Inverse of :meth:`export`.

        Raises:
            ValueError: lengths that do not fit, or keys not strictly increasing (a snapshot
                that was not written by :meth:`export`).
        """
        if not 0 <= width <= 64:
            raise ValueError(f"table width {width} outside 0..64")
        n = len(nums) // 8
        if len(nums) != 8 * n or len(tags) != 16 * n or len(keys) != (width + 1) * n:
            raise ValueError("table arrays have inconsistent lengths")
        t = cls()
        t._w = width
        t._keys = np.frombuffer(keys, dtype=f"V{width + 1}").copy()
        t._nums = np.frombuffer(nums, dtype="<i8").astype(np.int64)
        t._tags = np.frombuffer(tags, dtype="V16").copy()
        if n > 1 and not _strictly_increasing(t._keys, width + 1):
            raise ValueError("table keys are not strictly increasing")
        if n and width:
            lens = t._keys.view(np.uint8).reshape(n, width + 1)[:, width]
            if bool(np.any((lens < 1) | (lens > width))):
                raise ValueError("table key lengths out of range")
        t._live = n
        return t

    def nbytes(self) -> int:
        """Approximate memory held, in bytes (base arrays plus ~200 B per overlay key)."""
        return int(self._keys.nbytes + self._nums.nbytes + self._tags.nbytes) + 200 * len(self._over)
