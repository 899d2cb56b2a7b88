"""Freshness errors: what the verifying store and the anchor detect, one class per finding.

Every message names the store namespace and the row key as hex (a blind index, never
plaintext) and says what was expected and what was found. Values are never quoted.

Hierarchy::

    FreshnessError (SafeholdError)
    ├── RowFreshnessError            one row or one page disagrees with the verifier map
    │   ├── RowRolledBackError       an older (or another) version of a live row came back
    │   ├── RowDeletedError          a live row is missing from the store
    │   ├── RowRestoredError         a row that must not exist is in the store
    │   ├── RowsOmittedError         a page / scan left out rows that exist
    │   └── PostingsStaleError       a posting group (prefix scan) differs in count or content
    ├── StoreStateError              the store as a whole cannot be served as fresh
    │   ├── StoreRolledBackError     the store's journal is behind the anchor
    │   ├── StoreForkedError         the store's history and the anchor's diverge
    │   ├── JournalCorruptError      journal / snapshot rows fail their MAC or do not chain
    │   ├── AnchorLostError          the anchor holds no state for the ledger
    │   └── LedgerUninitialisedError a new store waits for the owner's first initialisation
    ├── AnchorUnavailableError       fewer than a majority of anchor members answered
    ├── AnchorConflictError          a majority refused an advance (another history)
    ├── NotAnchoredError             stored in the database, not yet anchored
    └── OwnerStatementError          an owner statement is malformed or does not verify
"""

from __future__ import annotations

from safehold.errors import SafeholdError

__all__ = [
    "AnchorConflictError", "AnchorLostError", "AnchorUnavailableError", "FreshnessError",
    "JournalCorruptError", "LedgerUninitialisedError", "NotAnchoredError", "OwnerStatementError",
    "PostingsStaleError", "RowDeletedError", "RowFreshnessError", "RowRestoredError",
    "RowRolledBackError", "RowsOmittedError", "StoreForkedError", "StoreRolledBackError",
    "StoreStateError",
]


class FreshnessError(SafeholdError):
    """Root of everything the freshness layer refuses."""


# --- one row / one page ----------------------------------------------------------------------


class RowFreshnessError(FreshnessError):
    """A row or a page returned by the store disagrees with the verifier map.

    Attributes:
        namespace: the store namespace.
        key: the row key (or posting prefix) as bytes; ``key.hex()`` is the blind index.
        expected: what the map holds, in words ("version 3", "no row", ...).
        found: what the store returned, in words.
    """

    what = "row"

    def __init__(self, namespace: str, key: bytes, expected: str, found: str, detail: str = ""):
        self.namespace = namespace
        self.key = bytes(key)
        self.expected = expected
        self.found = found
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{self.headline} in namespace {namespace!r}, {self.what} {self.key.hex()}: "
            f"expected {expected}, found {found}{extra}"
        )

    headline = "store returned stale data"


class RowRolledBackError(RowFreshnessError):
    """The row exists but is not its latest state (an older valid version, or the right version
    with another value)."""

    headline = "row rolled back"


class RowDeletedError(RowFreshnessError):
    """The row is live in the verifier map but the store has none: deleted in the database, not
    through the service. Distinct from "never existed" (a plain ``None``)."""

    headline = "row deleted in the store"


class RowRestoredError(RowFreshnessError):
    """The store holds a row that the verifier map says does not exist (a deleted row put back,
    or a row that was never written through the service)."""

    headline = "deleted row restored"


class RowsOmittedError(RowFreshnessError):
    """A page or scan left out rows the verifier map holds; ``key`` is the first missing one."""

    headline = "rows omitted from a scan"


class PostingsStaleError(RowFreshnessError):
    """A posting group (all rows under one key prefix) differs from the map's (count, keyed
    multiset hash): rows omitted, stale postings restored, or postings of another version."""

    headline = "posting group stale"
    what = "prefix"


# --- the whole store -----------------------------------------------------------------------


class StoreStateError(FreshnessError):
    """The store as a whole is not fresh; nothing is served until the cause is resolved.

    Attributes:
        ledger: the anchor ledger name.
        store_epoch / anchor_epoch: the heads compared (None where unknown).
    """

    def __init__(self, message: str, *, ledger: str = "", store_epoch: int | None = None,
                 anchor_epoch: int | None = None):
        self.ledger = ledger
        self.store_epoch = store_epoch
        self.anchor_epoch = anchor_epoch
        super().__init__(message)


class StoreRolledBackError(StoreStateError):
    """The store's journal ends before the anchor's head: it was restored from an earlier copy
    (or lost committed transactions)."""


class StoreForkedError(StoreStateError):
    """The store's history and the anchor's differ at the same epoch, or do not link: another
    copy of the store was written under the same ledger."""


class JournalCorruptError(StoreStateError):
    """A journal entry or snapshot chunk fails its MAC, does not chain to its predecessor, or
    is missing: the freshness metadata itself was edited."""


class AnchorLostError(StoreStateError):
    """The anchor holds no state for the ledger (a majority of its members restarted at once).
    Only the data owner's signed re-anchoring statement brings the service back."""


class LedgerUninitialisedError(AnchorLostError):
    """A new, empty store whose ledger the anchor does not know yet: the data owner's signed
    initialisation is required before the first write."""


# --- the anchor --------------------------------------------------------------------------


class AnchorUnavailableError(FreshnessError):
    """Fewer than a majority of anchor members answered (503-like: retry later)."""


class AnchorConflictError(FreshnessError):
    """A majority of anchor members refused an advance: their head is neither the expected
    predecessor nor the new head (another writer advanced the ledger: a fork)."""


class NotAnchoredError(FreshnessError):
    """The write is stored in the database but not yet anchored. It becomes visible (and is
    never lost: start-up rolls it forward) when the anchor answers."""


class OwnerStatementError(FreshnessError):
    """An owner statement (initialise / re-anchor) is malformed, not signed by the pinned owner
    key, not addressed to this member incarnation, or replayed."""


class WireError(FreshnessError):
    """A message on the anchor API does not have the documented shape."""
