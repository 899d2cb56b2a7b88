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
configuration. Only HTTP status codes live here; the core raises Safehold errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from safehold.bodylimit import ASGIApp, BodyLimit, refuse_declared_over
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
from safehold.errors import StoreError

ROLES = ("query", "register")
#: Largest request body accepted (a full query of MAX_QUERY outputs in base64, with margin).
MAX_BODY = 8 * 1024 * 1024

router = APIRouter()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` (the rate-limit identity) and its ``roles``."""

    name: str
    roles: frozenset[str]


def parse_access(data: Mapping[str, Any]) -> dict[bytes, Principal]:
    """The access list from its JSON/TOML form.

    Raises:
        DiscoveryConfigError: a key that is not 64 hex digits, a missing name, an unknown role.
    """
    out: dict[bytes, Principal] = {}
    for digest, ent in dict(data).items():
        try:
            key = bytes.fromhex(digest)
        except ValueError:
            key = b""
        if len(key) != 32 or not isinstance(ent, Mapping):
            raise DiscoveryConfigError("access list keys must be 64 hex digits (SHA-256 of a token)")
        name, roles = ent.get("name"), ent.get("roles", [])
        if not isinstance(name, str) or not name or not isinstance(roles, list) or not roles \
                or any(r not in ROLES for r in roles):
            raise DiscoveryConfigError(f"access entry {digest[:12]}…: needs a name and roles from {ROLES}")
        out[key] = Principal(name, frozenset(roles))
    return out


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


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _service(request: Request) -> DiscoveryService:
    return request.app.state.discovery


def _body_limit(app: ASGIApp, limit: int = MAX_BODY) -> BodyLimit:
    """``app`` behind the shared :class:`~safehold.bodylimit.BodyLimit`: a body over ``limit``
    bytes (declared or streamed) → 413 ``too-large`` before any route reads it."""
    detail = f"request body over {limit} bytes"
    declared = refuse_declared_over(limit, lambda: _error(413, "too-large", detail))
    return BodyLimit(app, limit, declared=declared, overflow=lambda: StarletteHTTPException(413, detail))


def _principal(request: Request, authorization: str = Header(default="")) -> Principal:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise StarletteHTTPException(401, "a bearer token is required")
    principal = request.app.state.access.get(hashlib.sha256(token.strip().encode()).digest())
    if principal is None:
        raise StarletteHTTPException(401, "unknown token")
    return principal


def _require(principal: Principal, role: str) -> None:
    if role not in principal.roles:
        raise StarletteHTTPException(403, f"the {role!r} role is required")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@router.get("/v1/discovery/info")
def info(request: Request) -> dict[str, object]:
    """Public facts about the service."""
    return _service(request).info()


@router.post("/v1/discovery/evaluate")
def evaluate(body: EvaluateBody, request: Request, who: Principal = Depends(_principal)) -> dict[str, str]:
    """RFC 9497 BlindEvaluate of a batch (charged against the evaluation budget)."""
    _require(who, "query")
    blinded = unpack(body.blinded, ELEMENT_SIZE, what="blinded")
    return {"evaluated": pack(_service(request).evaluate(who.name, blinded), ELEMENT_SIZE)}


@router.post("/v1/discovery/query")
def query(body: QueryBody, request: Request, who: Principal = Depends(_principal)) -> dict[str, object]:
    """Rate-limited oblivious lookup of OPRF outputs."""
    _require(who, "query")
    token = unpack(body.token, TOKEN_SIZE, what="token", limit=1)
    prev = unpack(body.prev, OUTPUT_SIZE, what="prev")
    new = unpack(body.new, OUTPUT_SIZE, what="new")
    discard = unpack(body.discard, OUTPUT_SIZE, what="discard", limit=MAX_QUERY)
    answer = _service(request).query(who.name, token[0] if token else None, prev, new, discard)
    c = answer.charge
    return {"results": pack(answer.results, RESULT_SIZE), "token": pack([c.token], TOKEN_SIZE),
            "charged": c.cost, "used": c.used, "limit": c.limit, "reset_at": c.reset_at}


@router.post("/v1/discovery/register")
def register(body: EntriesBody, request: Request, who: Principal = Depends(_principal)) -> dict[str, int]:
    """Register identifiers → user ids."""
    _require(who, "register")
    entries = [(e.kind, e.identifier, e.user_id) for e in body.entries]
    return {"registered": _service(request).register(entries, body.region)}


@router.post("/v1/discovery/unregister")
def unregister(body: EntriesBody, request: Request, who: Principal = Depends(_principal)) -> dict[str, int]:
    """Remove registrations."""
    _require(who, "register")
    entries = [(e.kind, e.identifier) for e in body.entries]
    return {"removed": _service(request).unregister(entries, body.region)}


# --- error mapping (the only place with status codes) ------------------------------------------


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    return _error(400, "invalid", str(exc))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", ""))
                      for e in exc.errors()[:5])
    return _error(400, "invalid", f"malformed request: {where}")


async def _on_token(request: Request, exc: Exception) -> JSONResponse:
    return _error(400, "invalid-token", str(exc))


async def _on_rate(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimitedError)
    return _error(429, "rate-limited", str(exc), {"Retry-After": str(exc.retry_after)})


async def _on_tampered(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, "store-tampered", str(exc))


async def _on_store(request: Request, exc: Exception) -> JSONResponse:
    return _error(503, "store-unavailable", type(exc).__name__)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {401: "unauthenticated", 403: "forbidden", 404: "no-such-endpoint", 405: "method-not-allowed",
             413: "too-large"}
    return _error(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail))


def create_app(service: DiscoveryService, access: Mapping[bytes, Principal]) -> FastAPI:
    """The ASGI app: this router, the error mapping, and ``service``/``access`` on ``app.state``."""
    app = FastAPI(title="Safehold contact discovery", version="1")
    app.state.discovery = service
    app.state.access = dict(access)
    app.include_router(router)
    app.add_middleware(_body_limit)
    for exc_type in (InvalidRequestError, InvalidIdentifierError, InvalidUserIdError, DeserializeError):
        app.add_exception_handler(exc_type, _on_invalid)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(InvalidTokenError, _on_token)
    app.add_exception_handler(RateLimitedError, _on_rate)
    app.add_exception_handler(RegistryTamperedError, _on_tampered)
    app.add_exception_handler(StoreError, _on_store)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    return app
