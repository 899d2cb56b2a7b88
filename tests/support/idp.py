"""A test identity provider: its own signing key, tokens shaped like the gematik IdP's."""

from __future__ import annotations

import time
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

import safehold.erezept.tokens  # noqa: F401 - registers BP256R1 with joserfc

ISSUER = "https://idp.safehold.test"
OIDS = {
    "arzt": "1.2.276.0.76.4.30",
    "praxis": "1.2.276.0.76.4.50",
    "zahnarzt": "1.2.276.0.76.4.31",
    "apotheke": "1.2.276.0.76.4.54",
    "versicherter": "1.2.276.0.76.4.49",
    "psychotherapeut": "1.2.276.0.76.4.46",  # no E-Rezept role here
}


class TestIdp:
    """Issues access tokens signed with a fresh key (ES256 on P-256, or BP256R1 like gematik)."""

    __test__ = False

    def __init__(self, alg: str = "ES256", issuer: str = ISSUER):
        curve = ec.BrainpoolP256R1() if alg == "BP256R1" else ec.SECP256R1()
        self.alg = alg
        self.issuer = issuer
        self.private_key = ec.generate_private_key(curve)
        self.public_key = self.private_key.public_key()
        self._jwk = ECKey.import_key(self.private_key)

    def token(
        self,
        kind: str,
        id_number: str,
        *,
        sub: str | None = None,
        lifetime: int = 300,
        now: float | None = None,
        **extra: Any,
    ) -> str:
        t = int(time.time() if now is None else now)
        claims = {
            "iss": self.issuer,
            "sub": sub or f"sub-{id_number}",
            "iat": t,
            "nbf": t,
            "exp": t + lifetime,
            "professionOID": OIDS[kind],
            "idNummer": id_number,
            "acr": "gematik-ehealth-loa-high",
            "jti": uuid.uuid4().hex,
            **extra,
        }
        return jwt.encode({"alg": self.alg, "typ": "at+JWT"}, claims, self._jwk, algorithms=[self.alg])
