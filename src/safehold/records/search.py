"""Exact-match search through keyed blind indexes: one *posting row* per (term, record).

A term is ``"<field>=<normalised value>"`` (:func:`safehold.records.model.postings`).
For each term a record has, one row is stored in the untrusted store (format 5, issue 17)::

    namespace  <records namespace>.postings      (e.g. "records:patients.postings")
    key        P || V                             26 bytes
               P = HMAC-SHA256(k_ns, "term:" || term)[:10]             term prefix
               V || C = AES-SIV(k_siv, AD = ["safehold/search/v1", ns, term], E(id))
    value      C: the encoded id encrypted (AES-CTR under the synthetic IV V), len(E(id)) bytes

    E(id) = 0x00 || UUID(id).bytes    (17 bytes) if id is a canonical UUID: the lowercase,
                                      hyphenated 36 characters str(uuid.UUID(id)) gives back
                                      (RFC 9562 §4)
          = UTF-8(id)                 otherwise (never empty, never starting with 0x00)

with ``k_ns`` the keyset's blind-index key derived for the namespace
(:class:`safehold.crypto.blind_index.BlindIndexer`, HKDF domain separation) and ``k_siv`` a
64-byte AES-SIV key (RFC 5297, ``cryptography``'s ``AESSIV``) derived from the same
``index_key`` (HKDF purpose ``records/posting-siv``, context ns). A lookup scans the rows whose
key starts with ``P`` (the store orders keys bytewise), decrypts the ids with the term as
associated data and decodes them (:func:`decode_id`).

Format 5 vs format 4 (namespace ``<records namespace>.search``, ``P`` 16 bytes, 32-byte keys):
``P`` is 10 bytes and the rows live in a namespace of their own — 6 bytes less on each of a
Patient's ~37 postings, ~220 bytes of row payload per record — and nothing else changed. The
namespace is new because the freshness layer groups a posting namespace by one fixed prefix
length for good (:data:`safehold.records.fresh.POSTINGS_POLICY`; the verifier map refuses a
journaled namespace whose length changed), and because its name is in ``k_ns``, ``k_siv`` and the
associated data, a row of one format never authenticates as a row of the other.
:func:`safehold.records.reindex.ensure_search_index` drops the old namespace's rows and posts
every record again. ``P`` only locates a term's rows; what authenticates a row is ``V`` (over the
namespace, the term and the encoded id), so shortening ``P`` weakens nothing but the separation
of terms: two distinct terms of one namespace whose ``P`` collide share a group, and each one's
lookup meets rows that fail authentication under it — over a
:class:`~safehold.freshness.store.FreshStore` refused as corruption (below), so both terms'
searches fail closed (409 ``record-tampered``) rather than answer wrongly (over a plain store
the other term's rows are skipped as below); the records themselves are untouched. ``P`` is a
PRF output, so for
``T`` distinct terms in a namespace the chance of any collision is at most ``T² / 2^81``
(birthday bound over 80 bits): ~4e-9 for 10^8 terms (a Patient has ~37, mostly shared: names,
date levels, prefixes), ~4e-13 for 10^6. Do not shorten ``P`` further: at 8 bytes 10^8 terms
would collide with probability ~3e-4.

``E`` is injective and :func:`decode_id` its exact inverse on its image, refusing every other
byte string: the record ids the service accepts (:data:`safehold.records.model.RECORD_ID_RE`,
ASCII letters, digits and ``._~:@-``; FHIR R4 ids ``[A-Za-z0-9\\-\\.]{1,64}`` among them) never
contain U+0000, so a text id never starts with 0x00 and the two forms cannot be confused; a
0x00 form of any length but 17, and a text form that spells a canonical UUID (which ``E``
always writes in the 0x00 form), are refused like a row failing authentication.

Format 4 vs format 3 (``V || C = AES-SIV(..., UTF-8(id))``, 19 bytes more per UUID id): only
the SIV plaintext's encoding changed, keys and associated data did not. Since ``E`` is
injective, (term, ``E(id)``) pairs are (term, id) pairs, so the argument of format 3 carries
over unchanged: AES-SIV is a deterministic authenticated encryption scheme (RFC 5297 §1.3) whose
IV ``V`` is a PRF of (associated data, plaintext) — what format 2's key suffix
``S = HMAC(k_ns, "posting:" || term || 0 || id)[:16]`` was, a deterministic per-(term, id)
tag — so the key suffix and the authentication tag are one and the same 16 bytes.
Deterministic encryption only reveals equal (term, id) pairs, which the deterministic key
revealed already; ids of one record under different terms get unrelated ``V`` and keystreams,
so they stay unlinkable. Decryption checks ``V`` over the term, namespace and encoded id: a
value edited, or copied under another key (another term, another id), fails. The multiset hash
of the freshness layer covers each group's keys and versions, and a key names its value (``V``
is a PRF of the id), so rows left out, restored or added are found there. The ids are sealed
under a key derived from ``index_key``, which never rotates (the blind indexes depend on it
too), not under the rotating value keys; rotating value keys does not re-seal postings
(:meth:`PostingIndex.rekey` has nothing to do), and changing ``index_key`` means re-indexing as
it always did.

What the database learns (the same in format 5 as in format 4; a shorter ``P`` groups the same
rows, barring the collision above): how many records share a term (rows under one prefix) and
which rows a write touches — the usual leakage of deterministic blind indexes — and each row's
value length ``len(E(id))``: 17 bytes for a canonical UUID id, the id's length in bytes
otherwise. Format 3 showed the id's length (36 for a UUID); format 4 in addition tells a
canonical UUID from any other 36-character id (an upper-case or otherwise non-canonical UUID,
another 36-character id), and no longer tells a UUID from a 17-character id. The record row does
not reveal this already: its key is a blind index and its value length is a fixed frame plus
``len(id)`` plus the record JSON's length (frame version 1) or the record key, value header and
compressed JSON rounded up to 256 bytes (version 2, :mod:`safehold.records.frame`), never the
id's shape. The id never appears. Writes are O(1) per term (no ever-growing list, no hot row),
one batched insert per record (:meth:`StoreOps.insert_new`), and run inside the caller's store
transaction, so postings commit atomically with their record.

A row that fails authentication or decoding: over a :class:`~safehold.freshness.store.FreshStore`
the lookup is refused (:class:`~safehold.records.errors.RecordCorruptedError`, fail closed) —
the multiset hash covers keys and versions, not values, so a skipped row would be a posting
hidden from search with the group's check passing; over a plain store (where the database may
drop rows anyway) it is skipped and logged by key. Search results are re-checked against the
decrypted records either way.
"""

from __future__ import annotations

import logging
import uuid
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
#: Bytes of the blind term prefix ``P`` (format 5; the module docstring has the collision bound).
PREFIX_LEN = 10
#: Store namespace of the postings: ``<prefix><namespace>`` + this (format 5).
NAMESPACE_SUFFIX = ".postings"
#: Store namespace of the postings of formats 1 to 4 (16-byte prefixes), whose rows
#: :func:`safehold.records.reindex.ensure_search_index` drops.
OLD_NAMESPACE_SUFFIX = ".search"
#: The prefix length the freshness layer grouped the old namespace by (kept in its policy).
OLD_PREFIX_LEN = 16
_TAG_LEN = 16  # AES-SIV's synthetic IV V, the key's second part
_PAGE = 500
_FIRST_PAGE = 16
_SIV_PURPOSE = "records/posting-siv"
_PREFIX_CACHE = 65_536  # blinded term prefixes kept (terms repeat: names, date levels)
_UUID_TAG = b"\x00"  # first byte of a canonical UUID's encoding; no accepted text id has it
_UUID_LEN = 36  # characters of a canonical UUID (8-4-4-4-12 hex digits and hyphens)


def _canonical_uuid(rid: str) -> uuid.UUID | None:
    """The UUID ``rid`` spells if it is in canonical form (``str(uuid.UUID(rid)) == rid``:
    lowercase, hyphenated, RFC 9562 §4), else None."""
    if len(rid) != _UUID_LEN:
        return None  # uuid.UUID also takes braces, "urn:uuid:" and 32 bare digits: not canonical
    try:
        u = uuid.UUID(rid)
    except ValueError:
        return None
    return u if str(u) == rid else None


def encode_id(rid: str) -> bytes:
    """The posting plaintext ``E(rid)`` (module docstring): ``0x00 || 16 bytes`` for a canonical
    UUID, else the id's UTF-8 bytes.

    Raises:
        ValueError: ``rid`` is empty or starts with U+0000 (its encoding would be ambiguous; no
            id :func:`~safehold.records.model.check_record_id` accepts is either).
    """
    u = _canonical_uuid(rid)
    if u is not None:
        return _UUID_TAG + u.bytes
    if not rid or rid[0] == "\x00":
        raise ValueError("a posting id must be non-empty and not start with U+0000")
    return rid.encode("utf-8")


def decode_id(plain: bytes) -> str:
    """The id whose encoding is ``plain`` — the exact inverse of :func:`encode_id` on its image.

    Raises:
        ValueError: ``plain`` is not an encoding :func:`encode_id` makes: a 0x00 form that is
            not 17 bytes, bytes that are not UTF-8 (``UnicodeDecodeError``), empty, or a text
            form spelling a canonical UUID (always written in the 0x00 form).
    """
    if plain[:1] == _UUID_TAG:
        if len(plain) != 1 + 16:
            raise ValueError("a UUID posting id must be 17 bytes")
        return str(uuid.UUID(bytes=plain[1:]))
    rid = plain.decode("utf-8")
    if not rid or _canonical_uuid(rid) is not None:
        raise ValueError("a posting id not in the form its encoding claims")
    return rid


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
        """The blind prefix ``P`` of ``term``, :data:`PREFIX_LEN` bytes (cached: a PRF of the term
        alone)."""
        p = self._prefixes.get(term)
        if p is None:
            p = self._bi.index(self.ns, b"term:" + term.encode("utf-8"))[:PREFIX_LEN]
            if len(self._prefixes) >= _PREFIX_CACHE:
                self._prefixes.clear()
            self._prefixes[term] = p
        return p

    def row(self, term: str, rid: str) -> tuple[bytes, bytes]:
        """The posting row ``(key, value)`` of (``term``, ``rid``): ``P || V`` and ``C``.

        Raises:
            ValueError: ``rid`` has no encoding (:func:`encode_id`).
        """
        return self._row(term, encode_id(rid))

    def _row(self, term: str, plain: bytes) -> tuple[bytes, bytes]:
        """The posting row of ``term`` and the encoded id ``plain``."""
        sealed = self._siv.encrypt(plain, [*self._ad, term.encode("utf-8")])
        return self.prefix(term) + sealed[:_TAG_LEN], sealed[_TAG_LEN:]

    def key(self, term: str, rid: str) -> bytes:
        """The row key ``P || V`` of (``term``, ``rid``), :data:`PREFIX_LEN` + 16 bytes.

        Raises:
            ValueError: ``rid`` has no encoding (:func:`encode_id`).
        """
        return self.row(term, rid)[0]

    def add(self, rid: str, terms: Iterable[str]) -> None:
        """Insert the postings of ``rid`` for ``terms`` (existing ones are left alone), in one
        batched insert.

        Raises:
            StoreUnavailableError: as the store.
            ValueError: ``rid`` has no encoding (:func:`encode_id`; nothing is written).
        """
        self.add_many([(rid, terms)])

    def add_many(self, items: Iterable[tuple[str, Iterable[str]]]) -> None:
        """:meth:`add` for several records ``(rid, terms)`` in one batched insert (a batch
        import's postings).

        Raises:
            StoreUnavailableError: as the store.
            ValueError: an id has no encoding (:func:`encode_id`; nothing is written).
        """
        rows: list[tuple[bytes, bytes]] = []
        for rid, terms in items:
            plain = encode_id(rid)  # once per record, not per term
            rows.extend(self._row(t, plain) for t in terms)
        if rows:
            # in key order: the B-tree fills page by page (~20 % less SQLite time), and the
            # database no longer sees a batch's rows grouped by record in the insert order
            rows.sort()
            self.store.insert_new(self.ns, rows)

    def remove(self, rid: str, terms: Iterable[str]) -> None:
        """Delete the postings of ``rid`` for ``terms`` (missing ones are fine).

        Raises:
            ValueError: ``rid`` has no encoding (:func:`encode_id`).
        """
        plain = encode_id(rid)
        for t in terms:
            self.store.delete(self.ns, self._row(t, plain)[0])

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
        """Add the row's record id to ``out``; False (logged by key) if the row fails
        authentication or its id is not in the form its encoding claims (:func:`decode_id`)."""
        try:
            plain = self._siv.decrypt(row.key[PREFIX_LEN:] + row.value, [*self._ad, term.encode("utf-8")])
            out.add(decode_id(plain))
        except (InvalidTag, ValueError):  # UnicodeDecodeError is a ValueError
            log.warning("search: posting row %s failed authentication", row.key.hex())
            return False
        return True

    def rekey(self, *, batch: int = 200) -> int:
        """Re-seal postings after a value-key rotation: nothing to do since format 3 (the ids are
        sealed under a key derived from ``index_key``, which does not rotate; module
        docstring). Returns 0; kept for callers of the key-rotation API."""
        return 0
