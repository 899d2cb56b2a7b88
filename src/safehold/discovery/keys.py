"""The discovery service's keys, all derived from one 32-byte secret held only in memory.

The secret is what the key broker will release to the attested workload (for now the caller
passes it in). From it, with HKDF-SHA256 (RFC 5869) under Safehold's domain separation
(:func:`safehold.crypto.kdf.build_info`):

* ``oprf`` — the RFC 9497 key pair, ``DeriveKeyPair(seed, "safehold discovery oprf v1")``
  (RFC 9497 §3.2.1) with a derived 32-byte seed;
* ``tag_key`` — HMAC-SHA256 key turning an OPRF output into the store's row key, so a database
  row is not even an OPRF output a client could have computed;
* ``keyset`` — one AES-256-GCM key for the sealed user ids and rate-limit state;
* ``token_key`` — HMAC-SHA256 key of the rate-limit tokens.

Rotating the secret changes every tag: registrations must then be made again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safehold.crypto import oprf
from safehold.crypto.kdf import ROOT_SECRET_SIZE, RootSecret
from safehold.crypto.keyset import Keyset

SECRET_SIZE = ROOT_SECRET_SIZE
OPRF_INFO = b"safehold discovery oprf v1"


@dataclass(frozen=True)
class DiscoveryKeys:
    """The derived keys (``repr`` shows none of them)."""

    oprf: oprf.KeyPair = field(repr=False)
    tag_key: bytes = field(repr=False)
    keyset: Keyset = field(repr=False)
    token_key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> DiscoveryKeys:
        """Derive every key from ``secret`` (32 bytes).

        Raises:
            ValueError: ``secret`` is not 32 bytes.
        """
        root = RootSecret(secret, "discovery")
        return cls(oprf.derive_key_pair(root.derive("discovery/oprf-seed"), OPRF_INFO),
                   root.derive("discovery/tag"), root.keyset("discovery"), root.derive("discovery/token"))

    @property
    def public_key(self) -> bytes:
        """The OPRF public key ``pkS`` (32 bytes), for clients that pin it."""
        return self.oprf.pk
