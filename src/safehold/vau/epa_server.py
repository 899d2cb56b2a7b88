"""The VAU side of the ePA 3 channel (gemSpec_Krypt chapter 7; wire format in
:mod:`safehold.vau.epa`): the channel table, M1 → M2, M3 → M4, request opening with the
anti-replay window, response sealing. Framework-free; the HTTP routes are :mod:`safehold.vau.http`."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.vau.epa import (
    _K1,
    DIRECTION_REQUEST,
    DIRECTION_RESPONSE,
    MAX_KEY_LIFETIME,
    REPLAY_WINDOW,
    ChannelKeys,
    UserDataHeader,
    _cbor_map,
    _ecdh_encapsulate,
    _field,
    _k1,
    _message,
    aead_decrypt,
    aead_encrypt,
    ecdh_key_from_cbor,
    open_user_data,
    seal_user_data,
)
from safehold.vau.epa_keys import SignedPublicVauKeys, VauPublicKeys, VauServerKeys
from safehold.vau.errors import (
    VauChannelUnknownError,
    VauCounterError,
    VauHandshakeError,
    VauKeyVerificationError,
)
from safehold.vau.kyber import KyberPublicKey

__all__ = ["EpaVauServer"]


class _Channel:
    __slots__ = (
        "cid",
        "m1",
        "m2",
        "k1",
        "ss_e",
        "keys",
        "lock",
        "max_seen",
        "window",
        "enc_counter",
        "touched",
        "established",
    )

    def __init__(self, cid: str, m1: bytes, m2: bytes, k1: _K1, ss_e: tuple[bytes, bytes], now: float):
        self.cid = cid
        self.m1, self.m2, self.k1, self.ss_e = m1, m2, k1, ss_e
        self.keys: ChannelKeys | None = None
        self.lock = threading.Lock()
        self.max_seen = 0
        self.window = 0  # bit i set: counter max_seen - i was seen
        self.enc_counter = 0
        self.touched = now
        self.established = False


class EpaVauServer:
    """The VAU side of the ePA 3 channel: handshake and user data, channels kept in memory.

    Args:
        keys: the instance's KEM keys.
        signed_keys: its :class:`SignedPublicVauKeys` (sent inside M2).
        pu: production environment flag (the PU byte every user-data message must carry).
        cid_prefix: path prefix of the channel ids handed out (``VAU-CID``, A_24622:
            ``/[A-Za-z0-9/-]*``, at most 200 characters).
        max_channels: most channels held; the least recently used one is dropped when full.
        idle_timeout: seconds an established channel lives without traffic.
        handshake_timeout: seconds between M1 and M3.
        clock: seconds since the epoch.

    Thread-safe.
    """

    def __init__(
        self,
        keys: VauServerKeys,
        signed_keys: SignedPublicVauKeys,
        *,
        pu: bool = False,
        cid_prefix: str = "/VAU/epa/",
        max_channels: int = 100_000,
        idle_timeout: float = 3600.0,
        handshake_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        import re

        if not re.fullmatch(r"/[A-Za-z0-9/-]*", cid_prefix) or len(cid_prefix) + 32 > 200:
            raise ValueError("cid_prefix must match /[A-Za-z0-9/-]* and leave room for 32 characters")
        self.keys = keys
        self.signed_keys = signed_keys
        self._signed_bytes = signed_keys.encode()
        self.pu = pu
        self.cid_prefix = cid_prefix
        self.max_channels = max_channels
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self._clock = clock
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._lock = threading.Lock()
        ks = VauPublicKeys.decode(signed_keys.signed_pub_keys, variant=keys.kyber.variant)
        if ks.ecdh != keys.ecdh.public_key() or ks.kyber != keys.kyber.public_key:
            raise VauKeyVerificationError("signed VAU public keys are not this instance's keys")
        if ks.exp - ks.iat > MAX_KEY_LIFETIME:
            raise VauKeyVerificationError("signed VAU public keys are valid for more than 30 days")
        self._exp = ks.exp

    def __repr__(self) -> str:
        return f"EpaVauServer(pu={self.pu}, channels={len(self._channels)})"

    def __len__(self) -> int:
        return len(self._channels)

    def _get(self, cid: str) -> _Channel:
        now = self._clock()
        with self._lock:
            ch = self._channels.get(cid)
            if ch is None:
                raise VauChannelUnknownError("no VAU channel under this VAU-CID; perform a new handshake")
            ttl = self.idle_timeout if ch.established else self.handshake_timeout
            if now - ch.touched > ttl:
                del self._channels[cid]
                raise VauChannelUnknownError("VAU channel expired; perform a new handshake")
            ch.touched = now
            self._channels.move_to_end(cid)
            return ch

    def _drop(self, cid: str) -> None:
        with self._lock:
            self._channels.pop(cid, None)

    def handle_m1(self, m1: bytes) -> tuple[str, bytes]:
        """Answer M1 with M2 (A_24608); returns ``(VAU-CID, M2 bytes)``.

        Raises:
            VauHandshakeError: not an M1, or the VAU keys have expired.
            VauFormatError: malformed client keys.
        """
        m1 = bytes(m1)
        now = self._clock()
        if now > self._exp:
            raise VauHandshakeError("this VAU's signed public keys have expired; it takes no new channels")
        obj = _message(m1, "M1")
        client_ecdh = ecdh_key_from_cbor(_field(obj, "ECDH_PK", dict, "M1"), "M1 ECDH_PK")
        client_kyber = KyberPublicKey(
            _field(obj, "Kyber768_PK", bytes, "M1"), variant=self.keys.kyber.variant
        )
        ss_ecdh, ecdh_ct = _ecdh_encapsulate(client_ecdh)
        ss_kyber, kyber_ct = client_kyber.encapsulate()
        k1 = _k1(ss_ecdh, ss_kyber)
        m2 = cbor2.dumps(
            {
                "MessageType": "M2",
                "ECDH_ct": ecdh_ct,
                "Kyber768_ct": kyber_ct,
                "AEAD_ct": aead_encrypt(k1.s2c, self._signed_bytes),
            }
        )
        cid = self.cid_prefix + os.urandom(16).hex()
        with self._lock:
            while len(self._channels) >= self.max_channels:
                self._channels.popitem(last=False)
            self._channels[cid] = _Channel(cid, m1, m2, k1, (ss_ecdh, ss_kyber), now)
        return cid, m2

    def handle_m3(self, cid: str, m3: bytes) -> bytes:
        """Check M3's key confirmation and answer with M4 (A_24623, A_24626).

        A failed M3 ends the channel.

        Raises:
            VauChannelUnknownError: no channel under ``cid``.
            VauHandshakeError: not an M3, channel already established, inner layer does not
                decrypt, or the client's transcript hash differs (key confirmation failed).
            VauFormatError: malformed inner layer.
        """
        m3 = bytes(m3)
        ch = self._get(cid)
        with ch.lock:
            if ch.established or ch.keys is not None:
                raise VauHandshakeError("M3 for a channel that already completed its handshake")
            try:
                obj = _message(m3, "M3")
                inner_ct = _field(obj, "AEAD_ct", bytes, "M3")
                kc_ct = _field(obj, "AEAD_ct_key_confirmation", bytes, "M3")
                inner = _cbor_map(aead_decrypt(ch.k1.c2s, inner_ct, "M3 AEAD_ct"), "M3 inner layer")
                peer = ecdh_key_from_cbor(_field(inner, "ECDH_ct", dict, "M3 inner layer"), "M3 ECDH_ct")
                ss_s_ecdh = self.keys.ecdh.exchange(ec.ECDH(), peer)
                ss_s_kyber = self.keys.kyber.decapsulate(
                    _field(inner, "Kyber768_ct", bytes, "M3 inner layer")
                )
                for flag in ("ERP", "ESO"):
                    _field(inner, flag, bool, "M3 inner layer")
                keys = ChannelKeys.derive(ch.ss_e[0], ch.ss_e[1], ss_s_ecdh, ss_s_kyber)
                got = aead_decrypt(keys.c2s_key_confirmation, kc_ct, "M3 AEAD_ct_key_confirmation")
                want = hashlib.sha256(ch.m1 + ch.m2 + inner_ct).digest()
                if not hmac.compare_digest(got, want):
                    raise VauHandshakeError("M3 key confirmation failed: client transcript hash differs")
            except Exception:
                self._drop(cid)
                raise
            m4 = cbor2.dumps(
                {
                    "MessageType": "M4",
                    "AEAD_ct_key_confirmation": aead_encrypt(
                        keys.s2c_key_confirmation, hashlib.sha256(ch.m1 + ch.m2 + m3).digest()
                    ),
                }
            )
            ch.keys, ch.established = keys, True
            ch.m1 = ch.m2 = b""
            ch.k1 = _K1(b"", b"")
            ch.ss_e = (b"", b"")
        return m4

    def open_request(self, cid: str, msg: bytes) -> tuple[int, bytes]:
        """Decrypt a client request (A_24628-01, A_24629); returns ``(request counter, plaintext)``.

        Raises:
            VauChannelUnknownError: no established channel under ``cid``.
            VauFormatError: malformed header, PU flag of the other environment, or not a request.
            VauKeyIdError: the KeyID is not this channel's.
            VauDecryptionError: tampered message.
            VauCounterError: the request counter was used before or is too old for the window.
        """
        ch = self._get(cid)
        if not ch.established or ch.keys is None:
            raise VauChannelUnknownError("VAU channel has not completed its handshake")
        header = UserDataHeader.expect(msg, pu=self.pu, direction=DIRECTION_REQUEST, key_id=ch.keys.key_id)
        _, pt = open_user_data(ch.keys.c2s_app_data, msg)
        with ch.lock:
            self._accept_counter(ch, header.counter)
        return header.counter, pt

    @staticmethod
    def _accept_counter(ch: _Channel, n: int) -> None:
        if n == 0:
            raise VauCounterError("request counter 0 is never valid (the client starts at 1)")
        if n > ch.max_seen:
            shift = n - ch.max_seen
            ch.window = (
                ((ch.window << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            )
            ch.max_seen = n
            return
        age = ch.max_seen - n
        if age >= REPLAY_WINDOW:
            raise VauCounterError(
                f"request counter {n} is older than the replay window (highest {ch.max_seen})"
            )
        if ch.window >> age & 1:
            raise VauCounterError(f"request counter {n} was already used (replayed request refused)")
        ch.window |= 1 << age

    def seal_response(self, cid: str, request_counter: int, plaintext: bytes) -> bytes:
        """Encrypt the answer to request ``request_counter`` under ``K2_s2c_app_data``.

        Raises:
            VauChannelUnknownError: no established channel under ``cid``.
        """
        ch = self._get(cid)
        if not ch.established or ch.keys is None:
            raise VauChannelUnknownError("VAU channel has not completed its handshake")
        with ch.lock:
            ch.enc_counter += 1
            enc = ch.enc_counter
        header = UserDataHeader(self.pu, DIRECTION_RESPONSE, request_counter, ch.keys.key_id)
        return seal_user_data(ch.keys.s2c_app_data, header, plaintext, encryption_counter=enc)


