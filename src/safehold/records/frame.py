"""The record row frame of :mod:`safehold.records.engine`: sealing a record into the bytes a store
row holds, and opening them again with every coordinate check (layout and the attack each check
names in the engine's module docstring).

:class:`RowFrame` is stateless apart from the codec and the blind indexer, so the engine and the
key rotation (:mod:`safehold.records.rotation`) share one.
"""

from __future__ import annotations

import struct

from safehold.crypto.blind_index import BlindIndexer
from safehold.errors import DecryptionError, EnvelopeFormatError, UnknownKeyError
from safehold.records.codec import Codec
from safehold.records.errors import (
    RecordCopiedError,
    RecordCorruptedError,
    RecordMovedError,
    RecordUnknownKeyError,
    RecordVersionMismatchError,
)
from safehold.store.base import Row

__all__ = ["AAD_LABEL", "FRAME_VERSION", "RowFrame"]

#: First byte of every record frame.
FRAME_VERSION = 1
#: Prefix of the GCM associated data (the header follows it).
AAD_LABEL = b"safehold/record/v1"
_VERSION = struct.Struct(">Q")
_KEYLEN = struct.Struct(">H")


class RowFrame:
    """Seal and open record rows.

    Args:
        codec: seals and opens the body (normally :class:`~safehold.records.codec.EnvelopeCodec`).
        indexer: the blind indexer of the engine's keyset (checks a listed row's embedded key).
    """

    def __init__(self, codec: Codec, indexer: BlindIndexer) -> None:
        self.codec = codec
        self.indexer = indexer

    @staticmethod
    def header(sns: str, row_key: bytes, version: int) -> bytes:
        """The frame header: version byte, store namespace, row key and row version."""
        ns = sns.encode("ascii")
        return b"".join(
            (bytes((FRAME_VERSION, len(ns))), ns, bytes((len(row_key),)), row_key, _VERSION.pack(version))
        )

    def seal(self, sns: str, row_key: bytes, version: int, kb: bytes, value: bytes) -> bytes:
        """The stored value of record key ``kb`` with ``value`` at ``version`` in row ``row_key``
        of store namespace ``sns``: header || codec-sealed body."""
        header = self.header(sns, row_key, version)
        body = self.codec.seal(b"".join((_KEYLEN.pack(len(kb)), kb, value)), AAD_LABEL + header)
        return header + body

    @staticmethod
    def split(row: Row) -> tuple[bytes, str, bytes, int, bytes]:
        """``(header, namespace, row_key, version, body)`` as written in the frame."""
        v = row.value
        if len(v) < 2 or v[0] != FRAME_VERSION:
            what = "empty" if not v else f"frame version {v[0]}" if len(v) >= 2 else "1 byte"
            raise RecordCorruptedError(row.namespace, row.key, f"not a record frame ({what})")
        n = v[1]
        off = 2 + n
        if len(v) < off + 1:
            raise RecordCorruptedError(row.namespace, row.key, "record frame truncated in the namespace")
        m = v[off]
        end = off + 1 + m + 8
        if len(v) < end:
            raise RecordCorruptedError(row.namespace, row.key, "record frame truncated in the header")
        try:
            ns = v[2:off].decode("ascii")
        except UnicodeDecodeError:
            raise RecordCorruptedError(row.namespace, row.key, "frame namespace is not ASCII") from None
        (version,) = _VERSION.unpack_from(v, off + 1 + m)
        return v[:end], ns, v[off + 1 : off + 1 + m], version, v[end:]

    def open(self, row: Row, kb: bytes | None) -> tuple[bytes, bytes]:
        """Authenticate ``row`` and return ``(record key bytes, value)``.

        ``kb`` is the record key asked for (None in list/rekey: then the embedded key must
        hash to the row's blind index).

        Raises:
            RecordCorruptedError, RecordCopiedError, RecordMovedError,
            RecordVersionMismatchError, RecordUnknownKeyError: see the engine's module docstring.
        """
        header, ns, row_key, version, body = self.split(row)
        try:
            inner = self.codec.open(body, AAD_LABEL + header)
        except UnknownKeyError:
            kid = self.codec.key_id(body)
            raise RecordUnknownKeyError(row.namespace, row.key, kid if kid is not None else -1) from None
        except DecryptionError:
            raise RecordCorruptedError(
                row.namespace, row.key, "authentication failed: the stored value was altered"
            ) from None
        except EnvelopeFormatError as e:
            raise RecordCorruptedError(row.namespace, row.key, f"malformed envelope: {e}") from None
        # The coordinates are now authentic; they must be this row's.
        if ns != row.namespace:
            raise RecordMovedError(row.namespace, row.key, f"value was sealed for store namespace {ns!r}")
        if row_key != row.key:
            raise RecordCopiedError(row.namespace, row.key, f"value was sealed for row {row_key.hex()}")
        if version != row.version:
            raise RecordVersionMismatchError(
                row.namespace, row.key, f"value was sealed for version {version}, row says {row.version}"
            )
        if len(inner) < 2:
            raise RecordCorruptedError(row.namespace, row.key, "record plaintext truncated")
        (klen,) = _KEYLEN.unpack_from(inner, 0)
        if len(inner) < 2 + klen:
            raise RecordCorruptedError(row.namespace, row.key, "record plaintext truncated in the key")
        got = inner[2 : 2 + klen]
        if kb is not None:
            if got != kb:
                raise RecordCopiedError(row.namespace, row.key, "value holds a different record key")
        elif self.indexer.index(row.namespace, got) != row.key:
            raise RecordCopiedError(row.namespace, row.key, "record key inside does not match the row index")
        return got, inner[2 + klen :]

    def key_id(self, row: Row) -> int | None:
        """The key id the row's envelope names (None for a keyless codec); nothing is decrypted.

        Raises:
            RecordCorruptedError: the frame or the envelope header is malformed.
        """
        body = self.split(row)[4]
        try:
            return self.codec.key_id(body)
        except EnvelopeFormatError as e:
            raise RecordCorruptedError(row.namespace, row.key, f"malformed envelope: {e}") from None
