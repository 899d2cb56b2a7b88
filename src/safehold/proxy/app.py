"""The HTTP encryption proxy: an ASGI app between clients and an untrusted upstream API.

Requests: JSON (``application/json``, ``*+json``) and form-encoded
(``application/x-www-form-urlencoded``) bodies are parsed, the schema's fields protected with
:meth:`Protector.protect` and the body re-encoded; query parameters and path segments named in
the schema (``[proxy.query]``, ``[proxy] paths``, or a parameter with a field's name) are
protected with the field's deterministic transform so exact search still works upstream.
Responses with a JSON body are revealed with :meth:`Protector.reveal`.

Fails closed: a body that cannot be parsed (400), a body of another content type (415), a
configured field or query value that cannot be transformed (422) is refused and nothing is
sent upstream. A response that cannot be revealed becomes 502. Error bodies are
``{"error": "..."}`` and never contain field values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from safehold.errors import TransformError
from safehold.proxy.core import Protector, apply_path
from safehold.proxy.schema import _template_vars

__all__ = ["create_app", "serve"]

log = logging.getLogger("safehold.proxy")

_HOP = {
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "proxy-authorization", "proxy-authenticate", "te", "trailer", "accept-encoding",
}
_RESP_DROP = {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _compile_paths(templates: tuple[str, ...]) -> list[tuple[re.Pattern[str], list[str]]]:
    out = []
    for tpl in templates:
        names = _template_vars(tpl)
        rx = ""
        for part in re.split(r"(\{[^{}]+\})", tpl):
            m = re.fullmatch(r"\{([^{}]+)\}", part)
            rx += "([^/]+)" if m else re.escape(part)
        out.append((re.compile(rx), names))
    return out


def _is_json(ct: str) -> bool:
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


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
    upstream = upstream.rstrip("/")
    paths = _compile_paths(protector.schema.paths)
    embedded = [tuple(p.split(".")) for p in protector.schema.embedded]
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def protect_path(path: str) -> tuple[str, dict[str, str]]:
        """Protected path and the plaintext template variables (context for the body)."""
        for rx, names in paths:
            m = rx.fullmatch(path)
            if not m:
                continue
            pieces, last, plain = [], 0, {}
            for i, name in enumerate(names, start=1):
                pieces.append(path[last : m.start(i)])
                try:
                    plain[name] = unquote(m.group(i), errors="strict")
                except UnicodeDecodeError:
                    raise _Refused(400, "path segment is not valid UTF-8; not forwarded") from None
                pieces.append(quote(protector.protect_query(name, plain[name]), safe=""))
                last = m.end(i)
            pieces.append(path[last:])
            return "".join(pieces), plain
        return path, {}

    def protect_query(query: str) -> str:
        if not query:
            return ""
        try:
            pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "query string is not valid UTF-8 form encoding; not forwarded") from None
        out = []
        for k, v in pairs:
            if protector.is_protected_field(k):
                v = protector.protect_query(k, v)
            out.append((k, v))
        return urlencode(out, quote_via=quote)

    def each_record(doc: Any, fn: Callable[[dict], dict]) -> Any:
        """Apply ``fn`` to every record of a JSON body: embedded paths first, then the body
        itself (an object) or each object of a top-level array."""
        one = lambda r: fn(r) if isinstance(r, dict) else r  # noqa: E731
        for path in embedded:
            doc = apply_path(doc, path, one)
        if isinstance(doc, list):
            return [one(d) for d in doc]
        return one(doc)

    def protect_body(body: bytes, ct: str, ctx: dict[str, str]) -> bytes:
        if not body:
            return body
        if _is_json(ct):
            try:
                doc = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise _Refused(400, "request body is not valid UTF-8 JSON; refusing to forward it") from None
            doc = each_record(doc, lambda r: protector.protect(r, context=ctx))
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if ct == "application/x-www-form-urlencoded":
            try:
                pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                                  errors="strict")
            except (UnicodeDecodeError, ValueError):
                raise _Refused(400, "request body is not valid form encoding; not forwarded") from None
            rec: dict[str, Any] = {}
            for k, v in pairs:
                if k in rec and protector.is_protected_field(k):
                    raise _Refused(400, f"form field {k!r} appears more than once")
                rec[k] = v
            out = protector.protect(rec, key_id_as_text=True, context=ctx)
            return urlencode(out, quote_via=quote).encode("ascii")
        raise _Refused(415, f"cannot inspect a request body of type {ct or 'unknown'!r}; not forwarded")

    def reveal_body(body: bytes, ctx: dict[str, str]) -> bytes | None:
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(doc, (dict, list)):
            return None
        doc = each_record(doc, lambda r: protector.reveal(r, context=ctx))
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @app.api_route("/{path:path}", methods=_METHODS)
    async def forward(request: Request, path: str) -> Response:  # noqa: ARG001 - path via scope
        ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
        too_big = JSONResponse({"error": f"request body over {max_body} bytes; not forwarded"},
                               status_code=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                return too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            # the still-encoded path: forwarded byte for byte, segments decoded strictly
            raw_path = request.scope.get("raw_path") or request.url.path.encode("utf-8")
            new_path, path_ctx = protect_path(raw_path.decode("latin-1"))
            new_query = protect_query(request.url.query)
            new_body = protect_body(body, ct, path_ctx)
        except _Refused as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except TransformError as e:
            return JSONResponse({"error": f"cannot protect request: {e}"}, status_code=422)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        url = upstream + new_path + (("?" + new_query) if new_query else "")
        try:
            resp = await state["client"].request(request.method, url, content=new_body, headers=headers)
        except httpx.HTTPError as e:
            log.warning("upstream request failed: %s", type(e).__name__)
            return JSONResponse({"error": f"upstream unreachable ({type(e).__name__})"}, status_code=502)
        # a list, not a dict: repeated headers (Set-Cookie) must all pass
        out_headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _RESP_DROP]
        content = resp.content
        rct = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if content and _is_json(rct):
            try:
                revealed = reveal_body(content, path_ctx)
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

    return app


def serve(protector: Protector, upstream: str, host: str, port: int) -> None:
    """Run the proxy with uvicorn until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(protector, upstream), host=host, port=port, log_level="warning")
