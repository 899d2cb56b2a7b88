"""The VAU's half of the E-Rezept channel (gemSpec_Krypt A_20161-01, A_20163, A_20174,
A_20175; wire format in :mod:`safehold.vau.erp`): open a request with the VAU's keys, refuse a
replayed request-id (:class:`RequestIdCache`), seal the response. Framework-free; the HTTP route
is :mod:`safehold.vau.http`."""

from __future__ import annotations

import heapq
import hmac
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from safehold.vau.erp import CURVE, InnerRequest, ecies_decrypt, encrypt_response
from safehold.vau.errors import (
    VauAccessTokenError,
    VauCapacityError,
    VauFormatError,
    VauReplayError,
)
from safehold.vau.httpmsg import HttpRequest, HttpResponse, parse_request
from safehold.vau.pseudonym import PseudonymService

__all__ = [
    "ErpVau",
    "OpenedRequest",
    "RequestIdCache",
]

# --- replay cache --------------------------------------------------------------------------


class RequestIdCache:
    """Request-ids seen by this VAU, each kept until its access token expires.

    Args:
        capacity: most ids held at once; when full (after dropping expired ones) new requests
            are refused with :class:`VauCapacityError` rather than forgetting live ids.
        max_ttl: seconds an id is kept at most, whatever the token's ``exp`` says.
        clock: seconds since the epoch.

    Thread-safe. Ids are compared case-insensitively.
    """

    def __init__(
        self, *, capacity: int = 1_000_000, max_ttl: float = 86_400.0, clock: Callable[[], float] = time.time
    ):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.max_ttl = max_ttl
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, request_id: str, until: float) -> None:
        """Record ``request_id`` as used until ``until`` (epoch seconds).

        Raises:
            VauReplayError: the id is already recorded and not expired.
            VauCapacityError: the cache is full of live ids.
        """
        rid = request_id.lower()
        now = self._clock()
        until = min(float(until), now + self.max_ttl)
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                exp, old = heapq.heappop(self._heap)
                if self._seen.get(old) == exp:
                    del self._seen[old]
            held = self._seen.get(rid)
            if held is not None and held > now:
                raise VauReplayError("request-id was already used (replayed VAU request refused)")
            if len(self._seen) >= self.capacity:
                raise VauCapacityError("VAU replay cache is full; request refused")
            self._seen[rid] = until
            heapq.heappush(self._heap, (until, rid))


# --- the VAU (server side) ------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedRequest:
    """A request the VAU has decrypted and authorised.

    Attributes:
        inner: the parsed inner request (token, request-id, response key, HTTP bytes).
        http: the inner HTTP request, parsed.
        claims: the verified access-token claims.
        pnp: the pre-user pseudonym (hex AES-CMAC of ``sub``).
        user_pseudonym: the value for the outer ``Userpseudonym`` response header.
    """

    inner: InnerRequest
    http: HttpRequest
    claims: Mapping[str, Any]
    pnp: str
    user_pseudonym: str

    def __repr__(self) -> str:
        return f"OpenedRequest({self.http.method} {self.http.target}, request_id={self.inner.request_id!r})"


TokenVerifier = Callable[[str], Mapping[str, Any]]


class ErpVau:
    """The E-Rezept VAU: opens requests, seals responses (A_20163), issues pseudonyms (A_20162).

    Args:
        private_keys: brainpoolP256r1 ECIES keys, current first, then fallbacks (rotation).
        token_verifier: verifies a compact JWS access token against the IdP key and returns its
            claims (must include ``sub`` and ``exp``); raises anything on failure
            (A_20163 step 4).
        pseudonyms: the PNP / Userpseudonym keys.
        replay: request-id cache; a fresh one by default.
        clock: seconds since the epoch.

    Raises (constructor):
        VauFormatError: a key is not on brainpoolP256r1.
    """

    def __init__(
        self,
        private_keys: Sequence[ec.EllipticCurvePrivateKey],
        *,
        token_verifier: TokenVerifier,
        pseudonyms: PseudonymService | None = None,
        replay: RequestIdCache | None = None,
        clock: Callable[[], float] = time.time,
    ):
        keys = list(private_keys)
        if not keys:
            raise VauFormatError("at least one VAU private key is needed")
        for k in keys:
            if not isinstance(k, ec.EllipticCurvePrivateKey) or not isinstance(k.curve, CURVE):
                raise VauFormatError("VAU private keys must be EC keys on brainpoolP256r1")
        self._keys = keys
        self._verify = token_verifier
        self.pseudonyms = pseudonyms if pseudonyms is not None else PseudonymService.generate(clock=clock)
        self.replay = replay if replay is not None else RequestIdCache(clock=clock)
        self._clock = clock

    def __repr__(self) -> str:
        return f"ErpVau(keys={len(self._keys)}, <secret>)"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The current VAU public key (the one its certificate carries)."""
        return self._keys[0].public_key()

    def open(self, pseudonym: str, body: bytes) -> OpenedRequest:
        """Process an outer ``POST /VAU/<pseudonym>`` up to the inner HTTP request.

        Order: pseudonym shape and web-interface CMAC (A_20162) → ECIES decryption (A_20163
        step 2) → inner request structure (step 3) → access token (step 4) and its match with the
        inner ``Authorization`` header → the pseudonym belongs to this token's user → request-id
        not seen before (then recorded).

        Raises:
            VauPseudonymError: the path pseudonym is malformed, forged, or another user's.
            VauFormatError / VauDecryptionError / VauInnerRequestError: as the steps above.
            VauAccessTokenError: token invalid or expired, or the inner ``Authorization``
                header carries another token.
            VauReplayError: the request-id was used before.
            VauCapacityError: the replay cache is full.
        """
        claimed_pnp = self.pseudonyms.check_path(pseudonym)
        inner = InnerRequest.parse(ecies_decrypt(self._keys, body))
        http = parse_request(inner.http_request)
        try:
            claims = self._verify(inner.access_token)
        except Exception as e:  # noqa: BLE001 - any verifier failure is an invalid token
            raise VauAccessTokenError(f"access token refused: {e}") from None
        auth = http.header("authorization")
        if auth is None or auth != "Bearer " + inner.access_token:
            raise VauAccessTokenError(
                "inner Authorization header does not carry the token of the VAU request"
            )
        sub = claims.get("sub")
        exp = claims.get("exp")
        if not isinstance(sub, str) or not sub or not isinstance(exp, int | float):
            raise VauAccessTokenError("access token lacks 'sub' or 'exp'")
        pnp = self.pseudonyms.pnp(sub)
        # Equal: issued under the current key, nothing more to check (saves a CMAC per request).
        if claimed_pnp is not None and not hmac.compare_digest(claimed_pnp, pnp):
            self.pseudonyms.check_owner(claimed_pnp, sub)
        self.replay.add(inner.request_id, float(exp))
        return OpenedRequest(inner, http, claims, pnp, self.pseudonyms.user_pseudonym(pnp))

    def seal(self, opened: OpenedRequest, response: HttpResponse | bytes) -> bytes:
        """Encrypt the inner HTTP response under the client's response key with its request-id."""
        raw = response.encode() if isinstance(response, HttpResponse) else bytes(response)
        return encrypt_response(opened.inner.response_key, opened.inner.request_id, raw)

