"""Wire shapes of the KBS protocol (Trustee RCAR) as Safehold speaks it; used by both sides.

Request–Challenge–Attestation–Response (confidential-containers/trustee,
``docs/kbs_attestation_protocol.md``):

1. ``POST /kbs/v0/auth``  body *Request* ``{"version": "0.1.0", "tee": "<tee>", "extra-params": {}}``
   → *Challenge* ``{"nonce": "<base64url, 32 random bytes>", "extra-params": {}}`` and the
   cookie ``kbs-session-id``. ``extra-params.workload`` may name the manifest workload to
   appraise against (otherwise every workload is tried).
2. ``POST /kbs/v0/attest`` body *Attestation* ``{"tee-pubkey": <JWK>, "tee-evidence": <CMW>}``.
   The Evidence's report_data must be :func:`report_data` of *runtime-data*
   ``{"nonce": <challenge nonce>, "tee-pubkey": <the same JWK>}`` = SHA-256 of its canonical JSON
   (RFC 8785 subset), zero-padded to 64 bytes. → ``{"token": "<EAR JWT>"}``.
3. ``GET /kbs/v0/resource/<repository>/<type>/<tag>`` with the cookie or
   ``Authorization: Bearer <EAR>`` → the resource as a JWE in flattened JSON serialisation
   (RFC 7516 §7.2.2) encrypted to ``tee-pubkey``: ``ECDH-ES+A256KW`` for EC keys,
   ``RSA-OAEP-256`` for RSA keys, content encryption ``A256GCM``.

``tee-pubkey`` is a public JWK (RFC 7517): EC P-256 / P-384 or RSA >= 2048 bits.

Released resources: a ``keyset`` secret travels as :func:`keyset_to_json` (read back with
:func:`keyset_from_json`); ``value`` secrets as their bytes; a ``certificate`` as
``{"certificate": PEM, "ca": PEM}``.

This module is the only part of :mod:`safehold.broker` the workload SDK
(:mod:`safehold.client.broker`) imports, so it depends on nothing but lower layers
(``safehold.crypto``, ``safehold.errors``) and joserfc.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import cast

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from safehold.crypto.keyset import Keyset
from safehold.errors import BrokerError, ManifestError, SafeholdError
from safehold.errors import JWKError as JWKError  # re-exported: callers catch protocol.JWKError
from safehold.jsontypes import JSONObject

PROTOCOL_VERSION = "0.1.0"
SESSION_COOKIE = "kbs-session-id"
#: KBS ``tee`` names (Trustee) → Safehold TEE types (claims.TEE_TYPES); Safehold names pass through.
TEE_NAMES = {"intel-sgx": "sgx", "sgx": "sgx", "intel-tdx": "tdx", "tdx": "tdx", "amd-sev-snp": "sev-snp",
             "snp": "sev-snp", "sev-snp": "sev-snp", "simulated": "simulated", "sample": "simulated",
             "azure-sev-snp": "azure-sev-snp", "az-snp-vtpm": "azure-sev-snp",
             "azure-tdx": "azure-tdx", "az-tdx-vtpm": "azure-tdx", "tpm": "tpm"}
_JWE_ALGS = {"EC": "ECDH-ES+A256KW", "RSA": "RSA-OAEP-256"}
_ENC = "A256GCM"


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5), as JOSE uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Inverse of :func:`b64url` (padding optional).

    Raises:
        ValueError: not base64url (``binascii.Error`` is a ValueError).
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical_json(obj: object) -> bytes:
    """Serialise ``obj`` deterministically: UTF-8, sorted keys, no whitespace, no floats.

    This is the JSON Canonicalization Scheme (RFC 8785) restricted to objects, arrays, strings,
    integers, booleans and null, for which RFC 8785 reduces to sorted keys and minimal
    separators. Used for runtime-data, manifest digests and updates, and audit entries.

    Raises:
        ManifestError: the value holds a float or a non-JSON type (names where, e.g.
            ``$.tee-pubkey.x``).
    """
    def check(v: object, where: str) -> None:
        if isinstance(v, float):
            raise ManifestError(f"{where}: floating-point numbers are not allowed")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ManifestError(f"{where}: object keys must be strings")
                check(x, f"{where}.{k}")
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]")
        elif v is not None and not isinstance(v, str | int | bool):
            raise ManifestError(f"{where}: {type(v).__name__} is not a JSON value")

    check(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- KBS messages (what the workload sends) ----------------------------------------------------


def auth_request(tee: str, workload: str | None = None) -> JSONObject:
    """The KBS *Request* body for ``POST /kbs/v0/auth``; ``workload`` goes into ``extra-params``."""
    return {"version": PROTOCOL_VERSION, "tee": tee,
            "extra-params": {"workload": workload} if workload else {}}


def attestation(jwk: JSONObject, evidence_cmw: str) -> JSONObject:
    """The KBS *Attestation* body for ``POST /kbs/v0/attest``: ``tee-pubkey`` and the Evidence
    as a CMW (JSON text)."""
    return {"tee-pubkey": jwk, "tee-evidence": evidence_cmw}


def certificate_request(extensions: Sequence[tuple[str, bytes]] = ()) -> JSONObject:
    """The body of ``POST /kbs/v0/certificate/<name>``: ``(OID, DER extnValue)`` pairs to copy
    into the leaf, as ``{"extensions": [{"oid", "value": base64url}]}``."""
    return {"extensions": [{"oid": oid, "value": b64url(v)} for oid, v in extensions]}


def import_tee_pubkey(jwk: object) -> ECKey | RSAKey:
    """Validate and import a ``tee-pubkey`` JWK.

    Raises:
        JWKError: not an object, a private key, an unsupported kty/curve, or RSA < 2048 bits.
    """
    if not isinstance(jwk, dict):
        raise JWKError("tee-pubkey: expected a JWK object")
    if "d" in jwk or "p" in jwk:
        raise JWKError("tee-pubkey: contains private key members; send the public key only")
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            if jwk.get("crv") not in ("P-256", "P-384"):
                raise JWKError(f"tee-pubkey: EC curve must be P-256 or P-384, got {jwk.get('crv')!r:.20}")
            key: ECKey | RSAKey = ECKey.import_key({k: jwk[k] for k in ("kty", "crv", "x", "y")})
        elif kty == "RSA":
            key = RSAKey.import_key({k: jwk[k] for k in ("kty", "n", "e")})
            if key.raw_value.key_size < 2048:
                raise JWKError("tee-pubkey: RSA keys must be at least 2048 bits")
        else:
            raise JWKError(f"tee-pubkey: kty must be EC or RSA, got {kty!r:.20}")
    except (JoseError, ValueError, KeyError, TypeError) as e:
        raise JWKError(f"tee-pubkey: not a valid {kty} public JWK ({type(e).__name__})") from None
    return key


def public_jwk(key: ECKey | RSAKey) -> JSONObject:
    """The public members of ``key`` as a JWK dict (what goes into ``tee-pubkey``)."""
    out: JSONObject = {}
    for k, v in key.as_dict(private=False).items():
        out[k] = v if isinstance(v, str) else [x for x in v]
    return out


def thumbprint(key: ECKey | RSAKey) -> bytes:
    """RFC 7638 JWK SHA-256 thumbprint, 32 bytes."""
    return unb64url(key.thumbprint())


def runtime_data(nonce: str, jwk: JSONObject) -> bytes:
    """Canonical JSON of runtime-data ``{"nonce", "tee-pubkey"}`` (what report_data hashes)."""
    return canonical_json({"nonce": nonce, "tee-pubkey": jwk})


def report_data(nonce: str, jwk: JSONObject) -> bytes:
    """The 64-byte report_data binding ``nonce`` and ``tee-pubkey``: SHA-256 of
    :func:`runtime_data`, zero-padded to 64 bytes."""
    return hashlib.sha256(runtime_data(nonce, jwk)).digest().ljust(64, b"\x00")


def recovery_report_data(broker_jwk: JSONObject) -> bytes:
    """The 64-byte report_data of the broker's own Evidence in ``GET /recovery``: SHA-256 of the
    canonical JSON of its fresh recovery key (a public JWK), zero-padded to 64 bytes."""
    return hashlib.sha256(canonical_json(broker_jwk)).digest().ljust(64, b"\x00")


def encrypt_response(plaintext: bytes, key: ECKey | RSAKey) -> JSONObject:
    """The KBS *Response*: ``plaintext`` as a flattened-JSON JWE to the TEE's public key."""
    alg = _JWE_ALGS[key.key_type]
    obj = jwe.FlattenedJSONEncryption({"alg": alg, "enc": _ENC}, plaintext)
    obj.add_recipient({"kid": key.thumbprint()}, key)  # kid: RFC 7638 thumbprint of tee-pubkey
    # joserfc's FlattenedJSONSerialization is a TypedDict of JSON strings and objects
    return cast(JSONObject, dict(jwe.encrypt_json(obj, None, algorithms=[alg, _ENC])))


def decrypt_response(response: object, private_key: ECKey | RSAKey) -> bytes:
    """Decrypt a KBS *Response* JWE with the TEE's private key.

    Raises:
        BrokerError: not a flattened JWE, or it does not decrypt with this key.
    """
    if not isinstance(response, dict):
        raise BrokerError("KBS response: expected a JWE JSON object")
    alg = _JWE_ALGS[private_key.key_type]
    try:
        obj = jwe.decrypt_json(response, private_key, algorithms=[alg, _ENC])  # type: ignore[arg-type]
    except (JoseError, ValueError, KeyError, TypeError) as e:
        raise BrokerError(f"KBS response does not decrypt with the TEE key ({type(e).__name__})") from None
    return obj.plaintext or b""


# --- released resources -------------------------------------------------------------------------


def keyset_to_json(keyset: Keyset) -> bytes:
    """The release form of a ``keyset`` secret (only ever sent inside a KBS *Response* JWE):
    ``{"type": "keyset", "primary": id, "index_key": b64url, "keys": {"<id>": b64url}}``."""
    return json.dumps({
        "type": "keyset", "primary": keyset.primary_id, "index_key": b64url(keyset.index_key),
        "keys": {str(i): b64url(keyset.key(i)) for i in keyset.ids()},
    }).encode()


def keyset_from_json(data: bytes) -> Keyset:
    """Inverse of :func:`keyset_to_json` → :class:`~safehold.crypto.keyset.Keyset`.

    Raises:
        BrokerError: malformed document (names the exception type only, never key bytes).
    """
    try:
        obj = json.loads(data)
        return Keyset({int(k): unb64url(v) for k, v in obj["keys"].items()}, int(obj["primary"]),
                      unb64url(obj["index_key"]))
    except (ValueError, KeyError, TypeError, AttributeError, SafeholdError) as e:
        raise BrokerError(f"keyset resource is malformed ({type(e).__name__})") from None
