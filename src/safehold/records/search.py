"""Exact-match search through keyed blind indexes: one *posting row* per (term, record).

A term is ``"<field>=<normalised value>"`` (:func:`safehold.records.model.postings`).
For each term a record has, one row is stored in the untrusted store::

    namespace  <records namespace>.search        (e.g. "records:patients.search")
    key        P || S                             32 bytes
               P = HMAC-SHA256(k_ns, "term:" || term)[:16]             term prefix
               S = HMAC-SHA256(k_ns, "posting:" || term || 0x00 || id)[:16]
    value      AES-256-GCM envelope of the record id, AAD = "safehold/search/v1" || ns || key

with ``k_ns`` the keyset's blind-index key derived for the namespace
(:class:`safehold.crypto.blind_index.BlindIndexer`, HKDF domain separation). A lookup scans the
rows whose key starts with ``P`` (the store orders keys bytewise) and decrypts the ids.

What the database learns: how many records share a term (rows under one prefix) and which
rows a write touches — the usual leakage of deterministic blind indexes. ``S`` depends on the
term, so rows of one record under different terms are not linkable by key; the id never
appears. Writes are O(1) per term (no ever-growing list, no hot row), and run inside the
caller's store transaction, so postings commit atomically with their record.

A row whose envelope fails authentication (edited, or copied to another key) is skipped and
logged by key; search results are re-checked against the decrypted records anyway.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from safehold.crypto import envelope
from safehold.crypto.blind_index import BlindIndexer
from safehold.crypto.keyset import Keyset
from safehold.errors import ConflictError, CryptoError
from safehold.store.base import Row, Store

log = logging.getLogger("safehold.records")

_AAD = b"safehold/search/v1"
PREFIX_LEN = 16
_PAGE = 500
_FIRST_PAGE = 16


class PostingIndex:
    """Posting rows for blind-index search (format in the module docstring).

    Args:
        store: the untrusted store (calls join an enclosing ``store.transaction()``).
        keyset: the attested records keyset (value keys seal ids; ``index_key`` blinds terms).
        namespace: store namespace of the postings.
    """

    def __init__(self, store: Store, keyset: Keyset, namespace: str):
        self.store = store
        self.keyset = keyset
        self.ns = namespace
        self._bi = BlindIndexer(keyset.index_key)
        self._aad_ns = _AAD + namespace.encode("ascii")

    def prefix(self, term: str) -> bytes:
        """The 16-byte blind prefix of ``term``."""
        return self._bi.index(self.ns, b"term:" + term.encode("utf-8"))

    def key(self, term: str, rid: str) -> bytes:
        """The 32-byte row key of (``term``, ``rid``)."""
        s = self._bi.index(self.ns, b"posting:" + term.encode("utf-8") + b"\x00" + rid.encode("utf-8"))
        return self.prefix(term) + s

    def add(self, rid: str, terms: Iterable[str]) -> None:
        """Insert the postings of ``rid`` for ``terms`` (existing ones are left alone).

        Raises:
            StoreUnavailableError: as the store.
        """
        for t in terms:
            k = self.key(t, rid)
            v = envelope.seal(self.keyset, rid.encode("utf-8"), self._aad_ns + k)
            with contextlib.suppress(ConflictError):  # already posted: an insert-only CAS no-op
                self.store.put(self.ns, k, v, expected_version=0)

    def remove(self, rid: str, terms: Iterable[str]) -> None:
        """Delete the postings of ``rid`` for ``terms`` (missing ones are fine)."""
        for t in terms:
            self.store.delete(self.ns, self.key(t, rid))

    def lookup(self, term: str) -> set[str]:
        """Record ids posted under ``term`` (rows that fail authentication are skipped).

        Over a :class:`~safehold.freshness.store.FreshStore` the whole posting group is read at
        once with ``scan_prefix`` and checked against the verifier map's (count, multiset hash):
        a group with rows omitted, stale or added raises
        :class:`~safehold.freshness.errors.PostingsStaleError` (names the blind prefix).
        """
        p = self.prefix(term)
        out: set[str] = set()
        scan_prefix = getattr(self.store, "scan_prefix", None)
        if scan_prefix is not None:
            for row in scan_prefix(self.ns, p):
                self._open_into(row, out)
            return out
        after = p
        page = _FIRST_PAGE  # the store scans past the prefix: most terms have few rows
        while True:
            rows = self.store.scan(self.ns, after=after, limit=page)
            for row in rows:
                if row.key[:PREFIX_LEN] != p:
                    return out
                self._open_into(row, out)
            if len(rows) < page:
                return out
            after = rows[-1].key
            page = min(page * 4, _PAGE)

    def _open_into(self, row: Row, out: set[str]) -> None:
        try:
            out.add(envelope.open_envelope(self.keyset, row.value, self._aad_ns + row.key).decode("utf-8"))
        except (CryptoError, UnicodeDecodeError):
            log.warning("search: posting row %s failed authentication; skipped", row.key.hex())

    def rekey(self, *, batch: int = 200) -> int:
        """Re-seal postings not under the keyset's primary key; returns how many. Resumable;
        rows that fail authentication are logged and left alone."""
        n = 0
        after: bytes | None = None
        primary = self.keyset.primary_id
        while True:
            rows = self.store.scan(self.ns, after=after, limit=batch)
            with self.store.transaction() as tx:
                for row in rows:
                    if envelope.envelope_key_id(row.value) == primary:
                        continue
                    try:
                        rid = envelope.open_envelope(self.keyset, row.value, self._aad_ns + row.key)
                    except CryptoError:  # a damaged posting stays unusable; it is not re-sealed
                        log.warning("rekey: posting row %s failed authentication; left as is",
                                    row.key.hex())
                        continue
                    tx.put(self.ns, row.key, envelope.seal(self.keyset, rid, self._aad_ns + row.key),
                           expected_version=row.version)
                    n += 1
            if len(rows) < batch:
                return n
            after = rows[-1].key
