"""The records service's HTTP layer: the native REST API (FastAPI) and the shared HTTP plumbing.

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
``GET /v1/audit/segment?through=n``         admin     export the oldest live entries through
                                                      ``n`` (NDJSON; header
                                                      ``X-Safehold-Segment-SHA256``)
``POST /v1/audit/seal``                     admin     ``{"through": n, "sha256": hex}`` drops
                                                      the exported segment, keeps its digest
``GET /healthz``                            none      ``{"status": "ok"}``; 503
                                                      ``{"status": "unavailable"}``, plus
                                                      ``"reason"`` when the store is not fresh
``GET /v1/freshness``                       admin     the FreshStore's status (epochs, rows)
``GET /v1/freshness/proposal``              admin     what re-anchoring would accept and the
                                                      unsigned owner statement
``POST /v1/freshness/reanchor``             admin     the owner-signed statement → the new head;
                                                      audited (``freshness-reanchor``)
``GET /openapi.json``                       none      the OpenAPI 3.1 description
                                                      (:mod:`safehold.records.openapi`)
``/fhir/…``                                 (roles)   FHIR R4 REST (:mod:`safehold.records.fhir`,
                                                      mounted by ``mount_fhir``)
==========================================  ========  =============================================

Errors are ``{"error": "<code>", "detail": "<message>"}`` and never hold record content —
also FastAPI's own: query validation (400 ``invalid``), unknown path (404 ``no-such-endpoint``),
wrong method (405 ``method-not-allowed``, ``Allow`` listing every method the path serves).
Freshness (docs/freshness.md): a row, page or posting group the database returned stale,
restored, deleted or with rows left out → 409 ``stale-data`` naming the blind index (hex) and
what was expected vs. found; a store that is not fresh (restored from an earlier copy, forked,
corrupt journal, anchor lost, ledger not initialised) → 503 ``not-fresh`` with the reason; a
write stored but not yet anchored → 503 ``not-anchored`` ("retry the read"); the anchor without
a majority → 503 ``anchor-unavailable``; an owner statement refused → 409
``owner-statement-refused``.
A body over the limit (:data:`MAX_RECORD_BYTES` for a PUT, :data:`MAX_BATCH_BYTES` for a batch;
plain or chunked) → 413 ``too-large`` naming the limit, decided while reading (never buffered
whole). A body whose ``Content-Type`` is not ``application/json`` (``text/plain``, a form,
multipart, none) → 415 ``unsupported-media-type``, before it is read. JSON bodies holding
``NaN`` / ``Infinity`` / ``-Infinity`` (not JSON, RFC 8259 §6) → 400 ``invalid``. A corrupt
store → 500 ``store-corrupt`` naming the store.

Authentication: a bearer token (``Authorization: Bearer <token>``) whose SHA-256 appears in the
access list the broker released to this workload (the owner's ``access`` secret), or a client
certificate issued by the broker's workload CA (mutual TLS) whose public key's SHA-256 appears
in that list — never its CN (:mod:`safehold.records.access`). Roles are ordered ``reader`` <
``writer`` < ``admin``.

Layout: the routes are module-level functions on :data:`router`; :func:`create_native_app`
makes the app and puts its collaborators in ``app.state.records`` (a :class:`NativeAPI`). Every
HTTP status code of the records service is chosen in this module (:func:`error_response`) or in
:mod:`safehold.records.scone_http`; the core below raises Safehold errors.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from safehold.errors import (
    AuditChainError,
    AuditSegmentRefusedError,
    ConfigError,
    RecordError,
    RecordNotFoundError,
    RecordTamperedError,
    SafeholdError,
    StoreError,
)
from safehold.freshness.errors import (
    AnchorUnavailableError,
    FreshnessError,
    NotAnchoredError,
    OwnerStatementError,
    RowFreshnessError,
    StoreStateError,
)
from safehold.records.access import AccessList, Principal
from safehold.records.errors import (
    AlreadyExistsError,
    AuthenticationError,
    InvalidRecordError,
    NonFiniteNumberError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    UnsupportedMediaTypeError,
)
from safehold.records.fresh import Freshness
from safehold.records.model import (
    MAX_BATCH,
    MAX_RECORD_BYTES,
    SEARCH_FIELDS,
    loads_strict,
    parse_batch,
    parse_record,
)
from safehold.records.openapi import native_openapi
from safehold.records.repository import PatientRepository
from safehold.store.errors import StoreCorruptError

log = logging.getLogger("safehold.records")

__all__ = ["ETAG_RE", "JSON_MEDIA_TYPES", "MAX_BATCH_BYTES", "NativeAPI", "authenticate",
           "create_native_app", "error_response", "read_body", "require_json", "router"]

#: Largest ``POST /v1/patients:batch`` body (bytes); split bigger imports into several batches.
MAX_BATCH_BYTES = 32 * 1024 * 1024
#: An over-limit body is read and dropped up to this many bytes, so the client sees the 413
#: instead of a reset connection; beyond it the connection is closed.
_DRAIN_BYTES = 16 * 1024 * 1024

AccessSource = AccessList | Callable[[], AccessList]


@dataclass(frozen=True)
class NativeAPI:
    """What the native API's routes work with (``app.state.records``).

    Attributes:
        repo: the repository.
        access: returns the current access list (called per request: the list may be reloaded).
        health: for ``/healthz`` (None: always healthy).
        freshness: the FreshStore wiring (None: freshness off, the owner routes answer 404).
    """

    repo: PatientRepository
    access: Callable[[], AccessList]
    health: Callable[[], bool] | None = None
    freshness: Freshness | None = None


def access_getter(acl: AccessSource) -> Callable[[], AccessList]:
    """``acl`` as a callable (a fixed list, or a callable that allows reloads)."""
    if isinstance(acl, AccessList):
        fixed = acl
        return lambda: fixed
    return acl


# --- errors ----------------------------------------------------------------------------------

#: Safehold errors → (HTTP status, error code); the first matching class wins.
_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (AuthenticationError, 401, "unauthorized"),
    (PermissionDeniedError, 403, "forbidden"),
    (RecordNotFoundError, 404, "not-found"),
    (AlreadyExistsError, 409, "exists"),
    (PreconditionFailedError, 412, "precondition-failed"),
    (RecordTamperedError, 409, "record-tampered"),
    (PayloadTooLargeError, 413, "too-large"),
    (UnsupportedMediaTypeError, 415, "unsupported-media-type"),
    (InvalidRecordError, 400, "invalid"),
    (AuditSegmentRefusedError, 409, "audit-segment-refused"),
    (AuditChainError, 409, "audit-chain-broken"),
    (RowFreshnessError, 409, "stale-data"),
    (StoreStateError, 503, "not-fresh"),
    (NotAnchoredError, 503, "not-anchored"),
    (AnchorUnavailableError, 503, "anchor-unavailable"),
    (OwnerStatementError, 409, "owner-statement-refused"),
    (FreshnessError, 503, "not-fresh"),
    (StoreCorruptError, 500, "store-corrupt"),
    (StoreError, 503, "store-unavailable"),
    (RecordError, 500, "record-error"),
)


def error_response(e: Exception) -> JSONResponse:
    """Map a Safehold error to a JSON error response (no record content in any message)."""
    for cls, status, code in _ERRORS:
        if isinstance(e, cls):
            # freshness findings are named (StoreForkedError, RowRolledBackError, ...): the class
            # is what the operator acts on; the message names blind indexes and epochs only
            detail = f"{type(e).__name__}: {e}" if isinstance(e, FreshnessError) else str(e)
            return JSONResponse({"error": code, "detail": detail}, status_code=status)
    return JSONResponse({"error": "internal", "detail": type(e).__name__}, status_code=500)


async def on_safehold_error(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: Safehold errors in the documented shape."""
    return error_response(exc)


async def on_invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: FastAPI's request validation → 400 ``invalid``."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"error": "invalid", "detail": _validation_detail(exc)}, status_code=400)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: FastAPI's own 404/405 for paths and methods it does not serve (the
    path is not echoed: it may hold a record id)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names only the first route's method; list them all
        headers = {"Allow": allowed_methods(request)}
    codes = {404: ("no-such-endpoint", "no such endpoint (see /openapi.json)"),
             405: ("method-not-allowed", f"method {request.method} is not allowed here")}
    code, detail = codes.get(exc.status_code, ("http-error", str(exc.detail)))
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code,
                        headers=headers)


def allowed_methods(request: Request) -> str:
    """Every method some route of the request's app serves for the request's path (for the
    ``Allow`` header of a 405, RFC 9110 §10.2.1), comma-separated."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    path = path[len(root):] if root and path.startswith(root) else path

    def walk(routes: list[Any]) -> set[str]:
        found: set[str] = set()
        for route in routes:
            sub = getattr(route, "original_router", None)  # an included APIRouter
            if sub is not None:
                found |= walk(sub.routes)
                continue
            regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is not None and methods and regex.match(path):
                found |= set(methods)
        return found

    return ", ".join(sorted(walk(request.app.router.routes)))


def _validation_detail(exc: RequestValidationError) -> str:
    """Name each bad parameter and the rule it broke; never echo the value (it may be a name)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {loc[-1]!r}" if len(loc) >= 2 else ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "request is invalid"


# --- request plumbing ------------------------------------------------------------------------


def authenticate(acl: AccessList, request: Request) -> Principal:
    """Return the caller's principal (client certificate first, then bearer token).

    Raises:
        AuthenticationError: neither identifies a known principal (401).
    """
    der = getattr(request.state, "tls_peer_cert", None)
    return acl.principal(certificate=der, authorization=request.headers.get("authorization", ""))


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


#: Media types of a native API body (RFC 8259 §11); ``application/fhir+json`` belongs to FHIR routes.
JSON_MEDIA_TYPES = ("application/json",)


def require_json(request: Request, accepted: tuple[str, ...] = JSON_MEDIA_TYPES) -> None:
    """Refuse a body that is not declared as JSON before anything parses it.

    Exactly one ``Content-Type`` header whose media type (case-insensitive, RFC 9110 §8.3.1)
    is one of ``accepted``, with no ``charset`` other than UTF-8 (RFC 8259 §8.1). A missing
    header is refused as well: ``text/plain``, form and multipart bodies are never read as JSON.

    Raises:
        UnsupportedMediaTypeError: anything else (415); the message names what is accepted.
    """
    values = request.headers.getlist("content-type")
    want = " or ".join(accepted)
    if len(values) != 1:
        got = "none" if not values else f"{len(values)} Content-Type headers"
        raise UnsupportedMediaTypeError(f"request body must be {want} (got {got})")
    media, *params = values[0].split(";")
    media = media.strip().lower()
    if media not in accepted:
        raise UnsupportedMediaTypeError(f"request body must be {want} (got {media[:60]!r})")
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaTypeError(f"request body must be UTF-8 {want} (charset "
                                            f"{value.strip()[:20]!r} is not UTF-8)")


def _batch_items(body: bytes) -> list[tuple[object, object]]:
    """The ``(id, record)`` pairs of a batch body ``{"records": [{"id", "record"}, ...]}``.

    Raises:
        InvalidRecordError: not JSON, or not that envelope (at most :data:`MAX_BATCH` items).
    """
    try:
        doc = loads_strict(body)
    except NonFiniteNumberError as e:
        raise InvalidRecordError(f"batch body: {e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRecordError("batch body is not JSON") from None
    recs = doc.get("records") if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or not isinstance(recs, list) or len(recs) > MAX_BATCH
            or set(doc) != {"records"}):
        raise InvalidRecordError(f'batch body must be {{"records": [...]}} with at most {MAX_BATCH} items '
                                 "and nothing else")
    items: list[tuple[object, object]] = []
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or not set(r) <= {"id", "record"}:
            raise InvalidRecordError(f'batch item {i}: must be {{"id": str, "record": object}} '
                                     "and nothing else")
        items.append((r.get("id"), r.get("record")))
    return items


#: A version entity tag (RFC 9110 §8.8.3), weak or strong, at most 18 digits.
ETAG_RE = re.compile(r'(?:W/)?"([0-9]{1,18})"')


def _etag(version: int) -> str:
    return f'"{version}"'


def _if_match(value: str | None) -> int | None:
    """The version an ``If-Match`` entity tag names (RFC 9110 §8.8.3: ``"3"`` or ``W/"3"``,
    quotes required); None without the header.

    Raises:
        InvalidRecordError: any other value (``null``, ``3``, ``*``, a list).
    """
    if value is None:
        return None
    m = ETAG_RE.fullmatch(value)
    if m is None:
        raise InvalidRecordError('If-Match must be a version entity tag such as "3" or W/"3"')
    return int(m.group(1))


def _api(request: Request) -> NativeAPI:
    api: NativeAPI = request.app.state.records
    return api


async def _principal(request: Request, role: str) -> Principal:
    api = _api(request)
    p = authenticate(api.access(), request)
    if not p.can(role):
        if api.repo.audit is not None:
            await run_in_threadpool(api.repo.audit.append, p.name, request.method.lower(), None, "denied")
        p.require(role)  # raises PermissionDeniedError (403)
    return p


async def reader(request: Request) -> Principal:
    """Dependency: an authenticated caller with role ``reader`` or more (async: no thread hop)."""
    return await _principal(request, "reader")


async def writer(request: Request) -> Principal:
    """Dependency: an authenticated caller with role ``writer`` or more."""
    return await _principal(request, "writer")


async def admin(request: Request) -> Principal:
    """Dependency: an authenticated caller with role ``admin``."""
    return await _principal(request, "admin")


# --- routes ----------------------------------------------------------------------------------

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz(request: Request) -> JSONResponse:
    """``{"status": "ok"}`` (200) or ``{"status": "unavailable"}`` (503), with ``"reason"``
    when the store is not fresh (the finding: blind indexes and epochs, never a value)."""
    api = _api(request)
    ok = api.health() if api.health else True
    body = {"status": "ok" if ok else "unavailable"}
    if not ok and api.freshness is not None:
        fresh, why = api.freshness.health()
        if not fresh:
            body["reason"] = why
    return JSONResponse(body, status_code=200 if ok else 503)


@router.put("/v1/patients/{rid}", status_code=200)
async def put_patient(
    rid: str,
    request: Request,
    if_match: str | None = Header(default=None),
    if_none_match: str | None = Header(default=None),
    who: Principal = Depends(writer),
) -> Response:
    """Create (201) or replace (200) a record; ``If-Match`` for compare-and-set (412)."""
    require_json(request)
    if if_none_match is not None and if_none_match.strip() != "*":
        raise InvalidRecordError("If-None-Match must be * (create only)")
    record = parse_record(rid, await read_body(request, MAX_RECORD_BYTES, "record body"))
    expected = _if_match(if_match)
    repo = _api(request).repo
    res = await run_in_threadpool(lambda: repo.put(who.name, record, expected_version=expected,
                                                   create_only=if_none_match is not None))
    out = json.dumps({"id": rid, "version": res.version, "status": res.status}).encode()
    return Response(out, status_code=201 if res.status == "created" else 200,
                    media_type="application/json", headers={"ETag": _etag(res.version)})


@router.get("/v1/patients/{rid}")
def get_patient(rid: str, request: Request, who: Principal = Depends(reader)) -> Response:
    """The record (its stored form: no re-encoding) with ``ETag: "<version>"``."""
    raw, version = _api(request).repo.get_raw(who.name, rid)
    return Response(raw, media_type="application/json", headers={"ETag": _etag(version)})


@router.delete("/v1/patients/{rid}", status_code=204)
def delete_patient(rid: str, request: Request, if_match: str | None = Header(default=None),
                   who: Principal = Depends(writer)) -> Response:
    """Delete a record (204); ``If-Match`` as for PUT."""
    _api(request).repo.delete(who.name, rid, expected_version=_if_match(if_match))
    return Response(status_code=204)


@router.get("/v1/patients")
def list_or_search(
    request: Request,
    cursor: str | None = Query(default=None, pattern=r"^([0-9a-f]{2}){1,64}$"),  # a blind index, hex
    limit: int = Query(default=100, ge=1, le=1000),
    family: str | None = Query(default=None, max_length=512),
    given: str | None = Query(default=None, max_length=512),
    birthDate: str | None = Query(default=None, max_length=64),  # noqa: N803 - FHIR name
    gender: str | None = Query(default=None, max_length=64),
    identifier: str | None = Query(default=None, max_length=1024),
    who: Principal = Depends(reader),
) -> Response:
    """A page of ids, or (with search fields) the matching records with their versions.

    Answered as ready bytes, each record's stored form (compact JSON) embedded as it is:
    FastAPI's ``jsonable_encoder`` walk, and even ``json.dumps``, over 100 nested FHIR records
    cost more than the search itself (issue 17, the 100-hit search)."""
    unknown = sorted(set(request.query_params) - {"cursor", "limit", *SEARCH_FIELDS})
    if unknown:
        raise InvalidRecordError(f"unknown query parameters {unknown}")
    repo = _api(request).repo
    crit = {k: v for k, v in {"family": family, "given": given, "birthDate": birthDate,
                              "gender": gender, "identifier": identifier}.items() if v is not None}
    if crit:
        hits = repo.search_raw(who.name, crit, limit=limit + 1)
        # the stored form is compact JSON already: embed it instead of decoding and encoding
        # 100 nested records again (issue 17, the 100-hit search)
        parts = [b'{"id":' + json.dumps(i).encode() + b',"record":' + raw + b',"version":'
                 + str(v).encode() + b"}" for i, raw, v in hits[:limit]]
        body = b'{"records":[' + b",".join(parts) + b"]"
        if len(hits) > limit:
            body += b',"truncated":true'  # more matched than ``limit``
        return Response(body + b"}", media_type="application/json")
    ids, nxt = repo.list_ids(who.name, cursor=cursor, limit=limit)
    return JSONResponse({"ids": ids, "next": nxt})


@router.post("/v1/patients:batch")
async def batch(request: Request, who: Principal = Depends(writer)) -> JSONResponse:
    """Upsert up to 500 records; per-item results (a malformed item: 400, nothing written)."""
    # every item is checked before any write: a malformed batch writes nothing
    require_json(request)
    body = await read_body(request, MAX_BATCH_BYTES, "batch body")
    repo = _api(request).repo

    def work() -> list[Any]:  # parsing (JSON, postings) is CPU: off the event loop too
        return repo.batch(who.name, parse_batch(_batch_items(body)))

    results = await run_in_threadpool(work)
    return JSONResponse({"results": results})


@router.get("/v1/audit/verify")
def audit_verify(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """Verify the whole access-audit chain against its head: ``{"entries": n}`` or 409."""
    audit = _api(request).repo.audit
    if audit is None:
        raise ConfigError("audit is disabled")
    return {"entries": audit.verify(full=True if request.query_params.get("full") == "true" else None)}


@router.get("/v1/audit/segment")
def audit_segment(request: Request, through: int = Query(..., ge=0),
                  who: Principal = Depends(admin)) -> Response:
    """Export the oldest live audit entries through ``through`` (NDJSON, stored form) for
    retention; nothing is dropped until ``POST /v1/audit/seal`` names its SHA-256."""
    audit = _api(request).repo.audit
    if audit is None:
        raise ConfigError("audit is disabled")
    data, first, last, digest = audit.export_segment(through)
    return Response(data, media_type="application/x-ndjson",
                    headers={"X-Safehold-Segment-SHA256": digest,
                             "X-Safehold-Segment": f"{first}-{last}"})


@router.post("/v1/audit/seal")
async def audit_seal(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """Drop an exported segment (``{"through": n, "sha256": hex}``), keeping its signed digest
    in the chain: ``{"first", "last", "sha256"}``."""
    audit = _api(request).repo.audit
    if audit is None:
        raise ConfigError("audit is disabled")
    require_json(request)
    try:
        doc = json.loads(await read_body(request, 4096, "seal request"))
        through, digest = doc["through"], doc["sha256"]
        if isinstance(through, float) and through.is_integer():
            through = int(through)  # JSON Schema: 1.0 is an integer
        if type(through) is not int or through < 0 or not isinstance(digest, str) or \
                not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise InvalidRecordError('seal takes {"through": <entry number>, "sha256": <64 hex>}') from None
    rec = await run_in_threadpool(audit.seal, who.name, through, digest)
    return {"first": rec.first, "last": rec.last, "sha256": rec.sha256}


@router.post("/v1/audit/reseal")
def audit_reseal(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """Accept the log as it is after a failed head check: ``{"entries": n, "outcome"}``."""
    audit = _api(request).repo.audit
    if audit is None:
        raise ConfigError("audit is disabled")
    entry = audit.reseal(who.name)
    return {"entries": entry.seq + 1, "outcome": entry.body["outcome"]}


# --- freshness: the owner's routes (docs/freshness.md) ----------------------------------------


def _freshness(request: Request) -> Freshness:
    f = _api(request).freshness
    if f is None:
        raise RecordNotFoundError("freshness is off (measured config freshness = false)")
    return f


@router.get("/v1/freshness")
def freshness_status(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """The FreshStore's status: ledger, serving, problem, committed / anchored epoch, rows."""
    return _freshness(request).status()


@router.get("/v1/freshness/proposal")
def freshness_proposal(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """What re-anchoring would accept (rows per namespace, head, last entry time, last audit
    entry) and the unsigned owner statement ``payload`` (base64url) the owner signs."""
    f = _freshness(request)
    doc = f.statement()
    audit = _api(request).repo.audit
    if audit is not None:
        head = audit.read_head() if f.fs.problem is None else _unverified_audit_head(f)
        doc["proposal"]["last_audit_entry"] = head
    return doc


def _unverified_audit_head(f: Freshness) -> Any:
    """The audit head row as the database holds it (the store is not fresh: shown to the owner
    as a claim, labelled so)."""
    from safehold.records.access_audit import AUDIT_NAMESPACE, HEAD_KEY

    row = f.fs.inner.get(f"{AUDIT_NAMESPACE}.head", HEAD_KEY)
    if row is None:
        return None
    try:
        d = json.loads(row.value)
        return {"seq": d.get("seq"), "hash": d.get("hash"), "verified": False}
    except ValueError:
        return {"verified": False, "malformed": True}


@router.post("/v1/freshness/reanchor")
async def freshness_reanchor(request: Request, who: Principal = Depends(admin)) -> dict[str, Any]:
    """Apply the owner-signed statement ``{"payload", "signature"}``; the members accept only
    the owner's signature. Audited as ``freshness-reanchor`` (outcome ``ok`` or ``refused``);
    the statement itself is committed into the freshness journal."""
    f = _freshness(request)
    require_json(request)
    body = loads_strict(await read_body(request, 64 * 1024, "owner statement"))
    audit = _api(request).repo.audit
    try:
        head = await run_in_threadpool(f.reanchor, body)
    except FreshnessError:
        if audit is not None and f.fs.problem is None:
            await run_in_threadpool(audit.append, who.name, "freshness-reanchor", None, "refused")
        raise
    out: dict[str, Any] = {"ledger": f.fs.ledger, "epoch": head.epoch, "digest": head.digest.hex(),
                           "audited": False}
    if audit is not None:
        try:
            await run_in_threadpool(audit.append, who.name, "freshness-reanchor", None, "ok")
            out["audited"] = True
        except SafeholdError as e:
            # the anchor already took the statement (it cannot be undone) and the journal holds
            # it; the access audit itself is broken (e.g. rows cut by the DBA): say so, loudly
            log.error("FRESHNESS: re-anchored ledger %r, but the access audit entry failed: %s",
                      f.fs.ledger, e)
            out["audit_error"] = f"{type(e).__name__}: {e}"
    return out


def add_error_handlers(app: FastAPI) -> None:
    """Install the records service's error shapes (Safehold errors, validation, 404/405)."""
    app.add_exception_handler(SafeholdError, on_safehold_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def create_native_app(
    repo: PatientRepository,
    acl: AccessSource,
    *,
    title: str = "Safehold records",
    health: Callable[[], bool] | None = None,
    freshness: Freshness | None = None,
) -> FastAPI:
    """Build the native API app over ``repo``; ``acl`` may be a callable to allow reloads.
    (:func:`safehold.records.fhir.http.mount_fhir` adds FHIR R4 REST at ``/fhir``.)"""
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None)
    app.state.records = NativeAPI(repo, access_getter(acl), health, freshness)
    add_error_handlers(app)
    app.include_router(router)
    app.openapi = native_openapi  # type: ignore[method-assign]
    return app
