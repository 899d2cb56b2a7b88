"""Attestation Results as EAR (draft-ietf-rats-ear, "EAT Attestation Results") JWTs.

The Verifier signs, a Relying Party (key broker, client SDK) checks. Token = JWT (RFC 7519)
signed ES256 (ECDSA P-256 / SHA-256, RFC 7518 §3.4) with claims::

    {
      "eat_profile": "tag:github.com,2023:veraison/ear",
      "iat": 1764460800, "exp": 1764461100,                  # exp: RFC 7519 §4.1.4
      "eat_nonce": "<base64url>",                             # optional, RFC 9711 §4.1
      "ear.verifier-id": {"developer": "https://safehold.dev", "build": "safehold 0.1.0"},
      "submods": {
        "<name, e.g. the TEE type>": {
          "ear.status": "affirming" | "warning" | "contraindicated",
          "ear.trustworthiness-vector": {"executables": 2, "hardware": 2},   # AR4SI
          "ear.appraisal-policy-id": "<policy name>",
          "ear.veraison.annotated-evidence": {<claims, bytes as hex>},
          "ear.safehold.appraisal": [[claim, expected, got, ok], ...]
        }
      }
    }

Status: ``affirming`` when every claim passed on hardware; ``warning`` when every claim passed
but the TEE is the simulated one or runs in debug mode (not hardware-protected); and
``contraindicated`` when any claim failed.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from safehold import __version__
from safehold.attestation.verifier import VERIFIER_DEVELOPER, Appraisal
from safehold.errors import AttestationResultError

EAT_PROFILE = "tag:github.com,2023:veraison/ear"
STATUSES = ("affirming", "warning", "contraindicated")
DEFAULT_TTL = 300
MAX_TOKEN_CHARS = 64 * 1024
#: AR4SI trustworthiness claim values (draft-ietf-rats-ar4si §2.3).
_TV_APPROVED, _TV_WARNING, _TV_UNRECOGNISED = 2, 32, 33


def generate_signing_key() -> ec.EllipticCurvePrivateKey:
    """A fresh Verifier signing key (ECDSA P-256, for ES256)."""
    return ec.generate_private_key(ec.SECP256R1())


def status_of(appraisal: Appraisal) -> str:
    """The EAR status for an appraisal (see module docstring)."""
    if not appraisal.ok:
        return "contraindicated"
    if appraisal.claims.tee_type == "simulated" or appraisal.claims.debug:
        return "warning"
    return "affirming"


def _eckey(key: Any, *, private: bool) -> ECKey:
    if isinstance(key, ECKey):
        k = key
    elif isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        k = ECKey.import_key(key)
    else:
        raise AttestationResultError(f"EAR key: expected an EC P-256 key, got {type(key).__name__}")
    if k.curve_name != "P-256":
        raise AttestationResultError(f"EAR key: expected curve P-256 (ES256), got {k.curve_name}")
    if private and not k.is_private:
        raise AttestationResultError("EAR signing needs the private key")
    return k


def issue_ear(appraisal: Appraisal, signing_key: ec.EllipticCurvePrivateKey | ECKey, *,
              submod: str | None = None, nonce: bytes | None = None, ttl: int = DEFAULT_TTL,
              now: int | None = None, verifier_build: str = f"safehold {__version__}") -> str:
    """Sign an EAR JWT for ``appraisal``.

    Args:
        appraisal: the Verifier's appraisal (a failed one gives ``contraindicated``).
        signing_key: the Verifier's ES256 private key (P-256).
        submod: submodule name (default: the TEE type).
        nonce: Relying Party nonce echoed as ``eat_nonce`` (8..64 bytes, RFC 9711 §4.1).
        ttl: seconds until ``exp``.
        now: issue time, Unix seconds (tests pin it).

    Returns:
        The compact JWS string.

    Raises:
        AttestationResultError: wrong key type, bad nonce length or ttl.
    """
    k = _eckey(signing_key, private=True)
    if ttl <= 0:
        raise AttestationResultError(f"EAR ttl must be positive, got {ttl}")
    iat = int(time.time()) if now is None else int(now)
    c = appraisal.claims
    status = status_of(appraisal)
    meas_ok = all(v.ok for v in appraisal.verdicts if v.claim in ("measurement", "signer"))
    hw = _TV_APPROVED if status == "affirming" else (
        _TV_WARNING if status == "warning" else _TV_UNRECOGNISED)
    sub = {
        "ear.status": status,
        "ear.trustworthiness-vector": {
            "executables": _TV_APPROVED if meas_ok else _TV_UNRECOGNISED,
            "hardware": hw,
        },
        "ear.appraisal-policy-id": appraisal.policy_name,
        "ear.veraison.annotated-evidence": c.as_dict(),
        "ear.safehold.appraisal": [[v.claim, v.expected, v.got, v.ok] for v in appraisal.verdicts],
    }
    claims: dict[str, Any] = {
        "eat_profile": EAT_PROFILE,
        "iat": iat,
        "exp": iat + int(ttl),
        "ear.verifier-id": {"developer": VERIFIER_DEVELOPER, "build": verifier_build},
        "submods": {submod or c.tee_type: sub},
    }
    if nonce is not None:
        if not 8 <= len(nonce) <= 64:
            raise AttestationResultError(f"eat_nonce must be 8..64 bytes, got {len(nonce)}")
        claims["eat_nonce"] = base64.urlsafe_b64encode(nonce).rstrip(b"=").decode("ascii")
    try:
        return jwt.encode({"alg": "ES256", "typ": "JWT"}, claims, k, algorithms=["ES256"])
    except (JoseError, TypeError, ValueError) as e:
        raise AttestationResultError(f"cannot sign EAR: {e}") from None


def verify_ear(token: str | bytes, issuer_public_key: ec.EllipticCurvePublicKey | ECKey, *,
               now: int | None = None, expected_nonce: bytes | None = None,
               accept_warning: bool = False, leeway: int = 0) -> dict[str, Any]:
    """Verify an EAR JWT as a Relying Party and return its claims.

    Checks, in order: ES256 signature under ``issuer_public_key``; ``eat_profile``; ``iat``/``exp``
    (with ``leeway`` seconds); ``ear.verifier-id``; ``eat_nonce`` when ``expected_nonce`` is
    given; every ``submods.*.ear.status`` is ``affirming`` (or ``warning`` when
    ``accept_warning``).

    Raises:
        AttestationResultError: garbled token, wrong algorithm, signature by another key,
            expired or not yet valid, missing/invalid claims, wrong nonce, or a non-affirming
            status (the message names the submodule and status).
    """
    k = _eckey(issuer_public_key, private=False)
    if isinstance(token, bytes | bytearray):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise AttestationResultError("EAR token is not ASCII") from None
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise AttestationResultError("EAR token is empty, not text, or too large")
    try:
        tok = jwt.decode(token, k, algorithms=["ES256"])
    except JoseError as e:
        raise AttestationResultError(
            f"EAR token rejected: {e.error} (tampered, garbled, or signed by another key)"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise AttestationResultError(f"EAR token is malformed: {type(e).__name__}") from None
    if tok.header.get("alg") != "ES256":
        raise AttestationResultError(f"EAR alg: expected ES256, got {tok.header.get('alg')!r}")
    cl = tok.claims
    if not isinstance(cl, Mapping):
        raise AttestationResultError("EAR claims are not a JSON object")
    if cl.get("eat_profile") != EAT_PROFILE:
        raise AttestationResultError(
            f"EAR eat_profile: expected {EAT_PROFILE!r}, got {cl.get('eat_profile')!r:.80}"
        )
    t = int(time.time()) if now is None else int(now)
    iat, exp = cl.get("iat"), cl.get("exp")
    for name, v in (("iat", iat), ("exp", exp)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise AttestationResultError(f"EAR {name}: expected an integer, got {v!r:.40}")
    assert isinstance(iat, int) and isinstance(exp, int)
    if iat > t + leeway:
        raise AttestationResultError(f"EAR iat: issued in the future ({iat} > now {t})")
    if exp < t - leeway:
        raise AttestationResultError(f"EAR exp: expired at {exp}, now {t}")
    vid = cl.get("ear.verifier-id")
    if not isinstance(vid, Mapping) or not vid.get("developer") or not vid.get("build"):
        raise AttestationResultError("EAR ear.verifier-id: expected {developer, build}")
    if expected_nonce is not None:
        want = base64.urlsafe_b64encode(expected_nonce).rstrip(b"=").decode("ascii")
        if cl.get("eat_nonce") != want:
            raise AttestationResultError(
                f"EAR eat_nonce: expected {want}, got {cl.get('eat_nonce')!r:.100}"
            )
    subs = cl.get("submods")
    if not isinstance(subs, Mapping) or not subs:
        raise AttestationResultError("EAR submods: expected a non-empty object")
    ok_status = ("affirming", "warning") if accept_warning else ("affirming",)
    for name, sub in subs.items():
        st = sub.get("ear.status") if isinstance(sub, Mapping) else None
        if st not in STATUSES:
            raise AttestationResultError(f"EAR submods.{name}.ear.status: invalid value {st!r:.40}")
        if st not in ok_status:
            raise AttestationResultError(
                f"EAR submods.{name}.ear.status: expected {' or '.join(ok_status)}, got {st}"
            )
    return dict(cl)
