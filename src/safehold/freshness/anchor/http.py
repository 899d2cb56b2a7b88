"""HTTP layer of an anchor member: the routes as one plain ASGI app, the only place that picks
status codes (``anchor/wire.py`` documents the API).

Plain ASGI (the calling convention uvicorn speaks, no web framework): the member serves five
fixed routes on every commit of every writer, and FastAPI's routing, dependency and middleware
layers cost more CPU per request than the route's own work (``bench/anchor_rtt.py``,
docs/freshness.md "Performance"). Behaviour is what the FastAPI routes had: the same URLs, JSON
bodies and status codes; ``{"detail": "Not Found"}`` (404) for another path and ``{"detail":
"Method Not Allowed"}`` (405, with ``Allow``) for another method; an exception in a route is
uvicorn's 500.

The client certificate (mutual TLS; the TLS layer already checked it chains to the pinned
broker CA) comes from ``scope["state"]["tls_peer_cert"]`` (DER), set by the server's protocol
class; its subject CN is the workload name, and only a certificate with the attested-workload
key purpose may write (:func:`safehold.freshness.anchor.core.ledger_writer`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from safehold.freshness.anchor.core import MemberCore, ledger_writer
from safehold.freshness.anchor.statements import SignedOwnerStatement
from safehold.freshness.anchor.wire import STATUS_CODES, WireError, head_from, info_to, reply_to, state_to
from safehold.freshness.errors import FreshnessError

__all__ = ["MAX_BODY", "AnchorApp", "create_app"]

MAX_BODY = 16 * 1024
_LEDGER = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_LEDGERS, _ADVANCE = "/v1/anchor/ledgers/", "/v1/anchor/advance/"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Answer = tuple[int, Any]  # (status code, JSON body)


def _problem(status: int, detail: str) -> Answer:
    return status, {"status": "refused", "head": None, "reason": detail}


def _reply(r: Any) -> Answer:
    return STATUS_CODES[r.status], reply_to(r)


@functools.lru_cache(maxsize=256)
def _identity(der: bytes) -> tuple[str | None, str | None]:
    """``(subject CN, ledger writer name)`` of a DER certificate (:func:`ledger_writer`; None
    for what it lacks). Cached per certificate: a client sends the same one on every request of
    its connection, and parsing it is pure."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None, None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return (value if isinstance(value, str) else None), ledger_writer(cert)


def client_name(scope: Scope) -> str | None:
    """The CN of the verified client certificate, or None without one."""
    der = scope.get("state", {}).get("tls_peer_cert")
    return _identity(bytes(der))[0] if der else None


def _writer(scope: Scope) -> str | Answer:
    """The ledger writer name of the verified client certificate, or the refusal (401 none,
    403 not issued to an attested workload)."""
    der = scope.get("state", {}).get("tls_peer_cert")
    name, writer = _identity(bytes(der)) if der else (None, None)
    if name is None:
        return _problem(401, "a client certificate from the pinned workload CA is required")
    if writer is None:
        return _problem(403, f"client certificate {name[:64]!r} was not issued to an attested workload "
                        "(no attested-workload key purpose): it may not write any ledger; ledger "
                        "writes need the certificate the broker issues after attestation")
    return writer


async def _body(receive: Receive) -> Any:
    """The request body as JSON; reading stops once it passes :data:`MAX_BODY`.

    Raises:
        WireError: over :data:`MAX_BODY` bytes, or not JSON.
    """
    parts, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":  # http.disconnect: nobody is left to answer
            raise WireError("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise WireError(f"request body over {MAX_BODY} bytes")
        parts.append(chunk)
        more = msg.get("more_body", False)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise WireError("request body is not JSON") from None


class AnchorApp:
    """The member's ASGI app (module docstring); ``core`` is its
    :class:`~safehold.freshness.anchor.core.MemberCore`."""

    def __init__(self, core: MemberCore) -> None:
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; no websockets here
            return
        status, obj, allow = await self._route(scope["method"], scope["path"], scope, receive)
        # as Starlette's JSONResponse renders it
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8")
        headers = [(b"content-length", str(len(body)).encode("ascii")),
                   (b"content-type", b"application/json")]
        if allow:
            headers.append((b"allow", allow))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, method: str, path: str, scope: Scope, receive: Receive) -> tuple[int, Any, bytes]:
        """``(status, JSON body, Allow header or b"")`` of one request."""
        if path.startswith(_ADVANCE):
            if method != "POST":
                return 405, {"detail": "Method Not Allowed"}, b"POST"
            return *await self.advance(path[len(_ADVANCE):], scope, receive), b""
        if path.startswith(_LEDGERS):
            if method not in ("GET", "HEAD"):
                return 405, {"detail": "Method Not Allowed"}, b"GET, HEAD"
            return *self.read(path[len(_LEDGERS):]), b""
        if path == "/v1/anchor/owner":
            if method != "POST":
                return 405, {"detail": "Method Not Allowed"}, b"POST"
            return *await self.owner(scope, receive), b""
        if path in ("/v1/anchor/info", "/v1/anchor/state"):
            if method not in ("GET", "HEAD"):
                return 405, {"detail": "Method Not Allowed"}, b"GET, HEAD"
            if path == "/v1/anchor/info":  # the incarnation id, statement key, endorsement, readiness
                return 200, info_to(self.core.info()), b""
            return 200, state_to(self.core.dump()), b""  # all ledger heads (for a restarting peer)
        return 404, {"detail": "Not Found"}, b""

    def read(self, ledger: str) -> Answer:
        """``GET /v1/anchor/ledgers/{ledger}``: the member's head of one ledger."""
        if not _LEDGER.fullmatch(ledger):
            return _problem(400, "ledger name must be 1..128 of [A-Za-z0-9._:/-]")
        return _reply(self.core.read(ledger))

    async def advance(self, ledger: str, scope: Scope, receive: Receive) -> Answer:
        """``POST /v1/anchor/advance/{ledger}`` (mutual TLS, an attested workload's certificate;
        only its own ledger)."""
        name = _writer(scope)
        if not isinstance(name, str):
            return name
        if not _LEDGER.fullmatch(ledger):
            return _problem(400, "ledger name must be 1..128 of [A-Za-z0-9._:/-]")
        try:
            body = await _body(receive)
            if not isinstance(body, dict):
                raise WireError("expected {prev, new}")
            prev, new = head_from(body.get("prev"), "prev"), head_from(body.get("new"), "new")
        except WireError as e:
            return _problem(400, str(e))
        return _reply(self.core.advance(ledger, prev, new, client=name))

    async def owner(self, scope: Scope, receive: Receive) -> Answer:
        """``POST /v1/anchor/owner``: apply the data owner's signed statement (mutual TLS; the
        statement's ledger must be the client's)."""
        name = _writer(scope)
        if not isinstance(name, str):
            return name
        try:
            signed = SignedOwnerStatement.from_json(await _body(receive))
        except FreshnessError as e:
            return _problem(400, str(e))
        return _reply(self.core.apply_owner(signed, client=name))


def create_app(core: MemberCore) -> AnchorApp:
    """The member's ASGI app."""
    return AnchorApp(core)
