"""Compatibility with SCONE's Flask patient demo (DESIGN.md → Compatibility targets).

Same paths, form fields, status codes and JSON member names as the demo, so its ``curl`` and
``requests`` client lines work unchanged against Safehold's separate SCONE port (default 4996,
TLS name ``api``, CA from the broker's ``GET /v1/values/session=<name>``):

* ``POST /patient/<id>`` — form-encoded (``application/x-www-form-urlencoded`` or multipart)
  with the 13 fields of :data:`FIELDS`; 200 with the stored record plus ``id``; **403**
  ``{"error": "already exists"}`` if the id exists; 400 naming missing fields.
* ``GET /patient/<id>`` — the record plus ``id`` and ``score``; **404**
  ``{"error": "unknown patient_id"}``.
* ``GET /score/<id>`` — ``{"id": <id>, "score": <float>}``; 404 as above. The score is
  deterministic (:func:`safehold.records.app.score`), where the demo used a random number.
* ``/openapi.json`` and ``/healthz`` (reveals nothing).

Records created here are ordinary records in the same namespace (a flat JSON object of the 13
fields), so they are also readable and searchable through the native API.

Authentication: the SCONE demo has none beyond TLS; ``auth="none"`` keeps that (every access is
still audited, as ``scone:<client address>``). ``auth="token"`` demands the native API's bearer
tokens (reader for GET, writer for POST).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from safehold.errors import RecordNotFoundError, SafeholdError
from safehold.records.api import AccessList, AuthError, Principal, authenticate, error_response
from safehold.records.app import AlreadyExists, PatientRepository, score

#: The demo's form fields, in its order.
FIELDS = (
    "fname", "lname", "address", "city", "state", "ssn", "email", "dob", "contactphone",
    "drugallergies", "preexistingconditions", "dateadmitted", "insurancedetails",
)
_MAX_FIELD = 4096


def create_scone_app(
    repo: PatientRepository,
    acl: AccessList | Callable[[], AccessList] | None = None,
    *,
    auth: str = "none",
) -> FastAPI:
    """Build the SCONE-compatible app over ``repo`` (see the module docstring).

    Raises:
        ValueError: ``auth`` is not ``"none"`` or ``"token"``, or ``"token"`` without ``acl``.
    """
    if auth not in ("none", "token"):
        raise ValueError(f"auth must be 'none' or 'token', got {auth!r}")
    if auth == "token" and acl is None:
        raise ValueError("auth='token' needs an access list")
    get_acl: Callable[[], AccessList] | None = (acl if callable(acl) else (lambda: acl)) if acl else None  # type: ignore[assignment,return-value]
    app = FastAPI(title="Safehold records (SCONE demo compatibility)", version="1",
                  docs_url=None, redoc_url=None)

    @app.exception_handler(SafeholdError)
    async def _on_error(request: Request, exc: SafeholdError) -> JSONResponse:
        return error_response(exc)

    def who(request: Request, role: str) -> str:
        if auth == "none":
            host = request.client.host if request.client else "unknown"
            return f"scone:{host}"
        assert get_acl is not None
        p: Principal = authenticate(get_acl(), request)
        if not p.can(role):
            raise AuthError(f"role {p.role!r} may not do this (needs {role!r})", 403)
        return p.name

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/patient/{patient_id}")
    async def post_patient(patient_id: str, request: Request) -> JSONResponse:
        principal = who(request, "writer")
        form = await request.form()
        missing = [f for f in FIELDS if f not in form]
        if missing:
            return JSONResponse({"error": f"missing fields: {', '.join(missing)}"}, status_code=400)
        record: dict[str, Any] = {}
        for f in FIELDS:
            v = form[f]
            if not isinstance(v, str) or len(v) > _MAX_FIELD:
                return JSONResponse({"error": f"field {f} must be text of at most {_MAX_FIELD} chars"},
                                    status_code=400)
            record[f] = v
        from starlette.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(repo.put, principal, patient_id, record, create_only=True)
        except AlreadyExists:
            return JSONResponse({"error": "already exists"}, status_code=403)
        return JSONResponse({**record, "id": patient_id}, status_code=200)

    @app.get("/patient/{patient_id}")
    def get_patient(patient_id: str, request: Request) -> JSONResponse:
        principal = who(request, "reader")
        try:
            rec, _ = repo.get(principal, patient_id)
        except RecordNotFoundError:
            return JSONResponse({"error": "unknown patient_id"}, status_code=404)
        return JSONResponse({**rec, "id": patient_id, "score": score(rec)})

    @app.get("/score/{patient_id}")
    def get_score(patient_id: str, request: Request) -> JSONResponse:
        principal = who(request, "reader")
        try:
            rec, _ = repo.get(principal, patient_id)
        except RecordNotFoundError:
            return JSONResponse({"error": "unknown patient_id"}, status_code=404)
        return JSONResponse({"id": patient_id, "score": score(rec)})

    return app
