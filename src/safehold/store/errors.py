"""Store-specific errors, all subclasses of :mod:`safehold.errors`.

Messages name the namespace, the row key as hex (a blind index, never plaintext) and the
versions involved; they never contain stored values.
"""

from __future__ import annotations

from safehold.errors import ConflictError, StoreError


class VersionConflictError(ConflictError):
    """Compare-and-set failed.

    Attributes:
        namespace: the row's namespace.
        key: the row key (blind index bytes).
        expected: the version the caller expected (0 = "must not exist").
        actual: the version found (0 = no such row).
    """

    def __init__(self, namespace: str, key: bytes, expected: int, actual: int, op: str = "put"):
        self.namespace = namespace
        self.key = bytes(key)
        self.expected = expected
        self.actual = actual
        found = "no row" if actual == 0 else "an invalid version" if actual < 0 else f"version {actual}"
        want = "no row (insert)" if expected == 0 else f"version {expected}"
        super().__init__(
            f"{op} conflict in namespace {namespace!r} on row {self.key.hex()}: "
            f"expected {want}, found {found}"
        )


class StoreCorruptError(StoreError):
    """The database file or table is not a valid Safehold store (garbage, truncated, malformed)."""


class StoreClosedError(StoreError):
    """An operation was attempted on a store after :meth:`~safehold.store.base.Store.close`."""
