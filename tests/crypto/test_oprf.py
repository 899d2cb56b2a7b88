"""RFC 9497 OPRF (mode 0, ristretto255-SHA512): the official vectors, round trips, bad input."""

from __future__ import annotations

import hashlib

import pysodium
import pytest

from safehold.crypto import oprf

# An element encoding that is not canonical: field element p = 2^255 - 19 itself (RFC 9496
# §4.3.1 Decode rejects s ≥ p), and one whose s is negative (odd, lowest bit set).
NON_CANONICAL = (2**255 - 19).to_bytes(32, "little")
NEGATIVE_S = (1).to_bytes(32, "little")


def h(x: str) -> bytes:
    return bytes.fromhex(x)


def test_context_string_matches_vector_dst(rfc9497_ristretto):
    assert h(rfc9497_ristretto["groupDST"]) == b"HashToGroup-" + oprf.CONTEXT_STRING


def test_derive_key_pair_vector(rfc9497_ristretto):
    kp = oprf.derive_key_pair(h(rfc9497_ristretto["seed"]), h(rfc9497_ristretto["keyInfo"]))
    assert kp.sk == h(rfc9497_ristretto["skSm"])
    assert kp.pk == pysodium.crypto_scalarmult_ristretto255_base(kp.sk)
    assert kp.sk.hex() not in repr(kp)


def test_every_mode0_vector(rfc9497_ristretto):
    sk = h(rfc9497_ristretto["skSm"])
    for n, v in enumerate(rfc9497_ristretto["vectors"]):
        assert v["Batch"] == 1
        x = h(v["Input"])
        b = oprf.blind([x], blinds=[h(v["Blind"])])
        assert b.elements == [h(v["BlindedElement"])], f"vector {n}: BlindedElement"
        ev = oprf.blind_evaluate(sk, b.elements)
        assert ev == [h(v["EvaluationElement"])], f"vector {n}: EvaluationElement"
        assert oprf.finalize([x], b.blinds, ev) == [h(v["Output"])], f"vector {n}: Output"
        assert oprf.evaluate(sk, [x]) == [h(v["Output"])], f"vector {n}: Evaluate"


def test_vectors_as_one_batch(rfc9497_ristretto):
    sk = h(rfc9497_ristretto["skSm"])
    vs = rfc9497_ristretto["vectors"]
    xs = [h(v["Input"]) for v in vs]
    b = oprf.blind(xs, blinds=[h(v["Blind"]) for v in vs])
    outs = oprf.finalize(xs, b.blinds, oprf.blind_evaluate(sk, b.elements))
    assert outs == [h(v["Output"]) for v in vs]


def test_random_blinds_round_trip_and_unlinkable():
    kp = oprf.generate_key_pair()
    xs = [b"+4930123456", b"X110411675", b""]
    b1, b2 = oprf.blind(xs), oprf.blind(xs)
    assert set(b1.elements).isdisjoint(b2.elements)  # fresh blinds: the server sees new elements
    o1 = oprf.finalize(xs, b1.blinds, oprf.blind_evaluate(kp.sk, b1.elements))
    o2 = oprf.finalize(xs, b2.blinds, oprf.blind_evaluate(kp.sk, b2.elements))
    assert o1 == o2 == oprf.evaluate(kp.sk, xs)
    assert all(len(o) == oprf.NH for o in o1)
    other = oprf.generate_key_pair()
    assert oprf.evaluate(other.sk, xs) != o1


def test_expand_message_xmd_rfc9380_vector():
    # RFC 9380 Appendix K.3, expand_message_xmd(SHA-512), DST "QUUX-V01-CS02-with-expander-SHA512-256",
    # msg "", len_in_bytes 0x20
    out = oprf.expand_message_xmd(b"", b"QUUX-V01-CS02-with-expander-SHA512-256", 0x20)
    assert out == h("6b9a7312411d92f921c6f68ca0b6380730a1a4d982c507211a90964c394179ba")
    with pytest.raises(ValueError, match="DST"):
        oprf.expand_message_xmd(b"", b"", 32)
    with pytest.raises(ValueError, match="length"):
        oprf.expand_message_xmd(b"", b"d", 255 * 64 + 1)


def test_blind_evaluate_rejects_identity():
    kp = oprf.generate_key_pair()
    good = oprf.blind([b"a"]).elements[0]
    with pytest.raises(oprf.IdentityElementError, match="blinded element 1"):
        oprf.blind_evaluate(kp.sk, [good, bytes(32)])


@pytest.mark.parametrize("bad", [NON_CANONICAL, NEGATIVE_S, b"\xff" * 32, bytes(31), bytes(33), b""])
def test_blind_evaluate_rejects_invalid_elements(bad):
    kp = oprf.generate_key_pair()
    with pytest.raises(oprf.InvalidElementError, match="blinded element 0"):
        oprf.blind_evaluate(kp.sk, [bad])


def test_blind_evaluate_rejects_non_bytes():
    kp = oprf.generate_key_pair()
    with pytest.raises(oprf.InvalidElementError):
        oprf.blind_evaluate(kp.sk, ["00" * 32])  # type: ignore[list-item]


def test_finalize_rejects_bad_server_answer():
    kp = oprf.generate_key_pair()
    b = oprf.blind([b"a", b"b"])
    with pytest.raises(oprf.IdentityElementError, match="evaluated element 1"):
        oprf.finalize([b"a", b"b"], b.blinds, [oprf.blind_evaluate(kp.sk, b.elements)[0], bytes(32)])
    with pytest.raises(oprf.InvalidElementError, match="evaluated element 0"):
        oprf.finalize([b"a"], b.blinds[:1], [NON_CANONICAL])
    with pytest.raises(ValueError, match="2 inputs, 1 blinds"):
        oprf.finalize([b"a", b"b"], b.blinds[:1], b.elements)


def test_input_length_limit():
    kp = oprf.generate_key_pair()
    ok = b"\x00" * oprf.MAX_INPUT
    assert len(oprf.evaluate(kp.sk, [ok])[0]) == 64
    with pytest.raises(oprf.InputLengthError, match="input 1"):
        oprf.blind([b"a", ok + b"\x00"])
    with pytest.raises(oprf.InputLengthError):
        oprf.evaluate(kp.sk, [ok + b"\x00"])


def test_scalar_validation():
    order = oprf.ORDER.to_bytes(32, "little")
    with pytest.raises(oprf.InvalidScalarError, match="group order"):
        oprf.check_scalar(order)
    with pytest.raises(oprf.InvalidScalarError, match="32 bytes"):
        oprf.check_scalar(b"\x01")
    with pytest.raises(oprf.InvalidScalarError, match="zero"):
        oprf.KeyPair.from_private_key(bytes(32))
    with pytest.raises(oprf.InvalidScalarError, match="zero"):
        oprf.scalar_invert(bytes(32))
    with pytest.raises(oprf.InvalidScalarError, match="blind 0 is zero"):
        oprf.blind([b"a"], blinds=[bytes(32)])
    with pytest.raises(oprf.InvalidScalarError, match="private key"):
        oprf.blind_evaluate(order, [oprf.blind([b"a"]).elements[0]])


def test_derive_key_pair_argument_checks(monkeypatch):
    with pytest.raises(ValueError, match="seed"):
        oprf.derive_key_pair(b"short", b"")
    with pytest.raises(ValueError, match="info"):
        oprf.derive_key_pair(bytes(32), bytes(0x10000))
    # every counter hashing to zero is the DeriveKeyPairError branch (probability ~2^-2000)
    monkeypatch.setattr(oprf, "hash_to_scalar", lambda msg, dst: bytes(32))
    with pytest.raises(oprf.DeriveKeyPairError):
        oprf.derive_key_pair(bytes(32), b"")


def test_additive_key_shares_match_the_whole_key():
    """SVR (Signal DB4) splits k into additive shares k1 + k2 + k3; the sum of the share
    evaluations is the evaluation under k — checked through the public helpers."""
    k1, k2, k3 = (oprf.random_scalar() for _ in range(3))
    k = oprf.scalar_add(oprf.scalar_add(k1, k2), k3)
    b = oprf.blind([b"1234"])
    parts = [oprf.blind_evaluate(s, b.elements)[0] for s in (k1, k2, k3)]
    combined = oprf.element_add(oprf.element_add(parts[0], parts[1]), parts[2])
    assert oprf.finalize([b"1234"], b.blinds, [combined]) == oprf.evaluate(k, [b"1234"])
    assert oprf.scalar_sub(k, k1) == oprf.scalar_add(k2, k3)
    assert oprf.scalar_add(k1, oprf.scalar_negate(k1)) == bytes(32)
    inv = oprf.scalar_invert(k1)
    assert oprf.scalar_mul(k1, inv) == (1).to_bytes(32, "little")
    assert oprf.scalar_mult(inv, oprf.scalar_mult(k1, b.elements[0])) == b.elements[0]


def test_outputs_equal_is_plain_equality():
    a = hashlib.sha512(b"a").digest()
    assert oprf.outputs_equal(a, a) and not oprf.outputs_equal(a, hashlib.sha512(b"b").digest())


def test_blind_evaluate_masked_is_the_share_evaluation_plus_the_mask():
    """SVR3/DB4's server answer: sk·B + z·hash_to_group(B, DST), the same as composing the
    public helpers; with z = 0 it is plain BlindEvaluate; a bad element is refused."""
    sk, z, dst = oprf.random_scalar(), oprf.random_scalar(), b"test-mask-dst"
    blinded = oprf.blind([b"a", b"b"]).elements
    want = [oprf.element_add(oprf.blind_evaluate(sk, [b])[0], oprf.scalar_mult(z, oprf.hash_to_group(b, dst)))
            for b in blinded]
    assert oprf.blind_evaluate_masked(sk, z, blinded, dst) == want
    assert oprf.blind_evaluate_masked(sk, bytes(32), blinded, dst) == oprf.blind_evaluate(sk, blinded)
    with pytest.raises(oprf.IdentityElementError):
        oprf.blind_evaluate_masked(sk, z, [bytes(32)], dst)
    with pytest.raises(oprf.InvalidElementError):
        oprf.blind_evaluate_masked(sk, z, [NON_CANONICAL], dst)
    with pytest.raises(oprf.InvalidScalarError):
        oprf.blind_evaluate_masked(sk, b"\xff" * 32, blinded, dst)
