"""Prior versions of records, kept encrypted for FHIR ``vread`` (``GET …/_history/{vid}``).

Framework-free; used by :class:`~safehold.records.repository.PatientRepository` inside the
store transaction of every write: when a record at version *n* is replaced, its stored form
is written to the history namespace ``<namespace>.history`` under the record key
``<id>/<n>`` through the same :class:`~safehold.records.engine.RecordEngine` (AES-256-GCM
envelope; the AAD binds namespace, key and version, so a history row cannot be moved to another
record or version, and the id and version number exist only inside the ciphertext and the keyed
blind index). Deleting a record erases its history in the same transaction (delete is erasure).

What the database learns: how many history rows there are and, from the write that adds one,
that a record was updated (not which record: the row key is a blind index of ``<id>/<n>``).
Rollback of a history row to an older ciphertext of the same key is not detected (as for
records: DESIGN.md → Storage); versions skipped by :meth:`RecordEngine.rekey` (which bumps the
row version without a new content) have no history row and read as not found.
"""

from __future__ import annotations

from safehold.records.engine import RecordEngine

__all__ = ["VersionHistory"]


class VersionHistory:
    """The history namespace of one record namespace.

    Args:
        engine: the repository's engine.
        namespace: the record namespace whose history this is (rows go to
            ``<namespace>.history``).
    """

    def __init__(self, engine: RecordEngine, namespace: str) -> None:
        self.engine = engine
        self.ns = f"{namespace}.history"

    @staticmethod
    def _key(rid: str, vid: int) -> str:
        return f"{rid}/{vid}"

    def archive(self, rid: str, vid: int, raw: bytes) -> None:
        """Keep ``raw`` as version ``vid`` of ``rid`` (replaces a leftover row of that key).

        Raises:
            StoreUnavailableError: as the store.
        """
        self.engine.put(self.ns, self._key(rid, vid), raw)

    def get(self, rid: str, vid: int) -> bytes:
        """The stored form of version ``vid`` of ``rid``.

        Raises:
            RecordNotFoundError: not kept.  RecordTamperedError subclasses: the row failed
                authentication.
        """
        return self.engine.get(self.ns, self._key(rid, vid))[0]

    def erase(self, rid: str, upto: int) -> None:
        """Delete versions 1..``upto`` of ``rid`` (missing ones are fine)."""
        for vid in range(1, upto + 1):
            self.engine.delete(self.ns, self._key(rid, vid))
