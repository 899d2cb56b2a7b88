"""HTTP layer of contact discovery: a FastAPI ``APIRouter`` with module-level routes.

==============================  ========  ============================================================
``GET  /healthz``               none      ``{"status": "ok"}``
``GET  /v1/discovery/info``     none      suite, OPRF public key (hex), limits, registrations
``POST /v1/discovery/evaluate`` query     ``{"blinded": b64(n × 32)}`` → ``{"evaluated": b64(n × 32)}``
``POST /v1/discovery/query``    query     ``{"token", "prev", "new", "discard"}`` (base64; OPRF outputs
                                          64 bytes each, token 65 bytes or "") →
                                          ``{"results": b64((|prev|+|new|) × 48), "token", "charged",
                                          "used", "limit", "reset_at"}``
``POST /v1/discovery/register``   register  ``{"entries": [{"kind", "identifier", "user_id"}],
                                          "region"?}`` → ``{"registered": n}``
``POST /v1/discovery/unregister`` register  ``{"entries": [{"kind", "identifier"}], "region"?}`` →
                                          ``{"removed": n}``
==============================  ========  ============================================================

Results are fixed-size: the body of a query answer depends only on how many identifiers were
asked (and the integers ``charged``/``used``/``reset_at``, which follow from the request and the
client's own history, never from the registry). Errors are ``{"error", "detail"}``: 400
``invalid`` / ``invalid-token``, 401/403, 413 ``too-large``, 429 ``rate-limited`` (with
``Retry-After``), 500 ``store-tampered``, 503 ``store-unavailable``.

Authentication: ``Authorization: Bearer <token>``; the SHA-256 of the token must be in the access
list (``{"<hex sha256>": {"name": ..., "roles": ["query", "register"]}}``), part of the measured
configuration. Only HTTP status codes live here (the ones both bearer-token services share in
:mod:`safehold.runtime.http`); the core raises Safehold errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from safehold.crypto.errors import DeserializeError
from safehold.discovery.core import DiscoveryService
from safehold.discovery.errors import (
    DiscoveryConfigError,
    InvalidIdentifierError,
    InvalidRequestError,
    InvalidTokenError,
    InvalidUserIdError,
    RateLimitedError,
    RegistryTamperedError,
)
from safehold.discovery.protocol import (
    ELEMENT_SIZE,
    MAX_QUERY,
    OUTPUT_SIZE,
    RESULT_SIZE,
    TOKEN_SIZE,
    pack,
    unpack,
)
from safehold.runtime.http import Principal, bearer_app, bearer_principal, error_response, require_role
from safehold.runtime.http import parse_access as _parse_access

ROLES = ("query", "register")
#: Largest request body accepted (a full query of MAX_QUERY outputs in base64, with margin).
MAX_BODY = 8 * 1024 * 1024

router = APIRouter()
#: The authenticated caller of a route (401 without a known bearer token); roles checked in the route.
Caller = Annotated[Principal, Depends(bearer_principal)]


def parse_access(data: Mapping[str, Any]) -> dict[bytes, Principal]:
    """The access list from its JSON/TOML form (:func:`safehold.runtime.http.parse_access`,
    roles :data:`ROLES`; a :class:`~safehold.runtime.http.Principal`'s name is the rate-limit
    identity).

    Raises:
        DiscoveryConfigError: not an object, a key that is not 64 hex digits, a missing name,
            an unknown role.
    """
    return _parse_access(data, ROLES, DiscoveryConfigError)


class EvaluateBody(BaseModel):
    blinded: str


class QueryBody(BaseModel):
    token: str = ""
    prev: str = ""
    new: str = ""
    discard: str = ""


class Entry(BaseModel):
    kind: str
    identifier: str
    user_id: str = ""


class EntriesBody(BaseModel):
    entries: list[Entry]
    region: str | None = None


def _service(request: Request) -> DiscoveryService:
    return request.app.state.discovery


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@router.get("/v1/discovery/info")
def info(request: Request) -> dict[str, object]:
    """Public facts about the service."""
    return _service(request).info()


@router.post("/v1/discovery/evaluate")
def evaluate(body: EvaluateBody, request: Request, who: Caller) -> dict[str, str]:
    """RFC 9497 BlindEvaluate of a batch (charged against the evaluation budget)."""
    require_role(who, "query")
    blinded = unpack(body.blinded, ELEMENT_SIZE, what="blinded")
    return {"evaluated": pack(_service(request).evaluate(who.name, blinded), ELEMENT_SIZE)}


@router.post("/v1/discovery/query")
def query(body: QueryBody, request: Request, who: Caller) -> dict[str, object]:
    """Rate-limited oblivious lookup of OPRF outputs."""
    require_role(who, "query")
    token = unpack(body.token, TOKEN_SIZE, what="token", limit=1)
    prev = unpack(body.prev, OUTPUT_SIZE, what="prev")
    new = unpack(body.new, OUTPUT_SIZE, what="new")
    discard = unpack(body.discard, OUTPUT_SIZE, what="discard", limit=MAX_QUERY)
    answer = _service(request).query(who.name, token[0] if token else None, prev, new, discard)
    c = answer.charge
    return {"results": pack(answer.results, RESULT_SIZE), "token": pack([c.token], TOKEN_SIZE),
            "charged": c.cost, "used": c.used, "limit": c.limit, "reset_at": c.reset_at}


@router.post("/v1/discovery/register")
def register(body: EntriesBody, request: Request, who: Caller) -> dict[str, int]:
    """Register identifiers → user ids."""
    require_role(who, "register")
    entries = [(e.kind, e.identifier, e.user_id) for e in body.entries]
    return {"registered": _service(request).register(entries, body.region)}


@router.post("/v1/discovery/unregister")
def unregister(body: EntriesBody, request: Request, who: Caller) -> dict[str, int]:
    """Remove registrations."""
    require_role(who, "register")
    entries = [(e.kind, e.identifier) for e in body.entries]
    return {"removed": _service(request).unregister(entries, body.region)}


# --- error mapping (the only place with status codes) ------------------------------------------


async def _on_rate(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimitedError)
    return error_response(429, "rate-limited", str(exc), {"Retry-After": str(exc.retry_after)})


def create_app(service: DiscoveryService, access: Mapping[bytes, Principal]) -> FastAPI:
    """The ASGI app: this router, the error mapping (module docstring; the shared part in
    :func:`safehold.runtime.http.bearer_app`), and ``service``/``access`` on ``app.state``."""
    invalid = (400, "invalid")
    app = bearer_app(title="Safehold contact discovery", router=router, access=access, max_body=MAX_BODY,
                     errors={InvalidRequestError: invalid, InvalidIdentifierError: invalid,
                             InvalidUserIdError: invalid, DeserializeError: invalid,
                             InvalidTokenError: (400, "invalid-token"),
                             RegistryTamperedError: (500, "store-tampered")})
    app.state.discovery = service
    app.add_exception_handler(RateLimitedError, _on_rate)
    return app
