"""HTTP layer of the gematik VAU channels (FastAPI ``APIRouter``; status codes live here only).

E-Rezept VAU (gemSpec_Krypt E-Rezept chapter):

* ``GET /VAUCertificate`` — the VAU encryption certificate, DER (A_20160).
* ``GET /VAUCertificateOCSPResponse`` — the stapled OCSP response for it, DER; 404 when the
  operator configured none.
* ``POST /VAU/{pseudonym}`` — ``application/octet-stream`` ECIES request; the decrypted inner
  HTTP request is routed in-process to the inner application (the E-Rezept FHIR routes) and the
  answer comes back encrypted under the client's response key, with the ``Userpseudonym``
  header (A_20162, A_20163). Outer errors (Tab_KRYPT_VAUERR): 400 undecryptable or malformed,
  403 invalid access token or wrong pseudonym, 415 wrong content type, 413 too large,
  503 replay cache full.

ePA 3 VAU (gemSpec_Krypt chapter 7):

* ``POST /VAU`` — M1 (``application/cbor``) → M2 with the ``VAU-CID`` header.
* ``POST /VAU/epa/{cid}`` — M3 (``application/cbor``) → M4; afterwards user data
  (``application/octet-stream``) routed in-process to the ePA inner application.
* ``GET /CertData.{hash}-{cdv}`` — CBOR ``{cert, ca, rca_chain}`` for the AUT-VAU certificate
  (A_24957); 404 for another hash or version.

State comes from ``request.app.state.vau`` (a :class:`VauState`); a channel that is not
configured answers 404.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

import cbor2
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message

from safehold.vau.epa_server import EpaVauServer
from safehold.vau.erp_server import ErpVau
from safehold.vau.errors import (
    VauAccessTokenError,
    VauCapacityError,
    VauChannelUnknownError,
    VauError,
    VauPseudonymError,
)
from safehold.vau.httpmsg import HttpRequest, HttpResponse, parse_request

__all__ = ["VauState", "router"]

MAX_BODY = 16 * 1024 * 1024
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


@dataclass
class VauState:
    """What the VAU routes serve. Any part may be None (that channel then answers 404).

    Attributes:
        erp: the E-Rezept VAU. erp_certificate: its certificate (DER). erp_ocsp: stapled OCSP.
        erp_inner: ASGI app the decrypted E-Rezept requests go to.
        epa: the ePA 3 VAU. epa_inner: ASGI app for decrypted ePA user data.
        epa_cert_data: ``{cert_hash: (cdv, CBOR CertData bytes)}``.
    """

    erp: ErpVau | None = None
    erp_certificate: bytes | None = None
    erp_ocsp: bytes | None = None
    erp_inner: ASGIApp | None = None
    epa: EpaVauServer | None = None
    epa_inner: ASGIApp | None = None
    epa_cert_data: Mapping[bytes, tuple[int, bytes]] = field(default_factory=dict)


def _state(request: Request) -> VauState:
    st = getattr(request.app.state, "vau", None)
    if not isinstance(st, VauState):
        raise RuntimeError("app.state.vau is not configured")
    return st


def _status(e: VauError) -> int:
    if isinstance(e, VauAccessTokenError | VauPseudonymError):
        return 403
    if isinstance(e, VauCapacityError):
        return 503
    if isinstance(e, VauChannelUnknownError):
        return 404
    return 400


def _refuse(e: VauError) -> Response:
    return Response(str(e), status_code=_status(e), media_type="text/plain; charset=utf-8")


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain; charset=utf-8")


async def _body(request: Request) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        return _plain(413, f"VAU request larger than {MAX_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_BODY:
        return _plain(413, f"VAU request larger than {MAX_BODY} bytes")
    return body


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _dispatch(app: ASGIApp, req: HttpRequest) -> HttpResponse:
    """Call the inner ASGI app in-process (ASGI 3.0 HTTP scope, no socket); a crash there becomes
    an inner 500 for the client."""
    path, _, query = req.target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in req.headers
            if k.lower() not in _HOP
        ]
        + [(b"host", b"vau-inner"), (b"content-length", str(len(req.body)).encode())],
        "client": ("127.0.0.1", 0),
        "server": ("vau-inner", 80),
    }
    delivered = False
    status = 500
    headers: list[tuple[str, str]] = []
    body = bytearray()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers.extend(
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in message.get("headers", [])
                if k.decode("latin-1").lower() not in _HOP
            )
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 - the inner app failed; the client still gets an answer
        return HttpResponse(500, [("Content-Type", "text/plain")], b"inner application error")
    return HttpResponse(status, headers, bytes(body))


router = APIRouter()


# --- E-Rezept VAU ------------------------------------------------------------------------------


@router.get("/VAUCertificate")
def vau_certificate(request: Request) -> Response:
    """The VAU encryption certificate (DER)."""
    st = _state(request)
    if st.erp is None or st.erp_certificate is None:
        return _plain(404, "no E-Rezept VAU certificate configured")
    return Response(st.erp_certificate, media_type="application/pkix-cert")


@router.get("/VAUCertificateOCSPResponse")
def vau_certificate_ocsp(request: Request) -> Response:
    """The stapled OCSP response for the VAU certificate (DER)."""
    st = _state(request)
    if st.erp is None or st.erp_ocsp is None:
        return _plain(404, "no OCSP response configured for the VAU certificate")
    return Response(st.erp_ocsp, media_type="application/ocsp-response")


async def erp_vau_request(request: Request) -> Response:
    """One E-Rezept VAU request (A_20163). The ECIES step (~0.5 ms of CPU) runs on the event loop:
    under the GIL a thread hop costs more than it frees. A plain Starlette route (registered
    below), not a FastAPI one: nothing to validate or inject, and FastAPI's parameter solving
    cost ~30 µs of CPU per request on the path every E-Rezept request takes."""
    pseudonym = str(request.path_params["pseudonym"])
    st = _state(request)
    if st.erp is None or st.erp_inner is None:
        return _plain(404, "E-Rezept VAU is not configured")
    if _media(request) != "application/octet-stream":
        return _plain(415, "VAU requests are application/octet-stream")
    body = await _body(request)
    if isinstance(body, Response):
        return body
    vau = st.erp
    try:
        opened = vau.open(pseudonym, body)
    except VauError as e:
        return _refuse(e)
    answer = await _dispatch(st.erp_inner, opened.http)
    sealed = vau.seal(opened, answer)
    return Response(
        sealed, media_type="application/octet-stream", headers={"Userpseudonym": opened.user_pseudonym}
    )


router.add_route("/VAU/{pseudonym}", erp_vau_request, methods=["POST"])


# --- ePA 3 VAU -----------------------------------------------------------------------------------


@router.post("/VAU")
async def epa_vau_m1(request: Request) -> Response:
    """M1 → M2 (A_24608); the channel id goes into ``VAU-CID``."""
    st = _state(request)
    if st.epa is None:
        return _plain(404, "ePA VAU is not configured")
    if _media(request) != "application/cbor":
        return _plain(415, "VAU handshake messages are application/cbor")
    body = await _body(request)
    if isinstance(body, Response):
        return body
    try:
        cid, m2 = await run_in_threadpool(st.epa.handle_m1, body)
    except VauError as e:
        return _refuse(e)
    return Response(m2, media_type="application/cbor", headers={"VAU-CID": cid})


@router.post("/VAU/epa/{cid}")
async def epa_vau_channel(cid: str, request: Request) -> Response:
    """M3 → M4 (A_24626), then user data (A_24628-01) on the channel."""
    st = _state(request)
    if st.epa is None or st.epa_inner is None:
        return _plain(404, "ePA VAU is not configured")
    body = await _body(request)
    if isinstance(body, Response):
        return body
    epa = st.epa
    path = f"/VAU/epa/{cid}"
    media = _media(request)
    try:
        if media == "application/cbor":
            m4 = await run_in_threadpool(epa.handle_m3, path, body)
            return Response(m4, media_type="application/cbor")
        if media != "application/octet-stream":
            return _plain(415, "VAU user data is application/octet-stream")
        counter, plaintext = await run_in_threadpool(epa.open_request, path, body)
        inner = parse_request(plaintext)
    except VauError as e:
        return _refuse(e)
    answer = await _dispatch(st.epa_inner, inner)
    return Response(epa.seal_response(path, counter, answer.encode()), media_type="application/octet-stream")


@router.get("/CertData.{name}")
def epa_cert_data(name: str, request: Request) -> Response:
    """CertData for ``<hex cert_hash>-<cdv>`` (A_24957)."""
    st = _state(request)
    h, _, v = name.partition("-")
    try:
        cert_hash, cdv = bytes.fromhex(h), int(v)
    except ValueError:
        return _plain(404, "CertData name must be <hex SHA-256>-<version>")
    entry = st.epa_cert_data.get(cert_hash)
    if entry is None or entry[0] != cdv:
        return _plain(404, "no CertData for this certificate hash and version")
    return Response(entry[1], media_type="application/cbor")


def cert_data(
    certificate: bytes, *, ca: bytes = b"", rca_chain: list[bytes] | None = None
) -> tuple[bytes, bytes]:
    """``(SHA-256 of certificate, CBOR {cert, ca, rca_chain})`` for :attr:`VauState.epa_cert_data`."""
    return hashlib.sha256(certificate).digest(), cbor2.dumps(
        {"cert": certificate, "ca": ca, "rca_chain": list(rca_chain or [])}
    )
