"""CDSI-style rate limiting: N new per period, the N+1st refused, repeats free, tokens bound."""

from __future__ import annotations

import os
import threading

import pytest

from safehold.discovery.core import DiscoveryService
from safehold.discovery.errors import (
    InvalidRequestError,
    InvalidTokenError,
    RateLimitedError,
    RegistryTamperedError,
)
from safehold.discovery.ratelimit import NAMESPACE, RateLimiter, client_key
from safehold.store import open_store


def outs(n: int) -> list[bytes]:
    return [os.urandom(64) for _ in range(n)]


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limiter(store, keys, clock):
    return RateLimiter(store, keys, limit=5, period=3600, clock=clock)


def test_n_plus_first_new_identifier_is_refused_and_repeats_are_free(limiter, clock):
    first = outs(3)
    c1 = limiter.charge("app", None, [], first)
    assert (c1.cost, c1.used) == (3, 3)
    more = outs(2)
    c2 = limiter.charge("app", c1.token, first, more)
    assert (c2.cost, c2.used) == (2, 5)
    # the 6th new identifier: refused, nothing charged, retry-after until the period ends
    with pytest.raises(RateLimitedError, match="1 new identifiers asked, 0 of 5 left") as e:
        limiter.charge("app", c2.token, first + more, outs(1))
    assert 0 < e.value.retry_after <= 3600
    # re-asking all five: free, again and again, also with the older token + discard
    c3 = limiter.charge("app", c2.token, first + more, [])
    c4 = limiter.charge("app", c3.token, first + more, [])
    assert (c3.cost, c4.cost, c4.used) == (0, 0, 5)
    c5 = limiter.charge("app", c4.token, first[:1], [], discard=first[1:] + more)
    assert c5.cost == 0
    # after discarding, the discarded ones are new again (and the budget is spent)
    with pytest.raises(RateLimitedError):
        limiter.charge("app", c5.token, first[:1], first[1:2])
    # next period: budget back, tokens still valid
    clock.t += 3600
    c6 = limiter.charge("app", c5.token, first[:1], first[1:2])
    assert (c6.cost, c6.used) == (1, 1)


def test_clients_have_separate_budgets_and_tokens(limiter):
    set_a = outs(5)
    a = limiter.charge("a", None, [], set_a)
    b = limiter.charge("b", None, [], outs(5))
    assert a.used == b.used == 5
    # a's token with a's exact set is still refused for b (the client is in the MAC)
    with pytest.raises(InvalidTokenError, match="another client"):
        limiter.charge("b", a.token, set_a, [])
    assert limiter.charge("a", a.token, set_a, []).cost == 0


def test_token_must_cover_exactly_prev_and_discard(limiter):
    s = outs(3)
    c = limiter.charge("app", None, [], s)
    for prev, discard in [(s[:2], []), (s + outs(1), []), (s[:2], outs(1))]:
        with pytest.raises(InvalidTokenError, match="does not cover"):
            limiter.charge("app", c.token, prev, [], discard=discard)
    forged = bytearray(c.token)
    forged[-1] ^= 1
    with pytest.raises(InvalidTokenError):
        limiter.charge("app", bytes(forged), s, [])
    with pytest.raises(InvalidTokenError, match="malformed"):
        limiter.charge("app", c.token[:-1], s, [])
    with pytest.raises(InvalidTokenError, match="need the token"):
        limiter.charge("app", None, s, [])


def test_superseded_tokens_expire(store, keys, clock):
    lim = RateLimiter(store, keys, limit=100, period=3600, clock=clock)
    s = outs(1)
    first = lim.charge("app", None, [], s)
    tok = first.token
    for _ in range(16):
        tok = lim.charge("app", tok, s, []).token
    with pytest.raises(InvalidTokenError, match="superseded"):
        lim.charge("app", first.token, s, [])


def test_duplicates_and_sizes_are_refused(limiter):
    x = outs(1)
    with pytest.raises(InvalidRequestError, match="twice"):
        limiter.charge("app", None, [], x + x)
    with pytest.raises(InvalidRequestError, match="64-byte"):
        limiter.charge("app", None, [], [b"short"])


def test_state_survives_a_restart_and_is_sealed(store, keys, clock, sqlite_url):
    lim = RateLimiter(store, keys, limit=5, period=3600, clock=clock)
    c = lim.charge("app", None, [], outs(4))
    with open_store(sqlite_url) as s2:
        lim2 = RateLimiter(s2, keys, limit=5, period=3600, clock=clock)
        with pytest.raises(RateLimitedError):
            lim2.charge("app", None, [], outs(2))
        assert lim2.charge("app", None, [], outs(1)).used == 5
    row = store.get(NAMESPACE, client_key("app"))
    assert b"app" not in row.value and c.token not in row.value
    # an edited state row fails closed
    blob = bytearray(row.value)
    blob[-1] ^= 1
    store.put(NAMESPACE, client_key("app"), bytes(blob), expected_version=row.version)
    with pytest.raises(RegistryTamperedError):
        lim.charge("app", None, [], outs(1))


def test_evaluation_budget(store, keys, clock):
    lim = RateLimiter(store, keys, limit=5, period=3600, max_evaluations=8, clock=clock)
    lim.charge_evaluations("app", 8)
    with pytest.raises(RateLimitedError, match="evaluation limit"):
        lim.charge_evaluations("app", 1)
    clock.t += 3600
    lim.charge_evaluations("app", 8)


def test_parallel_charges_never_exceed_the_limit(store, keys, clock):
    lim = RateLimiter(store, keys, limit=20, period=3600, clock=clock)
    ok, refused = [], []

    def worker():
        try:
            ok.append(lim.charge("app", None, [], outs(3)).cost)
        except RateLimitedError:
            refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(ok) <= 20 and len(ok) == 6 and len(refused) == 6


def test_query_is_charged_before_the_lookup(service: DiscoveryService):
    from tests.support.discovery import client_outputs

    service.register([("e164", "+31201234567", "alice")])
    out = client_outputs(service, "c", [("e164", "+31201234567")])
    svc = DiscoveryService(service.registry.store, service.keys, limit=1, period=3600)
    svc.load()
    first = svc.query("c", None, [], out)
    assert first.charge.used == 1
    with pytest.raises(RateLimitedError):
        svc.query("c", None, [], client_outputs(svc, "c", [("e164", "+31648352638")]))
    again = svc.query("c", first.charge.token, out, [])
    assert again.charge.cost == 0 and again.results == first.results
