"""Wire formats of contact discovery, shared by the service and the client SDK (no server code).

Every list on the wire is one base64 string of fixed-size items, so a body's size depends only
on how many items it holds:

* blinded / evaluated elements: 32 bytes each (RFC 9497 §4.1, ``Ne``);
* OPRF outputs: 64 bytes each (``Nh``);
* results: :data:`RESULT_SIZE` = 48 bytes each — ``flag (1) | len (1) | user id (46, zero-padded)``;
  ``flag`` is 1 for matched, 0 for not matched (then every byte is zero);
* rate-limit token: :data:`TOKEN_SIZE` = 65 bytes (``version | entropy (32) | HMAC-SHA256``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from safehold.discovery.errors import InvalidRequestError, InvalidUserIdError

ELEMENT_SIZE = 32
OUTPUT_SIZE = 64
#: Longest user id in UTF-8 bytes.
USER_ID_MAX = 46
RESULT_SIZE = 2 + USER_ID_MAX
TOKEN_SIZE = 65
#: Most identifiers in one query (prev + new) and most blinded elements in one evaluate call.
MAX_QUERY = 50_000
#: Most entries in one register / unregister call.
MAX_REGISTER_BATCH = 1000


def check_user_id(user_id: str) -> bytes:
    """The UTF-8 bytes of ``user_id``.

    Raises:
        InvalidUserIdError: not a string, empty, or over :data:`USER_ID_MAX` bytes.
    """
    if not isinstance(user_id, str) or not user_id:
        raise InvalidUserIdError("user id must be a non-empty string")
    raw = user_id.encode("utf-8", "strict")
    if len(raw) > USER_ID_MAX:
        raise InvalidUserIdError(f"user id is {len(raw)} bytes in UTF-8; at most {USER_ID_MAX}")
    return raw


def encode_result(user_id: bytes | None) -> bytes:
    """One fixed-size result: matched with ``user_id`` (UTF-8 bytes) or not matched (None)."""
    if user_id is None:
        return bytes(RESULT_SIZE)
    if not 0 < len(user_id) <= USER_ID_MAX:
        raise InvalidUserIdError(f"user id must be 1..{USER_ID_MAX} bytes")
    return bytes([1, len(user_id)]) + user_id.ljust(USER_ID_MAX, b"\x00")


def decode_results(blob: bytes, count: int) -> list[str | None]:
    """Split a results blob into ``count`` entries: the user id, or None for not matched.

    Raises:
        InvalidRequestError: wrong total size or a malformed entry.
    """
    if len(blob) != count * RESULT_SIZE:
        raise InvalidRequestError(f"results are {len(blob)} bytes; expected {count} x {RESULT_SIZE}")
    out: list[str | None] = []
    for n in range(count):
        item = blob[n * RESULT_SIZE : (n + 1) * RESULT_SIZE]
        if item[0] == 0:
            if any(item):
                raise InvalidRequestError(f"result {n}: not matched but carries data")
            out.append(None)
            continue
        length = item[1]
        if item[0] != 1 or not 0 < length <= USER_ID_MAX or any(item[2 + length :]):
            raise InvalidRequestError(f"result {n} is malformed")
        try:
            out.append(item[2 : 2 + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequestError(f"result {n}: user id is not UTF-8") from None
    return out


def pack(items: Sequence[bytes], size: int) -> str:
    """Base64 of the concatenation of ``items``, each exactly ``size`` bytes."""
    for n, it in enumerate(items):
        if len(it) != size:
            raise InvalidRequestError(f"item {n} is {len(it)} bytes; expected {size}")
    return base64.b64encode(b"".join(items)).decode("ascii")


def unpack(text: object, size: int, *, what: str, limit: int = MAX_QUERY) -> list[bytes]:
    """Inverse of :func:`pack`.

    Raises:
        InvalidRequestError: not a base64 string, a length that is not a multiple of ``size``,
            or more than ``limit`` items (names ``what``).
    """
    if not isinstance(text, str):
        raise InvalidRequestError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidRequestError(f"{what} is not valid base64") from None
    if len(raw) % size:
        raise InvalidRequestError(f"{what} is {len(raw)} bytes, not a multiple of {size}")
    n = len(raw) // size
    if n > limit:
        raise InvalidRequestError(f"{what} holds {n} items; at most {limit}")
    return [raw[i * size : (i + 1) * size] for i in range(n)]
