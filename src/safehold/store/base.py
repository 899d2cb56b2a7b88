"""The untrusted store interface: rows of opaque bytes, compare-and-set on a version number.

The store sits outside the trust boundary (DESIGN.md → Storage): it only ever sees blind
indexes as keys and envelopes as values. Engines: ``safehold.store.sqlite`` (embedded default)
and ``safehold.store.postgres`` (scale-out). Both pass one shared test suite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from safehold.errors import ConflictError

#: Longest namespace name (ASCII letters, digits, ``._-:``).
MAX_NAMESPACE = 128
#: Longest row key in bytes (a blind index is 16–32 bytes).
MAX_KEY = 64


@dataclass(frozen=True)
class Row:
    """One stored row.

    Attributes:
        namespace: ASCII name, 1..:data:`MAX_NAMESPACE` chars.
        key: opaque row key (a blind index), 1..:data:`MAX_KEY` bytes.
        version: positive integer, 1 for a freshly inserted row, +1 on every put.
        value: opaque bytes (an envelope).
    """

    namespace: str
    key: bytes
    version: int
    value: bytes


class StoreOps(ABC):
    """Row operations, offered by a :class:`Store` and by its transactions."""

    @abstractmethod
    def get(self, namespace: str, key: bytes) -> Row | None:
        """Return the row or None.

        Raises:
            StoreUnavailableError: the database is unreachable or the connection dropped.
        """

    @abstractmethod
    def put(self, namespace: str, key: bytes, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set: write ``value`` iff the row's current version is ``expected_version``
        (0 = the row must not exist). Returns the new version, ``expected_version + 1``.

        Raises:
            ConflictError: the current version differs (names expected and actual version).
            StoreUnavailableError: the database is unreachable; nothing was written.
            ValueError: namespace/key outside the limits above.
        """

    @abstractmethod
    def delete(self, namespace: str, key: bytes, *, expected_version: int | None = None) -> bool:
        """Delete the row; with ``expected_version``, only if it matches. True if a row went.

        Raises:
            ConflictError: ``expected_version`` given and the current version differs.
            StoreUnavailableError: as above.
        """

    @abstractmethod
    def scan(self, namespace: str, *, after: bytes | None = None, limit: int = 100) -> list[Row]:
        """Up to ``limit`` rows of ``namespace`` with key > ``after``, ordered by key bytes.

        Page by passing the last row's key as ``after``.
        """

    def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[Row | None]:
        """The rows of ``keys`` (None where missing), in the order asked; same as :meth:`get`
        per key, which is what this default does; engines read them in one query (issue 17:
        the hits of a search).

        Raises:
            StoreUnavailableError, ValueError: as :meth:`get`.
        """
        return [self.get(namespace, k) for k in keys]

    def insert_new(self, namespace: str, rows: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Insert-only writes of many rows: each ``(key, value)`` is inserted at version 1 unless
        a row with that key exists (then it is left alone). Returns, per row, whether it was
        inserted. Same effect as ``put(..., expected_version=0)`` per row with conflicts
        ignored; engines override it with one batched statement (issue 17: postings).

        Raises:
            StoreUnavailableError, ValueError: as :meth:`put`.
        """
        out: list[bool] = []
        for key, value in rows:
            try:
                self.put(namespace, key, value, expected_version=0)
                out.append(True)
            except ConflictError:
                out.append(False)
        return out


class Store(StoreOps):
    """A store engine. Thread-safe; usable from several processes on the same database."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[StoreOps]:
        """All operations inside commit atomically on normal exit, roll back on exception.

        Raises:
            ConflictError: from any CAS inside (the whole transaction rolls back).
            StoreUnavailableError: as above; nothing of the transaction was written.
        """

    def scan_all(self, namespace: str, *, page: int = 500) -> Iterator[Row]:
        """Iterate every row of ``namespace`` in key order, ``page`` rows per query."""
        after: bytes | None = None
        while True:
            rows = self.scan(namespace, after=after, limit=page)
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].key

    def reclaim(self, max_pages: int | None = None) -> int:
        """Give free space left by deleted rows back to the file system, in short transactions
        (off the request path: the freshness snapshotter calls it after deleting the journal a
        snapshot covers). Rows, versions and values do not change. Returns the number of pages
        given back (engine units); 0 if the engine has nothing to do.

        This default does nothing: PostgreSQL's autovacuum marks dead rows' space reusable
        inside the table files but does not shrink them (only ``VACUUM FULL``, which locks the
        table, does; docs/storage.md). SQLite: :meth:`SqliteStore.reclaim`.

        Args:
            max_pages: most pages to give back, >= 0; None: all.

        Raises:
            StoreError: the engine failed (nothing is lost: free space stays free).
        """
        return 0

    @abstractmethod
    def close(self) -> None:
        """Release connections/files. Idempotent."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
