"""The oblivious table: right answers, and access traces that do not depend on the query."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from safehold.discovery import table as table_mod
from safehold.discovery.protocol import RESULT_SIZE, decode_results, encode_result
from safehold.discovery.table import ObliviousTable, _wrap, slots_per_block, tags_to_words


def make_table(n: int, *, delta: int = 0, removed: int = 0, seed: int = 1):
    rnd = random.Random(seed)
    tags = [rnd.randbytes(16) for _ in range(n + delta)]
    values = [encode_result(f"user-{i}".encode()) for i in range(n + delta)]
    t = ObliviousTable()
    t.build(tags[:n], values[:n])
    for tag, val in zip(tags[n:], values[n:], strict=True):
        t.put(tag, val)
    for tag in tags[:removed]:
        assert t.remove(tag)
    return t, tags, values


def fresh_tags(m: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(m)]


@pytest.mark.parametrize("n,delta", [(0, 5), (10, 0), (5000, 0), (20000, 300)])
def test_lookup_matches_a_dict(n, delta):
    t, tags, values = make_table(n, delta=delta, removed=min(3, n))
    truth = dict(zip(tags, values, strict=True))
    for tag in tags[: min(3, n)]:
        truth[tag] = bytes(RESULT_SIZE)
    rnd = random.Random(7)
    queries = rnd.sample(tags, min(len(tags), 300)) + fresh_tags(200)
    rnd.shuffle(queries)
    got = t.lookup(queries)
    assert got == [truth.get(q, bytes(RESULT_SIZE)) for q in queries]
    assert all(len(r) == RESULT_SIZE for r in got)
    assert len(t) == n + delta - min(3, n)


def test_put_replace_remove_compact():
    t, tags, values = make_table(5000, delta=10)
    t.put(tags[0], encode_result(b"moved"))
    t.put(tags[-1], encode_result(b"moved-too"))
    assert decode_results(b"".join(t.lookup([tags[0], tags[-1]])), 2) == ["moved", "moved-too"]
    assert t.remove(tags[1]) and not t.remove(tags[1]) and not t.remove(os.urandom(16))
    assert t.remove(tags[-2])
    before = t.lookup(tags[:50] + tags[-8:])
    t.compact()
    assert t.shape == (8192, 0)
    assert t.lookup(tags[:50] + tags[-8:]) == before
    assert len(t) == 5000 + 10 - 2


def test_bad_inputs():
    t = ObliviousTable()
    with pytest.raises(ValueError, match="duplicate"):
        t.build([b"a" * 16, b"a" * 16], [encode_result(b"x")] * 2)
    with pytest.raises(ValueError, match="reserved"):
        t.put(b"\xff" * 16, encode_result(b"x"))
    with pytest.raises(ValueError, match="flag"):
        t.put(b"a" * 16, bytes(RESULT_SIZE))
    with pytest.raises(Exception, match="16 bytes"):
        t.lookup([b"short"])
    assert t.lookup([]) == []


def test_overflow_splits_the_batch(monkeypatch):
    t, tags, values = make_table(20000)
    monkeypatch.setattr(table_mod, "slots_per_block", lambda m, b: 1)  # force overflows
    queries = tags[:64] + fresh_tags(64)
    assert t.lookup(queries) == values[:64] + [bytes(RESULT_SIZE)] * 64


def test_slot_bound_is_conservative():
    # the Poisson bound with margin must exceed what random placement produces
    rng = np.random.default_rng(3)
    for m, blocks in [(1000, 1024), (100, 128), (4096, 4096), (1000, 16)]:
        c = slots_per_block(m, blocks)
        worst = max(np.bincount(rng.integers(0, blocks, m), minlength=blocks).max() for _ in range(200))
        assert worst < c, (m, blocks, c, worst)
        assert c <= m
    # many blocks: the tail must be summed, not taken as 1 - cdf (which bottoms out at ~1e-16)
    assert slots_per_block(1000, 4096) <= 16 and slots_per_block(1000, 16384) <= 12


# --- access traces ---------------------------------------------------------------------------


def traced_lookup(t: ObliviousTable, queries: list[bytes]) -> tuple[list, list[bytes]]:
    trace: list = []
    out = t.lookup(queries, trace=trace)
    return trace, out


@pytest.mark.parametrize("n,delta,removed,m", [(30000, 0, 0, 1000), (30000, 40, 5, 1000), (3000, 7, 0, 33)])
def test_access_trace_is_independent_of_the_query(n, delta, removed, m):
    """All matching, none matching, half matching (and two different random halves): identical
    traces (every operation, shape and index digest) and identical response sizes."""
    t, tags, _ = make_table(n, delta=delta, removed=removed)
    rnd = random.Random(11)
    live = tags[removed:]
    cases = {
        "all": rnd.sample(live, m),
        "none": fresh_tags(m),
        "half": rnd.sample(live, m // 2) + fresh_tags(m - m // 2),
        "half-other": fresh_tags(m - m // 2) + rnd.sample(live, m // 2),
        "removed": (tags[:removed] + fresh_tags(m))[:m],
    }
    traces, sizes, matched = {}, {}, {}
    for name, qs in cases.items():
        trace, out = traced_lookup(t, qs)
        traces[name], sizes[name] = trace, sum(len(r) for r in out)
        matched[name] = sum(r[0] == 1 for r in out)
    assert matched["all"] == m and matched["none"] == 0 and matched["half"] == m // 2
    assert len(traces["all"]) > 50  # the instrumentation saw the work
    assert any(e[0] == "get" for e in traces["all"]) and any(e[0] == "ufunc" for e in traces["all"])
    first = traces["all"]
    for name, trace in traces.items():
        assert trace == first, f"trace of {name!r} differs from 'all'"
        assert sizes[name] == m * RESULT_SIZE


def test_trace_catches_a_data_dependent_lookup():
    """Negative control: a binary search (what a non-oblivious index does) shows up in the trace
    as different index digests, so the test above can fail."""
    t, tags, _ = make_table(5000)

    def leaky(queries: list[bytes], trace: list) -> None:
        q_hi, _ = tags_to_words(queries)
        hi = _wrap(t._hi, trace)
        pos = np.searchsorted(hi, _wrap(q_hi, trace))
        hi[np.minimum(pos, len(t._hi) - 1)]  # read where the search landed

    a: list = []
    b: list = []
    leaky(tags[:10], a)
    leaky(fresh_tags(10), b)
    assert a != b


def test_trace_differs_when_the_table_size_differs():
    """The trace may depend on the table's shape (public), and the instrumentation sees it."""
    t1, tags1, _ = make_table(5000)
    t2, tags2, _ = make_table(9000)
    a, _ = traced_lookup(t1, tags1[:20])
    b, _ = traced_lookup(t2, tags2[:20])
    assert a != b
