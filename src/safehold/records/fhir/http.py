"""HTTP layer of ``/fhir``: FHIR R4 RESTful API routes, content negotiation, OperationOutcome.

:func:`mount_fhir` mounts it at ``/fhir`` on the native API's app (a sub-application, so its
errors are OperationOutcome resources while the native API keeps ``{error, detail}``).
Same authentication and roles as the native API (bearer token or client certificate;
:func:`safehold.records.http.reader` / ``writer``), every access in the same access audit.

===============================================  ========  ======================================
``GET /fhir/metadata``                           none      CapabilityStatement
``GET /fhir/{type}?…``                           reader    search → Bundle ``searchset``
``POST /fhir/{type}``                            writer    create (201, ``Location``, ``ETag``);
                                                           ``If-None-Exist`` = conditional create
``GET /fhir/{type}/{id}``                        reader    read (``ETag: W/"n"``)
``PUT /fhir/{type}/{id}``                        writer    update / update-as-create;
                                                           ``If-Match: W/"n"`` (412)
``DELETE /fhir/{type}/{id}``                     writer    204 (also when there was nothing)
``GET /fhir/{type}/{id}/_history/{vid}``         reader    vread
``POST /fhir/``                                  reader*   ``batch`` Bundle → ``batch-response``
                                                           (*write entries need writer)
``GET /fhir/openapi.json``                       none      OpenAPI description of these routes
===============================================  ========  ======================================

Formats (R4 §3.1.0.1.6 / §2.6): ``_format`` overrides ``Accept``; ``json``,
``application/fhir+json``, ``application/json+fhir`` and ``application/json`` are served (the
response is ``application/fhir+json``, or ``application/json`` when only that is acceptable);
anything else (XML, Turtle, HTML) → 406. Request bodies must be ``application/fhir+json`` or
``application/json`` (415 otherwise). ``_pretty=true`` indents. Every error is an
OperationOutcome whose diagnostics never hold record content.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from safehold.errors import (
    AuditChainError,
    RecordError,
    RecordNotFoundError,
    RecordTamperedError,
    SafeholdError,
    StoreError,
)
from safehold.records.access import AuthenticationError, PermissionDeniedError, Principal
from safehold.records.errors import (
    AlreadyExistsError,
    FhirUnsupportedMediaTypeError,
    InvalidRecordError,
    NonFiniteNumberError,
    NotAcceptableError,
    PreconditionFailedError,
    SearchTooCostlyError,
)
from safehold.records.fhir.capability import capability_statement
from safehold.records.fhir.core import (
    FhirInvalidError,
    FhirNotSupportedError,
    FhirStore,
    MultipleMatchesError,
    UnknownResourceTypeError,
    Written,
    operation_outcome,
)
from safehold.records.fhir.openapi import fhir_openapi
from safehold.records.fhir.search import SearchRefusedError
from safehold.records.http import (
    ETAG_RE,
    MAX_BATCH_BYTES,
    NativeAPI,
    PayloadTooLargeError,
    _validation_detail,
    allowed_methods,
    read_body,
    reader,
    writer,
)
from safehold.records.model import MAX_RECORD_BYTES, loads_strict
from safehold.store.errors import StoreCorruptError

__all__ = ["FHIR_JSON", "FhirAPI", "NotAcceptableError", "FhirUnsupportedMediaTypeError",
           "create_fhir_app", "issue_for", "mount_fhir", "outcome_response", "response_type", "router"]

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = ("application/fhir+json", "application/json+fhir", "application/json")
_FORMAT_JSON = {"json": FHIR_JSON, "application/fhir+json": FHIR_JSON,
                "application/json+fhir": FHIR_JSON, "application/json": "application/json"}

# --- errors → status + OperationOutcome -----------------------------------------------------------

#: (exception class, HTTP status, FHIR IssueType); the first matching class wins.
_ISSUES: tuple[tuple[type[Exception], int, str], ...] = (
    (AuthenticationError, 401, "login"),
    (PermissionDeniedError, 403, "forbidden"),
    (UnknownResourceTypeError, 404, "not-supported"),
    (RecordNotFoundError, 404, "not-found"),
    (NotAcceptableError, 406, "not-supported"),
    (FhirUnsupportedMediaTypeError, 415, "not-supported"),
    (MultipleMatchesError, 412, "multiple-matches"),
    (PreconditionFailedError, 412, "conflict"),
    (AlreadyExistsError, 409, "duplicate"),
    (RecordTamperedError, 409, "security"),
    (AuditChainError, 409, "exception"),
    (SearchTooCostlyError, 400, "too-costly"),
    (SearchRefusedError, 400, "invalid"),
    (FhirNotSupportedError, 400, "not-supported"),
    (InvalidRecordError, 400, "invalid"),
    (StoreCorruptError, 500, "exception"),
    (StoreError, 503, "transient"),
    (RecordError, 500, "exception"),
)


def issue_for(e: Exception) -> tuple[int, str]:
    """``(HTTP status, IssueType)`` for an exception (500 ``exception`` if unknown)."""
    if isinstance(e, PayloadTooLargeError):
        return 413, "too-long"
    for cls, status, code in _ISSUES:
        if isinstance(e, cls):
            if isinstance(e, SearchRefusedError):
                return status, e.code
            return status, code
    return 500, "exception"


def _diagnostics(e: Exception) -> str:
    return str(e) if isinstance(e, SafeholdError | ValueError) else type(e).__name__


def outcome_response(status: int, code: str, diagnostics: str, *,
                     headers: dict[str, str] | None = None) -> Response:
    """An OperationOutcome error response (always FHIR JSON, whatever was asked)."""
    body = json.dumps(operation_outcome(code, diagnostics), ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


async def on_error(request: Request, exc: Exception) -> Response:
    """Exception handler: any Safehold error as an OperationOutcome."""
    status, code = issue_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return outcome_response(status, code, _diagnostics(exc), headers=headers)


async def on_invalid_request(request: Request, exc: Exception) -> Response:
    """Exception handler: FastAPI's request validation → 400 (names the parameter, not the
    value)."""
    assert isinstance(exc, RequestValidationError)
    return outcome_response(400, "invalid", _validation_detail(exc))


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Exception handler: unknown paths (404) and methods (405, with every method the path
    serves in ``Allow``)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allow = allowed_methods(request)
        return outcome_response(405, "not-supported", f"method {request.method} is not allowed here "
                                f"(allowed: {allow})", headers={"Allow": allow})
    if exc.status_code == 404:
        return outcome_response(404, "not-found", "no such FHIR endpoint (see /fhir/metadata)")
    return outcome_response(exc.status_code, "exception", str(exc.detail))


# --- content negotiation --------------------------------------------------------------------------


def response_type(request: Request) -> str:
    """The media type to answer with (module docstring).

    Raises:
        NotAcceptableError: only formats other than JSON are acceptable.
        FhirInvalidError: ``_pretty`` is neither ``true`` nor ``false``.
    """
    if request.query_params.get("_pretty", "true") not in ("true", "false"):
        raise FhirInvalidError("_pretty must be true or false")
    fmt = request.query_params.get("_format")
    if fmt is not None:
        mt = _FORMAT_JSON.get(fmt)
        if mt is None:
            raise NotAcceptableError("_format asks for a format this server does not produce; "
                                     "it serves JSON only (_format=json)")
        return mt
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return FHIR_JSON
    ranges = []
    for part in accept.split(","):
        mt, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            ranges.append(mt.lower())
    if any(r in ("*/*", "application/*", "application/fhir+json", "application/json+fhir") for r in ranges):
        return FHIR_JSON
    if "application/json" in ranges:
        return "application/json"
    raise NotAcceptableError("Accept names no format this server produces; it serves "
                             "application/fhir+json (and application/json)")


def _check_body_type(request: Request) -> None:
    ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ct not in _JSON_TYPES:
        raise FhirUnsupportedMediaTypeError("request body must be application/fhir+json (or "
                                        "application/json)")


def _render(request: Request, obj: Any, *, status: int = 200, headers: dict[str, str] | None = None,
            media_type: str | None = None) -> Response:
    pretty = request.query_params.get("_pretty") == "true"
    body = json.dumps(obj, ensure_ascii=False, indent=2 if pretty else None,
                      separators=None if pretty else (",", ":")).encode("utf-8")
    return Response(body, status_code=status, media_type=media_type or response_type(request),
                    headers=headers)


def _base(request: Request) -> str:
    """The FHIR base URL (``https://host:port/fhir``): where this sub-application is mounted."""
    return f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}".rstrip("/")


def _prefer(request: Request, name: str) -> str | None:
    for part in request.headers.get("prefer", "").split(","):
        k, _, v = part.strip().partition("=")
        if k.strip().lower() == name:
            return v.strip().strip('"').lower()
    return None


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    m = ETAG_RE.fullmatch(value)
    if m is None:
        raise FhirInvalidError('If-Match must be a version entity tag such as W/"3"')
    return int(m.group(1))


def _version_headers(request: Request, w_res: dict[str, Any], version: int, *,
                     location: bool = False) -> dict[str, str]:
    h = {"ETag": f'W/"{version}"'}
    last = w_res.get("meta", {}).get("lastUpdated")
    if isinstance(last, str):
        try:
            h["Last-Modified"] = format_datetime(datetime.fromisoformat(last.replace("Z", "+00:00")),
                                                 usegmt=True)
        except (ValueError, TypeError):
            pass
    if location:
        h["Location"] = f"{_base(request)}/{w_res['resourceType']}/{w_res['id']}/_history/{version}"
    return h


# --- the app --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FhirAPI:
    """``app.state.fhir``: the :class:`~safehold.records.fhir.core.FhirStore`."""

    store: FhirStore


def _fhir(request: Request) -> FhirStore:
    api: FhirAPI = request.app.state.fhir
    return api.store


def _no_query(request: Request) -> None:
    """Refuse query parameters other than ``_format``/``_pretty`` on interactions that take
    none (a conditional create sent as ``POST /Patient?identifier=…`` would otherwise be an
    unconditional one).

    Raises:
        FhirNotSupportedError: names the first such parameter.
    """
    if request.url.path.rstrip("/").endswith("/metadata"):
        return
    for k in request.query_params:
        if k not in ("_format", "_pretty"):
            raise FhirNotSupportedError(f"parameter {k[:40]!r} is not supported here (conditional "
                                        "create takes the If-None-Exist header)")


async def _reader(request: Request) -> Principal:
    response_type(request)  # 406 before anything is read
    return await reader(request)


async def _writer(request: Request) -> Principal:
    response_type(request)
    _no_query(request)
    return await writer(request)


async def _instance_reader(request: Request) -> Principal:
    response_type(request)
    _no_query(request)
    return await reader(request)


async def _body(request: Request, limit: int, what: str) -> bytes:
    _check_body_type(request)
    return await read_body(request, limit, what)


def _written(request: Request, w: Written) -> Response:
    status = 201 if w.created else 200
    headers = _version_headers(request, w.resource, w.version, location=True)
    pref = _prefer(request, "return")
    if pref == "minimal":
        return Response(status_code=status, headers=headers)
    if pref == "operationoutcome":
        note = "created" if w.created else ("updated" if w.changed else "unchanged")
        return _render(request, operation_outcome("informational", note, "information"),
                       status=status, headers=headers)
    return _render(request, w.resource, status=status, headers=headers)


class _TypeConvertor(Convertor[str]):
    """A path segment that can be a resource type (``Patient``; not ``metadata``), so the
    type routes never shadow ``/metadata`` or ``/openapi.json``."""

    regex = "[A-Z][A-Za-z]{0,63}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhirtype", _TypeConvertor())
router = APIRouter()


@router.get("/metadata")
def metadata(request: Request) -> Response:
    """The CapabilityStatement (no authentication: it holds no data)."""
    return _render(request, capability_statement(_base(request)))


@router.post("/")
async def batch(request: Request, who: Principal = Depends(_reader)) -> Response:
    """A ``batch`` Bundle; each entry answered in place (not atomic)."""
    raw = await _body(request, MAX_BATCH_BYTES, "batch Bundle")
    try:
        bundle = loads_strict(raw)
    except NonFiniteNumberError as e:
        raise FhirInvalidError(f"body: {e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FhirInvalidError("body is not JSON") from None
    if not isinstance(bundle, dict):
        raise FhirInvalidError("body must be a Bundle")
    base = _base(request)
    outcomes = await run_in_threadpool(_fhir(request).batch, who.name, bundle, base=base,
                                       can_write=who.can("writer"))
    entries = []
    for o in outcomes:
        if o.kind == "write" and o.written is not None:
            w = o.written
            resp: dict[str, Any] = {"status": "201 Created" if w.created else "200 OK",
                                    "location": f"{w.resource['resourceType']}/{w.resource['id']}"
                                                f"/_history/{w.version}",
                                    "etag": f'W/"{w.version}"'}
            if not w.changed:
                resp["outcome"] = operation_outcome("informational", "unchanged" if not w.created
                                                    else "match found: not created", "information")
            entries.append({"response": resp})
        elif o.kind == "read" and o.resource is not None:
            entries.append({"resource": o.resource, "response": {
                "status": "200 OK", "etag": f'W/"{o.resource["meta"]["versionId"]}"'}})
        elif o.kind == "delete":
            entries.append({"response": {"status": "204 No Content"}})
        else:
            err = o.error if o.error is not None else RecordError("failed")
            status, code = issue_for(err)
            entries.append({"response": {"status": f"{status} {HTTPStatus(status).phrase}",
                                         "outcome": operation_outcome(code, _diagnostics(err))}})
    return _render(request, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})


@router.get("/{rtype:fhirtype}")
def search(rtype: str, request: Request, who: Principal = Depends(_reader)) -> Response:
    """Search → a ``searchset`` Bundle with ``total`` and paging links."""
    lenient = _prefer(request, "handling") == "lenient"
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_format", "_pretty")]
    result = _fhir(request).search(who.name, rtype, params, lenient=lenient)
    base = _base(request)
    used = result.plan.used
    link = [{"relation": "self", "url": f"{base}/{rtype}?{urlencode(used + _cursor(result.plan.cursor))}"},
            {"relation": "first", "url": f"{base}/{rtype}?{urlencode(used)}"}]
    if result.next_cursor is not None:
        link.append({"relation": "next",
                     "url": f"{base}/{rtype}?{urlencode(used + [('_cursor', result.next_cursor)])}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    bundle["link"] = link
    if result.entries:
        bundle["entry"] = [{"fullUrl": f"{base}/{rtype}/{rid}", "resource": res, "search": {"mode": "match"}}
                           for rid, res in result.entries]
    return _render(request, bundle)


def _cursor(c: str | None) -> list[tuple[str, str]]:
    return [("_cursor", c)] if c else []


@router.post("/{rtype:fhirtype}")
async def create(rtype: str, request: Request, if_none_exist: str | None = Header(default=None),
                 who: Principal = Depends(_writer)) -> Response:
    """Create with a server-assigned id; ``If-None-Exist`` for a conditional create."""
    raw = await _body(request, MAX_RECORD_BYTES, "resource body")
    w = await run_in_threadpool(_fhir(request).create, who.name, rtype, raw, if_none_exist=if_none_exist)
    return _written(request, w)


@router.get("/{rtype:fhirtype}/{rid}")
def read(rtype: str, rid: str, request: Request, who: Principal = Depends(_instance_reader)) -> Response:
    """Read the current version."""
    res, version = _fhir(request).read(who.name, rtype, rid)
    return _render(request, res, headers=_version_headers(request, res, version))


@router.put("/{rtype:fhirtype}/{rid}")
async def update(rtype: str, rid: str, request: Request, if_match: str | None = Header(default=None),
                 who: Principal = Depends(_writer)) -> Response:
    """Update (or create with this id); ``If-Match: W/"n"`` → 412 on another version."""
    expected = _if_match(if_match)
    raw = await _body(request, MAX_RECORD_BYTES, "resource body")
    w = await run_in_threadpool(_fhir(request).update, who.name, rtype, rid, raw, if_match=expected)
    return _written(request, w)


@router.delete("/{rtype:fhirtype}/{rid}", status_code=204)
def delete(rtype: str, rid: str, request: Request, who: Principal = Depends(_writer)) -> Response:
    """Delete the resource and its history (204, also when there was none)."""
    _fhir(request).delete(who.name, rtype, rid)
    return Response(status_code=204)


@router.get("/{rtype:fhirtype}/{rid}/_history/{vid}")
def vread(rtype: str, rid: str, vid: str, request: Request,
          who: Principal = Depends(_instance_reader)) -> Response:
    """Read one version."""
    res, version = _fhir(request).vread(who.name, rtype, rid, vid)
    return _render(request, res, headers=_version_headers(request, res, version))


def create_fhir_app(store: FhirStore, native_state: NativeAPI) -> FastAPI:
    """The ``/fhir`` sub-application over ``store``; ``native_state`` is the native API's
    :class:`~safehold.records.http.NativeAPI` (authentication, audit of refusals)."""
    app = FastAPI(title="Safehold FHIR R4", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.records = native_state
    app.state.fhir = FhirAPI(store)
    app.add_exception_handler(SafeholdError, on_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.include_router(router)
    app.openapi = fhir_openapi  # type: ignore[method-assign]
    return app



def mount_fhir(app: FastAPI, store: FhirStore | None = None) -> FastAPI:
    """Mount FHIR R4 REST at ``/fhir`` on a native API app
    (:func:`safehold.records.http.create_native_app`), sharing its authentication and audit;
    default store: :meth:`FhirStore.beside` the app's repository. Returns ``app``."""
    native: NativeAPI = app.state.records
    app.mount("/fhir", create_fhir_app(store if store is not None else FhirStore.beside(native.repo), native))
    # Starlette's mount pattern stops at a decoded newline inside the path, so such a /fhir path
    # falls through to the native app: answer it as FHIR (OperationOutcome) all the same.
    native_handler = app.exception_handlers[StarletteHTTPException]

    async def on_http_error_anywhere(request: Request, exc: Exception) -> Response:
        path = request.scope.get("path", "")
        if path == "/fhir" or path.startswith("/fhir/"):
            return await on_http_error(request, exc)
        out = native_handler(request, exc)
        return await out if inspect.isawaitable(out) else out

    app.add_exception_handler(StarletteHTTPException, on_http_error_anywhere)
    return app
