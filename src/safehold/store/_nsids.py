"""Namespace name → id cache shared by the engines (schema version 2, issue 17).

The rows table stores a small integer ``ns`` per row instead of the namespace name; the
dictionary table ``safehold_namespaces(id, name)`` maps the two. The database is the
adversary's, so the dictionary is never trusted beyond what a statement re-checks:

* an id enters the committed cache only once the transaction that read or created it has
  committed (an id created in a rolled-back transaction may be handed to another name later);
* every statement re-checks ``id ↔ name`` in the database (engines' SQL), and the answer comes
  here: an entry that is missing, names another namespace, or two names claiming one id raise
  :class:`~safehold.store.errors.StoreCorruptError`, so nothing is read from or written into
  another namespace's rows on the strength of a stale cache;
* fail closed: a namespace found inconsistent stays refused by this store object (every
  operation on it raises) until the process opens the store again, which then follows the
  dictionary as it is — the same as a version-1 table whose rows the administrator relabelled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from safehold.store.errors import StoreCorruptError
from safehold.store.migrations import NAMESPACES_TABLE

#: Largest id accepted from the dictionary (PostgreSQL ``INTEGER``).
MAX_NS_ID = 2**31 - 1


class NamespaceIds:
    """Committed name → id entries of one store (thread-safe).

    Args:
        where: the store's description for error messages (file path or schema).
    """

    def __init__(self, where: str):
        self._where = where
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._refused: set[str] = set()  # found inconsistent: refused until the store is reopened

    def get(self, name: str) -> int | None:
        """The committed id of ``name`` or None.

        Raises:
            StoreCorruptError: ``name`` was found inconsistent earlier (fail closed).
        """
        if self._refused and name in self._refused:
            raise self._corrupt(name, None, "was found inconsistent earlier; reopen the store to accept "
                                "the dictionary as it is now")
        return self._ids.get(name)

    def _corrupt(self, name: str, nsid: object, what: str) -> StoreCorruptError:
        self.drop(name)
        with self._lock:
            self._refused.add(name)
        return StoreCorruptError(
            f"{self._where}: namespace dictionary ({NAMESPACES_TABLE}) edited or corrupt: "
            f"namespace {name!r} (id {nsid!r}) {what}; refusing to read or write rows through it"
        )

    def learned(self, name: str, nsid: object, pending: Iterable[Mapping[str, int]] = ()) -> int:
        """Validate an id just read from the dictionary for ``name``; return it.

        ``pending``: the enclosing transactions' not yet committed entries, checked as well.

        Raises:
            StoreCorruptError: the id is not an integer in 0..:data:`MAX_NS_ID`, or another
                name already holds it (two names one id, or swapped ids).
        """
        if isinstance(nsid, bool) or not isinstance(nsid, int) or not 0 <= nsid <= MAX_NS_ID:
            raise self._corrupt(name, None, f"has an id of type {type(nsid).__name__} or out of range")
        other = self._names.get(nsid)
        if other is not None and other != name:
            self._corrupt(other, nsid, "shares its id with another name")
            raise self._corrupt(name, nsid, f"has the id this store knows as namespace {other!r}")
        for level in pending:
            for n, i in level.items():
                if i == nsid and n != name:
                    self._corrupt(n, nsid, "shares its id with another name")
                    raise self._corrupt(name, nsid, f"has the id of namespace {n!r}")
        if (mine := self._ids.get(name)) is not None and mine != nsid:
            raise self._corrupt(name, nsid, f"changed id (was {mine})")
        return nsid

    def commit(self, entries: Mapping[str, int]) -> None:
        """Add entries whose transaction committed (or that were read outside one)."""
        if not entries:
            return
        with self._lock:
            for name, nsid in entries.items():
                old = self._ids.get(name)
                if old is not None:
                    self._names.pop(old, None)
                self._ids[name] = nsid
                self._names[nsid] = name

    def drop(self, name: str) -> None:
        """Forget ``name`` (its entry was found inconsistent)."""
        with self._lock:
            nsid = self._ids.pop(name, None)
            if nsid is not None and self._names.get(nsid) == name:
                del self._names[nsid]

    def check(self, name: str, nsid: int, found: list[object]) -> None:
        """Check the dictionary names a statement returned for ``nsid`` (one per result row;
        a LEFT JOIN from the dictionary entry returns at least one when the entry exists).

        Raises:
            StoreCorruptError: no entry (deleted), or an entry naming another namespace.
        """
        if not found:
            raise self._corrupt(name, nsid, "has no dictionary entry any more")
        for got in found:
            if got != name:
                raise self._corrupt(name, nsid, "is now the id of another name")

    # -- one thread's view: its open transaction levels' uncommitted entries, innermost first --

    def cached(self, name: str, levels: Sequence[Mapping[str, int]]) -> int | None:
        """Id of ``name`` known to the calling thread: its open transactions' (``levels``,
        innermost first), else the committed one. Raises StoreCorruptError as :meth:`get`."""
        for level in levels:
            if (nsid := level.get(name)) is not None:
                return nsid
        return self.get(name)

    def learn(self, name: str, nsid: object, found: list[object], levels: Sequence[dict[str, int]]) -> int:
        """Remember an id just read from the dictionary (``found``: the names its entry holds):
        in the innermost open transaction level (committed into the cache when the outermost
        transaction commits), or at once outside a transaction. Returns the id.

        Raises:
            StoreCorruptError: as :meth:`learned` and :meth:`check`.
        """
        got = self.learned(name, nsid, levels)
        self.verify(name, got, found, levels)
        if levels:
            levels[0][name] = got
        else:
            self.commit({name: got})
        return got

    def verify(self, name: str, nsid: int, found: list[object], levels: Iterable[dict[str, int]]) -> None:
        """:meth:`check`, and on failure forget ``name`` in the open transaction ``levels`` too.

        Raises:
            StoreCorruptError: no dictionary entry, or one naming another namespace.
        """
        try:
            self.check(name, nsid, found)
        except StoreCorruptError:
            for level in levels:
                level.pop(name, None)
            raise
