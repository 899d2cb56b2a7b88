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

from safehold.crypto.kdf import build_info, hkdf_sha256
from safehold.crypto.keyset import Keyset

SECRET_SIZE = 32


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
        if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_SIZE:
            raise ValueError(f"the SVR secret must be {SECRET_SIZE} bytes")
        secret = bytes(secret)

        def sub(purpose: str) -> bytes:
            return hkdf_sha256(secret, info=build_info(purpose))

        kid = int.from_bytes(sub("svr/keyset-id")[:4], "big") or 1
        return cls(Keyset({kid: sub("svr/keyset")}, kid, sub("svr/index")), sub("svr/freshness"))
