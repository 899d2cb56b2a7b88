"""The records service's native REST API (FastAPI) and its authentication.

Endpoints (JSON bodies; records are FHIR R4 ``Patient`` resources or flat records):

==========================================  ========  =============================================
``PUT /v1/patients/{id}``                   writer    create/replace; ``If-Match: "<version>"``
                                                      for compare-and-set (412 on mismatch);
                                                      201 created / 200 updated; ``ETag``
``GET /v1/patients/{id}``                   reader    the record; ``ETag: "<version>"``; 404;
                                                      409 ``record-tampered`` for a bad row
``DELETE /v1/patients/{id}``                writer    204; 404; ``If-Match`` as above
``GET /v1/patients?cursor=&limit=``         reader    ``{"ids": [...], "next": cursor|null}``
``GET /v1/patients?family=..&birthDate=..`` reader    exact search on :data:`SEARCH_FIELDS`
                                                      → ``{"records": [{"id", "record",
                                                      "version"}]}``
                                                      (≤ ``limit``; ``"truncated": true`` if
                                                      more matched)
``POST /v1/patients:batch``                 writer    ``{"records": [{"id", "record"}]}`` (≤ 500)
                                                      → ``{"results": [{"id", "status", ...}]}``
                                                      (not atomic: per-item results; a
                                                      malformed item → 400, nothing written)
``GET /v1/audit/verify``                    admin     ``{"entries": n}`` or 409 with the break
                                                      (incl. a tail cut off behind the head)
``POST /v1/audit/reseal``                   admin     accept the log as it is after a failed
                                                      head check; ``{"entries": n}``
``GET /healthz``                            none      ``{"status": "ok"}`` and nothing else
``GET /openapi.json``                       none      the OpenAPI 3.1 description
==========================================  ========  =============================================

Errors are ``{"error": "<code>", "detail": "<message>"}`` and never hold record content —
also FastAPI's own: query validation (400 ``invalid``), unknown path (404 ``no-such-endpoint``),
wrong method (405 ``method-not-allowed``). A body over the limit (:data:`MAX_RECORD_BYTES` for
a PUT, :data:`MAX_BATCH_BYTES` for a batch; plain or chunked) → 413 ``too-large`` naming the
limit, decided while reading (never buffered whole). JSON bodies holding ``NaN`` /
``Infinity`` / ``-Infinity`` (not JSON, RFC 8259 §6) → 400 ``invalid``. A corrupt store →
500 ``store-corrupt`` naming the store.

Authentication: a bearer token (``Authorization: Bearer <token>``) whose SHA-256 appears in the
access list the broker released to this workload, or a client certificate issued by the
broker's workload CA (mutual TLS) whose subject CN appears in that list. Roles are ordered
``reader`` < ``writer`` < ``admin``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from safehold.errors import (
    AuditChainError,
    ConfigError,
    RecordError,
    RecordNotFoundError,
    RecordTamperedError,
    SafeholdError,
    StoreError,
)
from safehold.records.app import (
    MAX_BATCH,
    AlreadyExists,
    PatientRepository,
    PreconditionFailed,
    check_batch_shape,
)
from safehold.records.importers import (
    MAX_RECORD_BYTES,
    SEARCH_FIELDS,
    InvalidRecordError,
    NonFiniteNumberError,
    loads_strict,
)
from safehold.store.errors import StoreCorruptError

ROLES = ("reader", "writer", "admin")
#: Largest ``POST /v1/patients:batch`` body (bytes); split bigger imports into several batches.
MAX_BATCH_BYTES = 32 * 1024 * 1024
#: An over-limit body is read and dropped up to this many bytes, so the client sees the 413
#: instead of a reset connection; beyond it the connection is closed.
_DRAIN_BYTES = 16 * 1024 * 1024


class PayloadTooLargeError(InvalidRecordError):
    """The request body is over the endpoint's limit (413; the message names the limit)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` (for the audit) and ``role`` (one of :data:`ROLES`)."""

    name: str
    role: str

    def can(self, role: str) -> bool:
        """True if this principal's role is at least ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass
class AccessList:
    """Who may call the service, as released by the broker (secret ``records-access``).

    JSON form::

        {"tokens": {"<hex SHA-256 of token>": {"name": "alice", "role": "writer"}},
         "certificates": {"<subject CN>": "reader"}}

    Raises (from :meth:`from_json`):
        ConfigError: malformed JSON, unknown role, or a token hash that is not 64 hex digits.
    """

    tokens: dict[bytes, Principal] = field(default_factory=dict)
    certificates: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> AccessList:
        """Parse the JSON form above."""
        try:
            obj = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("records access list is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError("records access list must be a JSON object")
        acl = cls()
        for h, ent in (obj.get("tokens") or {}).items():
            try:
                digest = bytes.fromhex(h)
            except ValueError:
                digest = b""
            if len(digest) != 32 or not isinstance(ent, dict):
                raise ConfigError("records access list: token keys must be 64 hex digits of SHA-256")
            role = ent.get("role")
            if role not in ROLES:
                raise ConfigError(f"records access list: role must be one of {ROLES}, got {role!r}")
            acl.tokens[digest] = Principal(str(ent.get("name", "token")), role)
        for cn, role in (obj.get("certificates") or {}).items():
            if role not in ROLES:
                raise ConfigError(f"records access list: role must be one of {ROLES}, got {role!r}")
            acl.certificates[str(cn)] = role
        return acl

    def by_token(self, token: str) -> Principal | None:
        """The principal for a bearer token, compared by SHA-256 in constant time per entry."""
        d = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for h, p in self.tokens.items():
            if hmac.compare_digest(h, d):
                found = p
        return found

    def by_certificate(self, der: bytes) -> Principal | None:
        """The principal for a verified client certificate (DER), by subject CN."""
        try:
            cert = x509.load_der_x509_certificate(der)
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return None
        if not cns:
            return None
        cn = str(cns[0].value)
        role = self.certificates.get(cn)
        return Principal(f"cert:{cn}", role) if role else None


class AuthError(SafeholdError):
    """Missing or unknown credentials (401) or too weak a role (403)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def authenticate(acl: AccessList, request: Request) -> Principal:
    """Return the caller's principal (client certificate first, then bearer token).

    Raises:
        AuthError: 401 when neither identifies a known principal.
    """
    der = getattr(request.state, "tls_peer_cert", None) if hasattr(request, "state") else None
    if der:
        p = acl.by_certificate(der)
        if p is not None:
            return p
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        p = acl.by_token(token.strip())
        if p is not None:
            return p
        raise AuthError("bearer token not recognised", 401)
    raise AuthError("authentication required (bearer token or client certificate)", 401)


def error_response(e: Exception) -> JSONResponse:
    """Map a Safehold error to a JSON error response (no record content in any message)."""
    table: list[tuple[type[Exception], int, str]] = [
        (AuthError, 401, "unauthorized"),
        (RecordNotFoundError, 404, "not-found"),
        (AlreadyExists, 409, "exists"),
        (PreconditionFailed, 412, "precondition-failed"),
        (RecordTamperedError, 409, "record-tampered"),
        (PayloadTooLargeError, 413, "too-large"),
        (InvalidRecordError, 400, "invalid"),
        (AuditChainError, 409, "audit-chain-broken"),
        (StoreCorruptError, 500, "store-corrupt"),
        (StoreError, 503, "store-unavailable"),
        (RecordError, 500, "record-error"),
    ]
    for cls, status, code in table:
        if isinstance(e, cls):
            if isinstance(e, AuthError):
                status = e.status
                code = "unauthorized" if status == 401 else "forbidden"
            return JSONResponse({"error": code, "detail": str(e)}, status_code=status)
    return JSONResponse({"error": "internal", "detail": type(e).__name__}, status_code=500)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """Read the request body (plain or chunked), at most ``limit`` bytes.

    Raises:
        PayloadTooLargeError: ``Content-Length`` or the bytes received exceed ``limit`` (the
            rest is read and dropped up to a bound, so the client gets the 413).
    """
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    buf = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if not too_big:
            buf += chunk
            too_big = received > limit
        if too_big and received > _DRAIN_BYTES:
            break
    if too_big:
        raise PayloadTooLargeError(f"{what} is over the limit of {limit} bytes")
    return bytes(buf)


def parse_json_body(body: bytes, what: str) -> Any:
    """Parse a JSON request body strictly (RFC 8259: no NaN / Infinity).

    Raises:
        InvalidRecordError: not JSON (names what), or holds a non-finite number.
    """
    try:
        return loads_strict(body)
    except NonFiniteNumberError as e:
        raise InvalidRecordError(f"{what}: {e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRecordError(f"{what} is not JSON") from None


def _validation_detail(exc: RequestValidationError) -> str:
    """Name each bad parameter and the rule it broke; never echo the value (it may be a name)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {loc[-1]!r}" if len(loc) >= 2 else ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "request is invalid"


def _etag(version: int) -> str:
    return f'"{version}"'


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    v = value.strip().removeprefix("W/").strip('"')
    if not v.isdigit():
        raise InvalidRecordError('If-Match must be a version ETag such as "3"')
    return int(v)


def create_native_app(
    repo: PatientRepository,
    acl: AccessList | Callable[[], AccessList],
    *,
    title: str = "Safehold records",
    health: Callable[[], bool] | None = None,
) -> FastAPI:
    """Build the native API app over ``repo``; ``acl`` may be a callable to allow reloads."""
    get_acl = acl if callable(acl) else (lambda: acl)
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(SafeholdError)
    async def _on_error(request: Request, exc: SafeholdError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid", "detail": _validation_detail(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404/405 for paths and methods it does not serve (the path is not echoed:
        # it may hold a record id)
        codes = {404: ("no-such-endpoint", "no such endpoint (see /openapi.json)"),
                 405: ("method-not-allowed", f"method {request.method} is not allowed here")}
        code, detail = codes.get(exc.status_code, ("http-error", str(exc.detail)))
        return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def principal(role: str) -> Callable[[Request], Any]:
        async def dep(request: Request) -> Principal:  # async: no thread hop on the hot path
            p = authenticate(get_acl(), request)
            if not p.can(role):
                if repo.audit is not None:
                    await run_in_threadpool(repo.audit.append, p.name, request.method.lower(), None,
                                            "denied")
                raise AuthError(f"role {p.role!r} may not do this (needs {role!r})", 403)
            return p

        return dep

    reader, writer, admin = principal("reader"), principal("writer"), principal("admin")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        ok = health() if health else True
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.put(
        "/v1/patients/{rid}",
        status_code=200,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "description": "a FHIR R4 Patient or a flat record"}}}}},
    )
    async def put_patient(
        rid: str,
        request: Request,
        if_match: str | None = Header(default=None),
        if_none_match: str | None = Header(default=None),
        who: Principal = Depends(writer),
    ) -> Response:
        body = await read_body(request, MAX_RECORD_BYTES, "record body")
        record = parse_json_body(body, "body")
        if not isinstance(record, dict):
            raise InvalidRecordError("record must be a JSON object")
        res = await run_in_threadpool(
            lambda: repo.put(who.name, rid, record, expected_version=_if_match(if_match),
                             create_only=(if_none_match == "*")))
        out = json.dumps({"id": rid, "version": res.version, "status": res.status}).encode()
        return Response(out, status_code=201 if res.status == "created" else 200,
                        media_type="application/json", headers={"ETag": _etag(res.version)})

    @app.get("/v1/patients/{rid}")
    def get_patient(rid: str, who: Principal = Depends(reader)) -> Response:
        raw, version = repo.get_raw(who.name, rid)  # already compact JSON: no re-encoding
        return Response(raw, media_type="application/json", headers={"ETag": _etag(version)})

    @app.delete("/v1/patients/{rid}", status_code=204)
    def delete_patient(
        rid: str, if_match: str | None = Header(default=None), who: Principal = Depends(writer)
    ) -> Response:
        repo.delete(who.name, rid, expected_version=_if_match(if_match))
        return Response(status_code=204)

    @app.get("/v1/patients")
    def list_or_search(
        request: Request,
        cursor: str | None = Query(default=None, max_length=256),
        limit: int = Query(default=100, ge=1, le=1000),
        family: str | None = Query(default=None, max_length=512),
        given: str | None = Query(default=None, max_length=512),
        birthDate: str | None = Query(default=None, max_length=64),  # noqa: N803 - FHIR name
        gender: str | None = Query(default=None, max_length=64),
        identifier: str | None = Query(default=None, max_length=1024),
        who: Principal = Depends(reader),
    ) -> dict[str, Any]:
        unknown = sorted(set(request.query_params) - {"cursor", "limit", *SEARCH_FIELDS})
        if unknown:
            raise InvalidRecordError(f"unknown query parameters {unknown}")
        crit = {k: v for k, v in {"family": family, "given": given, "birthDate": birthDate,
                                  "gender": gender, "identifier": identifier}.items() if v is not None}
        if crit:
            hits = repo.search_hits(who.name, crit, limit=limit + 1)
            found: dict[str, Any] = {"records": [{"id": i, "record": r, "version": v}
                                                 for i, r, v in hits[:limit]]}
            if len(hits) > limit:
                found["truncated"] = True  # more matched than ``limit``
            return found
        ids, nxt = repo.list_ids(who.name, cursor=cursor, limit=limit)
        return {"ids": ids, "next": nxt}

    @app.post("/v1/patients:batch")
    async def batch(request: Request, who: Principal = Depends(writer)) -> dict[str, Any]:
        body = parse_json_body(await read_body(request, MAX_BATCH_BYTES, "batch body"), "batch body")
        recs = body.get("records") if isinstance(body, dict) else None
        if not isinstance(recs, list) or len(recs) > MAX_BATCH:
            raise InvalidRecordError(
                f'batch body must be {{"records": [...]}} with at most {MAX_BATCH} items'
            )
        items: list[tuple[Any, Any]] = []
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise InvalidRecordError(f'batch item {i}: must be {{"id": str, "record": object}}')
            items.append((r.get("id"), r.get("record")))
        check_batch_shape(items)  # every item before any write: a malformed batch writes nothing
        results = await run_in_threadpool(repo.batch, who.name, items)
        return {"results": results}

    @app.get("/v1/audit/verify")
    def audit_verify(who: Principal = Depends(admin)) -> dict[str, Any]:
        if repo.audit is None:
            raise ConfigError("audit is disabled")
        return {"entries": repo.audit.verify()}

    @app.post("/v1/audit/reseal")
    def audit_reseal(who: Principal = Depends(admin)) -> dict[str, Any]:
        if repo.audit is None:
            raise ConfigError("audit is disabled")
        entry = repo.audit.reseal(who.name)
        return {"entries": entry.seq + 1, "outcome": entry.body["outcome"]}

    return app
