"""The HTTP scaffold the bearer-token JSON services share (contact discovery, SVR).

Both answer errors as ``{"error": <code>, "detail": <text>}`` and authenticate callers with
``Authorization: Bearer <token>`` (RFC 6750 §2.1) against an access list keyed by the SHA-256
of the token, so neither the service nor its configuration ever holds a token:
``{"<64 hex digits>": {"name": ..., "roles": [...]}}``. This module holds what is the same in
both; the routes, the role names and which exception maps to which status stay in each
service's ``http.py`` (the only modules that import this one), so each still chooses its own
status codes.

.. code-block:: python

    from safehold.runtime.http import Principal, bearer_app, bearer_principal, parse_access

    app = bearer_app(title="…", router=router, access=parse_access(doc, ROLES, MyConfigError),
                     max_body=MAX_BODY, errors={InvalidRequestError: (400, "invalid"),
                                                MyTamperedError: (500, "store-tampered")})
    app.state.my_service = service
    # a route: who: Principal = Depends(bearer_principal); require_role(who, "query")

Always mapped by :func:`bearer_app`: FastAPI's ``RequestValidationError`` → 400 ``invalid``
(the first five locations and messages), ``StoreError`` → 503 ``store-unavailable`` (the
exception's type name only), Starlette's ``HTTPException`` → its status with ``unauthenticated``
(401), ``forbidden`` (403), ``no-such-endpoint`` (404), ``method-not-allowed`` (405),
``too-large`` (413) or ``error``; a body over ``max_body`` bytes → 413 ``too-large`` before any
route reads it (:class:`~safehold.bodylimit.BodyLimit`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safehold.bodylimit import ASGIApp, BodyLimit, refuse_declared_over
from safehold.errors import StoreError

__all__ = [
    "Principal",
    "bearer_app",
    "bearer_principal",
    "body_limit",
    "error_response",
    "parse_access",
    "require_role",
]

#: The ``error`` code of each HTTP status Starlette raises (or a route raises as HTTPException).
HTTP_CODES = {
    401: "unauthenticated",
    403: "forbidden",
    404: "no-such-endpoint",
    405: "method-not-allowed",
    413: "too-large",
}

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its ``name`` (the service's identity for it: the rate-limit
    identity in discovery, the owner of its backups in SVR) and its ``roles``."""

    name: str
    roles: frozenset[str]


def parse_access(
    data: object, roles: tuple[str, ...], error: type[Exception], *, max_name_bytes: int | None = None
) -> dict[bytes, Principal]:
    """The access list from its JSON/TOML form: ``{"<sha256 hex of a token>": {"name": str,
    "roles": [str, ...]}}`` → ``{32-byte SHA-256: Principal}``.

    Args:
        data: the parsed document (validated here).
        roles: the role names this service knows; every entry needs at least one of them and
            no other.
        error: the service's configuration error class, raised for any fault.
        max_name_bytes: if given, the longest name accepted (UTF-8 bytes).

    Raises:
        error: not an object, a key that is not 64 hex digits, an entry that is not an object,
            a missing, empty or too long name, no roles or an unknown role. Messages name at
            most the first 12 hex digits of a key.
    """
    if not isinstance(data, Mapping):
        raise error("the access list must be an object")
    out: dict[bytes, Principal] = {}
    for digest, ent in data.items():
        try:
            key = bytes.fromhex(digest)
        except (ValueError, TypeError):
            key = b""
        if len(key) != 32 or not isinstance(ent, Mapping):
            raise error("access list keys must be 64 hex digits (SHA-256 of a token)")
        name, granted = ent.get("name"), ent.get("roles", [])
        if (
            not isinstance(name, str)
            or not name
            or (max_name_bytes is not None and len(name.encode()) > max_name_bytes)
            or not isinstance(granted, list)
            or not granted
            or any(r not in roles for r in granted)
        ):
            raise error(f"access entry {str(digest)[:12]}…: needs a name and roles from {roles}")
        out[key] = Principal(name, frozenset(granted))
    return out


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error answer: ``status`` with ``{"error": code, "detail": detail}`` (and ``headers``)."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def body_limit(app: ASGIApp, limit: int) -> BodyLimit:
    """``app`` behind the shared :class:`~safehold.bodylimit.BodyLimit`: a body over ``limit``
    bytes (declared or streamed) → 413 ``too-large`` before any route reads it. Use as
    ``app.add_middleware(body_limit, limit=MAX_BODY)``."""
    detail = f"request body over {limit} bytes"
    declared = refuse_declared_over(limit, lambda: error_response(413, "too-large", detail))
    return BodyLimit(app, limit, declared=declared, overflow=lambda: StarletteHTTPException(413, detail))


def bearer_principal(request: Request, authorization: str = Header(default="")) -> Principal:
    """FastAPI dependency: the caller whose ``Authorization: Bearer <token>`` has its SHA-256 in
    ``request.app.state.access`` (``{bytes: Principal}``).

    Raises:
        StarletteHTTPException: 401 without a bearer token or with an unknown one.
    """
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise StarletteHTTPException(401, "a bearer token is required")
    digest = hashlib.sha256(token.strip().encode()).digest()
    principal: Principal | None = request.app.state.access.get(digest)
    if principal is None:
        raise StarletteHTTPException(401, "unknown token")
    return principal


def require_role(principal: Principal, role: str) -> None:
    """Raises StarletteHTTPException 403 unless ``principal`` holds ``role``."""
    if role not in principal.roles:
        raise StarletteHTTPException(403, f"the {role!r} role is required")


def _mapped(status: int, code: str) -> Handler:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(status, code, str(exc))

    return handler


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        ".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", "")) for e in exc.errors()[:5]
    )
    return error_response(400, "invalid", f"malformed request: {where}")


async def _on_store(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "store-unavailable", type(exc).__name__)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "error"), str(exc.detail))


def bearer_app(
    *,
    title: str,
    router: APIRouter,
    access: Mapping[bytes, Principal],
    max_body: int,
    errors: Mapping[type[Exception], tuple[int, str]],
    **options: Any,
) -> FastAPI:
    """A FastAPI app serving ``router`` with the shared scaffold (module docstring).

    Args:
        title: the app's title (OpenAPI).
        router: the service's routes.
        access: the access list (:func:`parse_access`), copied to ``app.state.access``.
        max_body: the largest request body, bytes.
        errors: the service's exceptions → ``(status, error code)``; the answer's detail is
            ``str(exc)``. Starlette picks the handler of the nearest class in the MRO.
        options: further ``FastAPI(...)`` arguments (e.g. ``openapi_url=None``).

    The caller puts its service object on ``app.state`` and may add further handlers.
    """
    app = FastAPI(title=title, version="1", **options)
    app.state.access = dict(access)
    app.include_router(router)
    app.add_middleware(body_limit, limit=max_body)
    for exc_type, (status, code) in errors.items():
        app.add_exception_handler(exc_type, _mapped(status, code))
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StoreError, _on_store)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    return app
