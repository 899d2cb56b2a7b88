"""The verifier map: what the freshness layer knows about every row, kept in enclave memory.

Two kinds of store namespace (chosen by a :class:`NamespacePolicy`):

* **point** (records, broker state, audit rows, ...): ``key -> (version, leaf)`` for every live
  row, leaf = keyed BLAKE2b-128 of (namespace, key, version, value). A get compares the row,
  a scan compares the exact page.
* **postings** (rows keyed ``P || S`` and read by prefix ``P``, e.g. blind-index search
  postings): ``P -> (count, keyed multiset hash of (key, version))``. A prefix scan recomputes
  both; per-row state is not kept, which is what keeps postings cheap in memory.

A change (:class:`Change`) is what one write did to one row; the journal stores lists of them
and start-up replays them into the map. The map is soft state: it is rebuilt from the latest
snapshot plus the journal (``safehold.freshness.journal``), never from the data rows.

Not thread-safe; :class:`~safehold.freshness.store.FreshStore` holds its lock around every call.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from safehold.errors import ConfigError
from safehold.freshness.digests import MSH_MOD, FreshKeys
from safehold.freshness.table import Entry, SortedTable

__all__ = ["POINT", "POSTINGS", "Change", "NamespacePolicy", "VerifierMap"]

POINT = 0
POSTINGS = 1
_NS_HEAD = struct.Struct(">BBBQ")  # kind, prefix length, key width, rows


class Change(NamedTuple):
    """What one committed write did to one row (immutable; a named tuple: a commit makes one
    per written row, ~37 per Patient, and a tuple is built 4 x faster than a frozen dataclass).

    Attributes:
        namespace, key: the row.
        kind: :data:`POINT` or :data:`POSTINGS`.
        version: point rows: the new version (0 = deleted). Postings: the new version (0 = gone).
        leaf: point rows: the new leaf (16 bytes; empty when deleted). Postings: unused (empty).
        old_version: postings only: the version before (0 = the row did not exist).
    """

    namespace: str
    key: bytes
    kind: int
    version: int
    leaf: bytes = b""
    old_version: int = 0


@dataclass(frozen=True)
class NamespacePolicy:
    """Which namespaces hold postings (read by key prefix) and how long their prefix is.

    Args:
        postings: ``fnmatch`` pattern → prefix length in bytes (1..63), e.g.
            ``{"*.postings": 10}`` for the records service's blind-index postings
            (``safehold.records.fresh.POSTINGS_POLICY``). Every other namespace is a point
            namespace (the safe default: every row is tracked). A namespace's kind and prefix
            length must not change once it holds rows: a snapshot records them, and loading one
            under another policy raises ConfigError.

    Raises:
        ConfigError: a prefix length outside 1..63.
    """

    postings: Mapping[str, int] = field(default_factory=dict)
    # namespace -> answer: the fnmatch patterns are matched once per namespace, not per row
    _memo: dict[str, tuple[int, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for pat, n in self.postings.items():
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 63:
                raise ConfigError(f"namespace policy: prefix length of {pat!r} must be 1..63, got {n!r}")

    def kind(self, namespace: str) -> tuple[int, int]:
        """``(kind, prefix_length)`` of ``namespace``."""
        k = self._memo.get(namespace)
        if k is None:
            k = next(((POSTINGS, n) for pat, n in self.postings.items()
                      if fnmatch.fnmatchcase(namespace, pat)), (POINT, 0))
            if len(self._memo) < 4096:
                self._memo[namespace] = k
        return k


class VerifierMap:
    """Point tables and posting-group tables per namespace (see the module docstring).

    Args:
        keys: the workload's freshness keys (posting multiset elements are keyed).
        policy: the namespace policy.
    """

    def __init__(self, keys: FreshKeys, policy: NamespacePolicy) -> None:
        self.keys = keys
        self.policy = policy
        self._tables: dict[str, SortedTable] = {}
        self._kinds: dict[str, tuple[int, int]] = {}

    # -- namespaces -------------------------------------------------------------------------

    def kind(self, namespace: str) -> tuple[int, int]:
        """``(kind, prefix_length)``: as journaled if the namespace is known, else the policy's."""
        k = self._kinds.get(namespace)
        return k if k is not None else self.policy.kind(namespace)

    def _table(self, namespace: str, kind: tuple[int, int]) -> SortedTable:
        t = self._tables.get(namespace)
        if t is None:
            want = self.policy.kind(namespace)
            if want != kind:
                raise ConfigError(
                    f"namespace {namespace!r} is journaled as {_kind_name(kind)} but the namespace "
                    f"policy says {_kind_name(want)}; the policy must not change for existing data")
            t = self._tables[namespace] = SortedTable()
            self._kinds[namespace] = kind
        elif self._kinds[namespace] != kind:
            raise ConfigError(f"namespace {namespace!r} changes kind in the journal")
        return t

    def namespaces(self) -> list[str]:
        """Every namespace the map has seen, sorted."""
        return sorted(self._tables)

    # -- reads ------------------------------------------------------------------------------

    def point(self, namespace: str, key: bytes) -> tuple[int, bytes] | None:
        """``(version, leaf)`` of a live point row, or None."""
        t = self._tables.get(namespace)
        return None if t is None else t.get(key)

    def point_page(self, namespace: str, after: bytes | None, limit: int) -> list[tuple[bytes, int, bytes]]:
        """The first ``limit`` live point rows with key > ``after``: ``(key, version, leaf)``."""
        t = self._tables.get(namespace)
        return [] if t is None else t.page(after, limit)

    def group(self, namespace: str, prefix: bytes) -> tuple[int, int]:
        """``(count, multiset hash)`` of the posting group ``prefix`` (``(0, 0)`` if none)."""
        t = self._tables.get(namespace)
        e = None if t is None else t.get(prefix)
        return (0, 0) if e is None else (e[0], int.from_bytes(e[1], "big"))

    def groups_from(self, namespace: str, after: bytes | None) -> Iterator[tuple[bytes, int, int]]:
        """Posting groups with prefix > ``after``: ``(prefix, count, hash)`` in order."""
        t = self._tables.get(namespace)
        if t is None:
            return
        for p, n, tag in t.iter_from(after):
            yield p, n, int.from_bytes(tag, "big")

    def rows(self, namespace: str) -> int:
        """Live rows (point) or posting groups in ``namespace``."""
        t = self._tables.get(namespace)
        return 0 if t is None else len(t)

    def items(self, namespace: str) -> Iterator[tuple[bytes, int, bytes]]:
        """Every entry of ``namespace`` in key order (for the background audit)."""
        t = self._tables.get(namespace)
        if t is not None:
            yield from t.iter_from(None)

    # -- changes ----------------------------------------------------------------------------

    def apply(self, changes: Iterable[Change]) -> None:
        """Apply committed changes in order.

        Raises:
            ConfigError: a change's kind contradicts the namespace's journaled kind or policy.
        """
        for c in changes:
            kind = (c.kind, self.policy.kind(c.namespace)[1] if c.kind == POSTINGS else 0)
            t = self._table(c.namespace, kind)
            if c.kind == POINT:
                if c.version:
                    t.set(c.key, c.version, c.leaf)
                else:
                    t.delete(c.key)
                continue
            prefix = c.key[: kind[1]]
            e = t.get(prefix)
            count, h = (0, 0) if e is None else (e[0], int.from_bytes(e[1], "big"))
            if c.old_version:
                count -= 1
                h = (h - self.keys.posting(c.namespace, c.key, c.old_version)) % MSH_MOD
            if c.version:
                count += 1
                h = (h + self.keys.posting(c.namespace, c.key, c.version)) % MSH_MOD
            if count == 0 and h == 0:
                t.delete(prefix)
            else:  # a non-zero hash at count 0 stays, so the next prefix scan names the lie
                t.set(prefix, count, h.to_bytes(16, "big"))

    def apply_deltas(self, deltas: Mapping[tuple[str, bytes], tuple[int, int]]) -> None:
        """Apply posting-group deltas ``(ns, prefix) -> (count delta, hash delta)`` computed
        when the commit began (saves hashing every posting twice)."""
        by_ns: dict[str, list[tuple[bytes, tuple[int, int]]]] = {}
        for (ns, prefix), delta in deltas.items():
            by_ns.setdefault(ns, []).append((prefix, delta))
        for ns, changes in by_ns.items():  # one table update per namespace: one sort, one merge
            self._table(ns, (POSTINGS, self.kind(ns)[1])).update_many(changes, _add_delta)

    # -- snapshots --------------------------------------------------------------------------

    def export(self) -> Iterator[bytes]:
        """The map as a byte stream (see :meth:`load`); merges every overlay first."""
        names = self.namespaces()
        yield struct.pack(">I", len(names))
        for ns in names:
            kind, plen = self._kinds[ns]
            w, keys, nums, tags = self._tables[ns].export()
            raw = ns.encode("ascii")
            yield bytes((len(raw),)) + raw + _NS_HEAD.pack(kind, plen, w, len(nums) // 8)
            yield keys
            yield nums
            yield tags

    @classmethod
    def load(cls, data: bytes | memoryview, keys: FreshKeys, policy: NamespacePolicy) -> VerifierMap:
        """Rebuild a map from :meth:`export` bytes.

        Raises:
            ValueError: truncated or malformed data.
            ConfigError: a namespace's kind contradicts the policy.
        """
        m = cls(keys, policy)
        buf = memoryview(data)
        (count,), off = struct.unpack_from(">I", buf, 0), 4
        for _ in range(count):
            ln = buf[off]
            ns = bytes(buf[off + 1: off + 1 + ln]).decode("ascii")
            off += 1 + ln
            kind, plen, w, n = _NS_HEAD.unpack_from(buf, off)
            off += _NS_HEAD.size
            sizes = ((w + 1) * n, 8 * n, 16 * n)
            parts = []
            for s in sizes:
                if off + s > len(buf):
                    raise ValueError(f"snapshot truncated in namespace {ns!r}")
                parts.append(bytes(buf[off: off + s]))
                off += s
            if kind not in (POINT, POSTINGS):
                raise ValueError(f"snapshot: unknown namespace kind {kind}")
            want = policy.kind(ns)
            if want != (kind, plen):
                raise ConfigError(f"namespace {ns!r} is journaled as {_kind_name((kind, plen))} but the "
                                  f"namespace policy says {_kind_name(want)}")
            m._tables[ns] = SortedTable.load(w, parts[0], parts[1], parts[2])
            m._kinds[ns] = (kind, plen)
        if off != len(buf):
            raise ValueError(f"snapshot has {len(buf) - off} trailing bytes")
        return m

    def nbytes(self) -> int:
        """Approximate memory of all tables, in bytes."""
        return sum(t.nbytes() for t in self._tables.values())


def _add_delta(e: Entry | None, delta: tuple[int, int]) -> Entry | None:
    """A posting group's ``(count, hash)`` entry plus ``delta`` = (count delta, hash delta);
    None (the group is removed) when both become 0 (a non-zero hash at count 0 stays, so the
    next prefix scan names the lie)."""
    count = (0 if e is None else e[0]) + delta[0]
    h = ((0 if e is None else int.from_bytes(e[1], "big")) + delta[1]) % MSH_MOD
    return None if count == 0 and h == 0 else (count, h.to_bytes(16, "big"))


def _kind_name(kind: tuple[int, int]) -> str:
    return "point rows" if kind[0] == POINT else f"postings (prefix {kind[1]} bytes)"
