"""safehold.crypto: HKDF (RFC 5869 vectors), keysets, envelopes (SP 800-38D vector), blind index."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.crypto import envelope as env
from safehold.crypto.blind_index import INDEX_SIZE, BlindIndexer
from safehold.crypto.kdf import RootSecret, build_info, derive_key, hkdf_sha256
from safehold.crypto.keyset import KEY_SIZE, Keyset
from safehold.errors import (
    CryptoError,
    DecryptionError,
    EnvelopeFormatError,
    KeysetError,
    UnknownKeyError,
)

# --- HKDF ------------------------------------------------------------------------------------

# RFC 5869 Appendix A, test cases 1 and 3 (SHA-256).
RFC5869 = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC5869)
def test_hkdf_rfc5869_vectors(ikm, salt, info, length, okm):
    got = hkdf_sha256(bytes.fromhex(ikm), salt=bytes.fromhex(salt), info=bytes.fromhex(info), length=length)
    assert got.hex() == okm


def test_build_info_layout_is_length_prefixed():
    info = build_info("blind-index", b"ns")
    assert info == b"safehold/v1/" + b"\x0b" + b"blind-index" + b"\x00\x00\x00\x02" + b"ns"


def test_derive_key_is_hkdf_with_safehold_info():
    ikm = os.urandom(32)
    assert derive_key(ikm, purpose="p", context=b"c") == hkdf_sha256(ikm, info=build_info("p", b"c"))


def test_derive_key_domain_separation():
    ikm = os.urandom(32)
    outs = {
        derive_key(ikm, purpose="a"),
        derive_key(ikm, purpose="b"),
        derive_key(ikm, purpose="a", context=b"x"),
        # naive concatenation would collide here: "ab"+"" vs "a"+"b"
        derive_key(ikm, purpose="ab"),
        derive_key(ikm, purpose="a", context=b"b"),
    }
    assert len(outs) == 5
    assert derive_key(ikm, purpose="a") == derive_key(ikm, purpose="a")
    assert derive_key(os.urandom(32), purpose="a") != derive_key(ikm, purpose="a")


def test_derive_key_lengths():
    ikm = os.urandom(32)
    assert len(derive_key(ikm, purpose="x", length=16)) == 16
    assert len(derive_key(ikm, purpose="x", length=8160)) == 8160
    # a shorter output is a prefix of a longer one in HKDF (same info)
    assert derive_key(ikm, purpose="x", length=64)[:16] == derive_key(ikm, purpose="x", length=16)
    for bad in (0, 8161, -1):
        with pytest.raises(ValueError, match="length"):
            derive_key(ikm, purpose="x", length=bad)


@pytest.mark.parametrize("purpose", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_derive_key_rejects_bad_purpose(purpose):
    with pytest.raises(ValueError, match="purpose"):
        derive_key(os.urandom(32), purpose=purpose)


def test_derive_key_rejects_empty_ikm():
    with pytest.raises(ValueError, match="keying material"):
        derive_key(b"", purpose="x")


# --- Keyset ----------------------------------------------------------------------------------


def test_root_secret_derives_hkdf_keys_and_a_one_key_keyset():
    secret = os.urandom(32)
    root = RootSecret(bytearray(secret), "test")
    assert root.derive("svc/tag") == hkdf_sha256(secret, info=build_info("svc/tag"))
    ks = root.keyset("svc")
    kid = struct.unpack(">I", hkdf_sha256(secret, info=build_info("svc/keyset-id"))[:4])[0] or 1
    assert ks.ids() == [kid] and ks.primary_id == kid
    assert ks.key(kid) == hkdf_sha256(secret, info=build_info("svc/keyset"))
    assert ks.index_key == hkdf_sha256(secret, info=build_info("svc/index"))
    assert secret.hex() not in repr(root) and repr(secret) not in repr(root)


@pytest.mark.parametrize("secret", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_root_secret_refuses_a_secret_not_32_bytes(secret):
    with pytest.raises(ValueError, match="the svc secret must be 32 bytes"):
        RootSecret(secret, "svc")


def test_keyset_generate_and_read():
    ks = Keyset.generate()
    assert ks.ids() == [ks.primary_id]
    kid, key = ks.primary_key()
    assert kid == ks.primary_id and len(key) == KEY_SIZE
    assert ks.key(kid) == key
    assert 1 <= kid < 2**32
    assert len(ks.index_key) == 32 and ks.index_key != key
    assert Keyset.generate().primary_key()[1] != key


def test_keyset_rotation_ops():
    ks = Keyset.generate()
    first = ks.primary_id
    second = ks.add()
    assert ks.primary_id == first and set(ks.ids()) == {first, second}
    third = ks.add(primary=True)
    assert ks.primary_id == third
    ks.promote(second)
    assert ks.primary_id == second
    ks.retire(first)
    assert first not in ks.ids()
    with pytest.raises(UnknownKeyError, match=str(first)):
        ks.key(first)
    with pytest.raises(KeysetError, match="primary"):
        ks.retire(second)
    with pytest.raises(KeysetError, match="not in the keyset"):
        ks.retire(first)
    with pytest.raises(KeysetError, match="not in the keyset"):
        ks.promote(first)
    assert ks.ids() == sorted([second, third])


def test_keyset_constructor_checks():
    k = os.urandom(32)
    with pytest.raises(KeysetError):
        Keyset({}, 1)
    with pytest.raises(KeysetError, match="primary"):
        Keyset({1: k}, 2)
    with pytest.raises(KeysetError, match="32 bytes"):
        Keyset({1: k[:16]}, 1)
    with pytest.raises(KeysetError, match="key id"):
        Keyset({0: k}, 0)
    with pytest.raises(KeysetError, match="key id"):
        Keyset({2**32: k}, 2**32)


def test_keyset_repr_hides_keys():
    ks = Keyset.generate()
    r = repr(ks)
    assert str(ks.primary_id) in r
    assert ks.primary_key()[1].hex() not in r and ks.index_key.hex() not in r


def test_keyset_wrap_unwrap_round_trip():
    ks = Keyset.generate()
    ks.add()
    ks.add(primary=True)
    kek = os.urandom(32)
    blob = ks.wrap(kek)
    assert blob[:5] == b"SHKS\x01"
    assert len(blob) == 17 + 4 + 32 + 2 + 36 * 3 + 16
    assert ks.wrap(kek) != blob  # fresh nonce every time
    back = Keyset.unwrap(blob, kek)
    assert back.ids() == ks.ids() and back.primary_id == ks.primary_id
    assert back.index_key == ks.index_key
    assert all(back.key(i) == ks.key(i) for i in ks.ids())
    for i in ks.ids():  # no key material in clear in the blob
        assert ks.key(i) not in blob


def test_keyset_unwrap_wrong_kek():
    blob = Keyset.generate().wrap(os.urandom(32))
    with pytest.raises(DecryptionError, match="wrong KEK or tampered"):
        Keyset.unwrap(blob, os.urandom(32))


def test_keyset_unwrap_every_flipped_bit_fails():
    kek = os.urandom(32)
    blob = Keyset.generate().wrap(kek)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises((DecryptionError, EnvelopeFormatError)):
            Keyset.unwrap(bytes(bad), kek)


def test_keyset_unwrap_garbage():
    kek = os.urandom(32)
    blob = Keyset.generate().wrap(kek)
    for cut in (0, 4, 16, 32, len(blob) - 1):
        with pytest.raises((EnvelopeFormatError, DecryptionError)):
            Keyset.unwrap(blob[:cut], kek)
    with pytest.raises(EnvelopeFormatError, match="magic"):
        Keyset.unwrap(b"XXXX" + blob[4:], kek)
    with pytest.raises(EnvelopeFormatError, match="version 2"):
        Keyset.unwrap(blob[:4] + b"\x02" + blob[5:], kek)
    with pytest.raises(ValueError):
        Keyset.unwrap(blob, kek[:16])
    with pytest.raises(ValueError):
        Keyset.generate().wrap(b"short")


def _wrap_raw_body(kek: bytes, body: bytes) -> bytes:
    """Authentic wrapping of an arbitrary body, to test checks after authentication."""
    header = b"SHKS\x01"
    nonce = os.urandom(12)
    return header + nonce + AESGCM(kek).encrypt(nonce, body, header)


def test_keyset_unwrap_authentic_but_inconsistent_body():
    kek = os.urandom(32)
    k = os.urandom(32)
    ik = os.urandom(32)
    dup = struct.pack(">I", 7) + ik + struct.pack(">H", 2) + (struct.pack(">I", 7) + k) * 2
    with pytest.raises(EnvelopeFormatError, match="twice"):
        Keyset.unwrap(_wrap_raw_body(kek, dup), kek)
    no_primary = struct.pack(">I", 9) + ik + struct.pack(">H", 1) + struct.pack(">I", 7) + k
    with pytest.raises(EnvelopeFormatError, match="primary"):
        Keyset.unwrap(_wrap_raw_body(kek, no_primary), kek)
    short = struct.pack(">I", 7) + ik + struct.pack(">H", 2) + struct.pack(">I", 7) + k
    with pytest.raises(EnvelopeFormatError, match="length"):
        Keyset.unwrap(_wrap_raw_body(kek, short), kek)
    empty = struct.pack(">I", 7) + ik + struct.pack(">H", 0)
    with pytest.raises(EnvelopeFormatError):
        Keyset.unwrap(_wrap_raw_body(kek, empty), kek)


# --- Envelope --------------------------------------------------------------------------------

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 96-bit IV),
# the vector set used by NIST's GCM validation.
GCM_K = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"
GCM_IV = "cafebabefacedbaddecaf888"
GCM_P = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_C = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)


def test_envelope_known_answer(monkeypatch):
    """With the vector's IV as nonce, the envelope body is the published GCM ciphertext."""
    monkeypatch.setattr(env.os, "urandom", lambda n: bytes.fromhex(GCM_IV))
    key = bytes.fromhex(GCM_K)
    blob = env.seal_with_key(0x01020304, key, bytes.fromhex(GCM_P), b"any aad")
    assert blob[:5] == b"\x01\x01\x02\x03\x04"
    assert blob[5:17].hex() == GCM_IV
    assert blob[17:-16].hex() == GCM_C  # GCM ciphertext does not depend on the AAD
    # the tag covers header || aad
    assert blob[-16:] == AESGCM(key).encrypt(bytes.fromhex(GCM_IV), bytes.fromhex(GCM_P),
                                             blob[:5] + b"any aad")[-16:]
    assert env.open_with_key(0x01020304, key, blob, b"any aad") == bytes.fromhex(GCM_P)


def test_envelope_round_trip_and_layout():
    ks = Keyset.generate()
    blob = env.seal(ks, b"patient 42", b"ctx")
    assert len(blob) == len(b"patient 42") + env.OVERHEAD == 10 + 33
    assert blob[0] == 1 and int.from_bytes(blob[1:5], "big") == ks.primary_id
    assert env.envelope_key_id(blob) == ks.primary_id
    assert b"patient 42" not in blob
    assert env.open_envelope(ks, blob, b"ctx") == b"patient 42"
    assert env.seal(ks, b"patient 42", b"ctx")[5:17] != blob[5:17]  # fresh nonce
    assert env.open_envelope(ks, env.seal(ks, b"", b""), b"") == b""


def test_envelope_wrong_aad():
    ks = Keyset.generate()
    blob = env.seal(ks, b"x", b"ns=a")
    for aad in (b"ns=b", b"", b"ns=a\x00"):
        with pytest.raises(DecryptionError, match="failed authentication"):
            env.open_envelope(ks, blob, aad)


def test_envelope_every_flipped_bit_fails():
    ks = Keyset.generate()
    blob = env.seal(ks, os.urandom(40), b"aad")
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises((DecryptionError, EnvelopeFormatError, UnknownKeyError)):
                env.open_envelope(ks, bytes(bad), b"aad")


def test_envelope_truncated_and_bad_version():
    ks = Keyset.generate()
    blob = env.seal(ks, b"hello", b"")
    for cut in range(env.OVERHEAD):
        with pytest.raises(EnvelopeFormatError, match="too short"):
            env.open_envelope(ks, blob[:cut], b"")
    with pytest.raises(DecryptionError):
        env.open_envelope(ks, blob[:-1], b"")
    with pytest.raises(EnvelopeFormatError, match="format version 2"):
        env.open_envelope(ks, b"\x02" + blob[1:], b"")


def test_envelope_key_selection_and_rotation():
    ks = Keyset.generate()
    old = ks.primary_id
    blob_old = env.seal(ks, b"old", b"")
    new = ks.add(primary=True)
    blob_new = env.seal(ks, b"new", b"")
    assert env.envelope_key_id(blob_old) == old and env.envelope_key_id(blob_new) == new
    assert env.open_envelope(ks, blob_old, b"") == b"old"
    assert env.open_envelope(ks, blob_new, b"") == b"new"
    # relabelling an envelope with another key id of the same keyset fails authentication
    relabelled = blob_old[:1] + new.to_bytes(4, "big") + blob_old[5:]
    with pytest.raises(DecryptionError):
        env.open_envelope(ks, relabelled, b"")
    ks.retire(old)
    with pytest.raises(UnknownKeyError, match=str(old)):
        env.open_envelope(ks, blob_old, b"")
    with pytest.raises(UnknownKeyError):
        env.open_envelope(Keyset.generate(), blob_new, b"")


def test_envelope_low_level_interop():
    ks = Keyset.generate()
    kid, key = ks.primary_key()
    assert env.open_envelope(ks, env.seal_with_key(kid, key, b"a", b"b"), b"b") == b"a"
    assert env.open_with_key(kid, key, env.seal(ks, b"a", b"b"), b"b") == b"a"
    with pytest.raises(UnknownKeyError, match="names key id"):
        env.open_with_key(kid + 1 if kid < 2**32 - 1 else 1, key, env.seal(ks, b"a", b""), b"")
    with pytest.raises(DecryptionError):
        env.open_with_key(kid, os.urandom(32), env.seal(ks, b"a", b""), b"")
    with pytest.raises(ValueError):
        env.seal_with_key(kid, key[:16], b"", b"")
    with pytest.raises(ValueError):
        env.seal_with_key(0, key, b"", b"")


def test_crypto_errors_share_root():
    assert issubclass(DecryptionError, CryptoError) and issubclass(UnknownKeyError, CryptoError)


_HYP_KS = Keyset.generate()


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=256))
def test_envelope_hypothesis_round_trip(plaintext, aad):
    ks = _HYP_KS
    blob = env.seal(ks, plaintext, aad)
    assert len(blob) == len(plaintext) + env.OVERHEAD
    assert env.open_envelope(ks, blob, aad) == plaintext


# --- Blind index -----------------------------------------------------------------------------


def test_blind_index_matches_independent_computation():
    key = os.urandom(32)
    bi = BlindIndexer(key)
    ns_key = hkdf_sha256(key, info=b"safehold/v1/\x0bblind-index\x00\x00\x00\x08patients")
    expected = hmac.new(ns_key, b"MRN-0042", hashlib.sha256).digest()[:16]
    assert bi.index("patients", b"MRN-0042") == expected
    assert len(expected) == INDEX_SIZE


def test_blind_index_properties():
    key = os.urandom(32)
    bi = BlindIndexer(key)
    a = bi.index("patients", b"42")
    assert a == bi.index("patients", b"42") == BlindIndexer(key).index("patients", b"42")
    assert a != bi.index("notes", b"42")
    assert a != bi.index("patients", b"43")
    assert a != BlindIndexer(os.urandom(32)).index("patients", b"42")
    assert key.hex() not in repr(bi)
    with pytest.raises(ValueError):
        BlindIndexer(b"short")
