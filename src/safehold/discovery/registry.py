"""Registrations: identifier → user id, stored in the untrusted store only as keyed tags.

Row layout (namespace :data:`NAMESPACE`)::

    key   = HMAC-SHA256(tag_key, OPRF output of the identifier)       (32 bytes)
    value = envelope(keyset, encode_result(user id), aad = AAD || key) (48-byte plaintext)

The OPRF output needs the service's OPRF key, and the tag the tag key — both exist only in the
attested workload's memory. A copy of the database therefore cannot be searched with a
dictionary of phone numbers or KVNRs, nor with their plain hashes, nor with OPRF outputs a
client obtained. Every plaintext is 48 bytes, so row sizes do not reveal user-id lengths.

What the store can still do (the database is the adversary's): delete rows (unregisters), or
return an older copy (rollback: old registrations come back). Moved or edited values fail
authentication (the row key is in the AAD) and :meth:`Registry.load` refuses to start with
:class:`~safehold.discovery.errors.RegistryTamperedError`. Rollback detection comes with the
freshness anchor.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterable, Sequence

from safehold.crypto import oprf
from safehold.crypto.envelope import open_envelope, seal
from safehold.discovery.errors import InvalidRequestError, RegistryTamperedError
from safehold.discovery.identifiers import oprf_input
from safehold.discovery.keys import DiscoveryKeys
from safehold.discovery.protocol import OUTPUT_SIZE, check_user_id, encode_result
from safehold.discovery.table import TAG_SIZE, ObliviousTable
from safehold.errors import CryptoError
from safehold.store import Store

NAMESPACE = "discovery.registry"
AAD = b"safehold/discovery/registry/v1"


class Registry:
    """The registry over a store, with its in-memory :class:`ObliviousTable`.

    Args:
        store: the untrusted store.
        keys: the service keys.
        table: the table to fill (a fresh one by default).
    """

    def __init__(self, store: Store, keys: DiscoveryKeys, table: ObliviousTable | None = None):
        self.store = store
        self.keys = keys
        self.table = table if table is not None else ObliviousTable()
        self._write_lock = threading.Lock()

    def row_key(self, output: bytes) -> bytes:
        """The 32-byte store key of an OPRF output (HMAC-SHA256 under the tag key)."""
        return hmac.digest(self.keys.tag_key, output, "sha256")

    def table_tags(self, outputs: Sequence[bytes]) -> list[bytes]:
        """The 16-byte table tags (row key prefixes) of OPRF outputs.

        Raises:
            InvalidRequestError: an output is not 64 bytes.
        """
        for n, o in enumerate(outputs):
            if not isinstance(o, bytes) or len(o) != OUTPUT_SIZE:
                raise InvalidRequestError(f"output {n} must be {OUTPUT_SIZE} bytes")
        return [self.row_key(o)[:TAG_SIZE] for o in outputs]

    def load(self) -> int:
        """Rebuild the table from the store; returns the number of registrations.

        Raises:
            RegistryTamperedError: a row fails authentication or has the wrong shape.
        """
        tags, values = [], []
        for row in self.store.scan_all(NAMESPACE, page=5000):
            try:
                value = open_envelope(self.keys.keyset, row.value, AAD + row.key)
            except CryptoError:
                raise RegistryTamperedError(
                    f"registry row {row.key.hex()[:16]} failed authentication") from None
            if len(row.key) != 32 or len(value) != len(encode_result(None)) or value[0] != 1:
                raise RegistryTamperedError(f"registry row {row.key.hex()[:16]} has the wrong shape")
            tags.append(row.key[:TAG_SIZE])
            values.append(value)
        try:
            self.table.build(tags, values)
        except ValueError as e:
            raise RegistryTamperedError(f"registry rows cannot form a table: {e}") from None
        return len(tags)

    def _output(self, kind: str, canonical: str) -> bytes:
        return oprf.evaluate(self.keys.oprf.sk, [oprf_input(kind, canonical)])[0]

    def register(self, kind: str, canonical: str, user_id: str) -> None:
        """Register (or re-assign) one identifier. Durable in the store before the table changes.

        Raises:
            InvalidIdentifierError, InvalidUserIdError; StoreError.
        """
        self.register_many([(kind, canonical, user_id)])

    def register_many(self, entries: Iterable[tuple[str, str, str]]) -> int:
        """Register several ``(kind, canonical identifier, user id)``; all validated first, then
        written in one store transaction. Returns the count."""
        prepared = []
        for kind, canonical, user_id in entries:
            value = encode_result(check_user_id(user_id))
            key = self.row_key(self._output(kind, canonical))
            prepared.append((key, value))
        with self._write_lock:
            with self.store.transaction() as tx:
                for key, value in prepared:
                    blob = seal(self.keys.keyset, value, AAD + key)
                    row = tx.get(NAMESPACE, key)
                    tx.put(NAMESPACE, key, blob, expected_version=row.version if row else 0)
            for key, value in prepared:
                self.table.put(key[:TAG_SIZE], value)
        return len(prepared)

    def unregister_many(self, entries: Iterable[tuple[str, str]]) -> int:
        """Remove ``(kind, canonical identifier)`` registrations; returns how many existed."""
        keys = [self.row_key(self._output(kind, canonical)) for kind, canonical in entries]
        removed = 0
        with self._write_lock:
            with self.store.transaction() as tx:
                for key in keys:
                    removed += int(tx.delete(NAMESPACE, key))
            for key in keys:
                self.table.remove(key[:TAG_SIZE])
        return removed

    def lookup(self, outputs: Sequence[bytes]) -> list[bytes]:
        """Oblivious lookup of OPRF outputs: one 48-byte result each (see :mod:`.table`)."""
        return self.table.lookup(self.table_tags(outputs))

    def __len__(self) -> int:
        return len(self.table)
