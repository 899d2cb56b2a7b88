"""The key broker's HTTP layer (FastAPI): the KBS protocol, the CA, admin and recovery endpoints.

Routes are module-level functions on one :class:`~fastapi.APIRouter`; each reaches the broker
core through the :func:`broker` dependency (``app.state.broker``, set by :func:`create_app`).
This is the only broker module that knows HTTP status codes.

Error mapping (RFC 7807 problem details ``{"type", "title", "status", "detail"}``, as the KBS
protocol asks), from the domain exceptions of :mod:`safehold.broker.errors`:

=====  ===============  ===================================================================
400    bad-request      :class:`MalformedRequestError`, and any other Safehold error (bad
                        manifest, JWK, Evidence, body); ``recovery-failed`` for
                        :class:`RecoveryError` on ``POST /recovery``
401    unauthorized     :class:`NotAuthenticatedError` (not attested, expired, replayed,
                        unknown credentials)
403    forbidden        :class:`PermissionDeniedError` (the manifest or policy denies)
404    not-found        :class:`NotFoundError`
409    conflict         :class:`StateConflictError`, :class:`~safehold.errors.AuditChainError`
413    body-too-large   a request body over the limit (:func:`body_limit`)
503    unavailable      :class:`NotReadyError` (recovery mode, no manifest),
                        :class:`StateIntegrityError` (names the row), a failing store or seal
=====  ===============  ===================================================================

Freshness (:mod:`safehold.broker.fresh`, :func:`create_gated_app`): while the broker's state
is not fresh every route but ``/ca``, ``/status`` and ``/freshness*`` answers 503 ``not-fresh``
with the reason (``/kbs`` releases nothing); ``/status`` says ``"mode": "not-fresh"``. Owner
routes (no bearer: the statement's signature is verified by the members against the owner key
they pin, and nothing else is accepted): ``GET /freshness`` (status), ``GET
/freshness/proposal`` (what re-anchoring would accept, the unsigned statement), ``POST
/freshness/reanchor`` (the signed statement; 409 ``owner-statement-refused``).

Unexpected errors are logged and answered 500 without detail; bad input never reaches that path.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from safehold.bodylimit import BodyLimit
from safehold.broker.core import Broker
from safehold.broker.errors import (
    MalformedRequestError,
    NotAuthenticatedError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    RecoveryError,
    StateConflictError,
    StateIntegrityError,
)
from safehold.broker.protocol import SESSION_COOKIE
from safehold.errors import AuditChainError, SafeholdError, SealingError, StoreError
from safehold.freshness.errors import FreshnessError, OwnerStatementError
from safehold.jsontypes import JSONValue

log = logging.getLogger("safehold.broker")

#: Largest request body accepted, bytes (a CMW with a TDX quote and its chain is ~10 KiB).
DEFAULT_MAX_BODY = 1024 * 1024
_PROBLEM = "https://safehold.dev/errors/"


class _BodyTooLargeError(SafeholdError):
    """A streamed request body went over the limit (answered 413)."""


#: Domain exception → (status, problem kind); the first matching row wins.
_STATUS: tuple[tuple[type[SafeholdError], int, str], ...] = (
    (_BodyTooLargeError, 413, "body-too-large"),
    (MalformedRequestError, 400, "bad-request"),
    (NotAuthenticatedError, 401, "unauthorized"),
    (PermissionDeniedError, 403, "forbidden"),
    (NotFoundError, 404, "not-found"),
    (StateConflictError, 409, "conflict"),
    (NotReadyError, 503, "unavailable"),
    (AuditChainError, 409, "conflict"),
)


def problem(status: int, kind: str, detail: str) -> JSONResponse:
    """An RFC 7807 ``application/problem+json`` response."""
    return JSONResponse({"type": _PROBLEM + kind, "title": kind.replace("-", " "), "status": status,
                         "detail": detail}, status_code=status, media_type="application/problem+json")


def body_limit(app: ASGIApp, limit: int) -> BodyLimit:
    """``app`` behind the shared :class:`~safehold.bodylimit.BodyLimit`: a ``Content-Length``
    over ``limit`` → 413 ``body-too-large``, one that is not a number or negative → 400
    ``bad-request``, a streamed body past ``limit`` → 413 ``body-too-large``."""

    def declared(value: bytes) -> ASGIApp | None:
        try:
            n = int(value)
        except ValueError:
            n = -1
        if 0 <= n <= limit:
            return None
        return problem(413 if n > limit else 400, "body-too-large" if n > limit else "bad-request",
                       f"request body of {value.decode(errors='replace')} bytes refused (limit {limit})")

    def too_large() -> _BodyTooLargeError:
        return _BodyTooLargeError(f"request body exceeds {limit} bytes")

    def answer() -> ASGIApp:
        return problem(413, "body-too-large", f"request body exceeds {limit} bytes")

    return BodyLimit(app, limit, declared=declared, overflow=too_large, answer=answer)


# --- exception handlers -------------------------------------------------------------------------


async def safehold_error(request: Request, exc: Exception) -> Response:
    """Map a :class:`~safehold.errors.SafeholdError` to its problem response (table above)."""
    if isinstance(exc, OwnerStatementError):
        return problem(409, "owner-statement-refused", str(exc))
    if isinstance(exc, FreshnessError):  # the state is not fresh (or a row read stale): nothing served
        log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return problem(503, "not-fresh", f"{type(exc).__name__}: {exc}")
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return problem(status, kind, str(exc))
    if isinstance(exc, StateIntegrityError):  # names the row, never its content
        log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return problem(503, "unavailable", str(exc))
    if isinstance(exc, StoreError | SealingError):
        log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return problem(503, "unavailable", f"broker state unavailable: {type(exc).__name__}")
    return problem(400, "bad-request", str(exc))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Log an unexpected exception and answer 500 without detail."""
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem(500, "internal", "internal error (logged by the broker)")


# --- request helpers ----------------------------------------------------------------------------


def broker(request: Request) -> Broker:
    """Dependency: the :class:`Broker` this app serves."""
    b: Broker = request.app.state.broker
    return b


BrokerDep = Annotated[Broker, Depends(broker)]


async def json_body(request: Request) -> JSONValue:
    """The request body as JSON (None if empty).

    Raises:
        MalformedRequestError: not valid JSON.
    """
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedRequestError("request body is not valid JSON") from None


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    h = request.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return None


def admin_user(b: Broker, request: Request, *roles: str) -> str:
    """The manifest user behind the bearer token or TLS client certificate holding one of ``roles``."""
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or [None]
    return b.authorize(bearer(request), *roles, client_cert=chain[0])


router = APIRouter()

# --- KBS ----------------------------------------------------------------------------------------


@router.post("/kbs/v0/auth")
async def kbs_auth(request: Request, b: BrokerDep) -> Response:
    """KBS *Request* → *Challenge* and the ``kbs-session-id`` cookie."""
    sid, challenge = b.auth(await json_body(request))
    resp = JSONResponse(challenge)
    resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict",
                    # the broker, not the cookie jar, decides expiry (and says so)
                    max_age=b.config.nonce_ttl + b.config.token_ttl + 60)
    return resp


@router.post("/kbs/v0/attest")
async def kbs_attest(request: Request, b: BrokerDep) -> Response:
    """KBS *Attestation* → ``{"token": EAR}``."""
    return JSONResponse(b.attest(request.cookies.get(SESSION_COOKIE), await json_body(request)))


@router.get("/kbs/v0/resource/{repository}/{rtype}/{tag}")
async def kbs_resource(repository: str, rtype: str, tag: str, request: Request, b: BrokerDep) -> Response:
    """A resource as a JWE to the attested ``tee-pubkey``."""
    return JSONResponse(b.resource(request.cookies.get(SESSION_COOKIE), bearer(request),
                                   repository, rtype, tag))


@router.post("/kbs/v0/certificate/{name}")
async def kbs_certificate(name: str, request: Request, b: BrokerDep) -> Response:
    """A certificate secret issued to the attested key, with requested extensions."""
    return JSONResponse(b.certificate(request.cookies.get(SESSION_COOKIE), bearer(request),
                                      name, await json_body(request)))


# --- CA -----------------------------------------------------------------------------------------


@router.get("/ca")
async def ca(b: BrokerDep) -> Response:
    """The workload CA certificate (PEM)."""
    return PlainTextResponse(b.ca_pem(), media_type="application/x-pem-file")


@router.get("/v1/values/session={name}")
async def scone_values(name: str, b: BrokerDep) -> Response:
    """SCONE-CAS-compatible session values (the API CA certificate)."""
    return JSONResponse(b.session_values(name))


# --- status / admin -----------------------------------------------------------------------------


@router.get("/status")
async def status(b: BrokerDep) -> Response:
    """Public status (mode, measurement, manifest version, fingerprint)."""
    return JSONResponse(b.status())


@router.post("/admin/manifest")
async def manifest_set(request: Request, b: BrokerDep) -> Response:
    """Install the first manifest (201)."""
    version = b.set_manifest(await json_body(request))
    return JSONResponse({"version": version}, status_code=201)


@router.post("/admin/manifest/update")
async def manifest_update(request: Request, b: BrokerDep) -> Response:
    """Install a manifest update signed by an owner."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise MalformedRequestError("manifest update: expected {manifest, version, signer, signature}")
    v = b.update_manifest(body.get("manifest"), body.get("version"), body.get("signer"),
                          body.get("signature"))
    return JSONResponse({"version": v})


@router.get("/admin/manifest")
async def manifest_show(request: Request, b: BrokerDep, version: int | None = None) -> Response:
    """A stored manifest version (reader role or above)."""
    admin_user(b, request, "owner", "operator", "reader")
    return JSONResponse(b.manifest_entry(version))


@router.put("/admin/secrets/{name}")
async def secret_put(name: str, request: Request, b: BrokerDep) -> Response:
    """Supply a ``value`` secret (operator role or above)."""
    user = admin_user(b, request, "owner", "operator")
    ver = b.set_value(user, name, await request.body())
    return JSONResponse({"secret": name, "version": ver})


@router.post("/admin/client-certificates")
async def client_cert(request: Request, b: BrokerDep) -> Response:
    """Issue a client certificate for a CSR (operator role or above; 201)."""
    user = admin_user(b, request, "owner", "operator")
    return JSONResponse(b.client_certificate(user, await json_body(request)), status_code=201)


@router.get("/admin/audit")
async def audit(request: Request, b: BrokerDep) -> Response:
    """The verified audit entries (reader role or above)."""
    admin_user(b, request, "owner", "operator", "reader")
    return JSONResponse({"entries": b.audit_entries()})


@router.get("/admin/audit/verify")
async def audit_verify(request: Request, b: BrokerDep) -> Response:
    """Verify the audit chain (reader role or above)."""
    admin_user(b, request, "owner", "operator", "reader")
    return JSONResponse(b.audit_verify())


# --- recovery -----------------------------------------------------------------------------------


@router.get("/recovery")
async def recovery_info(b: BrokerDep) -> Response:
    """Encrypted shares, threshold, a fresh broker key and Evidence binding it."""
    return JSONResponse(b.recovery_info())


@router.post("/recovery")
async def recovery(request: Request, b: BrokerDep) -> Response:
    """Accept decrypted shares; restore and re-seal the master key."""
    try:
        return JSONResponse(b.recover(await json_body(request)))
    except RecoveryError as e:
        return problem(400, "recovery-failed", str(e))


async def static(request: Request) -> Response:
    """The benchmark's plain-HTTPS baseline: a fixed value (only when configured)."""
    value: bytes = request.app.state.static_value
    return Response(value, media_type="application/octet-stream")


def create_app(b: Broker, *, max_body: int = DEFAULT_MAX_BODY,
               static_value: bytes | None = None) -> BodyLimit:
    """Build the ASGI app for broker ``b``.

    Args:
        b: the broker core.
        max_body: request body limit in bytes (413 above it).
        static_value: if given, ``GET /static`` returns it (the benchmark's plain-HTTPS baseline).
    """
    app = FastAPI(title="Safehold key broker (KBS)", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.broker = b
    app.add_exception_handler(SafeholdError, safehold_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.include_router(router)
    if static_value is not None:
        app.state.static_value = static_value
        app.add_api_route("/static", static, methods=["GET"])
    return body_limit(app, max_body)


# --- freshness gate (safehold.broker.fresh) -----------------------------------------------------

fresh_router = APIRouter()


def _gate(request: Request) -> Any:
    return request.app.state.gate


@fresh_router.get("/freshness")
async def freshness_status(request: Request) -> Response:
    """The broker ledger's status (epochs, rows per namespace; no values)."""
    return JSONResponse(_gate(request).status())


@fresh_router.get("/freshness/proposal")
async def freshness_proposal(request: Request) -> Response:
    """What re-anchoring would accept and the unsigned owner statement (base64url payload)."""
    return JSONResponse(await run_in_threadpool(_gate(request).statement))


@fresh_router.post("/freshness/reanchor")
async def freshness_reanchor(request: Request) -> Response:
    """Apply the owner-signed statement ``{"payload", "signature"}`` (audited by the broker)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise MalformedRequestError("body must be the JSON owner statement") from None
    head = await run_in_threadpool(_gate(request).reanchor, body)
    return JSONResponse({"ledger": "broker", "epoch": head.epoch, "digest": head.digest.hex()})


@fresh_router.get("/ca")
async def fresh_ca(request: Request) -> Response:
    """The workload CA certificate (PEM), also while the state is not fresh."""
    return PlainTextResponse(request.app.state.ca_pem, media_type="application/x-pem-file")


@fresh_router.get("/status")
async def fresh_status(request: Request) -> Response:
    """``{"mode": "not-fresh", "reason"}`` while the state is not fresh."""
    return JSONResponse({"mode": "not-fresh", "reason": _gate(request).reason()})


@fresh_router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
async def fresh_refuse(request: Request) -> Response:
    """Every other route: 503 ``not-fresh`` with the reason (``/kbs`` releases nothing)."""
    return problem(503, "not-fresh", f"broker state is not fresh; nothing is released: "
                   f"{_gate(request).reason()}")


class GatedApp:
    """ASGI: ``/freshness*`` always to the gate's routes; everything else to the broker's app
    while the state is fresh, else to the gate's routes (503 ``not-fresh``)."""

    def __init__(self, gate: Any, gate_app: ASGIApp, max_body: int) -> None:
        self.gate, self.gate_app, self.max_body = gate, gate_app, max_body
        self._inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        b = self.gate.broker
        if path.startswith("/freshness") or b is None or self.gate.fs.problem is not None:
            await self.gate_app(scope, receive, send)
            return
        if self._inner is None:
            self._inner = create_app(b, max_body=self.max_body)
        await self._inner(scope, receive, send)


def create_gated_app(gate: Any, ca: Any, *, max_body: int = DEFAULT_MAX_BODY) -> GatedApp:
    """The broker's app behind its :class:`~safehold.broker.fresh.FreshnessGate`."""
    app = FastAPI(title="Safehold key broker (freshness gate)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gate = gate
    app.state.ca_pem = ca.cert_pem()
    app.add_exception_handler(SafeholdError, safehold_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.include_router(fresh_router)
    return GatedApp(gate, body_limit(app, max_body), max_body)
