"""HTTP layer of the E-Rezept Fachdienst routes (FHIR R4 JSON; status codes live here only).

These routes are the *inner* application: in a deployment they are reached only through the
E-Rezept VAU (``POST /VAU/{pseudonym}``, :mod:`safehold.vau.http`), never on a socket of their
own. Routes (gemSpec_FD_eRp shape):

* ``POST /Task/$create`` (Parameters with ``workflowType``) → 201 Task with AccessCode
* ``POST /Task/{id}/$activate`` (``X-AccessCode`` header; Parameters with the ``ePrescription``
  Binary, ``application/pkcs7-mime``) → 200 Task
* ``POST /Task/{id}/$accept?ac=`` → 200 Bundle (Task with Secret, signed prescription)
* ``POST /Task/{id}/$reject?secret=`` → 204
* ``POST /Task/{id}/$close?secret=`` (MedicationDispense) → 200 receipt Bundle
* ``POST /Task/{id}/$abort`` (``X-AccessCode`` or ``?secret=``) → 204
* ``GET /Task`` (insured) → 200 searchset; ``GET /Task/{id}`` (``?ac=`` / ``?secret=``) → 200 Task

Errors are FHIR OperationOutcome: 400 invalid input / bundle / signature format, 401 access
token, 403 role / AccessCode / Secret, 404 unknown Task, 409 wrong state, 410 cancelled,
503 store unavailable. State comes from ``request.app.state.erezept`` (:class:`ErezeptState`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from safehold.erezept.errors import (
    AccessCodeError,
    AccessTokenError,
    BundleInvalidError,
    ErezeptError,
    RoleError,
    TaskGoneError,
    TaskNotFoundError,
    TaskStateError,
)
from safehold.erezept.tasks import TaskService
from safehold.erezept.tokens import AccessTokenVerifier, Principal
from safehold.errors import RecordTamperedError, StoreUnavailableError

__all__ = ["ErezeptState", "router"]

FHIR_JSON = "application/fhir+json"
MAX_BODY = 4 * 1024 * 1024

_STATUS: list[tuple[type[Exception], int, str]] = [
    (AccessTokenError, 401, "security"),
    (RoleError, 403, "forbidden"),
    (AccessCodeError, 403, "forbidden"),
    (TaskNotFoundError, 404, "not-found"),
    (TaskStateError, 409, "conflict"),
    (TaskGoneError, 410, "deleted"),
    (BundleInvalidError, 400, "invalid"),
]


@dataclass
class ErezeptState:
    """The service and token verifier the routes use."""

    tasks: TaskService
    verifier: AccessTokenVerifier


def _state(request: Request) -> ErezeptState:
    st = getattr(request.app.state, "erezept", None)
    if not isinstance(st, ErezeptState):
        raise RuntimeError("app.state.erezept is not configured")
    return st


def _fhir(obj: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(obj, ensure_ascii=False).encode("utf-8"), status_code=status, media_type=FHIR_JSON
    )


def _outcome(status: int, code: str, text: str) -> Response:
    return _fhir(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        },
        status,
    )


def _error(e: Exception) -> Response:
    for cls, status, code in _STATUS:
        if isinstance(e, cls):
            return _outcome(status, code, str(e))
    if isinstance(e, StoreUnavailableError):
        return _outcome(503, "transient", "prescription store unavailable")
    if isinstance(e, RecordTamperedError):
        return _outcome(500, "exception", "stored Task failed authentication (database tampering)")
    return _outcome(400, "invalid", str(e))


def _principal(request: Request) -> Principal:
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer "):
        raise AccessTokenError("Authorization: Bearer <access token> is required")
    return _state(request).verifier.principal(auth[7:])


async def _json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise BundleInvalidError(f"request body exceeds {MAX_BODY} bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleInvalidError("request body is not UTF-8 FHIR JSON") from None


def _param(params: Any, name: str) -> dict[str, Any]:
    if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
        raise BundleInvalidError("request body must be a FHIR Parameters resource")
    for p in params.get("parameter") or []:
        if isinstance(p, dict) and p.get("name") == name:
            return p
    raise BundleInvalidError(f"Parameters lack {name!r}")


#: What a route answers as a FHIR OperationOutcome (:func:`_error`) instead of raising.
_ANSWERED = (ErezeptError, StoreUnavailableError, RecordTamperedError)


def _outcomes(route: Callable[..., Any]) -> Callable[..., Any]:
    """Route decorator: an :data:`_ANSWERED` error the route raises (E-Rezept errors, the store
    unavailable, a stored Task that fails authentication) becomes its OperationOutcome response
    (:func:`_error`); anything else propagates. Keeps the route's signature (FastAPI reads it
    through ``__wrapped__``) and whether it is a coroutine function (sync routes stay in the
    thread pool)."""
    if inspect.iscoroutinefunction(route):

        @functools.wraps(route)
        async def answered_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await route(*args, **kwargs)
            except _ANSWERED as e:
                return _error(e)

        return answered_async

    @functools.wraps(route)
    def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return route(*args, **kwargs)
        except _ANSWERED as e:
            return _error(e)

    return answered


router = APIRouter()


@router.post("/Task/$create")
@_outcomes
async def task_create(request: Request) -> Response:
    """Create a draft Task (prescriber)."""
    p = _principal(request)
    coding = _param(await _json(request), "workflowType").get("valueCoding")
    flow = coding.get("code") if isinstance(coding, dict) else None
    if not isinstance(flow, str):
        raise BundleInvalidError("workflowType needs valueCoding.code")
    return _fhir(_state(request).tasks.create(p, flow), 201)


@router.post("/Task/{task_id}/$activate")
@_outcomes
async def task_activate(task_id: str, request: Request) -> Response:
    """Activate with the signed KBV bundle (prescriber)."""
    p = _principal(request)
    binary = _param(await _json(request), "ePrescription").get("resource")
    if not isinstance(binary, dict) or binary.get("resourceType") != "Binary":
        raise BundleInvalidError("ePrescription must be a Binary resource")
    if binary.get("contentType") != "application/pkcs7-mime":
        raise BundleInvalidError("ePrescription Binary must be application/pkcs7-mime (CMS)")
    try:
        signed = base64.b64decode(binary.get("data") or "", validate=True)
    except (binascii.Error, ValueError):
        raise BundleInvalidError("ePrescription Binary data is not base64") from None
    ac = request.headers.get("x-accesscode") or request.query_params.get("ac") or ""
    return _fhir(_state(request).tasks.activate(p, task_id, ac, signed))


@router.post("/Task/{task_id}/$accept")
@_outcomes
def task_accept(task_id: str, request: Request) -> Response:
    """Accept a ready Task (pharmacy, AccessCode)."""
    p = _principal(request)
    return _fhir(_state(request).tasks.accept(p, task_id, request.query_params.get("ac", "")))


@router.post("/Task/{task_id}/$reject")
@_outcomes
def task_reject(task_id: str, request: Request) -> Response:
    """Hand an accepted Task back (pharmacy, Secret)."""
    p = _principal(request)
    _state(request).tasks.reject(p, task_id, request.query_params.get("secret", ""))
    return Response(status_code=204)


@router.post("/Task/{task_id}/$close")
@_outcomes
async def task_close(task_id: str, request: Request) -> Response:
    """Close with the MedicationDispense (pharmacy, Secret)."""
    p = _principal(request)
    dispense = await _json(request)
    return _fhir(_state(request).tasks.close(p, task_id, request.query_params.get("secret", ""), dispense))


@router.post("/Task/{task_id}/$abort")
@_outcomes
def task_abort(task_id: str, request: Request) -> Response:
    """Cancel a Task (prescriber with AccessCode, insured, pharmacy with Secret)."""
    p = _principal(request)
    _state(request).tasks.abort(
        p,
        task_id,
        access_code=request.headers.get("x-accesscode"),
        secret=request.query_params.get("secret"),
    )
    return Response(status_code=204)


@router.get("/Task")
@_outcomes
def task_list(request: Request) -> Response:
    """The insured person's Tasks."""
    return _fhir(_state(request).tasks.list_for_insured(_principal(request)))


@router.get("/Task/{task_id}")
@_outcomes
def task_get(task_id: str, request: Request) -> Response:
    """One Task (insured: own; pharmacy: with AccessCode or Secret)."""
    p = _principal(request)
    q = request.query_params
    return _fhir(_state(request).tasks.get(p, task_id, access_code=q.get("ac"), secret=q.get("secret")))
