"""The record row frame of :mod:`safehold.records.engine`: sealing a record into the bytes a store
row holds, and opening them again with every coordinate check (header layout and the attack each
check names in the engine's module docstring).

Two frame versions, told apart by the header's first byte (which is in the GCM associated data,
so the database cannot turn one into the other):

* **version 1** (exact length, uncompressed; written when compression is off, always readable):
  the AEAD plaintext is ``u16be len(record key) || record key || value``.
* **version 2** (compress, then pad, then seal; the default of the records service): the AEAD
  plaintext is::

      offset    size  field
      0         2     k = length of the record key (u16 big-endian)
      2         k     record key (UTF-8)
      2+k       1     format: 0x00 stored (the value as is), 0x01 zlib (RFC 1950 stream of
                      RFC 1951 DEFLATE, level 3, of the value)
      3+k       4     L = payload length (u32 big-endian)
      7+k       L     payload
      7+k+L     P     zero bytes, 0 <= P < 256, so that 7+k+L+P is a multiple of 256

  The zlib form is written only when it is shorter than the value and the value is at most
  :data:`MAX_INFLATED` bytes; otherwise the value is stored as is. The padding is inside the
  authenticated plaintext and its length follows from ``L`` (no padding byte is interpreted),
  so the database sees ``header || envelope(256 * ceil((7 + k + L) / 256))`` — the compressed
  length rounded up to 256 bytes, not the JSON's length.

Opening authenticates first (GCM), then checks the coordinates, the format byte, ``L`` against
the plaintext, the padding (shorter than 256 bytes, all zero, total a multiple of 256), and
inflates with a hard bound of :data:`MAX_INFLATED` output bytes, requiring the zlib stream to end
exactly at ``L`` (checksum included). Every failure is :class:`RecordCorruptedError` (fail
closed), never a ``zlib.error``. Only a key holder can produce such a plaintext (the AEAD stops a
database edit), so these checks guard against a bug or a compromised writer, not the DBA.

:class:`RowFrame` is stateless apart from the codec, the blind indexer and the compression
switch, so the engine and the key rotation (:mod:`safehold.records.rotation`) share one; rotation
re-seals a row in the frame version the switch selects (version 1 rows become version 2 when it
is on).
"""

from __future__ import annotations

import struct
import zlib

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
from safehold.records.model import MAX_RECORD_BYTES
from safehold.store.base import Row

__all__ = ["AAD_LABEL", "FRAME_EXACT", "FRAME_VERSION", "MAX_INFLATED", "PAD_BUCKET", "RowFrame"]

#: First byte of the frames written with compression on (compress, pad, seal).
FRAME_VERSION = 2
#: First byte of the exact-length uncompressed frames (before compression; with it off).
FRAME_EXACT = 1
#: The version 2 plaintext is padded to a multiple of this many bytes.
PAD_BUCKET = 256
#: Largest value the frame compresses, and the hard bound on inflating one (bytes): the records
#: service's maximum record size. Larger values are stored as is.
MAX_INFLATED = MAX_RECORD_BYTES
#: zlib level of version 2 frames (a FHIR Patient: ~2.7x at ~26 us; level 6 is not smaller
#: in 256-byte buckets).
ZLIB_LEVEL = 3
_STORED, _ZLIB = 0, 1
_BODY_HEAD = struct.Struct(">BI")
#: Prefix of the GCM associated data (the header follows it).
AAD_LABEL = b"safehold/record/v1"
_VERSION = struct.Struct(">Q")
_KEYLEN = struct.Struct(">H")


class RowFrame:
    """Seal and open record rows.

    Args:
        codec: seals and opens the body (normally :class:`~safehold.records.codec.EnvelopeCodec`).
        indexer: the blind indexer of the engine's keyset (checks a listed row's embedded key).
        compress: True: :meth:`seal` writes frame version 2 (compressed, padded); False: version 1
            (exact length). :meth:`open` reads both either way.
    """

    def __init__(self, codec: Codec, indexer: BlindIndexer, *, compress: bool = False) -> None:
        self.codec = codec
        self.indexer = indexer
        self.compress = compress

    @staticmethod
    def header(sns: str, row_key: bytes, version: int, frame: int = FRAME_VERSION) -> bytes:
        """The frame header: frame version byte (``frame``), store namespace, row key and row
        version."""
        ns = sns.encode("ascii")
        return b"".join(
            (bytes((frame, len(ns))), ns, bytes((len(row_key),)), row_key, _VERSION.pack(version))
        )

    @staticmethod
    def pack(kb: bytes, value: bytes) -> bytes:
        """The version 2 AEAD plaintext of record key ``kb`` and ``value`` (layout in the module
        docstring): zlib level :data:`ZLIB_LEVEL` (RFC 1950) when shorter and ``value`` is at
        most :data:`MAX_INFLATED` bytes, else stored; zero-padded to a multiple of
        :data:`PAD_BUCKET` bytes."""
        fmt, payload = _STORED, value
        if len(value) <= MAX_INFLATED:
            z = zlib.compress(value, ZLIB_LEVEL)
            if len(z) < len(value):
                fmt, payload = _ZLIB, z
        used = 2 + len(kb) + _BODY_HEAD.size + len(payload)
        return b"".join((_KEYLEN.pack(len(kb)), kb, _BODY_HEAD.pack(fmt, len(payload)), payload,
                         bytes(-used % PAD_BUCKET)))

    def seal(self, sns: str, row_key: bytes, version: int, kb: bytes, value: bytes) -> bytes:
        """The stored value of record key ``kb`` with ``value`` at ``version`` in row ``row_key``
        of store namespace ``sns``: header || codec-sealed body, frame version 2 when
        ``compress`` is on, else 1 (module docstring)."""
        if self.compress:
            header = self.header(sns, row_key, version, FRAME_VERSION)
            inner = self.pack(kb, value)
        else:
            header = self.header(sns, row_key, version, FRAME_EXACT)
            inner = b"".join((_KEYLEN.pack(len(kb)), kb, value))
        return header + self.codec.seal(inner, AAD_LABEL + header)

    @staticmethod
    def split(row: Row) -> tuple[bytes, str, bytes, int, bytes]:
        """``(header, namespace, row_key, version, body)`` as written in the frame."""
        v = row.value
        if len(v) < 2 or v[0] not in (FRAME_EXACT, FRAME_VERSION):
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
        hash to the row's blind index). The value is the one given to :meth:`seal` (a version 2
        frame is unpadded and inflated, at most :data:`MAX_INFLATED` bytes, after GCM
        authenticated it), whichever frame version the row holds.

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
        if header[0] == FRAME_EXACT:
            return got, inner[2 + klen :]
        return got, _unpack(row, inner, 2 + klen)

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


def _unpack(row: Row, inner: bytes, off: int) -> bytes:
    """The value in the authenticated version 2 plaintext ``inner`` whose body starts at ``off``
    (after the record key): unpadded and, for format 0x01, inflated with the hard output bound
    :data:`MAX_INFLATED` (RFC 1950 stream that must end exactly at the payload's end).

    Raises:
        RecordCorruptedError: unknown format, a length or padding that does not add up, a zlib
            stream that is malformed, truncated, followed by other bytes or inflates past the
            bound (naming the row's blind index only; no content).
    """
    def bad(why: str) -> RecordCorruptedError:
        return RecordCorruptedError(row.namespace, row.key, why)

    if len(inner) < off + _BODY_HEAD.size:
        raise bad("record plaintext truncated in the value header")
    fmt, n = _BODY_HEAD.unpack_from(inner, off)
    start = off + _BODY_HEAD.size
    end = start + n
    pad = len(inner) - end
    if pad < 0 or pad >= PAD_BUCKET or len(inner) % PAD_BUCKET:
        raise bad(f"record plaintext of {len(inner)} bytes does not hold a {n}-byte payload "
                  f"padded to {PAD_BUCKET} bytes")
    if inner[end:].count(0) != pad:
        raise bad("record padding is not all zero")
    payload = inner[start:end]
    if fmt == _STORED:
        return payload
    if fmt != _ZLIB:
        raise bad(f"unknown record value format 0x{fmt:02x}")
    d = zlib.decompressobj()
    try:
        # one byte over the bound: an output of exactly MAX_INFLATED leaves zlib room to finish
        out = d.decompress(payload, MAX_INFLATED + 1)
    except zlib.error:
        raise bad("compressed record value is malformed") from None
    if len(out) > MAX_INFLATED:
        raise bad(f"compressed record value inflates past {MAX_INFLATED} bytes")
    if not d.eof or d.unused_data or d.unconsumed_tail:
        raise bad("compressed record value does not end exactly at its stated length")
    return out
