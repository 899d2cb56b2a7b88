"""Exact-match search through keyed blind indexes: one *posting row* per (term, record).

A term is ``"<field>=<normalised value>"`` (:func:`safehold.records.model.postings`).
For each term a record has, one row is stored in the untrusted store (format 3, issue 17)::

    namespace  <records namespace>.search        (e.g. "records:patients.search")
    key        P || V                             32 bytes
               P = HMAC-SHA256(k_ns, "term:" || term)[:16]             term prefix
               V || C = AES-SIV(k_siv, AD = ["safehold/search/v1", ns, term], id)
    value      C: the record id encrypted (AES-CTR under the synthetic IV V), len(id) bytes

with ``k_ns`` the keyset's blind-index key derived for the namespace
(:class:`safehold.crypto.blind_index.BlindIndexer`, HKDF domain separation) and ``k_siv`` a
64-byte AES-SIV key (RFC 5297, ``cryptography``'s ``AESSIV``) derived from the same
``index_key`` (HKDF purpose ``records/posting-siv``, context ns). A lookup scans the rows whose
key starts with ``P`` (the store orders keys bytewise) and decrypts the ids with the term as
associated data.

Why this is as strong as the format-2 row (GCM envelope of the id under the value key, key
suffix ``S = HMAC(k_ns, "posting:" || term || 0 || id)[:16]``), and 33 bytes shorter: AES-SIV
is a deterministic authenticated encryption scheme (RFC 5297 §1.3); its IV ``V`` is a PRF of
(associated data, id) — exactly what ``S`` was, a deterministic per-(term, id) tag — so the key
suffix and the authentication tag are one and the same 16 bytes. Deterministic encryption only
reveals equal (term, id) pairs, which the deterministic key revealed already; ids of one
record under different terms get unrelated ``V`` and keystreams, so they stay unlinkable.
Decryption checks ``V`` over the term, namespace and id: a value edited, or copied under
another key (another term, another id), fails. The multiset hash of the freshness layer
covers each group's keys and versions, and a key names its value (``V`` is a PRF of the id),
so rows left out, restored or added are found there. The price: the id is sealed under a key
derived from ``index_key``, which never rotates (the blind indexes depend on it too), instead
of under the rotating value keys; rotating value keys no longer re-seals postings
(:meth:`PostingIndex.rekey` has nothing to do), and changing ``index_key`` means re-indexing
as it always did.

What the database learns: how many records share a term (rows under one prefix) and which
rows a write touches — the usual leakage of deterministic blind indexes — and each id's
length (as before). The id never appears. Writes are O(1) per term (no ever-growing list, no
hot row), one batched insert per record (:meth:`StoreOps.insert_new`), and run inside the
caller's store transaction, so postings commit atomically with their record.

A row that fails authentication: over a :class:`~safehold.freshness.store.FreshStore` the
lookup is refused (:class:`~safehold.records.errors.RecordCorruptedError`, fail closed) — the
multiset hash covers keys and versions, not values, so a skipped row would be a posting hidden
from search with the group's check passing; over a plain store (where the database may drop rows
anyway) it is skipped and logged by key. Search results are re-checked against the decrypted
records either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from safehold.crypto.blind_index import BlindIndexer
from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.records.errors import RecordCorruptedError
from safehold.store.base import Row, Store

log = logging.getLogger("safehold.records")

_AAD = b"safehold/search/v1"
PREFIX_LEN = 16
_PAGE = 500
_FIRST_PAGE = 16
_SIV_PURPOSE = "records/posting-siv"
_PREFIX_CACHE = 65_536  # blinded term prefixes kept (terms repeat: names, date levels)


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
        ns = namespace.encode("ascii")
        self._siv = AESSIV(derive_key(keyset.index_key, purpose=_SIV_PURPOSE, context=ns, length=64))
        self._ad = [_AAD, ns]
        self._prefixes: dict[str, bytes] = {}

    def prefix(self, term: str) -> bytes:
        """The 16-byte blind prefix of ``term`` (cached: a PRF of the term alone)."""
        p = self._prefixes.get(term)
        if p is None:
            p = self._bi.index(self.ns, b"term:" + term.encode("utf-8"))
            if len(self._prefixes) >= _PREFIX_CACHE:
                self._prefixes.clear()
            self._prefixes[term] = p
        return p

    def row(self, term: str, rid: str) -> tuple[bytes, bytes]:
        """The posting row ``(key, value)`` of (``term``, ``rid``): ``P || V`` and ``C``."""
        sealed = self._siv.encrypt(rid.encode("utf-8"), [*self._ad, term.encode("utf-8")])
        return self.prefix(term) + sealed[:16], sealed[16:]

    def key(self, term: str, rid: str) -> bytes:
        """The 32-byte row key of (``term``, ``rid``)."""
        return self.row(term, rid)[0]

    def add(self, rid: str, terms: Iterable[str]) -> None:
        """Insert the postings of ``rid`` for ``terms`` (existing ones are left alone), in one
        batched insert.

        Raises:
            StoreUnavailableError: as the store.
        """
        self.add_many([(rid, terms)])

    def add_many(self, items: Iterable[tuple[str, Iterable[str]]]) -> None:
        """:meth:`add` for several records ``(rid, terms)`` in one batched insert (a batch
        import's postings).

        Raises:
            StoreUnavailableError: as the store.
        """
        rows = [self.row(t, rid) for rid, terms in items for t in terms]
        if rows:
            self.store.insert_new(self.ns, rows)

    def remove(self, rid: str, terms: Iterable[str]) -> None:
        """Delete the postings of ``rid`` for ``terms`` (missing ones are fine)."""
        for t in terms:
            self.store.delete(self.ns, self.key(t, rid))

    def lookup(self, term: str) -> set[str]:
        """Record ids posted under ``term``.

        Over a :class:`~safehold.freshness.store.FreshStore` the whole posting group is read at
        once with ``scan_prefix`` and checked against the verifier map's (count, multiset hash):
        a group with rows omitted, stale or added raises
        :class:`~safehold.freshness.errors.PostingsStaleError` (names the blind prefix), and a
        row of the checked group that fails authentication raises
        :class:`~safehold.records.errors.RecordCorruptedError` (its value was edited: the
        multiset hash does not cover values); over a plain store such a row is skipped.
        """
        p = self.prefix(term)
        out: set[str] = set()
        scan_prefix = getattr(self.store, "scan_prefix", None)
        if scan_prefix is not None:
            for row in scan_prefix(self.ns, p):
                if not self._open_into(row, term, out):
                    raise RecordCorruptedError(self.ns, row.key, "a posting of a checked group failed "
                                               "authentication (its value was edited)")
            return out
        after = p
        page = _FIRST_PAGE  # the store scans past the prefix: most terms have few rows
        while True:
            rows = self.store.scan(self.ns, after=after, limit=page)
            for row in rows:
                if row.key[:PREFIX_LEN] != p:
                    return out
                self._open_into(row, term, out)
            if len(rows) < page:
                return out
            after = rows[-1].key
            page = min(page * 4, _PAGE)

    def _open_into(self, row: Row, term: str, out: set[str]) -> bool:
        """Add the row's record id to ``out``; False (logged by key) if the row fails authentication."""
        try:
            rid = self._siv.decrypt(row.key[PREFIX_LEN:] + row.value, [*self._ad, term.encode("utf-8")])
            out.add(rid.decode("utf-8"))
        except (InvalidTag, ValueError, UnicodeDecodeError):
            log.warning("search: posting row %s failed authentication", row.key.hex())
            return False
        return True

    def rekey(self, *, batch: int = 200) -> int:
        """Re-seal postings after a value-key rotation: nothing to do in format 3 (the ids are
        sealed under a key derived from ``index_key``, which does not rotate; module
        docstring). Returns 0; kept for callers of the key-rotation API."""
        return 0
