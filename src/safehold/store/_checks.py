"""Argument checks shared by the engines (limits from :mod:`safehold.store.base`)."""

from __future__ import annotations

import re

from safehold.store.base import MAX_KEY, MAX_NAMESPACE, Row

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._:-]+")

#: Largest value accepted, in bytes (envelopes of patient records are far smaller).
MAX_VALUE = 16 * 1024 * 1024
#: Largest page a single :meth:`scan` returns.
MAX_SCAN_LIMIT = 10_000
#: Namespaces that passed :func:`check_namespace` (exact ``str`` only).
_CHECKED_NAMESPACES: set[str] = set()


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` if it is 1..MAX_NAMESPACE chars of ``[A-Za-z0-9._:-]``.

    Raises:
        ValueError: naming the problem (type, length or the first bad character).
    """
    if type(namespace) is str and namespace in _CHECKED_NAMESPACES:  # seen before: no regex
        return namespace
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be str, got {type(namespace).__name__}")
    if not 1 <= len(namespace) <= MAX_NAMESPACE:
        raise ValueError(f"namespace length must be 1..{MAX_NAMESPACE}, got {len(namespace)}")
    if not _NAMESPACE_RE.fullmatch(namespace):
        bad = next(c for c in namespace if not _NAMESPACE_RE.fullmatch(c))
        raise ValueError(f"namespace contains {bad!r}; allowed are ASCII letters, digits and ._:-")
    if len(_CHECKED_NAMESPACES) < 4096:  # bounded: namespaces are few (a service's own names)
        _CHECKED_NAMESPACES.add(namespace)
    return namespace


def check_key(key: object) -> bytes:
    """Return ``key`` as bytes if it is 1..MAX_KEY bytes long.

    Raises:
        ValueError: wrong type or length.
    """
    if type(key) is bytes and 0 < len(key) <= MAX_KEY:  # the common case, without a copy
        return key
    if not isinstance(key, bytes | bytearray | memoryview):
        raise ValueError(f"row key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if not 1 <= len(key) <= MAX_KEY:
        raise ValueError(f"row key length must be 1..{MAX_KEY} bytes, got {len(key)}")
    return key


def check_value(value: object) -> bytes:
    """Return ``value`` as bytes if it is at most :data:`MAX_VALUE` bytes.

    Raises:
        ValueError: wrong type or too long.
    """
    if type(value) is bytes and len(value) <= MAX_VALUE:  # the common case, without a copy
        return value
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"value must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) > MAX_VALUE:
        raise ValueError(f"value length must be <= {MAX_VALUE} bytes, got {len(value)}")
    return value


def check_version(version: object, *, name: str, minimum: int) -> int:
    """Return ``version`` if it is an int (not bool) >= ``minimum`` and < 2**63.

    Raises:
        ValueError: naming ``name``.
    """
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{name} must be int, got {type(version).__name__}")
    if not minimum <= version < 2**63 - 1:
        raise ValueError(f"{name} must be >= {minimum} and < 2**63-1, got {version}")
    return version


def check_scan(after: object, limit: object) -> tuple[bytes | None, int]:
    """Validate scan arguments: ``after`` None or a row key, ``limit`` 1..MAX_SCAN_LIMIT.

    Raises:
        ValueError: naming the bad argument.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"scan limit must be int, got {type(limit).__name__}")
    if not 1 <= limit <= MAX_SCAN_LIMIT:
        raise ValueError(f"scan limit must be 1..{MAX_SCAN_LIMIT}, got {limit}")
    if after is None:
        return None, limit
    if not isinstance(after, bytes | bytearray | memoryview):
        raise ValueError(f"scan 'after' must be bytes or None, got {type(after).__name__}")
    return bytes(after), limit


def row_from_db(namespace: str, key: object, version: object, value: object, where: str) -> Row:
    """Build a :class:`Row` from database columns, refusing wrongly typed ones.

    The database is untrusted: SQLite's flexible typing lets anyone with the file store TEXT
    or REAL in these columns, which must surface as a clear error, not a TypeError.

    Raises:
        StoreCorruptError: key/value not bytes, or version not an integer >= 1; the message
            names the namespace and the row key (hex) or its type, never the value.
    """
    from safehold.store.errors import StoreCorruptError

    if isinstance(key, memoryview | bytearray):
        key = bytes(key)
    if isinstance(value, memoryview | bytearray):
        value = bytes(value)
    if not isinstance(key, bytes):
        raise StoreCorruptError(
            f"{where}: a row in namespace {namespace!r} has a key of type {type(key).__name__}, not bytes"
        )
    if not isinstance(value, bytes):
        raise StoreCorruptError(
            f"{where}: row {key.hex()} in namespace {namespace!r} has a value of type "
            f"{type(value).__name__}, not bytes"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreCorruptError(
            f"{where}: row {key.hex()} in namespace {namespace!r} has an invalid version "
            f"of type {type(version).__name__}"
        )
    return Row(namespace, key, version, value)
