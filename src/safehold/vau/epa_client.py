"""The client side of the ePA 3 channel (gemSpec_Krypt chapter 7; wire format in
:mod:`safehold.vau.epa`): M1, M2 → M3, M4 check, request sealing and response opening. No I/O;
:class:`safehold.client.vau.EpaVauHttpClient` carries the messages over HTTP."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.vau.epa import (
    DIRECTION_REQUEST,
    DIRECTION_RESPONSE,
    ChannelKeys,
    UserDataHeader,
    _ecdh_encapsulate,
    _field,
    _k1,
    _message,
    aead_decrypt,
    aead_encrypt,
    ecdh_key_from_cbor,
    ecdh_key_to_cbor,
    open_user_data,
    seal_user_data,
)
from safehold.vau.epa_keys import SignedPublicVauKeys, VauKeyTrust, VauPublicKeys
from safehold.vau.errors import (
    VauHandshakeError,
    VauResponseError,
)
from safehold.vau.kyber import KyberPrivateKey, Variant

__all__ = ["CertificateProvider", "EpaVauClient"]

# --- client ------------------------------------------------------------------------------------


CertificateProvider = Callable[[bytes, int], bytes]


class EpaVauClient:
    """The client side of the ePA 3 channel: one instance per channel; not thread-safe.

    Use: :meth:`message1` → send, :meth:`handle_m2` → send M3, :meth:`handle_m4`; then
    :meth:`encrypt_request` / :meth:`decrypt_response` in turn.

    Args:
        trust: pinned AUT-VAU certificates and the checks of :class:`VauKeyTrust`.
        pu: the environment flag expected in every user-data message.
        variant: Kyber round 3 (production) or FIPS 203 ML-KEM.
    """

    def __init__(self, trust: VauKeyTrust, *, pu: bool = False):
        self.trust = trust
        self.pu = pu
        self._variant: Variant = trust.variant
        self._ecdh = ec.generate_private_key(ec.SECP256R1())
        self._kyber = KyberPrivateKey.generate(variant=self._variant)
        self._m1: bytes | None = None
        self._transcript = b""
        self._keys: ChannelKeys | None = None
        self._established = False
        self.vau_keys: VauPublicKeys | None = None
        self.request_counter = 0
        self._pending: set[int] = set()

    def __repr__(self) -> str:
        return f"EpaVauClient(established={self._established}, counter={self.request_counter})"

    @property
    def established(self) -> bool:
        """True once M4 verified."""
        return self._established

    @property
    def key_id(self) -> bytes:
        """The channel's KeyID (after M2)."""
        if self._keys is None:
            raise VauHandshakeError("no KeyID before M2")
        return self._keys.key_id

    def message1(self) -> bytes:
        """M1 (A_24428) with this channel's ephemeral ECDH and Kyber768 keys."""
        if self._m1 is not None:
            raise VauHandshakeError("M1 was already sent on this channel")
        self._m1 = cbor2.dumps(
            {
                "MessageType": "M1",
                "ECDH_PK": ecdh_key_to_cbor(self._ecdh.public_key()),
                "Kyber768_PK": self._kyber.public_key.raw,
            }
        )
        return self._m1

    def handle_m2(self, m2: bytes) -> bytes:
        """Check M2 and the signed VAU keys (A_24624-01) and build M3 (A_24623).

        Raises:
            VauHandshakeError: out of order, not an M2, or ``AEAD_ct`` does not decrypt.
            VauKeyVerificationError: the signed VAU keys fail a trust check.
            VauFormatError: malformed fields.
        """
        if self._m1 is None or self._keys is not None:
            raise VauHandshakeError("M2 received out of order")
        m2 = bytes(m2)
        obj = _message(m2, "M2")
        peer = ecdh_key_from_cbor(_field(obj, "ECDH_ct", dict, "M2"), "M2 ECDH_ct")
        ss_e_ecdh = self._ecdh.exchange(ec.ECDH(), peer)
        ss_e_kyber = self._kyber.decapsulate(_field(obj, "Kyber768_ct", bytes, "M2"))
        k1 = _k1(ss_e_ecdh, ss_e_kyber)
        signed = SignedPublicVauKeys.decode(
            aead_decrypt(k1.s2c, _field(obj, "AEAD_ct", bytes, "M2"), "M2 AEAD_ct")
        )
        vau = self.trust.verify(signed)
        ss_s_ecdh, ecdh_ct = _ecdh_encapsulate(vau.ecdh)
        ss_s_kyber, kyber_ct = vau.kyber.encapsulate()
        inner = cbor2.dumps({"ECDH_ct": ecdh_ct, "Kyber768_ct": kyber_ct, "ERP": False, "ESO": False})
        inner_ct = aead_encrypt(k1.c2s, inner)
        keys = ChannelKeys.derive(ss_e_ecdh, ss_e_kyber, ss_s_ecdh, ss_s_kyber)
        confirmation = aead_encrypt(
            keys.c2s_key_confirmation, hashlib.sha256(self._m1 + m2 + inner_ct).digest()
        )
        m3 = cbor2.dumps({"MessageType": "M3", "AEAD_ct": inner_ct, "AEAD_ct_key_confirmation": confirmation})
        self._transcript = self._m1 + m2 + m3
        self._keys = keys
        self.vau_keys = vau
        return m3

    def handle_m4(self, m4: bytes) -> None:
        """Check the VAU's key confirmation (A_24627); the channel is then established.

        Raises:
            VauHandshakeError: out of order, not an M4, or the transcript hash differs.
        """
        if self._keys is None or self._established:
            raise VauHandshakeError("M4 received out of order")
        obj = _message(bytes(m4), "M4")
        got = aead_decrypt(
            self._keys.s2c_key_confirmation,
            _field(obj, "AEAD_ct_key_confirmation", bytes, "M4"),
            "M4 AEAD_ct_key_confirmation",
        )
        if not hmac.compare_digest(got, hashlib.sha256(self._transcript).digest()):
            raise VauHandshakeError("M4 key confirmation failed: VAU transcript hash differs")
        self._established = True
        self._transcript = b""

    def encrypt_request(self, plaintext: bytes) -> bytes:
        """Encrypt one request with the next request counter (A_24628-01, A_24629).

        Raises:
            VauHandshakeError: the handshake has not completed.
        """
        if not self._established or self._keys is None:
            raise VauHandshakeError("VAU channel is not established")
        self.request_counter += 1
        n = self.request_counter
        self._pending.add(n)
        header = UserDataHeader(self.pu, DIRECTION_REQUEST, n, self._keys.key_id)
        return seal_user_data(self._keys.c2s_app_data, header, plaintext, encryption_counter=n)

    def decrypt_response(self, msg: bytes, *, request_counter: int | None = None) -> bytes:
        """Decrypt the VAU's answer (A_24633): direction 0x02, this channel's KeyID and PU flag,
        and the counter of an outstanding request (``request_counter``, default the last one).

        Raises:
            VauHandshakeError: the handshake has not completed.
            VauFormatError: malformed, wrong PU flag, or not a response.
            VauKeyIdError: another channel's KeyID.
            VauResponseError: the counter is not the expected request's.
            VauDecryptionError: tampered.
        """
        if not self._established or self._keys is None:
            raise VauHandshakeError("VAU channel is not established")
        header = UserDataHeader.expect(msg, pu=self.pu, direction=DIRECTION_RESPONSE,
                                       key_id=self._keys.key_id)
        want = self.request_counter if request_counter is None else request_counter
        if header.counter != want or want not in self._pending:
            raise VauResponseError(f"VAU response carries request counter {header.counter}, expected {want}")
        _, pt = open_user_data(self._keys.s2c_app_data, msg)
        self._pending.discard(want)
        return pt
