"""Rate limiting in the style of Signal's CDSI: new identifiers cost, re-asking is free.

A client may ask about at most ``limit`` *new* identifiers per ``period`` seconds. With each
answer it gets a **token** over the set of identifiers (OPRF outputs) it has asked about so far::

    token = version (1) | entropy (32) | HMAC-SHA256(token_key, version | SHA-256(client) |
                                                     entropy | SHA-512(sorted set))

Next time it sends that token with the old set split into ``prev`` (still wanted) and
``discard`` (dropped from its address book) plus the ``new`` ones. The service checks that
``prev ∪ discard`` is exactly the token's set, charges ``|new|``, answers for ``prev ∪ new``
and issues a token over ``prev ∪ new``. A client can therefore never look up an identifier it
has not paid for, and re-checking its whole address book costs nothing.

State per client, persisted in the store before any answer is released (so a crash after the
charge never gives a free lookup): period start, identifiers charged, OPRF evaluations used and
the SHA-256 of its last :data:`KEEP_TOKENS` tokens (an older token is refused). The row key is
SHA-256 of the client name and the value is sealed (AES-256-GCM, the row key in the AAD): the
host sees only that a client's row changed and its (fixed) size. **Rollback**: the store can
return an older copy of the row and so restore a spent budget; protection against that comes
with the freshness anchor (see docs/discovery.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from safehold.crypto.envelope import open_envelope, seal
from safehold.discovery.errors import (
    InvalidRequestError,
    InvalidTokenError,
    RateLimitedError,
    RegistryTamperedError,
)
from safehold.discovery.keys import DiscoveryKeys
from safehold.discovery.protocol import OUTPUT_SIZE, TOKEN_SIZE
from safehold.errors import ConflictError, CryptoError
from safehold.store import Store

NAMESPACE = "discovery.ratelimit"
AAD = b"safehold/discovery/ratelimit/v1"
TOKEN_VERSION = 1
#: Tokens per client that stay valid (the newest ones).
KEEP_TOKENS = 16
_CAS_RETRIES = 20
# State JSON is padded to a fixed size so its length says nothing about the token list.
_STATE_SIZE = 1400


@dataclass(frozen=True)
class Charge:
    """Outcome of a charged query: the new ``token``, what it ``cost``, the client's ``used``
    count out of ``limit`` this period, and ``reset_at`` (Unix seconds) when the period ends."""

    token: bytes
    cost: int
    used: int
    limit: int
    reset_at: int


def client_key(client: str) -> bytes:
    """The state row key of a client: SHA-256 of its name."""
    return hashlib.sha256(b"safehold/discovery/client\x00" + client.encode("utf-8")).digest()


class RateLimiter:
    """Token rate limiter over a store.

    Args:
        store: the untrusted store.
        keys: the service keys (``token_key`` and ``keyset``).
        limit: new identifiers per client per period (≥ 1).
        period: seconds (≥ 1).
        max_evaluations: OPRF evaluations per client per period (default ``4 × limit``); bounds
            the static-DH oracle (RFC 9497 §7.2.3) and evaluation abuse.
        clock: returns Unix seconds (tests pass a fake clock).

    Raises:
        ValueError: a non-positive limit or period.
    """

    def __init__(self, store: Store, keys: DiscoveryKeys, *, limit: int, period: int,
                 max_evaluations: int | None = None, clock: Callable[[], float] = time.time):
        if not isinstance(limit, int) or limit < 1 or not isinstance(period, int) or period < 1:
            raise ValueError("rate limit and period must be positive integers")
        self.store = store
        self.keys = keys
        self.limit = limit
        self.period = period
        self.max_evaluations = max_evaluations if max_evaluations is not None else 4 * limit
        self.clock = clock

    # -- tokens ----------------------------------------------------------------------------------

    def _mac(self, client: str, entropy: bytes, items: Sequence[bytes]) -> bytes:
        digest = hashlib.sha512(b"".join(sorted(items))).digest()
        msg = bytes([TOKEN_VERSION]) + hashlib.sha256(client.encode("utf-8")).digest() + entropy + digest
        return hmac.digest(self.keys.token_key, msg, "sha256")

    def _mint(self, client: str, items: Sequence[bytes]) -> bytes:
        entropy = os.urandom(32)
        return bytes([TOKEN_VERSION]) + entropy + self._mac(client, entropy, items)

    def _check_token(self, client: str, token: bytes, items: Sequence[bytes], known: list[str]) -> None:
        if len(token) != TOKEN_SIZE or token[0] != TOKEN_VERSION:
            raise InvalidTokenError("rate-limit token is malformed")
        if not hmac.compare_digest(token[33:], self._mac(client, token[1:33], items)):
            raise InvalidTokenError("rate-limit token does not cover prev + discard (or is another client's)")
        if hashlib.sha256(token).hexdigest() not in known:
            raise InvalidTokenError("rate-limit token is unknown or superseded; start again without a token")

    # -- state -----------------------------------------------------------------------------------

    def _load(self, key: bytes, value: bytes | None) -> dict:
        now = int(self.clock())
        fresh = {"start": now - now % self.period, "used": 0, "evals": 0, "tokens": []}
        if value is None:
            return fresh
        try:
            state = json.loads(open_envelope(self.keys.keyset, value, AAD + key).rstrip(b" "))
        except (CryptoError, ValueError):
            raise RegistryTamperedError(f"rate-limit row {key.hex()[:16]} failed authentication") from None
        if not isinstance(state, dict) or set(state) != set(fresh):
            raise RegistryTamperedError(f"rate-limit row {key.hex()[:16]} has the wrong shape")
        if now >= state["start"] + self.period:
            fresh["tokens"] = state["tokens"]  # tokens outlive periods; budgets do not
            return fresh
        return state

    def _update(self, client: str, change: Callable[[dict], object]) -> object:
        """Read-modify-write the client's row with compare-and-set; ``change`` mutates the
        state (or raises) and its return value is passed through."""
        key = client_key(client)
        for _ in range(_CAS_RETRIES):
            row = self.store.get(NAMESPACE, key)
            state = self._load(key, row.value if row else None)
            result = change(state)
            body = json.dumps(state, separators=(",", ":")).encode().ljust(_STATE_SIZE, b" ")
            try:
                self.store.put(NAMESPACE, key, seal(self.keys.keyset, body, AAD + key),
                               expected_version=row.version if row else 0)
                return result
            except ConflictError:
                continue
        raise RateLimitedError("rate-limit state is contended; retry", retry_after=1)

    # -- the two charges -------------------------------------------------------------------------

    def charge_evaluations(self, client: str, count: int) -> None:
        """Count ``count`` OPRF evaluations against the client's period budget (durably).

        Raises:
            RateLimitedError: over ``max_evaluations`` (nothing is charged).
        """
        def change(state: dict) -> None:
            if state["evals"] + count > self.max_evaluations:
                raise RateLimitedError(
                    f"OPRF evaluation limit reached ({self.max_evaluations} per {self.period} s)",
                    retry_after=max(1, state["start"] + self.period - int(self.clock())))
            state["evals"] += count

        self._update(client, change)

    def charge(self, client: str, token: bytes | None, prev: Sequence[bytes], new: Sequence[bytes],
               discard: Sequence[bytes] = ()) -> Charge:
        """Validate the token over ``prev ∪ discard``, charge ``len(new)``, mint a token over
        ``prev ∪ new``. Durable before it returns.

        Raises:
            InvalidRequestError: items of the wrong size or repeated across the three lists.
            InvalidTokenError: no token but ``prev``/``discard`` given, or a token that does not
                verify or is not among the client's recent tokens.
            RateLimitedError: ``len(new)`` would exceed the period's budget (nothing charged;
                ``retry_after`` seconds until the period ends).
        """
        everything = [*prev, *discard, *new]
        if any(not isinstance(x, bytes) or len(x) != OUTPUT_SIZE for x in everything):
            raise InvalidRequestError(f"every identifier must be a {OUTPUT_SIZE}-byte OPRF output")
        if len(set(everything)) != len(everything):
            raise InvalidRequestError("an identifier appears twice across prev, discard and new")
        if not token and (prev or discard):
            raise InvalidTokenError("prev and discard need the token that covers them")

        def change(state: dict) -> Charge:
            if token:
                self._check_token(client, token, [*prev, *discard], state["tokens"])
            now = int(self.clock())
            reset_at = state["start"] + self.period
            if state["used"] + len(new) > self.limit:
                raise RateLimitedError(
                    f"rate limit: {len(new)} new identifiers asked, {self.limit - state['used']} "
                    f"of {self.limit} left until the period ends", retry_after=max(1, reset_at - now))
            state["used"] += len(new)
            minted = self._mint(client, [*prev, *new])
            state["tokens"] = (state["tokens"] + [hashlib.sha256(minted).hexdigest()])[-KEEP_TOKENS:]
            return Charge(minted, len(new), state["used"], self.limit, reset_at)

        result = self._update(client, change)
        assert isinstance(result, Charge)
        return result
