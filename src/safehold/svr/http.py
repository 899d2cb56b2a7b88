"""HTTP layer of Secure Value Recovery: a FastAPI ``APIRouter`` with module-level routes.

================================  ======  ==============================================================
``GET  /healthz``                 none    200 ``{"status": "ok"}``; 503 ``not-fresh`` with the reason
``GET  /v1/svr/info``             none    name, group id, protocols, suite, limits, serving
``POST /v1/svr2/query``           backup  ``{label}`` → ``{status, backup_id, tries, max_tries, exposed,
                                          token}``
``POST /v1/svr2/backup``          backup  ``{label, data, pin, max_tries, token}`` → ``{status, token}``
``POST /v1/svr2/expose``          backup  ``{label, data}`` → ``{status, token}``
``POST /v1/svr2/restore``         backup  ``{label, pin}`` → ``{status, tries, token, data}``
``POST /v1/svr2/delete``          backup  ``{label}`` → ``{status, token}``
``POST /v1/svr3/query``           backup  ``{label}`` → ``{status, backup_id, tries, max_tries, version,
                                          token}``
``POST /v1/svr3/create``          backup  ``{label, version, max_tries, oprf_share, zero_share,
                                          encryption_share, auth_commitment, sealed, token}`` →
                                          ``{status, tries, token}``
``POST /v1/svr3/restore1``        backup  ``{label, blinded}`` → ``{status, tries, version, token,
                                          element, session}``
``POST /v1/svr3/restore2``        backup  ``{label, session, version, auth_point, auth_scalar}`` →
                                          ``{status, encryption_share, sealed}``
``POST /v1/svr3/remove``          backup  ``{label}`` → ``{status, token}``
``GET  /v1/svr/freshness``        admin   the owner statement to sign (``initialise`` / ``reanchor``)
``POST /v1/svr/freshness``        admin   ``{payload, signature}`` → ``{epoch, digest}``
================================  ======  ==============================================================

Bytes are standard base64 (:mod:`safehold.svr.protocol`). The backup id is derived from the
authenticated principal and the ``label`` (``protocol.backup_id``): a caller can reach only its
own backups. Protocol outcomes are ``status`` values in 200 answers. Errors are
``{"error", "detail"}``: 400 ``invalid`` (also unknown fields), 401 / 403, 413 ``too-large``,
409 ``stale-data`` (the database returned a rolled-back, restored or deleted row: refused),
503 ``not-fresh`` (the store as a whole is not fresh: restored from an older copy, forked,
anchor lost, ledger not initialised), 503 ``not-anchored`` (stored, the anchor has not
confirmed it yet: the answer is withheld), 503 ``anchor-unavailable``, 503
``store-unavailable``, 500 ``store-tampered``. Only this module chooses status codes (the ones
both bearer-token services share in :mod:`safehold.runtime.http`).

Authentication: ``Authorization: Bearer <token>``; the SHA-256 of the token must be in the
access list (``{"<hex sha256>": {"name": ..., "roles": ["backup", "admin"]}}``), which the
process receives with its secrets (never from its measured configuration or argv).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from safehold.errors import RecordTamperedError
from safehold.freshness.errors import (
    AnchorUnavailableError,
    NotAnchoredError,
    OwnerStatementError,
    RowFreshnessError,
    StoreStateError,
)
from safehold.runtime.http import Principal, bearer_app, bearer_principal, error_response, require_role
from safehold.runtime.http import parse_access as _parse_access
from safehold.svr.core import SvrService
from safehold.svr.errors import InvalidRequestError, SvrConfigError, SvrStateError
from safehold.svr.protocol import (
    ACCESS_KEY_SIZE,
    ELEMENT_SIZE,
    MAX_DATA,
    MIN_DATA,
    SESSION_SIZE,
    SHARE_SIZE,
    TOKEN_SIZE,
    b64,
    backup_id,
    unb64,
)

ROLES = ("backup", "admin")
#: Largest request body (the biggest, create, is under 1 KiB).
MAX_BODY = 16 * 1024
#: Longest principal name (UTF-8 bytes): it is hashed into every backup id it owns.
MAX_NAME = 256

router = APIRouter()


def parse_access(data: Mapping[str, Any]) -> dict[bytes, Principal]:
    """The access list from its JSON form (:func:`safehold.runtime.http.parse_access`, roles
    :data:`ROLES`, names of at most :data:`MAX_NAME` bytes; a
    :class:`~safehold.runtime.http.Principal` owns the backups it makes).

    Raises:
        SvrConfigError: not an object, a key that is not 64 hex digits, a missing or too long
            name, an unknown role.
    """
    return _parse_access(data, ROLES, SvrConfigError, max_name_bytes=MAX_NAME)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelBody(_Body):
    label: str = "default"


class Svr2BackupBody(LabelBody):
    data: str
    pin: str
    max_tries: int
    token: str


class Svr2ExposeBody(LabelBody):
    data: str


class Svr2RestoreBody(LabelBody):
    pin: str


class Svr3CreateBody(LabelBody):
    version: int
    max_tries: int
    oprf_share: str
    zero_share: str
    encryption_share: str
    auth_commitment: str
    sealed: str
    token: str


class Svr3Restore1Body(LabelBody):
    blinded: str


class Svr3Restore2Body(LabelBody):
    session: str
    version: int
    auth_point: str
    auth_scalar: str


class StatementBody(_Body):
    payload: str
    signature: str


def _service(request: Request) -> SvrService:
    return request.app.state.svr


def _backup_role(who: Principal = Depends(bearer_principal)) -> Principal:
    require_role(who, "backup")
    return who


def _admin_role(who: Principal = Depends(bearer_principal)) -> Principal:
    require_role(who, "admin")
    return who


Caller = Annotated[Principal, Depends(_backup_role)]
Admin = Annotated[Principal, Depends(_admin_role)]


def _bid(who: Principal, label: str) -> bytes:
    return backup_id(who.name, label)


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 while serving; 503 with the freshness finding otherwise."""
    ok, why = _service(request).health()
    return JSONResponse({"status": "ok"}) if ok else error_response(503, "not-fresh", why)


@router.get("/v1/svr/info")
def info(request: Request) -> dict[str, Any]:
    """Public facts about this server."""
    return _service(request).info()


# --- SVR2 -----------------------------------------------------------------------------------------


@router.post("/v1/svr2/query")
def svr2_query(body: LabelBody, request: Request, who: Caller) -> dict[str, Any]:
    """State of the caller's SVR2 backup ``label``; charges nothing."""
    bid = _bid(who, body.label)
    q = _service(request).svr2.query(bid)
    return {"status": q.status, "backup_id": bid.hex(), "tries": q.tries, "max_tries": q.max_tries,
            "exposed": q.exposed, "token": b64(q.token)}


@router.post("/v1/svr2/backup")
def svr2_backup(body: Svr2BackupBody, request: Request, who: Caller) -> dict[str, Any]:
    """Store the sealed secret and the access key (not restorable until exposed)."""
    a = _service(request).svr2.backup(
        _bid(who, body.label), unb64(body.data, "data", min_size=MIN_DATA, max_size=MAX_DATA),
        unb64(body.pin, "pin", size=ACCESS_KEY_SIZE), body.max_tries,
        unb64(body.token, "token", size=TOKEN_SIZE))
    return {"status": a.status, "token": b64(a.token)}


@router.post("/v1/svr2/expose")
def svr2_expose(body: Svr2ExposeBody, request: Request, who: Caller) -> dict[str, Any]:
    """Make the backup restorable (two-phase commit)."""
    a = _service(request).svr2.expose(_bid(who, body.label),
                                      unb64(body.data, "data", min_size=MIN_DATA, max_size=MAX_DATA))
    return {"status": a.status, "token": b64(a.token)}


@router.post("/v1/svr2/restore")
def svr2_restore(body: Svr2RestoreBody, request: Request, who: Caller) -> dict[str, Any]:
    """One guess; answered only after it is charged durably."""
    r = _service(request).svr2.restore(_bid(who, body.label), unb64(body.pin, "pin", size=ACCESS_KEY_SIZE))
    return {"status": r.status, "tries": r.tries, "token": b64(r.token), "data": b64(r.data)}


@router.post("/v1/svr2/delete")
def svr2_delete(body: LabelBody, request: Request, who: Caller) -> dict[str, Any]:
    """Erase the backup."""
    a = _service(request).svr2.delete(_bid(who, body.label))
    return {"status": a.status, "token": b64(a.token)}


# --- SVR3 (DB4) -----------------------------------------------------------------------------------


@router.post("/v1/svr3/query")
def svr3_query(body: LabelBody, request: Request, who: Caller) -> dict[str, Any]:
    """Tries and version of this server's share of backup ``label``."""
    bid = _bid(who, body.label)
    q = _service(request).svr3.query(bid)
    return {"status": q.status, "backup_id": bid.hex(), "tries": q.tries, "max_tries": q.max_tries,
            "version": q.version, "token": b64(q.token)}


@router.post("/v1/svr3/create")
def svr3_create(body: Svr3CreateBody, request: Request, who: Caller) -> dict[str, Any]:
    """Store this server's shares."""
    a = _service(request).svr3.create(
        _bid(who, body.label), version=body.version, max_tries=body.max_tries,
        oprf_share=unb64(body.oprf_share, "oprf_share", size=SHARE_SIZE),
        zero_share=unb64(body.zero_share, "zero_share", size=SHARE_SIZE),
        encryption_share=unb64(body.encryption_share, "encryption_share", size=SHARE_SIZE),
        auth_commitment=unb64(body.auth_commitment, "auth_commitment", size=ELEMENT_SIZE),
        sealed=unb64(body.sealed, "sealed", min_size=MIN_DATA, max_size=MAX_DATA),
        token=unb64(body.token, "token", size=TOKEN_SIZE))
    return {"status": a.status, "tries": a.tries, "token": b64(a.token)}


@router.post("/v1/svr3/restore1")
def svr3_restore1(body: Svr3Restore1Body, request: Request, who: Caller) -> dict[str, Any]:
    """Charge a guess durably, then answer the masked share evaluation and a session."""
    blinded = unb64(body.blinded, "blinded", size=ELEMENT_SIZE)
    r = _service(request).svr3.restore1(_bid(who, body.label), blinded)
    return {"status": r.status, "tries": r.tries, "version": r.version, "token": b64(r.token),
            "element": b64(r.element), "session": b64(r.session)}


@router.post("/v1/svr3/restore2")
def svr3_restore2(body: Svr3Restore2Body, request: Request, who: Caller) -> dict[str, Any]:
    """Release this server's encryption share against a valid authorisation proof."""
    r = _service(request).svr3.restore2(
        _bid(who, body.label), session=unb64(body.session, "session", size=SESSION_SIZE),
        version=body.version,
        auth_point=unb64(body.auth_point, "auth_point", size=ELEMENT_SIZE),
        auth_scalar=unb64(body.auth_scalar, "auth_scalar", size=ELEMENT_SIZE))
    return {"status": r.status, "encryption_share": b64(r.encryption_share), "sealed": b64(r.sealed)}


@router.post("/v1/svr3/remove")
def svr3_remove(body: LabelBody, request: Request, who: Caller) -> dict[str, Any]:
    """Erase this server's shares."""
    a = _service(request).svr3.remove(_bid(who, body.label))
    return {"status": a.status, "token": b64(a.token)}


# --- the owner's freshness steps --------------------------------------------------------------------


@router.get("/v1/svr/freshness")
def freshness_statement(request: Request, who: Admin) -> dict[str, Any]:
    """The statement the data owner signs to initialise (or re-anchor) this server's ledger."""
    return _service(request).freshness_statement()


@router.post("/v1/svr/freshness")
def freshness_apply(body: StatementBody, request: Request, who: Admin) -> dict[str, Any]:
    """Apply the owner's signed statement."""
    head = _service(request).reanchor({"payload": body.payload, "signature": body.signature})
    return {"epoch": head.epoch, "digest": head.digest.hex()}


# --- error mapping (the only place with status codes) ------------------------------------------


def create_app(service: SvrService, access: Mapping[bytes, Principal]) -> FastAPI:
    """The ASGI app: this router, the error mapping (module docstring; the shared part in
    :func:`safehold.runtime.http.bearer_app`), ``service`` / ``access`` on ``app.state``."""
    tampered = (500, "store-tampered")
    app = bearer_app(title="Safehold Secure Value Recovery", router=router, access=access, max_body=MAX_BODY,
                     errors={InvalidRequestError: (400, "invalid"),
                             OwnerStatementError: (400, "invalid-statement"),
                             RowFreshnessError: (409, "stale-data"), StoreStateError: (503, "not-fresh"),
                             NotAnchoredError: (503, "not-anchored"),
                             AnchorUnavailableError: (503, "anchor-unavailable"),
                             RecordTamperedError: tampered, SvrStateError: tampered},
                     openapi_url=None, docs_url=None, redoc_url=None)
    app.state.svr = service
    return app
