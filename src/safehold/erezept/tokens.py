"""IdP access tokens for the E-Rezept Fachdienst: signature, time and issuer checks, then roles.

Access tokens are compact JWS (RFC 7515 / RFC 7519) issued by an identity provider whose signing
key the operator configures. The gematik IdP signs with brainpoolP256r1 (JWS ``alg`` ``BP256R1``,
JWK ``crv`` ``BP-256``); other issuers use ES256. Both are accepted; joserfc does the JOSE work,
with the brainpool curve registered as an ECDSA-SHA256 variant.

Claims used (gemSpec_IDP_Dienst): ``professionOID`` (the role), ``idNummer`` (KVNR for insured
persons, Telematik-ID for institutions), ``sub``, ``iss``, ``exp``, ``iat``, ``nbf``; ``aud``
when an audience is configured. Roles (gemSpec_OID profession OIDs):

* prescriber: oid_arzt 1.2.276.0.76.4.30, oid_zahnarzt .31, oid_praxis_arzt .50,
  oid_zahnarztpraxis .51, oid_krankenhaus .53
* pharmacy: oid_oeffentliche_apotheke 1.2.276.0.76.4.54, oid_krankenhausapotheke .55
* insured: oid_versicherter 1.2.276.0.76.4.49 (``idNummer`` must be a KVNR)
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwa import ESAlgorithm
from joserfc.jwk import AnyKey, ECKey
from joserfc.jws import JWSRegistry

from safehold.erezept.errors import AccessTokenError
from safehold.jsontypes import JSONObject

__all__ = ["PROFESSION_ROLES", "AccessTokenVerifier", "Principal", "Role", "kvnr_valid"]

Role = Literal["prescriber", "pharmacy", "insured"]

PROFESSION_ROLES: dict[str, Role] = {
    "1.2.276.0.76.4.30": "prescriber",  # oid_arzt
    "1.2.276.0.76.4.31": "prescriber",  # oid_zahnarzt
    "1.2.276.0.76.4.50": "prescriber",  # oid_praxis_arzt
    "1.2.276.0.76.4.51": "prescriber",  # oid_zahnarztpraxis
    "1.2.276.0.76.4.53": "prescriber",  # oid_krankenhaus
    "1.2.276.0.76.4.54": "pharmacy",  # oid_oeffentliche_apotheke
    "1.2.276.0.76.4.55": "pharmacy",  # oid_krankenhausapotheke
    "1.2.276.0.76.4.49": "insured",  # oid_versicherter
}

_KVNR = re.compile(r"[A-Z][0-9]{9}")
_ALGORITHMS = ("ES256", "BP256R1")

# The gematik IdP's brainpoolP256r1 JWS algorithm, registered once with joserfc.
if "BP-256" not in ECKey.binding._dss_curves:
    ECKey.binding.register_curve("BP-256", ec.BrainpoolP256R1)
if "BP256R1" not in JWSRegistry.algorithms:
    JWSRegistry.register(ESAlgorithm("BP256R1", "BP-256", 256))


def kvnr_valid(kvnr: str) -> bool:
    """True for a 10-character KVNR (unchangeable part of the Krankenversichertennummer) whose
    check digit is right: letter → 01..26, then weights 1,2,1,2… over the 10 digits, digit sums
    of the products, sum mod 10 = the last digit."""
    if not isinstance(kvnr, str) or not _KVNR.fullmatch(kvnr):
        return False
    digits = f"{ord(kvnr[0]) - 64:02d}" + kvnr[1:9]
    total = 0
    for i, c in enumerate(digits):
        p = int(c) * (1 if i % 2 == 0 else 2)
        total += p // 10 + p % 10
    return total % 10 == int(kvnr[9])


@dataclass(frozen=True)
class Principal:
    """The caller as the access token describes it.

    Attributes:
        role: prescriber, pharmacy or insured.
        sub: the token's subject.
        id_number: ``idNummer`` — the KVNR of an insured person, else the Telematik-ID.
        profession_oid: the ``professionOID`` claim.
    """

    role: Role
    sub: str
    id_number: str
    profession_oid: str

    def __repr__(self) -> str:
        return f"Principal(role={self.role!r}, profession_oid={self.profession_oid!r})"


class AccessTokenVerifier:
    """Verifies IdP access tokens and maps them to a :class:`Principal`.

    Args:
        keys: the IdP's public signing keys (cryptography EC public keys on P-256 or
            brainpoolP256r1, or JWK dicts); at least one.
        issuer: required ``iss``.
        audience: required ``aud`` (string or in the list), or None to not check it.
        leeway: seconds of clock skew tolerated on ``exp`` / ``nbf`` / ``iat``.
        max_lifetime: longest ``exp - iat`` accepted, seconds (gematik tokens live 300 s).
        clock: seconds since the epoch.
        cache_size: verified tokens remembered (by SHA-256 of the token string) so a token used
            for many requests is signature-checked once; time claims are re-checked on every
            use. 0 disables the cache.

    Raises (constructor):
        ValueError: no key, or a key of an unsupported type.
    """

    def __init__(
        self,
        keys: Iterable[AnyKey | EllipticCurvePublicKey],
        *,
        issuer: str,
        audience: str | None = None,
        leeway: int = 30,
        max_lifetime: int = 86_400,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ):
        self._keys = []
        for k in keys:
            key = ECKey.import_key(k)
            if key.curve_name not in ("P-256", "BP-256"):
                raise ValueError(f"IdP key curve {key.curve_name} is not supported (P-256 or BP-256)")
            self._keys.append(key)
        if not self._keys:
            raise ValueError("at least one IdP signing key is needed")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self._clock = clock
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AccessTokenVerifier(issuer={self.issuer!r}, keys={len(self._keys)})"

    def claims(self, token: str) -> JSONObject:
        """Verify ``token`` and return its claims.

        Raises:
            AccessTokenError: malformed, unknown algorithm, bad signature, expired, not yet
                valid, wrong issuer or audience, or missing ``sub`` / ``exp`` / ``iat``.
        """
        if not isinstance(token, str) or token.count(".") != 2:
            raise AccessTokenError("access token is not a compact JWS")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            self._check_time(cached)
            return dict(cached)
        decoded = None
        for key in self._keys:
            alg = "BP256R1" if key.curve_name == "BP-256" else "ES256"
            try:
                decoded = jwt.decode(token, key, algorithms=[alg])
                break
            except (JoseError, ValueError):
                continue
        if decoded is None:
            raise AccessTokenError("access token signature does not verify under the configured IdP keys")
        c: Mapping[str, Any] = decoded.claims
        for name in ("exp", "iat"):
            if not isinstance(c.get(name), int | float) or isinstance(c.get(name), bool):
                raise AccessTokenError(f"access token lacks a numeric {name!r} claim")
        self._check_time(c)
        if c["exp"] - c["iat"] > self.max_lifetime:
            raise AccessTokenError("access token lifetime exceeds the configured maximum")
        if c.get("iss") != self.issuer:
            raise AccessTokenError("access token is from another issuer")
        if self.audience is not None:
            aud = c.get("aud")
            if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
                raise AccessTokenError("access token is for another audience")
        if not isinstance(c.get("sub"), str) or not c["sub"]:
            raise AccessTokenError("access token lacks 'sub'")
        if self.cache_size > 0:
            with self._lock:
                self._cache[digest] = dict(c)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return dict(c)

    def _check_time(self, c: Mapping[str, Any]) -> None:
        now = self._clock()
        if c["exp"] + self.leeway < now:
            raise AccessTokenError("access token has expired")
        if "nbf" in c and (not isinstance(c["nbf"], int | float) or c["nbf"] - self.leeway > now):
            raise AccessTokenError("access token is not yet valid (nbf)")
        if c["iat"] - self.leeway > now:
            raise AccessTokenError("access token is issued in the future (iat)")

    def principal(self, token: str) -> Principal:
        """Verify ``token`` and derive the caller's role.

        Raises:
            AccessTokenError: as :meth:`claims`, or ``professionOID`` / ``idNummer`` missing,
                unknown, or (insured) ``idNummer`` not a KVNR.
        """
        c = self.claims(token)
        oid = c.get("professionOID")
        role = PROFESSION_ROLES.get(oid) if isinstance(oid, str) else None
        if role is None or not isinstance(oid, str):
            raise AccessTokenError("access token professionOID grants no E-Rezept role")
        idn = c.get("idNummer")
        if not isinstance(idn, str) or not idn:
            raise AccessTokenError("access token lacks 'idNummer'")
        if role == "insured" and not _KVNR.fullmatch(idn):
            raise AccessTokenError("access token idNummer of an insured person is not a KVNR")
        sub = c["sub"]
        if not isinstance(sub, str):  # claims() checked it; kept for the type
            raise AccessTokenError("access token lacks 'sub'")
        return Principal(role, sub, idn, oid)
