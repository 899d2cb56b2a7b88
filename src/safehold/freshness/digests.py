"""The hashes of the freshness layer: row leaves, posting multiset hashes, journal MACs and the
hash chain the anchor holds.

Keys (all derived from the workload's attested MAC key with HKDF-SHA256, RFC 5869, through
:func:`safehold.crypto.kdf.derive_key`; never stored):

* ``freshness/leaf`` — row leaf: keyed BLAKE2b-128 (RFC 7693) over
  ``u8 len(ns) || ns || u8 len(key) || key || u64be version || value``. Keyed, so the database
  cannot precompute the leaf of a value it would like to substitute.
* ``freshness/posting`` — posting element: keyed BLAKE2b-128 over
  ``u8 len(ns) || ns || u8 len(key) || key || u64be version`` read as a 128-bit integer; a
  posting group's hash is the sum of its elements modulo 2**128 together with the element
  count. This is the keyed MSet-Add-Hash of Clarke et al. (ASIACRYPT 2003, §4): incremental
  (add / subtract one element in O(1)) and, while the key stays secret, a different multiset
  collides with probability about 2**-128 per try. The version inside each element keeps
  re-adding an element from wrapping the sum (the LtHash multiplicity caveat).
* ``freshness/journal-mac`` — journal entries: keyed BLAKE2b-256 over the entry body.

Not keyed (anyone can recompute it from the journal; the MAC is what stops forgery):

* chain digest ``d_e = SHA-256("safehold/freshness/chain/v1" || 0x00 || body_e)``, where
  ``body_e`` contains ``d_{e-1}``; genesis ``d_0 = SHA-256("safehold/freshness/genesis/v1" ||
  0x00 || ledger)``. The anchor stores ``(e, d_e)``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from safehold.crypto.kdf import derive_key

__all__ = ["DIGEST_LEN", "LEAF_LEN", "MSH_MOD", "FreshKeys", "chain_digest", "genesis_digest"]

LEAF_LEN = 16
DIGEST_LEN = 32
MAC_LEN = 32
#: Posting multiset hashes are sums modulo this.
MSH_MOD = 1 << 128
_U64 = struct.Struct(">Q")
_LEN = [bytes((n,)) for n in range(256)]  # one length byte
_CHAIN = b"safehold/freshness/chain/v1\x00"
_GENESIS = b"safehold/freshness/genesis/v1\x00"


def genesis_digest(ledger: str) -> bytes:
    """``d_0`` of ``ledger`` (32 bytes): the head of a store with an empty journal."""
    return hashlib.sha256(_GENESIS + ledger.encode("ascii")).digest()


def chain_digest(body: bytes) -> bytes:
    """``d_e`` for a journal entry ``body`` (which names ``d_{e-1}``), 32 bytes."""
    return hashlib.sha256(_CHAIN + body).digest()


class FreshKeys:
    """The freshness sub-keys of one workload, derived from its MAC key.

    Args:
        mac_key: at least 32 bytes of key material from the workload's attested keyset (for the
            records service e.g. ``derive_key(keyset.index_key, purpose="records/freshness")``).

    Raises:
        ValueError: ``mac_key`` shorter than 32 bytes.
    """

    def __init__(self, mac_key: bytes) -> None:
        if not isinstance(mac_key, bytes | bytearray) or len(mac_key) < 32:
            raise ValueError("freshness MAC key must be at least 32 bytes")
        mk = bytes(mac_key)
        self._leaf = hashlib.blake2b(key=derive_key(mk, purpose="freshness/leaf"), digest_size=LEAF_LEN)
        self._post = hashlib.blake2b(key=derive_key(mk, purpose="freshness/posting"),
                                     digest_size=LEAF_LEN)
        self._mac_key = derive_key(mk, purpose="freshness/journal-mac")
        # fingerprint lets a start-up say "journal written under another key" instead of "MAC bad"
        self.fingerprint = hashlib.sha256(b"safehold/freshness/key-id/v1\x00" + self._mac_key).digest()[:8]
        self._ns: dict[str, bytes] = {}

    def _ns_prefix(self, namespace: str) -> bytes:
        p = self._ns.get(namespace)
        if p is None:
            ns = namespace.encode("ascii")
            p = bytes((len(ns),)) + ns
            if len(self._ns) < 10_000:
                self._ns[namespace] = p
        return p

    def leaf(self, namespace: str, key: bytes, version: int, value: bytes) -> bytes:
        """The 16-byte leaf of one row state."""
        h = self._leaf.copy()
        h.update(self._ns_prefix(namespace) + bytes((len(key),)) + key + _U64.pack(version))
        h.update(value)
        return h.digest()

    def posting(self, namespace: str, key: bytes, version: int) -> int:
        """The multiset-hash element of one posting row (an integer below :data:`MSH_MOD`)."""
        h = self._post.copy()
        h.update(b"".join((self._ns_prefix(namespace), _LEN[len(key)], key, _U64.pack(version))))
        return int.from_bytes(h.digest(), "big")

    def mac(self, body: bytes) -> bytes:
        """Keyed BLAKE2b-256 of a journal entry body (32 bytes)."""
        return hashlib.blake2b(body, key=self._mac_key, digest_size=MAC_LEN).digest()

    def check_mac(self, body: bytes, mac: bytes) -> bool:
        """Constant-time comparison of ``mac`` with :meth:`mac` of ``body``."""
        return hmac.compare_digest(self.mac(body), mac)
