"""SVR3 share arithmetic (safehold.svr.db4): known answers from the RFC 9497 vectors.

The DB4 known-answer test: the RFC 9497 ristretto255-SHA512 key skSm (Appendix A.1.1) is split
into three additive shares with three zero shares; with the RFC's Blind, the sum of the three
masked share evaluations must be the RFC's EvaluationElement and Finalize must give the RFC's
Output — so the servers together evaluate exactly RFC 9497 under k = Σ k_i, while no single
server's answer is the RFC's evaluation.
"""

from __future__ import annotations

import pytest

from safehold.crypto import oprf
from safehold.svr import db4


def h(x: str) -> bytes:
    return bytes.fromhex(x)


@pytest.fixture
def rfc(tmp_path):
    from tests.support.shared import load_json

    data = load_json("vectors", "rfc9497_vectors.json")
    return next(s for s in data["suites"] if s["identifier"] == "ristretto255-SHA512" and s["mode"] == 0)


def _fixed_shares(sk: bytes) -> db4.ShareSet:
    k1, k2 = oprf.hash_to_scalar(b"share 1"), oprf.hash_to_scalar(b"share 2")
    z1, z2 = oprf.hash_to_scalar(b"zero 1"), oprf.hash_to_scalar(b"zero 2")
    return db4.split(3, oprf_shares=[k1, k2, oprf.scalar_sub(oprf.scalar_sub(sk, k1), k2)],
                     zero_shares=[z1, z2, oprf.scalar_negate(oprf.scalar_add(z1, z2))],
                     encryption_shares=[bytes([i]) * 32 for i in (1, 2, 4)])


def test_split_rfc_key_evaluates_to_the_rfc_vectors(rfc):
    shares = _fixed_shares(h(rfc["skSm"]))
    assert shares.oprf_key == h(rfc["skSm"])
    for v in rfc["vectors"]:
        x = h(v["Input"])
        b = oprf.blind([x], blinds=[h(v["Blind"])])
        assert b.elements[0] == h(v["BlindedElement"])
        parts = [db4.evaluate_share(k, z, b.elements[0])
                 for k, z in zip(shares.oprf_shares, shares.zero_shares, strict=True)]
        assert h(v["EvaluationElement"]) not in parts  # no server alone evaluates the OPRF
        combined = db4.combine(parts)
        assert combined == h(v["EvaluationElement"])
        assert oprf.finalize([x], b.blinds, [combined])[0] == h(v["Output"])
        assert oprf.evaluate(shares.oprf_key, [x])[0] == h(v["Output"])  # what backup computes


def test_masks_cancel_only_when_every_server_answers(rfc):
    shares = _fixed_shares(h(rfc["skSm"]))
    v = rfc["vectors"][0]
    b = oprf.blind([h(v["Input"])], blinds=[h(v["Blind"])]).elements[0]
    parts = [db4.evaluate_share(k, z, b) for k, z in zip(shares.oprf_shares, shares.zero_shares, strict=True)]
    assert db4.combine(parts[:2]) != h(v["EvaluationElement"])
    # without the masks two servers' answers plus the third's would still sum right, but each
    # masked answer differs from the bare share evaluation k_i·B
    bare = oprf.blind_evaluate(shares.oprf_shares[0], [b])[0]
    assert parts[0] != bare


def test_encryption_shares_xor_to_the_secret(rfc):
    shares = _fixed_shares(h(rfc["skSm"]))
    assert shares.encryption_secret == bytes([1 ^ 2 ^ 4]) * 32
    assert db4.xor_all(shares.encryption_shares) == shares.encryption_secret


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_random_split_is_consistent(n):
    s = db4.split(n)
    assert s.n == n and len(set(s.oprf_shares)) == n
    total = s.oprf_shares[0]
    for k in s.oprf_shares[1:]:
        total = oprf.scalar_add(total, k)
    assert total == s.oprf_key
    zsum = db4.ZERO_SCALAR
    for z in s.zero_shares:
        zsum = oprf.scalar_add(zsum, z)
    assert zsum == db4.ZERO_SCALAR
    x = db4.oprf_input(bytes(64))
    b = oprf.blind([x])
    parts = [db4.evaluate_share(k, z, b.elements[0])
             for k, z in zip(s.oprf_shares, s.zero_shares, strict=True)]
    assert oprf.finalize([x], b.blinds, [db4.combine(parts)]) == oprf.evaluate(s.oprf_key, [x])
    assert repr(s).count(s.oprf_key.hex()) == 0


def test_split_refuses_bad_fixed_shares():
    k = oprf.hash_to_scalar(b"k")
    with pytest.raises(ValueError, match="zero"):
        db4.split(2, oprf_shares=[k, oprf.scalar_negate(k)])
    with pytest.raises(ValueError, match="sum to zero"):
        db4.split(2, zero_shares=[k, k])
    with pytest.raises(ValueError):
        db4.split(0)


def test_authorisation_proof_verifies_only_for_its_key_blinded_and_session():
    k_auth = bytes(range(32))
    sk = db4.server_auth_key(k_auth, "svr-0")
    assert sk != db4.server_auth_key(k_auth, "svr-1")
    commitment = db4.auth_commitment(sk)
    blinded = oprf.blind([b"x"]).elements[0]
    session = bytes(32)
    point, scalar = db4.prove(sk, blinded, session)
    assert db4.verify(commitment, blinded, session, point, scalar)
    assert not db4.verify(commitment, blinded, bytes([1]) + bytes(31), point, scalar)  # replay elsewhere
    assert not db4.verify(commitment, oprf.blind([b"y"]).elements[0], session, point, scalar)
    wrong = db4.server_auth_key(bytes(32), "svr-0")  # a wrong PIN gives another k_auth
    p2, s2 = db4.prove(wrong, blinded, session)
    assert not db4.verify(commitment, blinded, session, p2, s2)
    assert not db4.verify(commitment, blinded, session, bytes(32), scalar)  # identity point
    assert not db4.verify(commitment, blinded, session, point, b"\xff" * 32)  # scalar ≥ ℓ
    assert not db4.verify(b"\x01" * 32, blinded, session, point, scalar)  # not an element


def test_evaluate_share_refuses_bad_elements():
    k = oprf.random_scalar()
    with pytest.raises(oprf.IdentityElementError):
        db4.evaluate_share(k, k, bytes(32))
    with pytest.raises(oprf.InvalidElementError):
        db4.evaluate_share(k, k, (2**255 - 19).to_bytes(32, "little"))
