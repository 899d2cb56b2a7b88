"""The discovery service facade: what the HTTP layer calls. Framework-free.

Query protocol (docs/discovery.md)::

    client                                        service (in the TEE)
    x_i = oprf_input(kind, normalise(identifier))
    blinded = Blind(x_i)            --evaluate-->  charge evaluations; BlindEvaluate(skS, ·)
    outputs = Finalize(x_i, ...)    <----------
    token, prev, new, discard       ---query--->  charge |new| (durable), then oblivious
                                                  lookup of prev ∪ new
    results (48 bytes each), token  <----------

Registration sends the canonical identifier itself (over the attested channel) and the service
computes the same output with RFC 9497 Evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safehold.crypto import oprf
from safehold.discovery.errors import InvalidRequestError
from safehold.discovery.identifiers import normalise
from safehold.discovery.keys import DiscoveryKeys
from safehold.discovery.protocol import ELEMENT_SIZE, MAX_QUERY, MAX_REGISTER_BATCH, check_user_id
from safehold.discovery.ratelimit import Charge, RateLimiter
from safehold.discovery.registry import Registry
from safehold.store import Store


@dataclass(frozen=True)
class QueryAnswer:
    """``results``: one 48-byte result per identifier, ``prev`` first then ``new``, in request
    order; ``charge``: the rate-limit outcome (new token etc.)."""

    results: list[bytes]
    charge: Charge


class DiscoveryService:
    """Registry + rate limiter + OPRF key.

    Args:
        store: the untrusted store (opened by the caller).
        keys: derived from the secret the broker releases (for now: passed in by the caller).
        limit / period / max_evaluations: see :class:`~safehold.discovery.ratelimit.RateLimiter`.
    """

    def __init__(self, store: Store, keys: DiscoveryKeys, *, limit: int = 1000, period: int = 86400,
                 max_evaluations: int | None = None):
        self.keys = keys
        self.registry = Registry(store, keys)
        self.limiter = RateLimiter(store, keys, limit=limit, period=period, max_evaluations=max_evaluations)

    def load(self) -> int:
        """Rebuild the in-memory table from the store (at start); returns the registrations."""
        return self.registry.load()

    def evaluate(self, client: str, blinded: Sequence[bytes]) -> list[bytes]:
        """Charge and run RFC 9497 BlindEvaluate on a batch.

        Raises:
            InvalidRequestError: empty or over :data:`MAX_QUERY`; RateLimitedError;
            InvalidElementError / IdentityElementError (an element fails DeserializeElement).
        """
        if not blinded or len(blinded) > MAX_QUERY:
            raise InvalidRequestError(f"evaluate takes 1..{MAX_QUERY} blinded elements")
        for n, b in enumerate(blinded):
            oprf.check_element(b, f"blinded element {n}")  # validate all before charging
            if len(b) != ELEMENT_SIZE:  # pragma: no cover - check_element enforces it
                raise InvalidRequestError(f"blinded element {n} has the wrong size")
        self.limiter.charge_evaluations(client, len(blinded))
        return oprf.blind_evaluate(self.keys.oprf.sk, blinded)

    def query(self, client: str, token: bytes | None, prev: Sequence[bytes], new: Sequence[bytes],
              discard: Sequence[bytes] = ()) -> QueryAnswer:
        """Charge the new identifiers (durably), then look up ``prev + new`` obliviously.

        Raises:
            InvalidRequestError, InvalidTokenError, RateLimitedError (nothing looked up).
        """
        if len(prev) + len(new) == 0 or len(prev) + len(new) + len(discard) > MAX_QUERY:
            raise InvalidRequestError(f"a query asks about 1..{MAX_QUERY} identifiers")
        charge = self.limiter.charge(client, token, prev, new, discard)
        return QueryAnswer(self.registry.lookup([*prev, *new]), charge)

    def register(self, entries: Sequence[tuple[str, str, str]], region: str | None = None) -> int:
        """Register ``(kind, identifier, user id)`` entries (normalised here, fail closed).

        Raises:
            InvalidRequestError: no entries or more than :data:`MAX_REGISTER_BATCH`;
            InvalidIdentifierError / InvalidUserIdError naming the entry's index.
        """
        return self.registry.register_many(self._normalised(entries, region, with_user=True))

    def unregister(self, entries: Sequence[tuple[str, str]], region: str | None = None) -> int:
        """Remove registrations; returns how many existed."""
        pairs = [(k, i) for k, i, _ in self._normalised([(k, i, "") for k, i in entries], region,
                                                        with_user=False)]
        return self.registry.unregister_many(pairs)

    @staticmethod
    def _normalised(entries: Sequence[tuple[str, str, str]], region: str | None,
                    *, with_user: bool) -> list[tuple[str, str, str]]:
        if not entries or len(entries) > MAX_REGISTER_BATCH:
            raise InvalidRequestError(f"1..{MAX_REGISTER_BATCH} entries per call")
        out = []
        for n, (kind, ident, user) in enumerate(entries):
            try:
                canonical = normalise(kind, ident, region)
                if with_user:
                    check_user_id(user)
            except ValueError as e:
                raise type(e)(f"entry {n}: {e}") from None
            out.append((kind, canonical, user))
        return out

    def info(self) -> dict[str, object]:
        """Public facts: suite, public key (hex), limits, registrations, table shape."""
        np_, d = self.registry.table.shape
        return {"suite": oprf.SUITE_ID, "public_key": self.keys.public_key.hex(),
                "limit": self.limiter.limit, "period": self.limiter.period,
                "max_evaluations": self.limiter.max_evaluations,
                "registered": len(self.registry), "table": {"sorted": np_, "unmerged": d}}
