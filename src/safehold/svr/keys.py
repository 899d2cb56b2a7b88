"""The SVR server's keys, all derived from one 32-byte secret held only in memory.

The secret is what the key broker will release to the attested workload (in this phase the
process reads it from standard input). From it, with HKDF-SHA256 (RFC 5869) under Safehold's
domain separation (:func:`safehold.crypto.kdf.build_info`):

* ``keyset`` — the AES-256-GCM key and the blind-index key of the records engine the rows are
  sealed with (purposes ``svr/keyset``, ``svr/keyset-id``, ``svr/index``);
* ``freshness_key`` — the MAC key of the :class:`~safehold.freshness.store.FreshStore` journal
  (purpose ``svr/freshness``).

Losing the secret loses every backup of this server (by design: nothing else can open them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safehold.crypto.kdf import ROOT_SECRET_SIZE, RootSecret
from safehold.crypto.keyset import Keyset

SECRET_SIZE = ROOT_SECRET_SIZE


@dataclass(frozen=True)
class SvrKeys:
    """The derived keys (``repr`` shows none of them)."""

    keyset: Keyset = field(repr=False)
    freshness_key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> SvrKeys:
        """Derive every key from ``secret``.

        Raises:
            ValueError: ``secret`` is not 32 bytes.
        """
        root = RootSecret(secret, "SVR")
        return cls(root.keyset("svr"), root.derive("svr/freshness"))
