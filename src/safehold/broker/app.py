"""HTTP face of the key broker (FastAPI): the KBS protocol, the CA, admin and recovery endpoints.

Error mapping (RFC 7807 problem details ``{"type", "title", "status", "detail"}``, as the KBS
protocol asks): 400 malformed input (manifest, JWK, Evidence, body), 401 not attested / expired /
replayed / unknown credentials, 403 the manifest or policy denies, 404 unknown resource,
409 state conflict, 413 body over the limit, 503 recovery mode. Unexpected errors are logged and
answered 500 without detail; bad input never reaches that path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safehold.broker.protocol import SESSION_COOKIE, JWKError
from safehold.broker.service import BadRequest, Broker, HTTPError
from safehold.broker.state import RecoveryError, StateIntegrityError
from safehold.errors import (
    AuditChainError,
    ManifestError,
    SafeholdError,
    SealingError,
    StoreError,
)

log = logging.getLogger("safehold.broker")

#: Largest request body accepted, bytes (a CMW with a TDX quote and its chain is ~10 KiB).
DEFAULT_MAX_BODY = 1024 * 1024
_PROBLEM = "https://safehold.dev/errors/"


class BodyLimit:
    """ASGI middleware: answer 413 when a request body exceeds ``limit`` bytes (declared or sent)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n < 0 or n > self.limit:
                    await _problem(413 if n > self.limit else 400, "body-too-large" if n > self.limit
                                   else "bad-request", f"request body of {v.decode(errors='replace')} bytes "
                                   f"refused (limit {self.limit})")(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(f"request body exceeds {self.limit} bytes")
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            resp = _problem(413, "body-too-large", f"request body exceeds {self.limit} bytes")
            await resp(scope, receive, send)


class _TooLarge(HTTPError):
    """A streamed body went over the limit (413); handled like every other HTTPError."""

    status = 413


def _problem(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"type": _PROBLEM + kind, "title": kind.replace("-", " "), "status": status,
                         "detail": detail}, status_code=status, media_type="application/problem+json")


_KINDS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
          409: "conflict", 413: "body-too-large", 503: "unavailable"}


def create_app(broker: Broker, *, max_body: int = DEFAULT_MAX_BODY, static_value: bytes | None = None) -> Any:
    """Build the ASGI app for ``broker``.

    Args:
        broker: the broker core.
        max_body: request body limit in bytes (413 above it).
        static_value: if given, ``GET /static`` returns it (the benchmark's plain-HTTPS baseline).
    """
    app = FastAPI(title="Safehold key broker (KBS)", version="0.1.0", docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return _problem(exc.status, _KINDS.get(exc.status, "error"), str(exc))

    @app.exception_handler(SafeholdError)
    async def _safehold_error(request: Request, exc: SafeholdError) -> JSONResponse:
        if isinstance(exc, StateIntegrityError):  # names the row, never its content
            log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
            return _problem(503, "unavailable", str(exc))
        if isinstance(exc, StoreError | SealingError):
            log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
            return _problem(503, "unavailable", f"broker state unavailable: {type(exc).__name__}")
        if isinstance(exc, AuditChainError):
            return _problem(409, "conflict", str(exc))
        return _problem(400, "bad-request", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _problem(500, "internal", "internal error (logged by the broker)")

    async def _json(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("request body is not valid JSON") from None

    def _bearer(request: Request) -> str | None:
        h = request.headers.get("authorization", "")
        if h[:7].lower() == "bearer ":
            return h[7:].strip()
        return None

    def _user(request: Request, *roles: str) -> str:
        chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or [None]
        return broker.authorize(_bearer(request), *roles, client_cert=chain[0])

    # --- KBS ---------------------------------------------------------------------------------

    @app.post("/kbs/v0/auth")
    async def kbs_auth(request: Request) -> Response:
        sid, challenge = broker.auth(await _json(request))
        resp = JSONResponse(challenge)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict",
                        # the broker, not the cookie jar, decides expiry (and says so)
                        max_age=broker.config.nonce_ttl + broker.config.token_ttl + 60)
        return resp

    @app.post("/kbs/v0/attest")
    async def kbs_attest(request: Request) -> Response:
        try:
            out = broker.attest(request.cookies.get(SESSION_COOKIE), await _json(request))
        except JWKError as e:
            raise BadRequest(str(e)) from None
        return JSONResponse(out)

    @app.get("/kbs/v0/resource/{repository}/{rtype}/{tag}")
    async def kbs_resource(repository: str, rtype: str, tag: str, request: Request) -> Response:
        return JSONResponse(broker.resource(request.cookies.get(SESSION_COOKIE), _bearer(request),
                                            repository, rtype, tag))

    @app.post("/kbs/v0/certificate/{name}")
    async def kbs_certificate(name: str, request: Request) -> Response:
        return JSONResponse(broker.certificate(request.cookies.get(SESSION_COOKIE), _bearer(request),
                                               name, await _json(request)))

    # --- CA ----------------------------------------------------------------------------------

    @app.get("/ca")
    async def ca() -> Response:
        return PlainTextResponse(broker.ca_pem(), media_type="application/x-pem-file")

    @app.get("/v1/values/session={name}")
    async def scone_values(name: str) -> Response:
        return JSONResponse(broker.session_values(name))

    # --- status / admin ------------------------------------------------------------------------

    @app.get("/status")
    async def status() -> Response:
        return JSONResponse(broker.status())

    @app.post("/admin/manifest")
    async def manifest_set(request: Request) -> Response:
        body = await _json(request)
        version = broker.set_manifest(body)
        return JSONResponse({"version": version}, status_code=201)

    @app.post("/admin/manifest/update")
    async def manifest_update(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict):
            raise BadRequest("manifest update: expected {manifest, version, signer, signature}")
        v = broker.update_manifest(body.get("manifest"), body.get("version"), body.get("signer"),
                                   body.get("signature"))
        return JSONResponse({"version": v})

    @app.get("/admin/manifest")
    async def manifest_show(request: Request, version: int | None = None) -> Response:
        _user(request, "owner", "operator", "reader")
        return JSONResponse(broker.manifest_entry(version))

    @app.put("/admin/secrets/{name}")
    async def secret_put(name: str, request: Request) -> Response:
        user = _user(request, "owner", "operator")
        ver = broker.set_value(user, name, await request.body())
        return JSONResponse({"secret": name, "version": ver})

    @app.post("/admin/client-certificates")
    async def client_cert(request: Request) -> Response:
        user = _user(request, "owner", "operator")
        return JSONResponse(broker.client_certificate(user, await _json(request)), status_code=201)

    @app.get("/admin/audit")
    async def audit(request: Request) -> Response:
        _user(request, "owner", "operator", "reader")
        return JSONResponse({"entries": broker.audit_entries()})

    @app.get("/admin/audit/verify")
    async def audit_verify(request: Request) -> Response:
        _user(request, "owner", "operator", "reader")
        return JSONResponse(broker.audit_verify())

    # --- recovery ------------------------------------------------------------------------------

    @app.get("/recovery")
    async def recovery_info() -> Response:
        return JSONResponse(broker.recovery_info())

    @app.post("/recovery")
    async def recovery(request: Request) -> Response:
        try:
            return JSONResponse(broker.recover(await _json(request)))
        except RecoveryError as e:
            return _problem(400, "recovery-failed", str(e))

    if static_value is not None:
        @app.get("/static")
        async def static() -> Response:
            return Response(static_value, media_type="application/octet-stream")

    _ = ManifestError  # ManifestError is a SafeholdError → 400 via the handler above
    return BodyLimit(app, max_body)
