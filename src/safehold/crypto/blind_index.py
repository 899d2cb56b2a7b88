"""Keyed blind indexes: HMAC-SHA256 (RFC 2104, FIPS 198-1) truncated to 128 bits, per namespace.

The untrusted store addresses rows by ``index(namespace, value)`` instead of by the value (a
patient id, say), so the database never sees it. Each namespace gets its own HMAC key,
``derive_key(key, purpose="blind-index", context=namespace)`` (HKDF-SHA256, RFC 5869), so
equal values in two namespaces have unrelated indexes and rows cannot be correlated across
namespaces. Truncation to 16 bytes follows NIST SP 800-107r1 §5.3.3 (>= 64 bits allowed).

The index is deterministic by design: equality is visible to whoever sees two indexes of one
namespace, nothing else is.
"""

from __future__ import annotations

import hmac
import threading

from safehold.crypto.kdf import derive_key

#: Blind index length in bytes (HMAC-SHA256 truncated).
INDEX_SIZE = 16


class BlindIndexer:
    """Computes blind indexes under one 32-byte key.

    Args:
        key: 32-byte secret (``Keyset.index_key``); never used directly, only via HKDF.

    Raises:
        ValueError: ``key`` shorter than 32 bytes.
    """

    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ValueError(f"blind-index key must be at least 32 bytes, got {len(key)}")
        self._key = bytes(key)
        self._ns_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "BlindIndexer(<key hidden>)"

    def namespace_key(self, namespace: str) -> bytes:
        """The derived 32-byte HMAC key of ``namespace`` (cached)."""
        k = self._ns_keys.get(namespace)
        if k is None:
            k = derive_key(self._key, purpose="blind-index", context=namespace.encode("utf-8"))
            with self._lock:
                self._ns_keys[namespace] = k
        return k

    def index(self, namespace: str, value: bytes) -> bytes:
        """``HMAC-SHA256(namespace_key(namespace), value)[:16]``.

        Args:
            namespace: any string (UTF-8 encoded into the HKDF context).
            value: the bytes to hide, any length.

        Returns:
            16 bytes.
        """
        return hmac.digest(self.namespace_key(namespace), value, "sha256")[:INDEX_SIZE]
