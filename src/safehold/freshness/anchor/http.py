"""HTTP layer of an anchor member: module-level routes on an :class:`fastapi.APIRouter`, the only
place that picks status codes (``anchor/wire.py`` documents the API).

The app's ``state.core`` is the :class:`~safehold.freshness.anchor.core.MemberCore`. The client
certificate (mutual TLS; the TLS layer already checked it chains to the pinned broker CA) comes
from ``request.state.tls_peer_cert`` (DER), set by the server's protocol class; its subject CN
is the workload name, which decides the ledgers the client may write.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from safehold.freshness.anchor.core import MemberCore, ledger_writer
from safehold.freshness.anchor.statements import SignedOwnerStatement
from safehold.freshness.anchor.wire import STATUS_CODES, WireError, head_from, info_to, reply_to, state_to
from safehold.freshness.errors import FreshnessError

__all__ = ["MAX_BODY", "create_app", "router"]

router = APIRouter()
MAX_BODY = 16 * 1024
_LEDGER = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def _core(request: Request) -> MemberCore:
    core: MemberCore = request.app.state.core
    return core


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"status": "refused", "head": None, "reason": detail}, status_code=status)


def client_name(request: Request) -> str | None:
    """The CN of the verified client certificate, or None without one."""
    der = getattr(request.state, "tls_peer_cert", None)
    if not der:
        return None
    return _cn(bytes(der))


@functools.lru_cache(maxsize=256)
def _cn(der: bytes) -> str | None:
    """The subject CN of a DER certificate (cached per certificate: a client sends the same one
    on every request of its connection, and parsing it is pure)."""
    try:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _writer(request: Request) -> str | JSONResponse:
    """The ledger writer name of the verified client certificate, or the refusal (401 none,
    403 not issued to an attested workload)."""
    name = client_name(request)
    if name is None:
        return _problem(401, "a client certificate from the pinned workload CA is required")
    writer = ledger_writer(x509.load_der_x509_certificate(request.state.tls_peer_cert))
    if writer is None:
        return _problem(403, f"client certificate {name[:64]!r} was not issued to an attested workload "
                        "(no attested-workload key purpose): it may not write any ledger; ledger "
                        "writes need the certificate the broker issues after attestation")
    return writer


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise WireError(f"request body over {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WireError("request body is not JSON") from None


@router.get("/v1/anchor/info")
async def info(request: Request) -> JSONResponse:
    """The member's incarnation id, statement key and endorsement, readiness."""
    return JSONResponse(info_to(_core(request).info()))


@router.get("/v1/anchor/state")
async def state(request: Request) -> JSONResponse:
    """All ledger heads (for a restarting peer)."""
    return JSONResponse(state_to(_core(request).dump()))


@router.get("/v1/anchor/ledgers/{ledger:path}")
async def read(ledger: str, request: Request) -> JSONResponse:
    """The member's head of one ledger (async: in-memory work, no thread-pool hop per read)."""
    if not _LEDGER.fullmatch(ledger):
        return _problem(400, "ledger name must be 1..128 of [A-Za-z0-9._:/-]")
    r = _core(request).read(ledger)
    return JSONResponse(reply_to(r), status_code=STATUS_CODES[r.status])


@router.post("/v1/anchor/advance/{ledger:path}")
async def advance(ledger: str, request: Request) -> JSONResponse:
    """Advance a ledger (mutual TLS, an attested workload's certificate; only its own ledger)."""
    name = _writer(request)
    if isinstance(name, JSONResponse):
        return name
    if not _LEDGER.fullmatch(ledger):
        return _problem(400, "ledger name must be 1..128 of [A-Za-z0-9._:/-]")
    try:
        body = await _body(request)
        if not isinstance(body, dict):
            raise WireError("expected {prev, new}")
        prev, new = head_from(body.get("prev"), "prev"), head_from(body.get("new"), "new")
    except WireError as e:
        return _problem(400, str(e))
    r = _core(request).advance(ledger, prev, new, client=name)
    return JSONResponse(reply_to(r), status_code=STATUS_CODES[r.status])


@router.post("/v1/anchor/owner")
async def owner(request: Request) -> JSONResponse:
    """Apply the data owner's signed statement (mutual TLS; the statement's ledger must be the
    client's)."""
    name = _writer(request)
    if isinstance(name, JSONResponse):
        return name
    try:
        signed = SignedOwnerStatement.from_json(await _body(request))
    except FreshnessError as e:
        return _problem(400, str(e))
    r = _core(request).apply_owner(signed, client=name)
    return JSONResponse(reply_to(r), status_code=STATUS_CODES[r.status])


def create_app(core: MemberCore) -> FastAPI:
    """The member's ASGI app (no docs routes)."""
    app = FastAPI(title="Safehold anchor member", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.core = core
    app.include_router(router)
    return app
