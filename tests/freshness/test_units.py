"""Unit tests of the building blocks: the sorted table, journal entries, the member rules, the
majority rules."""

from __future__ import annotations

import os
import random

import pytest

from safehold.freshness import table as T
from safehold.freshness.anchor.base import (
    AnchorHead,
    MemberReply,
    combine_advance,
    combine_head,
)
from safehold.freshness.anchor.core import MemberCore, PeerState, ledger_writer, may_write
from safehold.freshness.anchor.statements import (
    OwnerStatement,
    SignedOwnerStatement,
    sign_owner_statement,
    verify_head_signatures,
)
from safehold.freshness.digests import FreshKeys
from safehold.freshness.errors import (
    AnchorConflictError,
    AnchorLostError,
    AnchorUnavailableError,
    JournalCorruptError,
)
from safehold.freshness.journal import Entry, SnapshotRef, decode_entry, encode_entry
from safehold.freshness.vmap import POINT, POSTINGS, Change, NamespacePolicy, VerifierMap
from tests.support.freshness import Owner


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sorted_table_matches_a_dict(monkeypatch, seed):
    monkeypatch.setattr(T, "MAX_OVERLAY", 40)
    rnd = random.Random(seed)
    keys = [bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 2, 16, 17, 33]))) for _ in range(2000)]
    keys += [b"\x00", b"\x00\x00", b"a", b"a\x00", b"a\x00\x00", b"\xff" * 64]
    t, ref = T.SortedTable(), {}
    for step in range(12000):
        key = rnd.choice(keys)
        if rnd.random() < 0.7:
            v = (rnd.randrange(1 << 40), os.urandom(16))
            t.set(key, *v)
            ref[key] = v
        else:
            assert t.delete(key) == (key in ref)
            ref.pop(key, None)
        if step % 1500 == 0:
            items = [(kk, *v) for kk, v in sorted(ref.items())]
            assert list(t.iter_from(None)) == items and len(t) == len(ref)
            a = rnd.choice(keys)
            assert t.page(a, 9) == [x for x in items if x[0] > a][:9]
    assert all(t.get(kk) == ref.get(kk) for kk in keys)
    t2 = T.SortedTable.load(*t.export())
    assert list(t2.iter_from(None)) == [(kk, *v) for kk, v in sorted(ref.items())]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sorted_table_update_many_matches_a_dict(monkeypatch, seed):
    """``update_many`` (one search per key, one sort, at most one merge per call) leaves the
    table as ``get`` + ``set`` / ``delete`` per key would: the same entries, order and count,
    including keys changed twice in one call and deletes of absent keys."""
    monkeypatch.setattr(T, "MAX_OVERLAY", 40)
    rnd = random.Random(seed)
    keys = [bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 2, 16, 17, 33]))) for _ in range(1500)]
    keys += [b"\x00", b"\x00\x00", b"a", b"a\x00", b"\xff" * 64]
    t, ref = T.SortedTable(), {}
    for step in range(300):
        batch = []
        for _ in range(rnd.randrange(1, 90)):
            key = rnd.choice(keys)
            new = (rnd.randrange(1 << 40), os.urandom(16)) if rnd.random() < 0.7 else None
            seen = []
            batch.append((key, (new, seen)))
            cur = ref.get(key)
            if new is None:
                ref.pop(key, None)
            else:
                ref[key] = new
            batch[-1] = (*batch[-1], seen, cur)
        t.update_many(((k, arg) for k, arg, _, _ in batch), lambda e, arg: arg[1].append(e) or arg[0])
        assert all(seen == [cur] for _, _, seen, cur in batch)  # each fn saw the state before it
        if step % 40 == 0:
            items = [(kk, *v) for kk, v in sorted(ref.items())]
            assert list(t.iter_from(None)) == items and len(t) == len(ref)
    assert all(t.get(kk) == ref.get(kk) for kk in keys) and len(t) == len(ref)
    t2 = T.SortedTable.load(*t.export())
    assert list(t2.iter_from(None)) == [(kk, *v) for kk, v in sorted(ref.items())]
    with pytest.raises(ValueError):
        t.update_many([(b"", (1, bytes(16)))], lambda e, new: new)
    with pytest.raises(ValueError):
        t.update_many([(b"k", (1, bytes(15)))], lambda e, new: new)


def test_table_load_refuses_unsorted_keys():
    t = T.SortedTable()
    for i in range(5):
        t.set(bytes([i + 1]) * 4, i, bytes(16))
    w, keys, nums, tags = t.export()
    swapped = keys[w + 1: 2 * (w + 1)] + keys[: w + 1] + keys[2 * (w + 1):]
    with pytest.raises(ValueError, match="not strictly increasing"):
        T.SortedTable.load(w, swapped, nums, tags)


def test_journal_entry_roundtrip_and_tamper():
    keys = FreshKeys(os.urandom(32))
    ch = (Change("ns", b"k1", POINT, 3, b"L" * 16), Change("ns", b"k2", POINT, 0),
          Change("ns.search", b"p" * 32, POSTINGS, 1, b"", 0))
    e = Entry("records", 7, b"d" * 32, 123, ch, SnapshotRef(5, b"s" * 32, b"c" * 32, 2, 99), b"note")
    value, digest = encode_entry(e, keys)
    got, d2 = decode_entry(value, keys, ledger="records", epoch=7)
    assert got == e and d2 == digest
    flipped = bytearray(value)
    flipped[40] ^= 1
    with pytest.raises(JournalCorruptError, match="MAC does not verify"):
        decode_entry(bytes(flipped), keys, ledger="records", epoch=7)
    with pytest.raises(JournalCorruptError, match="moved row"):
        decode_entry(value, keys, ledger="records", epoch=8)
    with pytest.raises(JournalCorruptError, match="another freshness key"):
        decode_entry(value, FreshKeys(os.urandom(32)), ledger="records", epoch=7)


def test_posting_groups_are_order_independent_and_versioned():
    keys = FreshKeys(os.urandom(32))
    pol = NamespacePolicy({"*.search": 4})
    a, b = VerifierMap(keys, pol), VerifierMap(keys, pol)
    ch = [Change("x.search", b"PPPP" + bytes([i]), POSTINGS, 1) for i in range(5)]
    a.apply(ch)
    b.apply(reversed(ch))
    ga, gb = a.group("x.search", b"PPPP"), b.group("x.search", b"PPPP")
    assert ga == gb and ga[0] == 5
    b.apply([Change("x.search", b"PPPP\x01", POSTINGS, 2, b"", 1)])  # rekeyed: same count, new hash
    gb = b.group("x.search", b"PPPP")
    assert gb[0] == 5 and gb != ga
    a.apply([Change("x.search", b"PPPP" + bytes([i]), POSTINGS, 0, b"", 1) for i in range(5)])
    assert a.group("x.search", b"PPPP") == (0, 0) and a.rows("x.search") == 0


def _core(owner: Owner, n: int = 3) -> MemberCore:
    c = MemberCore(n, owner.public)
    c.ready = True
    return c


def _init(c: MemberCore, owner: Owner, epoch: int = 0, digest: bytes = b"\x00" * 32) -> SignedOwnerStatement:
    st = sign_owner_statement(OwnerStatement("initialise", "records", epoch, digest, (c.member,)),
                              owner.private_pem())
    assert c.apply_owner(st, client="records").status == "accepted"
    return st


def test_member_advance_rules():
    owner = Owner()
    c = _core(owner)
    h0, h1, h2 = (AnchorHead(i, bytes([i]) * 32) for i in range(3))
    assert c.advance("records", h0, h1, client="records").status == "unknown"
    _init(c, owner)
    assert c.advance("records", h0, h1, client="broker").status == "refused"  # another workload's ledger
    assert c.advance("records", h1, h0, client="records").status == "refused"  # epoch must grow
    assert c.advance("records", h0, h1, client="records").status == "accepted"
    assert c.advance("records", h0, h1, client="records").status == "accepted"  # a retry
    fork = AnchorHead(1, b"\x09" * 32)
    r = c.advance("records", h0, fork, client="records")
    assert r.status == "conflict" and r.head is not None and r.head.epoch == 1
    far = AnchorHead(9, b"\x05" * 32)
    behind = c.advance("records", AnchorHead(8, b"\x04" * 32), far, client="records")
    assert behind.status == "accepted"  # the member missed updates: it jumps
    assert c.read("records").head.epoch == 9
    assert c.advance("records", h1, h2, client="records").status == "conflict"  # another writer at 1
    assert may_write("records", "records/0") and not may_write("records", "records2")
    assert not may_write(None, "x")


def test_ledger_writer_needs_the_attested_workload_key_purpose():
    """Only a certificate as KBS issues it (attested key) names a writer; the same CA's admin
    client certificate (clientAuth only) with the same CN names none."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from safehold.broker.ca import WorkloadCA

    ca = WorkloadCA.generate("units")
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert ledger_writer(ca.issue(key, common_name="records", attested=True)) == "records"
    assert ledger_writer(ca.issue(key, common_name="broker", client_only=True, attested=True)) == "broker"
    assert ledger_writer(ca.issue(key, common_name="records", client_only=True)) is None
    assert ledger_writer(ca.issue(key, common_name="records")) is None


def test_member_owner_statement_rules():
    owner = Owner()
    c = _core(owner)
    st = _init(c, owner)
    assert c.apply_owner(st, client="records").status == "accepted"  # idempotent while unchanged
    c.advance("records", AnchorHead(0, b"\x00" * 32), AnchorHead(3, b"\x03" * 32), client="records")
    assert c.apply_owner(st, client="records").status == "refused"  # replay would roll back
    other = sign_owner_statement(OwnerStatement("reanchor", "records", 1, b"\x01" * 32, (os.urandom(16),)),
                                 owner.private_pem())
    assert "not addressed" in c.apply_owner(other, client="records").reason
    forged = SignedOwnerStatement(OwnerStatement("reanchor", "records", 1, b"\x01" * 32, (c.member,)),
                                  b"x" * 64)
    assert "not signed by the pinned owner key" in c.apply_owner(forged, client="records").reason
    again = SignedOwnerStatement.from_json(st.to_json())
    assert again.statement == st.statement


def test_catch_up_rules():
    owner = Owner()
    intact = [PeerState(os.urandom(16), True, False, {"r": (5, b"\x05" * 32)}),
              PeerState(os.urandom(16), True, False, {"r": (4, b"\x04" * 32), "b": (2, b"\x02" * 32)})]
    c = MemberCore(3, owner.public)
    assert c.catch_up(intact) and not c.lost_mode
    assert c.read("r").head.epoch == 5 and c.read("b").head.epoch == 2
    c = MemberCore(3, owner.public)
    assert not c.catch_up([intact[0], None])  # one answer is not enough: waits
    assert c.read("r").status == "not-ready"
    restarting = PeerState(os.urandom(16), False, False)
    c = MemberCore(3, owner.public)
    assert c.catch_up([intact[0], restarting]) and c.lost_mode  # a majority without state
    assert c.read("r").status == "lost"
    lost_peer = PeerState(os.urandom(16), True, True, {"b": (2, b"\x02" * 32)})
    c = MemberCore(3, owner.public)
    assert c.catch_up([intact[0], lost_peer]) and c.lost_mode
    assert c.read("r").status == "lost" and c.read("b").status == "known"
    me = MemberCore(3, owner.public)
    assert not me.catch_up([PeerState(me.member, True, False), intact[0]])  # itself is no peer


def test_majority_rules():
    h = AnchorHead(3, b"\x03" * 32)
    acc = MemberReply("accepted", h)
    assert combine_advance("r", h, [acc, acc, AnchorUnavailableError("down")], 3).epoch == 3
    with pytest.raises(AnchorUnavailableError):
        combine_advance("r", h, [acc, AnchorUnavailableError("x"), AnchorUnavailableError("y")], 3)
    with pytest.raises(AnchorConflictError):
        combine_advance("r", h, [acc, MemberReply("conflict"), MemberReply("conflict")], 3)
    with pytest.raises(AnchorLostError):
        combine_head("r", [MemberReply("known", h), MemberReply("lost")], 3)
    with pytest.raises(AnchorConflictError):
        combine_head("r", [MemberReply("known", h), MemberReply("known", AnchorHead(3, b"\x04" * 32))], 3)
    none = [MemberReply("unknown"), MemberReply("unknown"), MemberReply("not-ready")]
    assert combine_head("r", none, 3) is None
    older = MemberReply("known", AnchorHead(2, b"\x02" * 32))
    assert combine_head("r", [older, MemberReply("known", h)], 3).epoch == 3


def test_head_signatures_verify():
    owner = Owner()
    c = _core(owner)
    _init(c, owner, 4, b"\x04" * 32)
    head = c.read("records").head
    assert verify_head_signatures("records", head) == 1
    assert verify_head_signatures("records", head, {c.member: c.public_key}) == 1
    assert verify_head_signatures("records", AnchorHead(5, head.digest, head.signatures)) == 0
    assert verify_head_signatures("broker", head) == 0
