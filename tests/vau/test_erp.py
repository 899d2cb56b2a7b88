"""E-Rezept VAU (gemSpec_Krypt A_20160…A_20175): official vectors, recorded requests, refusals."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehold.vau.erp import (
    InnerRequest,
    decrypt_response,
    ecies_decrypt,
    ecies_encrypt,
    encrypt_response,
    seal_request,
)
from safehold.vau.erp_server import ErpVau, RequestIdCache
from safehold.vau.errors import (
    VauAccessTokenError,
    VauCapacityError,
    VauDecryptionError,
    VauFormatError,
    VauInnerRequestError,
    VauPseudonymError,
    VauReplayError,
    VauResponseError,
)
from safehold.vau.httpmsg import HttpRequest, HttpResponse, parse_request
from safehold.vau.pseudonym import ROTATION_SECONDS, PseudonymService
from tests.support.shared import vau_vector

SPEC = "gemSpec_Krypt/erp_vau_testvector.json"


def _point(x: str, y: str) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.BrainpoolP256R1(), bytes.fromhex("04" + x + y))


# --- official vectors ------------------------------------------------------------------------


def test_gemspec_vector_every_intermediate_value(ibm_vau_key):
    v = json.loads(vau_vector(SPEC))
    vau_pub = _point(v["vau_long_term_public_key"]["x"], v["vau_long_term_public_key"]["y"])
    assert vau_pub == ibm_vau_key.public_key()  # the test key's public point is the spec's
    eph = ec.derive_private_key(int(v["ephemeral_private_key_d"], 16), ec.BrainpoolP256R1())
    secret = eph.exchange(ec.ECDH(), vau_pub)
    assert secret.hex() == v["ecdh_shared_secret"]
    cek = HKDF(hashes.SHA256(), 16, salt=None, info=v["hkdf_info"].encode()).derive(secret)
    assert cek.hex() == v["cek_aes128"]
    msg = ecies_encrypt(vau_pub, v["plaintext_utf8"].encode(), ephemeral_key=eph, iv=bytes.fromhex(v["iv"]))
    assert msg.hex() == v["full_message_hex"]
    assert ecies_decrypt([ibm_vau_key], msg) == b"Hallo Test"


def test_ios_and_reference_server_vectors(ibm_vau_key):
    ios = json.loads(vau_vector("E-Rezept-App-iOS/VAUCryptoTests_testEciesEncrypt.json"))
    pub = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.BrainpoolP256R1(), bytes.fromhex(ios["vau_public_key_x962_uncompressed_hex"])
    )
    eph = ec.derive_private_key(int(ios["ephemeral_private_key_raw_hex"], 16), ec.BrainpoolP256R1())
    msg = ecies_encrypt(
        pub, ios["plaintext_utf8"].encode(), ephemeral_key=eph, iv=bytes.fromhex(ios["iv_hex"])
    )
    assert msg.hex() == "".join(
        ios["expected_parts_hex"][k]
        for k in ("version", "ephemeral_x", "ephemeral_y", "iv", "ciphertext", "tag")
    )
    ref = vau_vector("ref-eRp-FD-Server/decrypt_rs_test_vector.txt").decode()
    payload = next(line for line in ref.splitlines() if line.startswith("payload_hex="))
    assert (
        ecies_decrypt([ibm_vau_key], bytes.fromhex(payload.split("=", 1)[1].replace(" ", "")))
        == b"Hallo Test"
    )


@pytest.mark.parametrize("name", ["task_create", "task_create-ERP-3107"])
def test_recorded_task_create_decrypts_byte_exactly(ibm_vau_key, name):
    plain = vau_vector(f"erp-processing-context/{name}.plain")
    # INDEX.md: task_create.plain is stored with LF; the encrypted plaintext has CRLF.
    expected = plain.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    got = ecies_decrypt([ibm_vau_key], vau_vector(f"erp-processing-context/{name}.cipher"))
    assert got == expected
    inner = InnerRequest.parse(got)
    assert inner.request_id == "0123456789ABCDEF0123456789ABCDEF"  # upper-case hex accepted
    assert inner.response_key == bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
    http = parse_request(inner.http_request)
    assert (http.method, http.target) == ("POST", "/Task/$create")
    assert http.header("authorization") == "Bearer " + inner.access_token
    assert len(http.body) == int(http.header("content-length"))
    assert json.loads(http.body)["parameter"][0]["valueCoding"]["code"] == "160"
    assert InnerRequest.parse(inner.encode()) == inner  # re-encoding writes the key in lower case


# --- refusals of the ECIES layer ------------------------------------------------------------


@pytest.fixture
def vector_msg() -> bytes:
    return bytes.fromhex(json.loads(vau_vector(SPEC))["full_message_hex"])


@pytest.mark.parametrize("offset", [1, 40, 70, 78, -1])  # X, Y, IV, ciphertext, tag
def test_tampered_message_is_refused(ibm_vau_key, vector_msg, offset):
    bad = bytearray(vector_msg)
    bad[offset] ^= 0x01
    with pytest.raises((VauDecryptionError, VauFormatError)):
        ecies_decrypt([ibm_vau_key], bytes(bad))


def test_wrong_version_short_message_wrong_key(ibm_vau_key, vector_msg):
    with pytest.raises(VauFormatError, match="version byte is 0x02"):
        ecies_decrypt([ibm_vau_key], b"\x02" + vector_msg[1:])
    with pytest.raises(VauFormatError, match="shorter than the minimum 93"):
        ecies_decrypt([ibm_vau_key], vector_msg[:92])
    other = ec.generate_private_key(ec.BrainpoolP256R1())
    with pytest.raises(VauDecryptionError, match="does not authenticate"):
        ecies_decrypt([other], vector_msg)
    assert ecies_decrypt([other, ibm_vau_key], vector_msg) == b"Hallo Test"  # fallback key (rotation)


@pytest.mark.parametrize(
    "p,why",
    [
        (
            b"2 a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef GET / HTTP/1.1",
            "version",
        ),
        (b" 1 a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef X", "version"),
        (
            b"1  a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef X",
            "empty access token",
        ),
        (b"1 notajwt 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef X", "JWS"),
        (b"1 a.b.c 0123 0123456789abcdef0123456789abcdef X", "request-id"),
        (b"1 a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcd X", "response key"),
        (b"1 a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef", "items"),
        (b"1 a.b.c 0123456789abcdef0123456789abcdef 0123456789abcdef0123456789abcdef  X", "double space"),
    ],
)
def test_malformed_inner_request_is_refused(p, why):
    with pytest.raises(VauInnerRequestError, match=why):
        InnerRequest.parse(p)


# --- responses ------------------------------------------------------------------------------


def test_response_round_trip_and_refusals():
    key, rid = bytes(range(16)), "32b6594cc29bb54a14cb2a8e09558817"
    body = encrypt_response(key, rid, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert decrypt_response(key, rid, body).startswith(b"HTTP/1.1 200 OK")
    with pytest.raises(VauDecryptionError, match="response key"):
        decrypt_response(bytes(16), rid, body)  # wrong response key
    with pytest.raises(VauResponseError, match="another request-id"):
        decrypt_response(key, "00" * 16, body)
    with pytest.raises(VauDecryptionError):
        decrypt_response(key, rid, body[:-1] + bytes([body[-1] ^ 1]))


# --- the VAU end to end (core, no HTTP) ---------------------------------------------------------


class _Tokens:
    """Stand-in IdP verification for the core tests: tokens are ``h.<sub>.s`` with sub in a table."""

    def __init__(self):
        self.valid: dict[str, str] = {}

    def make(self, sub: str) -> str:
        tok = f"eyJhbGciOiJFUzI1NiJ9.{sub}.c2ln"
        self.valid[tok] = sub
        return tok

    def __call__(self, token: str):
        if token not in self.valid:
            raise ValueError("unknown token")
        return {"sub": self.valid[token], "exp": time.time() + 300}


@pytest.fixture
def vau(ibm_vau_key):
    tokens = _Tokens()
    return ErpVau([ibm_vau_key], token_verifier=tokens), tokens


def _req(vau_obj, token, target="/Task", body=b""):
    return seal_request(vau_obj.public_key, token, HttpRequest("GET", target, [("Host", "erp")], body))


def test_round_trip_with_pseudonym_flow(vau):
    v, tokens = vau
    tok = tokens.make("alice")
    sealed = _req(v, tok)
    opened = v.open("0", sealed.body)
    assert opened.http.target == "/Task" and opened.claims["sub"] == "alice"
    answer = sealed.open_response(v.seal(opened, HttpResponse(200, [("Content-Type", "text/plain")], b"ok")))
    assert answer.status == 200 and answer.body == b"ok"
    # A_20175: the next request goes to /VAU/<Userpseudonym>
    second = _req(v, tok)
    assert v.open(opened.user_pseudonym, second.body).pnp == opened.pnp


def test_replayed_request_id_is_refused(vau):
    v, tokens = vau
    sealed = _req(v, tokens.make("alice"))
    v.open("0", sealed.body)
    with pytest.raises(VauReplayError, match="already used"):
        v.open("0", sealed.body)


def test_wrong_pseudonym_is_refused(vau):
    v, tokens = vau
    alice, bob = tokens.make("alice"), tokens.make("bob")
    alice_ps = v.open("0", _req(v, alice).body).user_pseudonym
    with pytest.raises(VauPseudonymError, match="belongs to another user"):
        v.open(alice_ps, _req(v, bob).body)
    forged = alice_ps[:-1] + ("0" if alice_ps[-1] != "0" else "1")
    with pytest.raises(VauPseudonymError, match="not issued by this VAU"):
        v.open(forged, _req(v, alice).body)
    with pytest.raises(VauPseudonymError, match="malformed"):
        v.open("../etc", _req(v, alice).body)


def test_token_problems_are_refused(vau):
    v, tokens = vau
    with pytest.raises(VauAccessTokenError, match="access token refused"):
        v.open("0", _req(v, "eyJhbGciOiJFUzI1NiJ9.mallory.c2ln").body)
    tok, other = tokens.make("alice"), tokens.make("bob")
    inner = InnerRequest(
        tok,
        "ab" * 16,
        bytes(16),
        HttpRequest("GET", "/Task", [("Host", "erp"), ("Authorization", "Bearer " + other)]).encode(),
    )
    with pytest.raises(VauAccessTokenError, match="Authorization header"):
        v.open("0", ecies_encrypt(v.public_key, inner.encode()))


def test_request_id_cache_expiry_and_capacity():
    now = [1000.0]
    cache = RequestIdCache(capacity=2, clock=lambda: now[0])
    cache.add("AA" * 16, 1010)
    with pytest.raises(VauReplayError):
        cache.add("aa" * 16, 1010)  # case-insensitive
    cache.add("bb" * 16, 1005)
    with pytest.raises(VauCapacityError):
        cache.add("cc" * 16, 1020)
    now[0] = 1006  # "bb" expired with its token
    cache.add("cc" * 16, 1020)
    assert len(cache) == 2


def test_pseudonym_keys_rotate_and_previous_key_still_accepted():
    now = [0.0]
    ps = PseudonymService(clock=lambda: now[0])
    pnp = ps.pnp("alice")
    up = ps.user_pseudonym(pnp)
    now[0] = ROTATION_SECONDS + 1
    assert ps.pnp("alice") != pnp  # new key
    assert ps.check_path(up) == pnp  # issued under the previous key: still valid
    ps.check_owner(pnp, "alice")
    now[0] = 2 * ROTATION_SECONDS + 2
    ps.pnp("alice")
    with pytest.raises(VauPseudonymError):
        ps.check_path(up)  # two rotations later
