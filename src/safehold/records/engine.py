"""The encrypted key-value engine: records over an untrusted :class:`~safehold.store.base.Store`.

What the database sees, per record (sealed and opened by :mod:`safehold.records.frame`): the
store namespace (``namespace_prefix + namespace``), the row key — a 16-byte blind index
``HMAC-SHA256(k_ns, record key)[:16]`` (:mod:`safehold.crypto.blind_index`) — the CAS version,
and a value in this frame::

    offset   size  field
    0        1     frame version: 0x02 (compressed, padded; ``compress=True``) or 0x01 (exact)
    1        1     n = length of the store namespace
    2        n     store namespace (ASCII) the value was sealed for
    2+n      1     m = length of the row key (16)
    3+n      m     row key (blind index) the value was sealed for
    3+n+m    8     version (u64 big-endian) the value was sealed for
    11+n+m   ...   sealed body: codec output, normally an AES-256-GCM envelope
                   (format version, key id, nonce, ciphertext+tag)

The body's plaintext starts with ``u16be len(record key) || record key (UTF-8)``; then, in frame
version 1, the value as is; in version 2, a format byte, the payload length, the payload (the
value, or its zlib stream when shorter) and zero padding to a multiple of 256 bytes (layout in
:mod:`safehold.records.frame`). The record key lives inside the ciphertext, so
:meth:`RecordEngine.list` can return it, and the database never holds it. The GCM associated
data is ``b"safehold/record/v1" || header`` (bytes 0 to 10+n+m), which binds frame version,
namespace, blind index (a PRF of the record key) and version; after
decryption the engine also checks that the embedded record key is the one asked for (or, in
``list``, that it hashes to the row's blind index), so AAD effectively binds
(namespace, record key, version).

The header copy of the coordinates is only for diagnosis: authentication is decided by GCM,
and then the authenticated coordinates must equal the row's actual ones. That lets every
attack in the threat model fail with its own error naming the row's blind index:

* bytes of the value changed (flipped bit, truncated)  → :class:`RecordCorruptedError`
* a value copied onto another record key               → :class:`RecordCopiedError`
* a value moved to another namespace                   → :class:`RecordMovedError`
* the row's version number changed                     → :class:`RecordVersionMismatchError`
* the envelope names a key id the keyset lacks         → :class:`RecordUnknownKeyError`

Rolling a row back to an older valid (value, version) pair is *not* detected here; see
DESIGN.md → Storage (freshness is a later design).

Key rotation (:meth:`RecordEngine.rekey`, resumable, batch by batch) is
:mod:`safehold.records.rotation`.
"""

from __future__ import annotations

import builtins
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from safehold.crypto.blind_index import INDEX_SIZE, BlindIndexer
from safehold.crypto.keyset import Keyset
from safehold.errors import (
    ConflictError,
    RecordError,
    RecordNotFoundError,
    RecordTamperedError,
)
from safehold.records import rotation
from safehold.records.codec import Codec, EnvelopeCodec
from safehold.records.errors import (
    RecordConflictError,
)
from safehold.records.frame import RowFrame
from safehold.records.rotation import RekeyCounts
from safehold.store.base import MAX_NAMESPACE, Row, Store

__all__ = ["MAX_RECORD_KEY", "ListPage", "RecordEngine", "RowAddress"]

#: Longest record key, in UTF-8 bytes.
MAX_RECORD_KEY = 4096
#: Default prefix of the store namespaces the engine writes.
DEFAULT_PREFIX = "records:"

_NS_RE = re.compile(r"[A-Za-z0-9._:-]+")
_REGISTRY = "_namespaces"


# --- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowAddress:
    """Where a record lives, computed once by :meth:`RecordEngine.address` (namespace and key
    checked, blind index derived) for the ``*_at`` operations.

    Attributes:
        namespace: the record namespace.
        store_namespace: ``namespace_prefix + namespace``.
        key: the record key, UTF-8.
        row_key: the 16-byte blind index addressing the row.
    """

    namespace: str
    store_namespace: str
    key: bytes
    row_key: bytes


@dataclass(frozen=True)
class ListPage:
    """One page of :meth:`RecordEngine.list_page`.

    Attributes:
        keys: record keys of the rows that authenticated, in blind-index order.
        next_after: cursor for the next page (the last row's 16-byte blind index), None at the end.
        tampered: errors of rows left out (only with ``skip_tampered=True``).
    """

    keys: list[str]
    next_after: bytes | None
    tampered: list[RecordTamperedError]


# --- the engine ------------------------------------------------------------------------------


class RecordEngine:
    """Encrypted records over an untrusted store (frame and guarantees in the module docstring).

    Args:
        store: any :class:`~safehold.store.base.Store` (SQLite or PostgreSQL engine).
        keyset: value keys (primary seals, ids select on open) and the blind-index key
            (``keyset.index_key``; it never rotates).
        namespace_prefix: prepended to every record namespace to form the store namespace, so
            several engines can share one store; ASCII ``[A-Za-z0-9._:-]``, may be empty.
        codec: defaults to :class:`~safehold.records.codec.EnvelopeCodec` over ``keyset``;
            :class:`~safehold.records.codec.UnsafePlainCodec` only for benchmark baselines.
        compress: True: new values are written in frame version 2 (zlib when shorter, padded to
            256 bytes, inside the AEAD); False (default, the other services' engines): version 1,
            exact length. Rows of either version are read either way.

    Record namespaces are 1.. ``128 - len(prefix)`` characters of ``[A-Za-z0-9._:-]`` and may
    not start with ``_`` (reserved). Record keys are non-empty ``str`` of at most
    :data:`MAX_RECORD_KEY` UTF-8 bytes; values are ``bytes``. Thread-safe when the store is.
    """

    def __init__(
        self,
        store: Store,
        keyset: Keyset,
        *,
        namespace_prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        compress: bool = False,
    ):
        if namespace_prefix and not _NS_RE.fullmatch(namespace_prefix):
            raise ValueError("namespace_prefix may contain only ASCII letters, digits and ._:-")
        if len(namespace_prefix) + 1 + len(_REGISTRY) > MAX_NAMESPACE:
            raise ValueError(f"namespace_prefix too long ({len(namespace_prefix)} chars)")
        self.store = store
        self.keyset = keyset
        self.prefix = namespace_prefix
        self.codec: Codec = codec if codec is not None else EnvelopeCodec(keyset)
        self._indexer = BlindIndexer(keyset.index_key)
        self.frame = RowFrame(self.codec, self._indexer, compress=compress)
        self._sns: dict[str, str] = {}
        self._registered: set[str] = set()
        self._registry_ns = namespace_prefix + _REGISTRY

    def __repr__(self) -> str:
        store = type(self.store).__name__
        return (f"RecordEngine(store={store}, prefix={self.prefix!r}, codec={self.codec.name}, "
                f"compress={self.frame.compress})")

    # --- addressing ----------------------------------------------------------------------------

    def store_namespace(self, namespace: str) -> str:
        sns = self._sns.get(namespace) if isinstance(namespace, str) else None
        if sns is None:
            if not isinstance(namespace, str) or not _NS_RE.fullmatch(namespace):
                raise ValueError("record namespace must be non-empty ASCII letters, digits and ._:-")
            if namespace.startswith("_"):
                raise ValueError("record namespaces starting with '_' are reserved")
            sns = self.prefix + namespace
            if len(sns) > MAX_NAMESPACE:
                raise ValueError(
                    f"record namespace too long: prefix + namespace is {len(sns)} chars, max {MAX_NAMESPACE}"
                )
            self._sns[namespace] = sns
        return sns

    @staticmethod
    def _key_bytes(key: str) -> bytes:
        if not isinstance(key, str):
            raise ValueError(f"record key must be str, got {type(key).__name__}")
        try:
            kb = key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("record key is not encodable as UTF-8 (lone surrogate)") from None
        if not 1 <= len(kb) <= MAX_RECORD_KEY:
            raise ValueError(f"record key must be 1..{MAX_RECORD_KEY} UTF-8 bytes, got {len(kb)}")
        return kb

    def row_index(self, namespace: str, key: str) -> bytes:
        """The 16-byte blind index addressing ``key`` in ``namespace`` (for diagnostics).

        Raises:
            ValueError: bad namespace or key.
        """
        return self._indexer.index(self.store_namespace(namespace), self._key_bytes(key))

    def address(self, namespace: str, key: str) -> RowAddress:
        """Check ``namespace`` and ``key`` once and derive the row's blind index, for callers
        that touch one record several times (:meth:`get_at`, :meth:`put_at`, :meth:`delete_at`).

        Raises:
            ValueError: bad namespace or key.
        """
        sns = self.store_namespace(namespace)
        kb = self._key_bytes(key)
        return RowAddress(namespace, sns, kb, self._indexer.index(sns, kb))

    # --- namespace registry (lets rekey find every namespace) ------------------------------------

    def _register(self, sns: str) -> None:
        if sns in self._registered:
            return
        rk = hashlib.sha256(sns.encode("ascii")).digest()[:INDEX_SIZE]
        if self.store.get(self._registry_ns, rk) is None:
            try:
                self.store.put(self._registry_ns, rk, sns.encode("ascii"), expected_version=0)
            except ConflictError:
                pass  # registered concurrently by another writer: fine
        self._registered.add(sns)

    def namespaces(self) -> list[str]:
        """Record namespaces this engine's prefix has ever written to, sorted.

        Registry rows are plain (namespace names are visible to the store anyway); entries
        that do not belong to this prefix or do not match their row key are ignored.
        """
        out = []
        for row in self.store.scan_all(self._registry_ns):
            try:
                sns = row.value.decode("ascii")
            except UnicodeDecodeError:
                continue
            if (
                sns.startswith(self.prefix)
                and hashlib.sha256(row.value).digest()[:INDEX_SIZE] == row.key
                and _NS_RE.fullmatch(sns[len(self.prefix) :] or "_")
                and not sns[len(self.prefix) :].startswith("_")
            ):
                out.append(sns[len(self.prefix) :])
        return sorted(out)

    # --- record operations ---------------------------------------------------------------------

    def put(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Write a record; return its new version (1 for a new record, +1 per write).

        Args:
            namespace: record namespace.
            key: record key (``str``, 1..4096 UTF-8 bytes); stored only inside the ciphertext.
            value: bytes, up to the store's value limit minus the frame (~16 MiB).
            expected_version: ``None`` writes unconditionally; ``0`` creates (the record must
                not exist); ``n`` updates only if the record is at version ``n``.

        Raises:
            RecordConflictError (a ConflictError): the record's version is not ``expected_version``.
            StoreUnavailableError: the store cannot be reached; nothing was written.
            ValueError: bad namespace, key, value type or version.
        """
        addr = self.address(namespace, key)
        if expected_version is not None:
            return self.put_at(addr, value, expected_version=expected_version)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"record value must be bytes, got {type(value).__name__}")
        value = bytes(value)
        sns, kb, row_key = addr.store_namespace, addr.key, addr.row_key
        self._register(sns)
        for _ in range(16):
            row = self.store.get(sns, row_key)
            current = 0 if row is None else row.version
            blob = self.frame.seal(sns, row_key, current + 1, kb, value)
            try:
                return self.store.put(sns, row_key, blob, expected_version=current)
            except ConflictError:
                continue  # a concurrent writer got in between; read the new version and retry
        raise RecordConflictError(
            f"put on row {row_key.hex()} in namespace {namespace!r} lost 16 races to concurrent writers"
        )

    def put_at(self, addr: RowAddress, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set write at an :meth:`address`: only if the record is at
        ``expected_version`` (0 = must not exist); returns the new version.

        Raises:
            RecordConflictError, StoreUnavailableError, ValueError: as :meth:`put`.
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"record value must be bytes, got {type(value).__name__}")
        if isinstance(expected_version, bool) or not isinstance(expected_version, int) or (
            expected_version < 0
        ):
            raise ValueError(f"expected_version must be an int >= 0 or None, got {expected_version!r}")
        self._register(addr.store_namespace)
        sns, row_key = addr.store_namespace, addr.row_key
        blob = self.frame.seal(sns, row_key, expected_version + 1, addr.key, bytes(value))
        try:
            return self.store.put(addr.store_namespace, addr.row_key, blob, expected_version=expected_version)
        except ConflictError as e:
            raise self._conflict(addr.namespace, addr.row_key, expected_version, e) from None

    @staticmethod
    def _conflict(namespace: str, row_key: bytes, expected: int, e: ConflictError) -> RecordConflictError:
        actual = getattr(e, "actual", None)
        found = "unknown" if actual is None else ("no record" if actual == 0 else f"version {actual}")
        want = "no record" if expected == 0 else f"version {expected}"
        return RecordConflictError(
            f"stale version for record row {row_key.hex()} in namespace {namespace!r}: "
            f"expected {want}, found {found}",
            expected,
            actual,
        )

    def get(self, namespace: str, key: str) -> tuple[bytes, int]:
        """Read a record: ``(value, version)``.

        Raises:
            RecordNotFoundError: no such record (message names the blind index only).
            RecordTamperedError subclasses: the row failed authentication (see module docstring).
            StoreUnavailableError: the store cannot be reached.
            ValueError: bad namespace or key.
        """
        return self.get_at(self.address(namespace, key))

    def get_at(self, addr: RowAddress) -> tuple[bytes, int]:
        """:meth:`get` at an :meth:`address`.

        Raises:
            RecordNotFoundError, RecordTamperedError subclasses, StoreUnavailableError: as
                :meth:`get`.
        """
        row = self.store.get(addr.store_namespace, addr.row_key)
        if row is None:
            raise RecordNotFoundError(f"no record at row {addr.row_key.hex()} in namespace "
                                      f"{addr.namespace!r}")
        _, value = self.frame.open(row, addr.key)
        return value, row.version

    def get_many_at(self, addrs: list[RowAddress]) -> list[tuple[bytes, int] | RecordError]:
        """:meth:`get_at` for many addresses of one namespace, read in one batched store call
        (:meth:`~safehold.store.base.StoreOps.get_many`): per address ``(value, version)`` or
        the error :meth:`get_at` would raise (RecordNotFoundError, RecordTamperedError).

        Raises:
            StoreUnavailableError: the store cannot be reached. ValueError: mixed namespaces.
        """
        if not addrs:
            return []
        sns = addrs[0].store_namespace
        if any(a.store_namespace != sns for a in addrs):
            raise ValueError("get_many_at: addresses of one namespace only")
        out: list[tuple[bytes, int] | RecordError] = []
        for addr, row in zip(addrs, self.store.get_many(sns, [a.row_key for a in addrs]), strict=True):
            if row is None:
                out.append(RecordNotFoundError(f"no record at row {addr.row_key.hex()} in namespace "
                                               f"{addr.namespace!r}"))
                continue
            try:
                out.append((self.frame.open(row, addr.key)[1], row.version))
            except RecordTamperedError as e:
                out.append(e)
        return out

    def exists(self, namespace: str, key: str) -> bool:
        """True if the record exists *and* authenticates (a planted row raises, never counts).

        Raises:
            RecordTamperedError subclasses, StoreUnavailableError, ValueError: as :meth:`get`.
        """
        try:
            self.get(namespace, key)
        except RecordNotFoundError:
            return False
        return True

    def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete a record; True if one was deleted.

        Raises:
            RecordConflictError: ``expected_version`` given and the record is at another version.
            StoreUnavailableError, ValueError: as :meth:`put`.
        """
        return self.delete_at(self.address(namespace, key), expected_version=expected_version)

    def delete_at(self, addr: RowAddress, *, expected_version: int | None = None) -> bool:
        """:meth:`delete` at an :meth:`address`.

        Raises:
            RecordConflictError, StoreUnavailableError: as :meth:`delete`.
        """
        try:
            return self.store.delete(addr.store_namespace, addr.row_key, expected_version=expected_version)
        except ConflictError as e:
            raise self._conflict(addr.namespace, addr.row_key, expected_version or 0, e) from None

    def items(self, namespace: str, *, page: int = 500) -> Iterator[tuple[str, bytes, int]]:
        """Every record of ``namespace`` as ``(key, value, version)``, in blind-index order.

        Raises:
            RecordTamperedError subclasses on the first row that fails (fail closed).
        """
        sns = self.store_namespace(namespace)
        for row in self.store.scan_all(sns, page=page):
            kb, value = self.frame.open(row, None)
            yield kb.decode("utf-8"), value, row.version

    def list(self, namespace: str) -> list[str]:
        """Record keys of ``namespace``, sorted. Every row is authenticated first.

        Raises:
            RecordTamperedError subclasses on the first row that fails (fail closed).
        """
        return sorted(k for k, _, _ in self.items(namespace))

    def list_page(
        self, namespace: str, *, after: bytes | None = None, limit: int = 100, skip_tampered: bool = False
    ) -> ListPage:
        """One page of record keys, in blind-index order (not key order), for paging APIs.

        Args:
            namespace: record namespace.
            after: the ``next_after`` of the previous page, or None for the first page.
            limit: rows per page, 1..10000.
            skip_tampered: leave rows that fail authentication out of ``keys`` and collect their
                errors in ``tampered`` instead of raising on the first one.

        Returns:
            :class:`ListPage`; ``next_after`` is None on the last page.

        Raises:
            RecordTamperedError subclasses: a row failed and ``skip_tampered`` is False.
            StoreUnavailableError, ValueError: as :meth:`get` / bad ``after`` or ``limit``.
        """
        sns = self.store_namespace(namespace)
        rows = self.store.scan(sns, after=after, limit=limit)
        keys: builtins.list[str] = []
        tampered: builtins.list[RecordTamperedError] = []
        for row in rows:
            try:
                kb, _ = self.frame.open(row, None)
            except RecordTamperedError as e:
                if not skip_tampered:
                    raise
                tampered.append(e)
                continue
            keys.append(kb.decode("utf-8"))
        return ListPage(keys, rows[-1].key if len(rows) == limit else None, tampered)

    def put_many(
        self, namespace: str, items: Iterable[tuple[str, bytes, int | None]], *, max_retries: int = 8
    ) -> builtins.list[int]:
        """Write several records of one namespace atomically (one store transaction).

        Args:
            namespace: record namespace.
            items: ``(key, value, expected_version)`` triples, semantics as :meth:`put`
                (``None`` = unconditional); each key at most once.
            max_retries: how often a batch of only unconditional writes is redone after a
                concurrent writer changed one of its rows.

        Returns:
            The new version of each item, in order.

        Raises:
            RecordConflictError: an ``expected_version`` is stale (nothing of the batch is
                written), or an unconditional batch kept conflicting.
            StoreUnavailableError: nothing of the batch was written.
            ValueError: bad namespace, key, value or version, or a key listed twice.
        """
        sns = self.store_namespace(namespace)
        prepared: builtins.list[tuple[bytes, bytes, bytes, int | None]] = []
        seen: set[bytes] = set()
        for key, value, expected in items:
            kb = self._key_bytes(key)
            if not isinstance(value, bytes | bytearray | memoryview):
                raise ValueError(f"record value must be bytes, got {type(value).__name__}")
            if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or (
                expected < 0
            )):
                raise ValueError(f"expected_version must be an int >= 0 or None, got {expected!r}")
            row_key = self._indexer.index(sns, kb)
            if row_key in seen:
                raise ValueError("put_many lists one record key twice")
            seen.add(row_key)
            prepared.append((row_key, kb, bytes(value), expected))
        if not prepared:
            return []
        self._register(sns)
        conditional = any(e is not None for _, _, _, e in prepared)
        for _ in range(max_retries + 1):
            try:
                out = []
                with self.store.transaction() as tx:
                    for row_key, kb, value, expected in prepared:
                        if expected is None:
                            row = tx.get(sns, row_key)
                            current = 0 if row is None else row.version
                        else:
                            current = expected
                        blob = self.frame.seal(sns, row_key, current + 1, kb, value)
                        try:
                            out.append(tx.put(sns, row_key, blob, expected_version=current))
                        except ConflictError as e:
                            if expected is not None:
                                raise self._conflict(namespace, row_key, expected, e) from None
                            raise
                return out
            except RecordConflictError:
                raise
            except ConflictError:
                if conditional:
                    raise RecordConflictError(
                        f"put_many in namespace {namespace!r} raced a concurrent writer; nothing written"
                    ) from None
                continue  # unconditional batch: read the new versions and redo
        raise RecordConflictError(
            f"put_many in namespace {namespace!r} lost {max_retries + 1} races; nothing written"
        )

    # --- rotation (safehold.records.rotation) -------------------------------------------------

    def key_usage(self, namespaces: Iterable[str] | None = None) -> dict[int, int]:
        """``{key id: rows sealed under it}``; see :func:`safehold.records.rotation.key_usage`."""
        return rotation.key_usage(self, namespaces)

    def rekey(
        self,
        *,
        batch_size: int = 100,
        progress: Callable[[RekeyCounts], None] | None = None,
        namespaces: Iterable[str] | None = None,
        max_retries: int = 8,
    ) -> RekeyCounts:
        """Re-encrypt every row not under the primary key; see :func:`safehold.records.rotation.rekey`."""
        return rotation.rekey(
            self, batch_size=batch_size, progress=progress, namespaces=namespaces, max_retries=max_retries
        )

    def _row_key_id(self, row: Row) -> int | None:
        return self.frame.key_id(row)
