"""The HTTP encryption proxy: an ASGI app between clients and an untrusted upstream API.

Requests: JSON (``application/json``, ``*+json``) and form-encoded
(``application/x-www-form-urlencoded``) bodies are parsed, the schema's fields protected with
:meth:`Protector.protect` and the body re-encoded; query parameters and path segments named in
the schema (``[proxy.query]``, ``[proxy] paths``, or a parameter with a field's name) are
protected with the field's deterministic transform so exact search still works upstream.
Responses with a JSON body are revealed with :meth:`Protector.reveal`.

Fails closed: a body that cannot be parsed (400), a body of another content type (415), a
configured field or query value that cannot be transformed (422) is refused and nothing is
sent upstream. So is anything an upstream could read as a protected name although the proxy
would not protect it (400 unless noted): a path that resembles a path template without matching it
exactly (trailing slash, ``//``, dot segments, percent-encoded or differently cased fixed
segments, extra segments), a query or form name that resembles a protected one (``Patient``,
``patient[]``, ``filter[id]``), a JSON key that differs from a protected field only by case,
duplicate JSON keys, a JSON record encoded inside a string value (:meth:`Protector.encoded_record_key`),
several Content-Type headers, a charset other than UTF-8 (415) and a
``Content-Encoding`` (415). A response that cannot be revealed becomes 502. Error bodies are
``{"error": "..."}`` and never contain field values (nor the request path, which may hold one).

Layout: one module-level route (:func:`forward`) on :data:`router`; :func:`create_app` puts the
proxy's settings and its upstream client in ``app.state.proxy`` (a :class:`ProxyState`). The
record transforms are framework-free in :mod:`safehold.proxy.core`; the process is
:mod:`safehold.proxy.server`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from safehold.errors import ShapeError, TransformError
from safehold.jsontypes import JSONObject
from safehold.proxy.core import (
    LONE_SURROGATE,
    Protector,
    apply_path,
    fold_name,
    has_lone_surrogate,
    json_kind,
    url_decode_fully,
)
from safehold.proxy.schema import template_vars

__all__ = ["ProxyState", "create_app", "forward", "router"]

log = logging.getLogger("safehold.proxy")

_HOP = {
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "proxy-authorization", "proxy-authenticate", "te", "trailer", "accept-encoding",
}
_RESP_DROP = {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class _RefusedError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Template:
    """One ``[proxy] paths`` template, e.g. ``/patient/{id}``.

    ``exact`` matches the raw (still percent-encoded) request path byte for byte in the fixed
    parts; ``prefix`` is the folded fixed segments before the first variable segment, used to
    spot paths that an upstream may route to the same handler although they do not match
    exactly (see :func:`_loose_segments`).
    """

    def __init__(self, tpl: str):
        self.template = tpl
        self.names = template_vars(tpl)
        rx = ""
        for part in re.split(r"(\{[^{}]+\})", tpl):
            rx += "([^/]+)" if re.fullmatch(r"\{[^{}]+\}", part) else re.escape(part)
        self.exact = re.compile(rx)
        segs = [x for x in tpl.split("/") if x]
        first_var = next((i for i, x in enumerate(segs) if "{" in x), len(segs))
        self.prefix = [fold_name(x) for x in segs[:first_var]]
        self.has_var = first_var < len(segs)

    def resembles(self, segments: list[str]) -> bool:
        """True when the normalised ``segments`` reach a variable segment of this template."""
        n = len(self.prefix)
        return self.has_var and len(segments) > n and segments[:n] == self.prefix


def _loose_segments(raw_path: str) -> list[str]:
    """The path as the most lenient upstream might route it (for comparison only).

    Percent-decoded repeatedly (``%2F``, ``%252F``), Unicode NFKC + case-folded, split at ``/``
    and ``\\``, each segment's ``;parameters`` (RFC 3986 section 3.3, stripped by servlet
    containers) and surrounding whitespace dropped, empty and ``.`` segments dropped and ``..``
    resolved (RFC 3986 section 5.2.4).
    """
    out: list[str] = []
    for seg in re.split(r"[/\\]", fold_name(url_decode_fully(raw_path))):
        seg = seg.split(";", 1)[0].strip()
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return out


def _is_json(ct: str) -> bool:
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: parsers disagree on duplicate keys (Python keeps the last,
    others the first), so the proxy could protect one copy while the upstream stores the other."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RefusedError(400, f"request JSON has the key {k!r} twice in one object; not forwarded")
        out[k] = v
    return out


def _strings(node: Any) -> list[str]:
    """Every string value (not key) in a decoded JSON document."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, dict):
            todo.extend(n.values())
        elif isinstance(n, list):
            todo.extend(n)
    return out


def _content_type(request: Request) -> str:
    """The request's media type (lower case, parameters dropped), refusing ambiguous ones."""
    values = request.headers.getlist("content-type")
    if len(values) > 1:
        raise _RefusedError(400, "request has more than one Content-Type header; not forwarded")
    if not values:
        return ""
    media, *params = values[0].split(";")
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise _RefusedError(415, "request body charset is not UTF-8; not forwarded")
    return media.strip().lower()


@dataclass
class ProxyState:
    """What the proxy route works with (``app.state.proxy``).

    Attributes:
        protector: schema + keyset.
        upstream: base URL of the untrusted service, without a trailing slash.
        timeout: upstream timeout in seconds.
        max_body: largest request body in bytes.
        transport: optional httpx transport (tests of the app object alone).
        templates: the ``[proxy] paths`` templates.
        embedded: the ``[proxy] embedded`` record paths, split at dots.
        client: the upstream client, open while the app runs (its lifespan).
    """

    protector: Protector
    upstream: str
    timeout: float = 30.0
    max_body: int = 16 * 1024 * 1024
    transport: httpx.AsyncBaseTransport | None = None
    templates: list[_Template] = field(default_factory=list)
    embedded: list[tuple[str, ...]] = field(default_factory=list)
    client: httpx.AsyncClient | None = None


def protect_path(st: ProxyState, path: str) -> tuple[str, dict[str, str]]:
    """Protected path and the plaintext template variables (context for the body).

    A path that matches no template exactly but resembles one (:meth:`_Template.resembles`)
    is refused: the upstream might route it to the template's handler with the variable in
    plaintext (``/patient/123/``, ``//patient/123``, ``/Patient/123``, ``/pati%65nt/123``,
    ``/x/../patient/123``, ``/patient/123/history``).
    """
    if not path.startswith("/"):
        raise _RefusedError(400, "request target is not an origin-form path; not forwarded")
    for tpl in st.templates:
        m = tpl.exact.fullmatch(path)
        if not m:
            continue
        pieces, last, plain = [], 0, {}
        for i, name in enumerate(tpl.names, start=1):
            pieces.append(path[last : m.start(i)])
            try:
                plain[name] = unquote(m.group(i), errors="strict")
            except UnicodeDecodeError:
                raise _RefusedError(400, "path segment is not valid UTF-8; not forwarded") from None
            pieces.append(quote(st.protector.protect_query(name, plain[name]), safe=""))
            last = m.end(i)
        pieces.append(path[last:])
        return "".join(pieces), plain
    if st.templates:
        loose = _loose_segments(path)
        for tpl in st.templates:
            if tpl.resembles(loose):
                raise _RefusedError(400, f"request path resembles path template {tpl.template!r} but does "
                                    "not match it exactly (trailing slash, empty or dot segments, "
                                    "encoded or differently cased fixed segments, extra segments); "
                                    "not forwarded unprotected")
    return path, {}


def protect_query(protector: Protector, query: str) -> str:
    """The query string with protected parameters' values protected (look-alikes refused)."""
    if not query:
        return ""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _RefusedError(400, "query string is not valid UTF-8 form encoding; not forwarded") from None
    out = []
    for k, v in pairs:
        if protector.is_protected_field(k):
            v = protector.protect_query(k, v)
        elif (why := protector.lookalike_param(k)) is not None:
            raise _RefusedError(400, f"query parameter {k!r}: {why}; use the exact name. Not forwarded")
        out.append((k, v))
    refuse_encoded_records(protector, [v for _, v in out], "a query parameter")
    return urlencode(out, quote_via=quote)


def each_record(st: ProxyState, doc: Any, fn: Callable[[JSONObject], JSONObject], *,
                strict: bool = False) -> Any:
    """Apply ``fn`` to every record of a JSON body: the body itself (an object) or each
    object of a top-level array, and the records at the ``embedded`` paths of each — those
    first. With ``strict`` (requests), JSON of another shape where a record or an embedded
    path is expected raises :class:`ShapeError` (an array of arrays, ``records`` an object
    instead of an array, an embedded record that is an array)."""

    def embedded_record(r: Any) -> Any:
        if isinstance(r, dict):
            return fn(r)
        if strict and r is not None:
            raise ShapeError(json_kind(r), "an object (an embedded record)")
        return r

    def envelope(d: dict[str, Any]) -> dict[str, Any]:
        for path in st.embedded:
            d = apply_path(d, path, embedded_record, strict=strict)
        return fn(d)

    if isinstance(doc, dict):
        return envelope(doc)
    if isinstance(doc, list):
        out = []
        for i, d in enumerate(doc):
            if isinstance(d, dict):
                try:
                    out.append(envelope(d))
                except ShapeError as e:
                    raise e.within(f"[{i}]") from None
            elif strict and isinstance(d, list):
                raise ShapeError("an array", "an object (a record)", f"[{i}]")
            else:
                out.append(d)
        return out
    return doc


def refuse_encoded_records(protector: Protector, values: list[str], where: str) -> None:
    """Values still in plaintext after protection must not smuggle a JSON record."""
    for v in values:
        key = protector.encoded_record_key(v)
        if key is not None:
            raise _RefusedError(400, f"{where} holds an encoded JSON record with the protected key "
                                f"{key!r}, which the proxy does not inspect; not forwarded")


def protect_record(protector: Protector, record: JSONObject, ctx: dict[str, str]) -> JSONObject:
    """One JSON record protected (a key that only looks like a protected field is refused)."""
    hit = protector.lookalike_key(record)
    if hit is not None:
        raise _RefusedError(400, f"record key {hit[0]!r} differs from protected field {hit[1]!r} only by "
                            "case, Unicode form or spacing; not forwarded unprotected")
    return protector.protect(record, context=ctx)


def protect_body(st: ProxyState, body: bytes, ct: str, ctx: dict[str, str]) -> bytes:
    """The request body with every record protected (JSON or form encoding; else 415)."""
    protector = st.protector
    if not body:
        return body
    if _is_json(ct):
        try:
            doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError):
            raise _RefusedError(400, "request body is not valid UTF-8 JSON; refusing to forward it") from None
        if has_lone_surrogate(body, doc):
            raise _RefusedError(400, f"request JSON {LONE_SURROGATE}; not forwarded")
        doc = each_record(st, doc, lambda r: protect_record(protector, r, ctx), strict=True)
        refuse_encoded_records(protector, _strings(doc), "a string in the request JSON")
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if ct == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                              errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _RefusedError(400, "request body is not valid form encoding; not forwarded") from None
        rec: dict[str, Any] = {}
        for k, v in pairs:
            if k in rec and protector.is_protected_field(k):
                raise _RefusedError(400, f"form field {k!r} appears more than once")
            if (why := protector.lookalike_param(k)) is not None:
                raise _RefusedError(400, f"form field {k!r}: {why}; use the exact field name. Not forwarded")
            rec[k] = v
        out = protector.protect(rec, key_id_as_text=True, context=ctx, flat=True)
        refuse_encoded_records(protector, [v for v in out.values() if isinstance(v, str)], "a form field")
        return urlencode(out, quote_via=quote).encode("ascii")
    raise _RefusedError(415, f"cannot inspect a request body of type {ct or 'unknown'!r}; not forwarded")


def reveal_body(st: ProxyState, body: bytes, ctx: dict[str, str]) -> bytes | None:
    """A JSON response body with every record revealed; None if it is not a JSON document."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, (dict, list)):
        return None
    if has_lone_surrogate(body, doc):
        raise TransformError(f"upstream response JSON {LONE_SURROGATE}")
    doc = each_record(st, doc, lambda r: st.protector.reveal(r, context=ctx))
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


router = APIRouter()


@router.api_route("/{path:path}", methods=_METHODS)
async def forward(request: Request, path: str) -> Response:  # noqa: ARG001 - path via scope
    """Protect the request, send it upstream, reveal the response (module docstring)."""
    st: ProxyState = request.app.state.proxy
    too_big = JSONResponse({"error": f"request body over {st.max_body} bytes; not forwarded"},
                           status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > st.max_body:
        return too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > st.max_body:
            return too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        ct = _content_type(request)
        codings = {c.strip().lower() for v in request.headers.getlist("content-encoding")
                   for c in v.split(",")} - {"identity", ""}
        if body and codings:
            # the proxy cannot inspect a compressed body, and would forward it undecoded
            raise _RefusedError(415, "request Content-Encoding other than identity is not supported; "
                                "not forwarded")
        # the still-encoded path: forwarded byte for byte, segments decoded strictly
        raw_path = request.scope.get("raw_path") or request.url.path.encode("utf-8")
        new_path, path_ctx = protect_path(st, raw_path.decode("latin-1"))
        new_query = protect_query(st.protector, request.url.query)
        # parsing and FF1 are CPU-bound: off the event loop, so one large body cannot stall
        # every other client (the Protector keeps per-thread cipher state)
        new_body = await run_in_threadpool(protect_body, st, body, ct, path_ctx)
    except _RefusedError as e:
        return JSONResponse({"error": e.message}, status_code=e.status)
    except TransformError as e:
        return JSONResponse({"error": f"cannot protect request: {e}"}, status_code=422)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
    url = st.upstream + new_path + (("?" + new_query) if new_query else "")
    if st.client is None:
        raise RuntimeError("the proxy app runs without its lifespan (no upstream client)")
    try:
        resp = await st.client.request(request.method, url, content=new_body, headers=headers)
    except httpx.HTTPError as e:
        log.warning("upstream request failed: %s", type(e).__name__)
        return JSONResponse({"error": f"upstream unreachable ({type(e).__name__})"}, status_code=502)
    # a list, not a dict: repeated headers (Set-Cookie) must all pass
    out_headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _RESP_DROP]
    content = resp.content
    rct = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if content and _is_json(rct):
        try:
            revealed = await run_in_threadpool(reveal_body, st, content, path_ctx)
        except TransformError as e:
            return JSONResponse({"error": f"cannot reveal upstream response: {e}"}, status_code=502)
        if revealed is not None:
            content = revealed
    out = Response(content=content, status_code=resp.status_code)
    out.raw_headers = [
        *[(k.encode("latin-1"), v.encode("latin-1")) for k, v in out_headers],
        *[(k, v) for k, v in out.raw_headers if k == b"content-length"],
    ]
    return out


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the upstream client for the app's lifetime."""
    st: ProxyState = app.state.proxy
    async with httpx.AsyncClient(timeout=st.timeout, transport=st.transport,
                                 follow_redirects=False) as client:
        st.client = client
        try:
            yield
        finally:
            st.client = None


def create_app(protector: Protector, upstream: str, *, timeout: float = 30.0,
               max_body: int = 16 * 1024 * 1024,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build the proxy app.

    Args:
        protector: schema + keyset.
        upstream: base URL of the untrusted service, e.g. ``http://127.0.0.1:8080``; the
            request path and (protected) query are appended.
        timeout: upstream timeout in seconds.
        max_body: largest request body in bytes; a larger one is refused with 413.
        transport: optional httpx transport (tests of the app object alone).
    """
    app = FastAPI(lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.proxy = ProxyState(
        protector, upstream.rstrip("/"), timeout, max_body, transport,
        templates=[_Template(t) for t in protector.schema.paths],
        embedded=[tuple(p.split(".")) for p in protector.schema.embedded])
    app.include_router(router)
    return app
