"""RA-TLS certificates: format (Gramine-compatible), key binding, relay, nonce, bad input, fuzz."""

from __future__ import annotations

import hashlib
import warnings
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.errors import (
    ReferenceValueMismatchError,
    ReportDataMismatchError,
    SimulatedEvidenceError,
)
from safehold.attestation.evidence import MEDIA_TYPES
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.errors import EvidenceFormatError, SafeholdError
from safehold.ratls import (
    OID_GRAMINE_LEGACY_QUOTE,
    OID_TCG_DICE_TAGGED_EVIDENCE,
    TAG_INTEL_TEE_QUOTE,
    TAG_SAFEHOLD_CMW,
    CertificateFormatError,
    ClaimsFormatError,
    EvidenceExtensionError,
    KeyBindingError,
    MissingEvidenceError,
    NonceMismatchError,
    UnknownEvidenceTagError,
    create_identity,
    evaluate_certificate,
    parse_certificate,
    verify_certificate,
)
from safehold.ratls.cert import encode_claims, parse_claims, parse_extension, spki_der
from tests.support.shared import EVIDENCE, need_shared


@pytest.fixture(scope="module")
def att(tmp_path_factory) -> SimulatedAttester:
    return SimulatedAttester(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def ident(att):
    return create_identity(att)


@pytest.fixture(scope="module")
def verifier(att) -> Verifier:
    return Verifier(AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                                    measurements=(att.measurement.digest,),
                                    report_data="key-binding"))


def make_cert(ext_oid: x509.ObjectIdentifier | None, value: bytes | None,
              key: ec.EllipticCurvePrivateKey | None = None, *, days: int = 1) -> bytes:
    key = key or ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC) - timedelta(minutes=1)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=days)))
    if ext_oid is not None:
        b = b.add_extension(x509.UnrecognizedExtension(ext_oid, value), critical=False)
    return b.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def ext_value(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_oid(OID_TCG_DICE_TAGGED_EVIDENCE).value.value


def test_certificate_shape(ident) -> None:
    c = ident.certificate
    ext = c.extensions.get_extension_for_oid(OID_TCG_DICE_TAGGED_EVIDENCE)
    assert ext.critical is False
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp384r1"
    tagged = cbor2.loads(ext.value.value)
    assert tagged.tag == TAG_SAFEHOLD_CMW
    ev, claims = tagged.value
    m = cbor2.loads(claims)
    alg, digest = cbor2.loads(m["pubkey-hash"])  # Gramine layout: bstr-wrapped [alg, hash]
    assert alg == 1 and digest == hashlib.sha256(spki_der(c)).digest()
    rat = parse_certificate(ident.cert_der())
    assert rat.evidence == ident.evidence
    assert rat.expected_report_data() == hashlib.sha256(claims).digest() + bytes(32)
    assert ident.evidence.media_type == MEDIA_TYPES["simulated"]


def test_verify_accepts_and_rows(ident, verifier) -> None:
    a = verify_certificate(ident.cert_pem(), verifier)
    assert a.ok and a.claims.tee_type == "simulated"
    _, shown = evaluate_certificate(ident.certificate, verifier)
    assert shown.verdicts[0].claim == "ratls.pubkey-hash" and shown.ok


def test_simulated_refused_under_default_policy(att, ident) -> None:
    # RTMR1 of the dcap-qvl TDX sample
    rtmr1 = bytes.fromhex("0084452c01668329d4bc06acdf58a7205c26743304509973"
                          "949e5619bf81a6a7aea8c323c173019b3093d54e579e9378")
    pol = AppraisalPolicy(allowed_tee_types=("tdx",), simulated_root=att.root_ca_path,
                          measurements=(att.measurement.digest,), tdx_registers={"rtmr1": (rtmr1,)})
    with pytest.raises(SimulatedEvidenceError):
        verify_certificate(ident.certificate, Verifier(pol))


def test_wrong_measurement_policy(att, ident) -> None:
    pol = AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                          measurements=(bytes(48),))
    with pytest.raises(ReferenceValueMismatchError, match="measurement"):
        verify_certificate(ident.certificate, Verifier(pol))


def test_relay_extension_in_another_key_cert(ident, verifier) -> None:
    relayed = make_cert(OID_TCG_DICE_TAGGED_EVIDENCE, ext_value(ident.certificate))
    with pytest.raises(KeyBindingError, match="relayed"):
        verify_certificate(relayed, verifier)
    _, a = evaluate_certificate(relayed, verifier)
    assert [v.claim for v in a.failures] == ["ratls.pubkey-hash"]


def test_relay_with_rewritten_claims(ident, verifier) -> None:
    """The attacker rebinds the claims to its own key; the Evidence's report_data then no
    longer matches SHA-256(claims)."""
    attacker = ec.generate_private_key(ec.SECP384R1())
    tagged = cbor2.loads(ext_value(ident.certificate))
    ev = tagged.value[0]
    forged_claims = encode_claims(spki_der(attacker.public_key()))
    forged = cbor2.dumps(cbor2.CBORTag(TAG_SAFEHOLD_CMW, [ev, forged_claims]))
    cert = make_cert(OID_TCG_DICE_TAGGED_EVIDENCE, forged, attacker)
    with pytest.raises(ReportDataMismatchError, match="report_data"):
        verify_certificate(cert, verifier)


def test_nonce(att, verifier) -> None:
    with_nonce = create_identity(att, nonce=b"N" * 16)
    assert verify_certificate(with_nonce.certificate, verifier, expected_nonce=b"N" * 16).ok
    with pytest.raises(NonceMismatchError, match="expected 4d4d"):
        verify_certificate(with_nonce.certificate, verifier, expected_nonce=b"M" * 16)
    plain = create_identity(att)
    with pytest.raises(NonceMismatchError, match="got none"):
        verify_certificate(plain.certificate, verifier, expected_nonce=b"N" * 16)


def test_missing_extension(verifier) -> None:
    with pytest.raises(MissingEvidenceError, match="plain TLS certificate"):
        verify_certificate(make_cert(None, None), verifier)


def test_wrong_cbor_tag(ident, verifier) -> None:
    tagged = cbor2.loads(ext_value(ident.certificate))
    wrong = cbor2.dumps(cbor2.CBORTag(1234, list(tagged.value)))
    with pytest.raises(UnknownEvidenceTagError, match="got 1234"):
        verify_certificate(make_cert(OID_TCG_DICE_TAGGED_EVIDENCE, wrong), verifier)
    untagged = cbor2.dumps(list(tagged.value))
    with pytest.raises(UnknownEvidenceTagError, match="expected a CBOR tag"):
        parse_extension(untagged)


def test_truncated_and_garbled_extension(ident) -> None:
    raw = ext_value(ident.certificate)
    for bad in (raw[: len(raw) // 2], raw[:1], b"\xff\xff\xff", raw + b"\x00"):
        with pytest.raises(EvidenceExtensionError):
            parse_extension(bad)
    with pytest.raises(EvidenceExtensionError, match="empty"):
        parse_extension(b"")
    shape = cbor2.dumps(cbor2.CBORTag(TAG_SAFEHOLD_CMW, [b"only one"]))
    with pytest.raises(EvidenceExtensionError, match="expected \\[evidence"):
        parse_extension(shape)
    bad_cmw = cbor2.dumps(cbor2.CBORTag(TAG_SAFEHOLD_CMW, [b"not json", cbor2.loads(raw).value[1]]))
    with pytest.raises(EvidenceFormatError, match="CMW"):
        parse_extension(bad_cmw)


def test_claims_errors() -> None:
    spki = spki_der(ec.generate_private_key(ec.SECP384R1()).public_key())
    good = encode_claims(spki, nonce=b"x" * 8, hash_alg=7)
    assert parse_claims(good)[0] == 7
    cases = {
        "CBOR map": cbor2.dumps([1, 2]),
        "lack 'pubkey-hash'": cbor2.dumps({"nonce": b"1"}),
        "hash algorithm id": cbor2.dumps({"pubkey-hash": cbor2.dumps([99, bytes(32)])}),
        "bytes for algorithm": cbor2.dumps({"pubkey-hash": cbor2.dumps([1, bytes(31)])}),
        "hash-alg-id, hash": cbor2.dumps({"pubkey-hash": "text"}),
        "nonce": cbor2.dumps({"pubkey-hash": [1, bytes(32)], "nonce": "x"}),
        "not valid CBOR": b"\xa1",
    }
    for msg, raw in cases.items():
        with pytest.raises(ClaimsFormatError, match=msg):
            parse_claims(raw)
    # an unwrapped array (not bstr) is read too
    assert parse_claims(cbor2.dumps({"pubkey-hash": [1, bytes(32)]}))[1] == bytes(32)


def test_expired_and_garbage_certificates(ident, verifier) -> None:
    later = datetime.now(UTC) + timedelta(days=3)
    with pytest.raises(CertificateFormatError, match="valid"):
        verify_certificate(ident.certificate, verifier, at=later)
    for junk in (b"", b"\x30\x03\x02\x01\x01", ident.cert_der()[:100], b"-----BEGIN CERTIFICATE-----\nxx"):
        with pytest.raises(CertificateFormatError):
            parse_certificate(junk)


def _quote(name: str) -> bytes:
    return need_shared(EVIDENCE / name).read_bytes()


def test_gramine_tagged_quote_layout() -> None:
    """A certificate laid out exactly as Gramine >= 1.8 writes it (tag 60000, raw quote, claims
    with bstr-wrapped pubkey-hash) parses to SGX / TDX Evidence with the right binding."""
    for name, mt in (("sgx/dcapqvl-sgx_quote.bin", MEDIA_TYPES["sgx"]),
                     ("tdx/dcapqvl-tdx_quote.bin", MEDIA_TYPES["tdx"])):
        quote = _quote(name)
        key = ec.generate_private_key(ec.SECP384R1())
        claims = encode_claims(spki_der(key.public_key()))
        value = cbor2.dumps(cbor2.CBORTag(TAG_INTEL_TEE_QUOTE, [quote, claims]))
        rat = parse_certificate(make_cert(OID_TCG_DICE_TAGGED_EVIDENCE, value, key))
        assert rat.evidence.media_type == mt and rat.evidence.data == quote
        assert rat.tag == TAG_INTEL_TEE_QUOTE and not rat.legacy
        assert rat.expected_report_data() == hashlib.sha256(claims).digest() + bytes(32)


def test_gramine_legacy_quote_extension() -> None:
    quote = _quote("sgx/dcapqvl-sgx_quote.bin")
    key = ec.generate_private_key(ec.SECP384R1())
    rat = parse_certificate(make_cert(OID_GRAMINE_LEGACY_QUOTE, quote, key))
    assert rat.legacy and rat.evidence.media_type == MEDIA_TYPES["sgx"]
    assert rat.expected_report_data() == hashlib.sha256(spki_der(key.public_key())).digest() + bytes(32)
    with pytest.raises(EvidenceFormatError, match="48-byte header"):
        parse_certificate(make_cert(OID_GRAMINE_LEGACY_QUOTE, quote[:20], key))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_extension_bytes(data: bytes) -> None:
    try:
        parse_extension(data)
    except SafeholdError:
        pass


_cbor_leaf = st.one_of(st.integers(-(2**64), 2**64), st.binary(max_size=40), st.text(max_size=20),
                       st.booleans(), st.none())
_cbor_tree = st.recursive(_cbor_leaf, lambda ch: st.one_of(
    st.lists(ch, max_size=4), st.dictionaries(st.text(max_size=12), ch, max_size=4)), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([TAG_SAFEHOLD_CMW, TAG_INTEL_TEE_QUOTE, 1, 2**40]), _cbor_tree,
       st.dictionaries(st.sampled_from(["pubkey-hash", "nonce", "x"]), _cbor_tree, max_size=3))
def test_fuzz_structured_extension(tag, ev, claims) -> None:
    try:
        value = cbor2.dumps(cbor2.CBORTag(tag, [cbor2.dumps(ev), cbor2.dumps(claims)]))
        parse_extension(value)
        parse_claims(cbor2.dumps(claims))
    except SafeholdError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_certificate(ident, verifier, data) -> None:
    der = bytearray(ident.cert_der())
    i = data.draw(st.integers(0, len(der) - 1))
    der[i] ^= data.draw(st.integers(1, 255))
    try:
        verify_certificate(bytes(der), verifier)
    except SafeholdError:
        pass


def test_server_context_from_memory_presents_the_identity_in_a_handshake(ident) -> None:
    import ssl

    from safehold.ratls import server_ssl_context
    from safehold.ratls.client import client_ssl_context

    sctx = server_ssl_context(ident)
    assert sctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ssl_context().wrap_bio(c_in, c_out)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # pump the handshake between the two in-memory ends
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = client.getpeercert(binary_form=True)
    assert der is not None and x509.load_der_x509_certificate(der) == ident.certificate


def test_operator_watching_tmpdir_reads_no_key_while_tls_contexts_load(ident, tmp_path, monkeypatch) -> None:
    """Issue 11, finding 1, for every RA-TLS server (SVR, anchor members, the demo: they all use
    ``server_ssl_context``), the anchor's mTLS client and the records service's context: a
    fanotify watch of the temp dir sees no file written (the old code wrote key.pem there)."""
    import os
    import tempfile
    import time

    from safehold.freshness.anchor.client import memory_client_context
    from safehold.ratls import server_ssl_context
    from safehold.records.server import ssl_context_from_pem
    from tests.support.filewatch import FileWatch, fanotify_available

    if not fanotify_available():
        if os.environ.get("CI"):
            pytest.fail("fanotify (root) is needed: inotify or polling can miss a file removed at once")
        pytest.skip("needs fanotify (root): inotify or polling can miss a file removed at once")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fds = set(os.listdir("/proc/self/fd"))
    with FileWatch([tmp_path]) as watch:
        server_ssl_context(ident)
        memory_client_context(ident.cert_pem(), ident.key_pem())
        ssl_context_from_pem(ident.cert_pem(), ident.key_pem())
        (tmp_path / "canary").write_bytes(b"seen")  # the watch works
        deadline = time.monotonic() + 5
        while not watch.seen and time.monotonic() < deadline:
            time.sleep(0.05)
    assert list(watch.seen) == [str(tmp_path / "canary")]
    assert set(os.listdir("/proc/self/fd")) <= fds | {str(n) for n in range(3)}  # memfds closed


def test_memory_key_loading_fails_closed_without_memfd(ident, monkeypatch) -> None:
    import os

    from safehold.errors import ConfigError
    from safehold.ratls.memkey import ssl_context_from_memory

    with pytest.raises(ConfigError, match="garbled|does not load"):
        ssl_context_from_memory(ident.cert_pem(), b"-----BEGIN PRIVATE KEY-----\ngarbled\n")
    monkeypatch.delattr(os, "memfd_create")
    with pytest.raises(ConfigError, match="memfd_create"):
        ssl_context_from_memory(ident.cert_pem(), ident.key_pem())


def test_client_cert_that_does_not_load_is_a_clear_error(tmp_path):
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.errors import RATLSError
    from safehold.ratls.client import AsyncRATLSTransport, RATLSTransport

    v = Verifier(AppraisalPolicy(allowed_tee_types=("sgx",), measurements=(bytes(32),)))
    garbled = tmp_path / "client.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    for cls in (RATLSTransport, AsyncRATLSTransport):
        with pytest.raises(RATLSError, match="client.pem"):
            cls(v, client_cert=(garbled, garbled))
        with pytest.raises(RATLSError, match="missing.pem"):
            cls(v, client_cert=(tmp_path / "missing.pem", tmp_path / "missing.key"))


def test_relay_refused_even_under_report_data_any(tmp_path):
    """A policy saying report_data = "any" must not let relayed Evidence through: the RA-TLS
    Relying Party always supplies its key binding, and a supplied binding is always compared."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.attestation.errors import ReportDataMismatchError
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.ratls.cert import (
        OID_TCG_DICE_TAGGED_EVIDENCE,
        create_identity,
        encode_claims,
        encode_extension,
        parse_certificate,
        spki_der,
    )
    from safehold.ratls.verify import verify_certificate

    att = SimulatedAttester(tmp_path / "tee")
    evidence = parse_certificate(create_identity(att).certificate).evidence
    thief = ec.generate_private_key(ec.SECP384R1())  # a key outside any TEE
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    now = datetime.now(UTC) - timedelta(minutes=1)
    ext = encode_extension(evidence, encode_claims(spki_der(thief.public_key())))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(thief.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(OID_TCG_DICE_TAGGED_EVIDENCE, ext),
                           critical=False)
            .sign(thief, hashes.SHA384()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("any", "required", "key-binding"):
            pol = AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                                  measurements=(att.measurement.digest,), report_data=mode)
            with pytest.raises(ReportDataMismatchError, match="report_data"):
                verify_certificate(cert, Verifier(pol))


def test_client_cert_context_requires_tls13(tmp_path):
    import ssl
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from safehold.ratls.client import client_ssl_context

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "user")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    cp, kp = tmp_path / "c.pem", tmp_path / "k.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    assert client_ssl_context().minimum_version == ssl.TLSVersion.TLSv1_2
    # with a client certificate: TLS 1.3 only, so the certificate is never sent in clear
    assert client_ssl_context((cp, kp)).minimum_version == ssl.TLSVersion.TLSv1_3
