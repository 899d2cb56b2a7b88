"""ePA 3 VAU (gemSpec_Krypt chapter 7): Kyber768 R3, handshake with the lib-vau keys, the recorded
session, the AES-GCM user-data vector, and counter / KeyID / direction / trust refusals."""

from __future__ import annotations

import base64
import hashlib
import json

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kyber_py.kyber import Kyber768  # independent Kyber round-3 (v3.02) implementation

from safehold.vau.epa import UserDataHeader, aead_decrypt, open_user_data
from safehold.vau.epa_client import EpaVauClient
from safehold.vau.epa_keys import SignedPublicVauKeys, VauKeyTrust, VauPublicKeys, VauServerKeys
from safehold.vau.epa_server import EpaVauServer
from safehold.vau.errors import (
    VauChannelUnknownError,
    VauCounterError,
    VauDecryptionError,
    VauFormatError,
    VauHandshakeError,
    VauKeyIdError,
    VauKeyVerificationError,
    VauResponseError,
)
from safehold.vau.kyber import KyberPrivateKey
from tests.support.shared import vau_vector
from tests.support.tiger import legacy_counter, legacy_kyber_public_key, read_recording
from tests.support.vaukeys import LIBVAU_NOW, libvau_server_keys, libvau_signed_keys, libvau_signer


def _clock():
    return LIBVAU_NOW


@pytest.fixture(scope="module")
def libvau():
    keys = libvau_server_keys()
    return keys, libvau_signed_keys(keys)


def _pair(keys, signed, *, pu=False, client_pu=None):
    srv = EpaVauServer(keys, signed, pu=pu, clock=_clock)
    cl = EpaVauClient(
        VauKeyTrust([libvau_signer()[1]], clock=_clock), pu=pu if client_pu is None else client_pu
    )
    return srv, cl


def _handshake(srv, cl):
    cid, m2 = srv.handle_m1(cl.message1())
    cl.handle_m4(srv.handle_m3(cid, cl.handle_m2(m2)))
    return cid


# --- Kyber768 round 3 through ML-KEM ---------------------------------------------------------


def test_round3_shared_secrets_match_reference_both_ways():
    raw = cbor2.loads(vau_vector("lib-vau/vau_server_keys.cbor"))
    ours = KyberPrivateKey.from_expanded(raw["Kyber768_PrivKey"])
    assert ours.public_key.raw == raw["Kyber768_PK"]
    k, c = Kyber768.encaps(raw["Kyber768_PK"])  # round-3 reference encapsulates ...
    assert ours.decapsulate(c) == k  # ... we decapsulate (PyCryptodome, expanded key)
    ss, ct = ours.public_key.encapsulate()  # we encapsulate (OpenSSL) ...
    assert Kyber768.decaps(raw["Kyber768_PrivKey"], ct) == ss  # ... reference decapsulates
    # FIPS 203 ML-KEM secrets differ from round 3: the variant matters on the wire
    assert KyberPrivateKey.from_expanded(raw["Kyber768_PrivKey"], variant="mlkem").decapsulate(c) != k


def test_seed_keys_round_trip_and_variant_mismatch_fails_the_handshake(libvau):
    keys, signed = libvau
    srv, cl = _pair(keys, signed)
    _handshake(srv, cl)  # fresh client keys (OpenSSL) against the lib-vau keys (expanded)
    kseed = KyberPrivateKey.from_seed(bytes(range(64)))
    ss, ct = kseed.public_key.encapsulate()
    assert kseed.decapsulate(ct) == ss
    mlkem_client = EpaVauClient(VauKeyTrust([libvau_signer()[1]], clock=_clock, variant="mlkem"))
    srv2 = EpaVauServer(keys, signed, clock=_clock)
    cid, m2 = srv2.handle_m1(mlkem_client.message1())
    with pytest.raises(VauHandshakeError, match="M2 AEAD_ct does not authenticate"):
        mlkem_client.handle_m2(m2)


# --- handshake and user data with the lib-vau server keys ------------------------------------------


def test_full_handshake_with_libvau_keys_and_user_data(libvau):
    keys, signed = libvau
    srv, cl = _pair(keys, signed)
    cid = _handshake(srv, cl)
    assert cl.established and cid.startswith("/VAU/epa/") and len(cid) <= 200
    assert cl.vau_keys.ecdh == keys.ecdh.public_key()
    for i in range(1, 4):
        msg = cl.encrypt_request(b"GET /epa/authz/v1/freshness HTTP/1.1\r\nHost: epa\r\n\r\n")
        header = UserDataHeader.decode(msg)
        assert (header.pu, header.direction, header.counter, header.key_id) == (False, 1, i, cl.key_id)
        n, pt = srv.open_request(cid, msg)
        assert n == i and pt.startswith(b"GET /epa/authz")
        assert cl.decrypt_response(srv.seal_response(cid, n, b"HTTP/1.1 204 No Content\r\n\r\n")).startswith(
            b"HTTP/1.1 204"
        )


def test_user_data_vector_from_lib_vau_csharp():
    v = json.loads(vau_vector("lib-vau-csharp/AesGcmTest_vector.json"))
    key, iv, aad = (bytes.fromhex(v[k]) for k in ("key_hex", "iv_hex", "aad_header_hex"))
    ct = bytes.fromhex(v["ciphertext_and_tag_hex"])
    msg = aad + iv + ct
    header, pt = open_user_data(key, msg)
    assert pt == bytes.fromhex(v["plaintext_hex"]) == b"Hello World"
    assert (header.pu, header.direction, header.counter) == (False, 1, 1)
    assert header.encode() == aad
    assert AESGCM(key).encrypt(iv, pt, header.encode()) == ct  # same bytes when encrypted here
    with pytest.raises(VauDecryptionError):
        open_user_data(key, msg[:20] + bytes([msg[20] ^ 1]) + msg[21:])  # KeyID in the AAD changed


# --- the recorded session (legacy encodings only through tests/support/tiger.py) -----------------------


def test_recorded_session_decrypts():
    rec = read_recording(vau_vector("app-Tiger/vau3traffic.tgr"))
    assert [r.start_line.split()[0] for r in rec] == [
        "POST",
        "HTTP/1.1",
        "POST",
        "HTTP/1.1",
        "POST",
        "HTTP/1.1",
    ]
    k1_s2c = base64.b64decode(rec[1].headers["VAU-DEBUG-S_K1_s2c"])
    k1_c2s = base64.b64decode(rec[1].headers["VAU-DEBUG-S_K1_c2s"])
    m2 = cbor2.loads(rec[1].body)
    assert m2["MessageType"] == "M2" and len(m2["Kyber768_ct"]) == 1088
    signed_raw = aead_decrypt(k1_s2c, m2["AEAD_ct"], "M2 AEAD_ct")
    signed = cbor2.loads(signed_raw)
    sig_key, cert = libvau_signer()
    assert signed["cert_hash"] == hashlib.sha256(cert).digest() and signed["cdv"] == 1
    # legacy: DER signature, checked with the lib-vau AUT-VAU certificate's key
    sig_key.public_key().verify(
        signed["signature-ES256"], signed["signed_pub_keys"], ec.ECDSA(hashes.SHA256())
    )
    pub = cbor2.loads(signed["signed_pub_keys"])
    assert len(legacy_kyber_public_key(pub["Kyber768_PK"])) == 1184
    assert pub["exp"] - pub["iat"] <= 30 * 86400
    # the production decoders refuse the legacy forms
    with pytest.raises(VauFormatError, match="raw r\\|\\|s"):
        SignedPublicVauKeys.decode(signed_raw)
    with pytest.raises(VauFormatError, match="1184 bytes"):
        VauPublicKeys.decode(signed["signed_pub_keys"])
    inner = cbor2.loads(aead_decrypt(k1_c2s, cbor2.loads(rec[2].body)["AEAD_ct"], "M3 AEAD_ct"))
    assert inner["ERP"] is False and inner["ESO"] is False and len(inner["Kyber768_ct"]) == 1088
    k2_c2s, k2_s2c = (base64.b64decode(x) for x in rec[4].headers["VAU-nonPU-Tracing"].split())
    req_h, req = open_user_data(k2_c2s, rec[4].body)
    resp_h, resp = open_user_data(k2_s2c, rec[5].body)
    assert (req, resp) == (b"Hello World", b"Right back at ya!")
    assert (req_h.direction, resp_h.direction, req_h.pu) == (1, 2, False)
    assert req_h.key_id == resp_h.key_id
    assert legacy_counter(rec[4].body[:43]) == legacy_counter(rec[5].body[:43]) == 1
    assert req_h.counter == 1 << 32  # what a strict reader makes of the legacy counter


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture
def channel(libvau):
    keys, signed = libvau
    srv, cl = _pair(keys, signed)
    return srv, cl, _handshake(srv, cl)


def test_counter_replay_refused_reorder_within_window_accepted(channel):
    srv, cl, cid = channel
    m1, m2, m3 = (cl.encrypt_request(f"r{i}".encode()) for i in range(3))
    assert srv.open_request(cid, m3)[0] == 3
    assert srv.open_request(cid, m1)[0] == 1  # out of order, inside the window
    with pytest.raises(VauCounterError, match="already used"):
        srv.open_request(cid, m3)
    with pytest.raises(VauCounterError, match="already used"):
        srv.open_request(cid, m1)
    assert srv.open_request(cid, m2)[0] == 2
    for _ in range(70):
        last = cl.encrypt_request(b"x")
    srv.open_request(cid, last)
    old = UserDataHeader(False, 1, 4, cl.key_id)
    from safehold.vau.epa import seal_user_data

    stale = seal_user_data(cl._keys.c2s_app_data, old, b"late", encryption_counter=4)
    with pytest.raises(VauCounterError, match="older than the replay window"):
        srv.open_request(cid, stale)


def test_key_id_direction_and_pu_mismatch_refused(channel, libvau):
    srv, cl, cid = channel
    msg = cl.encrypt_request(b"hello")
    other_srv, other_cl = _pair(*libvau)
    other_cid = _handshake(other_srv, other_cl)
    with pytest.raises(VauKeyIdError):
        srv.open_request(cid, other_cl.encrypt_request(b"x"))  # another channel's KeyID
    with pytest.raises(VauKeyIdError):
        other_srv.open_request(other_cid, msg)
    with pytest.raises(VauFormatError, match="direction"):
        srv.open_request(cid, msg[:2] + b"\x02" + msg[3:])
    with pytest.raises(VauFormatError, match="PU flag"):
        srv.open_request(cid, msg[:1] + b"\x01" + msg[2:])
    with pytest.raises(VauDecryptionError):
        srv.open_request(cid, msg[:-1] + bytes([msg[-1] ^ 1]))
    n, _ = srv.open_request(cid, msg)
    reply = srv.seal_response(cid, n, b"ok")
    with pytest.raises(VauResponseError, match="expected 5"):
        cl.encrypt_request(b"another")  # counter moves on to 2 ...
        cl.decrypt_response(reply, request_counter=5)
    assert cl.decrypt_response(reply, request_counter=1) == b"ok"
    with pytest.raises(VauFormatError, match="not marked as a response"):
        cl.decrypt_response(msg, request_counter=1)
    with pytest.raises(VauChannelUnknownError):
        srv.open_request("/VAU/epa/" + "0" * 32, msg)


def test_tampered_key_confirmation_ends_the_channel(libvau):
    keys, signed = libvau
    srv, cl = _pair(keys, signed)
    cid, m2 = srv.handle_m1(cl.message1())
    m3 = cbor2.loads(cl.handle_m2(m2))
    kc = bytearray(m3["AEAD_ct_key_confirmation"])
    kc[-1] ^= 1
    m3["AEAD_ct_key_confirmation"] = bytes(kc)
    with pytest.raises(VauHandshakeError, match="AEAD_ct_key_confirmation does not authenticate"):
        srv.handle_m3(cid, cbor2.dumps(m3))
    with pytest.raises(VauChannelUnknownError):
        srv.handle_m3(cid, cbor2.dumps(m3))


def test_m4_from_another_transcript_is_refused(libvau):
    keys, signed = libvau
    srv, cl = _pair(keys, signed)
    cid, m2 = srv.handle_m1(cl.message1())
    m3 = cl.handle_m2(m2)
    m4 = cbor2.loads(srv.handle_m3(cid, m3))
    with pytest.raises(VauHandshakeError):
        cl.handle_m4(
            cbor2.dumps(
                {
                    "MessageType": "M4",
                    "AEAD_ct_key_confirmation": m4["AEAD_ct_key_confirmation"][:-1] + b"\x00",
                }
            )
        )
    with pytest.raises(VauHandshakeError, match="not established"):
        cl.encrypt_request(b"x")


def test_trust_checks(libvau):
    keys, _ = libvau
    sig_key, cert = libvau_signer()
    trust = VauKeyTrust([cert], clock=_clock)
    ok = libvau_signed_keys(keys)
    assert trust.verify(ok).ecdh == keys.ecdh.public_key()
    with pytest.raises(VauKeyVerificationError, match="no AUT-VAU certificate is pinned"):
        VauKeyTrust([])
    other_cert = VauKeyTrust([b"not the cert"], clock=_clock)
    with pytest.raises(VauKeyVerificationError, match="not pinned"):
        other_cert.verify(ok)
    with pytest.raises(VauKeyVerificationError, match="expired"):
        trust.verify(libvau_signed_keys(keys, iat=LIBVAU_NOW - 10 * 86400, exp=LIBVAU_NOW - 3600))
    with pytest.raises(VauKeyVerificationError, match="more than 30 days"):
        trust.verify(libvau_signed_keys(keys, iat=LIBVAU_NOW - 3600, exp=LIBVAU_NOW + 31 * 86400))
    forged = SignedPublicVauKeys(
        VauServerKeys.generate().public(iat=LIBVAU_NOW, exp=LIBVAU_NOW + 3600).encode(),
        ok.signature,
        ok.cert_hash,
        ok.cdv,
    )
    with pytest.raises(VauKeyVerificationError, match="does not verify"):
        trust.verify(forged)
    with pytest.raises(VauKeyVerificationError, match="validity period"):
        VauKeyTrust([cert]).verify(ok)  # the lib-vau test certificate expired in 2024
    with pytest.raises(VauKeyVerificationError, match="not this instance's keys"):
        EpaVauServer(VauServerKeys.generate(), ok, clock=_clock)


def test_malformed_m1_refused(libvau):
    srv, _ = _pair(*libvau)
    with pytest.raises(VauFormatError):
        srv.handle_m1(b"\xff\x00")
    with pytest.raises(VauHandshakeError, match="expected VAU message M1"):
        srv.handle_m1(cbor2.dumps({"MessageType": "M3"}))
    bad = {
        "MessageType": "M1",
        "ECDH_PK": {"crv": "P-384", "x": b"\0" * 32, "y": b"\0" * 32},
        "Kyber768_PK": b"\0" * 1184,
    }
    with pytest.raises(VauFormatError, match="crv"):
        srv.handle_m1(cbor2.dumps(bad))
    bad["ECDH_PK"] = {"crv": "P-256", "x": b"\1" * 32, "y": b"\1" * 32}
    with pytest.raises(VauFormatError, match="not a point"):
        srv.handle_m1(cbor2.dumps(bad))
