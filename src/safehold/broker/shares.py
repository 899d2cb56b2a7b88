"""Recovery shares of the broker's master key: split k-of-n, encrypt to recovery keys, decrypt,
combine, and the master-key fingerprint that anchors a recovery.

A share is ``0x00 || master`` (threshold 1: every key holder gets the whole key) or
``0x01 || Shamir share`` (pyshamir, GF(256)). Each is sent to one recovery key holder as a
compact JWE (RFC 7516, ``RSA-OAEP-256`` + ``A256GCM``) of
``{"share": base64url, "key": <key name>, "threshold": k}``; the recovery record is
``{"threshold": k, "shares": {key name: JWE}}`` (stored as ``m/recovery``, see
:mod:`safehold.broker.state`).

Used by the broker (:meth:`~safehold.broker.state.BrokerState.recover`) and by the recovery
client (``safehold broker recover``), which combines the shares itself first and refuses to
send them if the fingerprint differs from the recorded one.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pyshamir
from cryptography.hazmat.primitives import serialization
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from safehold.broker.errors import RecoveryError
from safehold.broker.protocol import b64url, unb64url

#: Length of the master key, bytes.
MASTER_KEY_LEN = 32
#: Length of a master-key fingerprint, hex digits.
FINGERPRINT_HEX_LEN = 32
_SHARE_ALG = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
_FINGERPRINT_INFO = b"safehold/v1/master-fingerprint"


def master_fingerprint(master: bytes) -> str:
    """The master key's fingerprint: the first 16 bytes of
    ``HMAC-SHA256(master, "safehold/v1/master-fingerprint")`` (RFC 2104) as 32 lowercase hex.

    Safe to show: it reveals nothing about the key, and forging another key with the same
    fingerprint is a 128-bit second preimage of HMAC-SHA256.
    """
    mac = hmac.new(master, _FINGERPRINT_INFO, hashlib.sha256).hexdigest()
    return mac[:FINGERPRINT_HEX_LEN]


def normalize_fingerprint(text: object) -> str:
    """A written-down fingerprint → 32 lowercase hex (spaces, ``-`` and ``:`` are ignored).

    Raises:
        RecoveryError: missing, or not 32 hex digits.
    """
    if not isinstance(text, str):
        raise RecoveryError("expect_fingerprint: the recorded master-key fingerprint (32 hex) is required")
    fp = "".join(c for c in text if c not in " -:").lower()
    if len(fp) != FINGERPRINT_HEX_LEN or any(c not in "0123456789abcdef" for c in fp):
        raise RecoveryError(
            f"expect_fingerprint: expected {FINGERPRINT_HEX_LEN} hex digits, got {len(fp)} characters"
        )
    return fp


def recovery_record(master: bytes, keys: dict[str, str], threshold: int) -> bytes:
    """Split ``master`` k-of-n and encrypt one share to each recovery key: the recovery record
    ``{"threshold": k, "shares": {key name: JWE}}`` as JSON bytes.

    Args:
        master: the 32-byte master key.
        keys: recovery key name → RSA public key PEM (>= 3072 bits, checked by the manifest).
        threshold: k, 1..len(keys).

    Raises:
        ValueError: no keys.
    """
    if not keys:
        raise ValueError("recovery needs at least one key")
    names = sorted(keys)
    if threshold == 1 or len(names) == 1:
        shares = [bytes([0]) + master for _ in names]
    else:
        shares = [bytes([1]) + bytes(p) for p in pyshamir.split(master, len(names), threshold)]
    out: dict[str, str] = {}
    for name, share in zip(names, shares, strict=True):
        jwk = RSAKey.import_key(keys[name].encode())
        payload = json.dumps({"share": b64url(share), "key": name, "threshold": threshold}).encode()
        out[name] = jwe.encrypt_compact(dict(_SHARE_ALG), payload, jwk, algorithms=list(_SHARE_ALG.values()))
    return json.dumps({"threshold": threshold, "shares": out}).encode()


def decrypt_share(jwe_compact: str, private_key_pem: bytes) -> bytes:
    """Decrypt one recovery share JWE with a recovery private key (PEM, unencrypted).

    Returns:
        The share bytes to hand to :func:`combine_shares` /
        :meth:`~safehold.broker.state.BrokerState.recover`.

    Raises:
        RecoveryError: the key cannot be loaded or does not decrypt this share.
    """
    try:
        serialization.load_pem_private_key(private_key_pem, password=None)
        key = RSAKey.import_key(private_key_pem)
        obj = jwe.decrypt_compact(jwe_compact, key, algorithms=[_SHARE_ALG["alg"], _SHARE_ALG["enc"]])
        payload = json.loads(obj.plaintext or b"")
        return unb64url(payload["share"])
    except (JoseError, ValueError, KeyError, TypeError) as e:
        raise RecoveryError(f"recovery share does not decrypt with this key ({type(e).__name__})") from None


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    """Combine decrypted recovery shares (as :func:`decrypt_share` returns them) into the
    32-byte master key.

    Raises:
        RecoveryError: fewer than ``threshold`` distinct shares, malformed shares, shares that do
            not combine, or a result of the wrong length. (Wrong shares of the right shape
            combine to a wrong key: check it with :func:`master_fingerprint`.)
    """
    distinct = list({bytes(s) for s in shares})
    if len(distinct) < threshold or not distinct:
        raise RecoveryError(f"recovery needs {threshold} distinct shares, got {len(distinct)}")
    if any(len(s) < 2 or s[0] not in (0, 1) for s in distinct):
        raise RecoveryError("a recovery share is malformed")
    if distinct[0][0] == 0:
        master = distinct[0][1:]
    else:
        try:
            master = bytes(pyshamir.combine([bytearray(s[1:]) for s in distinct]))
        except ValueError as e:
            raise RecoveryError(f"recovery shares do not combine: {e}") from None
    if len(master) != MASTER_KEY_LEN:
        raise RecoveryError("recovered master key has the wrong length")
    return master
