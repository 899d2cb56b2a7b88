"""HTTP layer of the SCONE-compatible API: SCONE's Flask patient demo (DESIGN.md → Compatibility
targets).

Same paths, form fields, status codes and JSON member names as the demo, so its ``curl`` and
``requests`` client lines work unchanged against Safehold's separate SCONE port (default 4996,
TLS name ``api``, CA from the broker's ``GET /v1/values/session=<name>``):

* ``POST /patient/<id>`` — form-encoded (``application/x-www-form-urlencoded`` or multipart)
  with the 13 fields of :data:`FIELDS`; 200 with the stored record plus ``id``; **403**
  ``{"error": "already exists"}`` if the id exists; 400 naming missing fields.
* ``GET /patient/<id>`` — the record plus ``id`` and ``score``; **404**
  ``{"error": "unknown patient_id"}``.
* ``GET /score/<id>`` — ``{"id": <id>, "score": <float>}``; 404 as above. The score is
  deterministic (:func:`safehold.records.scone.score`), where the demo used a random number.
* ``/openapi.json`` and ``/healthz`` (reveals nothing).

Records created here are ordinary records in the same namespace (a flat JSON object of the 13
fields), so they are also readable and searchable through the native API.

Authentication: the SCONE demo has none beyond TLS; ``auth="none"`` keeps that (every access is
still audited, as ``scone:<client address>``). ``auth="token"`` demands the native API's bearer
tokens (reader for GET, writer for POST).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from safehold.errors import RecordNotFoundError, SafeholdError
from safehold.records.access import AccessList
from safehold.records.errors import AlreadyExistsError, SconeFormError
from safehold.records.http import AccessSource, access_getter, authenticate, on_safehold_error
from safehold.records.model import decode_stored, parse_record
from safehold.records.repository import PatientRepository
from safehold.records.scone import form_record, score

__all__ = ["SconeAPI", "create_scone_app", "router"]

AUTH_MODES = ("none", "token")


@dataclass(frozen=True)
class SconeAPI:
    """What the SCONE routes work with (``app.state.scone``): the repository, the access list
    (None with ``auth = "none"``) and the authentication mode."""

    repo: PatientRepository
    access: Callable[[], AccessList] | None
    auth: str


def _api(request: Request) -> SconeAPI:
    api: SconeAPI = request.app.state.scone
    return api


def _who(request: Request, role: str) -> str:
    """The audit name of the caller: ``scone:<client address>`` without authentication, else
    the authenticated principal (PermissionDeniedError if its role is too weak)."""
    api = _api(request)
    if api.access is None:
        host = request.client.host if request.client else "unknown"
        return f"scone:{host}"
    return authenticate(api.access(), request).require(role).name


router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    """``{"status": "ok"}`` and nothing else."""
    return {"status": "ok"}


@router.post("/patient/{patient_id}")
async def post_patient(patient_id: str, request: Request) -> JSONResponse:
    """Create a record from the demo's form: 200 with it plus ``id``; 403 if the id exists."""
    principal = _who(request, "writer")
    try:
        fields = form_record(await request.form())
    except SconeFormError as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    record = parse_record(patient_id, fields)
    try:
        await run_in_threadpool(_api(request).repo.put, principal, record, create_only=True)
    except AlreadyExistsError:
        return JSONResponse({"error": "already exists"}, status_code=403)
    return JSONResponse({**fields, "id": patient_id}, status_code=200)


@router.get("/patient/{patient_id}")
def get_patient(patient_id: str, request: Request) -> JSONResponse:
    """The record plus ``id`` and ``score``; 404 ``unknown patient_id``."""
    principal = _who(request, "reader")
    try:
        raw, _ = _api(request).repo.get_raw(principal, patient_id)
    except RecordNotFoundError:
        return JSONResponse({"error": "unknown patient_id"}, status_code=404)
    return JSONResponse({**decode_stored(raw), "id": patient_id, "score": score(raw)})


@router.get("/score/{patient_id}")
def get_score(patient_id: str, request: Request) -> JSONResponse:
    """``{"id", "score"}``; 404 ``unknown patient_id``."""
    principal = _who(request, "reader")
    try:
        raw, _ = _api(request).repo.get_raw(principal, patient_id)
    except RecordNotFoundError:
        return JSONResponse({"error": "unknown patient_id"}, status_code=404)
    return JSONResponse({"id": patient_id, "score": score(raw)})


def create_scone_app(repo: PatientRepository, acl: AccessSource | None = None, *,
                     auth: str = "none") -> FastAPI:
    """Build the SCONE-compatible app over ``repo`` (see the module docstring).

    Raises:
        ValueError: ``auth`` is not ``"none"`` or ``"token"``, or ``"token"`` without ``acl``.
    """
    if auth not in AUTH_MODES:
        raise ValueError(f"auth must be 'none' or 'token', got {auth!r}")
    if auth == "token" and acl is None:
        raise ValueError("auth='token' needs an access list")
    app = FastAPI(title="Safehold records (SCONE demo compatibility)", version="1",
                  docs_url=None, redoc_url=None)
    app.state.scone = SconeAPI(repo, access_getter(acl) if auth == "token" and acl is not None else None,
                               auth)
    app.add_exception_handler(SafeholdError, on_safehold_error)
    app.include_router(router)
    return app
