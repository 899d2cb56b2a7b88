"""Serialised HTTP/1.1 messages as the VAU channels carry them (RFC 9112).

Both gematik channels encrypt a *whole* HTTP/1.1 request or response (request line / status
line, CRLF headers, blank line, body). Parsing uses h11 (strict RFC 9112 framing: one message,
``Content-Length`` framing, no smuggling), and refuses trailing bytes after the message; writing
is done here and refuses CR / LF / NUL in any header so a caller cannot inject a second message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import h11

from safehold.vau.errors import VauFormatError

__all__ = ["HttpRequest", "HttpResponse", "parse_request", "parse_response"]

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_MAX_MESSAGE = 64 * 1024 * 1024


def _check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise VauFormatError("HTTP header name is not a token")
        if _BAD_VALUE.search(value):
            raise VauFormatError(f"HTTP header {name.decode('ascii')!r} contains CR, LF or NUL")


def _b(x: str | bytes) -> bytes:
    return x.encode("latin-1") if isinstance(x, str) else bytes(x)


def _headers_and_body(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """Header lines (framing headers replaced by a matching Content-Length), blank line, body."""
    hs = [(_b(k), _b(v)) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    hs.append((b"Content-Length", str(len(body)).encode()))
    _check_headers(hs)
    return b"".join(k + b": " + v + b"\r\n" for k, v in hs) + b"\r\n" + bytes(body)


@dataclass
class HttpRequest:
    """One HTTP/1.1 request: ``method`` and ``target`` as str, headers as (lower-case name, value)."""

    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        n = name.lower()
        return next((v for k, v in self.headers if k.lower() == n), None)

    def encode(self) -> bytes:
        """Serialise with CRLF line ends and a ``Content-Length`` matching the body.

        Raises:
            VauFormatError: a method, target or header that would break the framing.
        """
        method, target = _b(self.method), _b(self.target)
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            raise VauFormatError("HTTP method or request target is malformed")
        return method + b" " + target + b" HTTP/1.1\r\n" + _headers_and_body(self.headers, self.body)


@dataclass
class HttpResponse:
    """One HTTP/1.1 response: status code, reason phrase, headers, body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    reason: str = ""

    def header(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        n = name.lower()
        return next((v for k, v in self.headers if k.lower() == n), None)

    def encode(self) -> bytes:
        """Serialise with CRLF line ends and a ``Content-Length`` matching the body.

        Raises:
            VauFormatError: status outside 100..599 or a header that would break the framing.
        """
        if not 100 <= self.status <= 599:
            raise VauFormatError(f"HTTP status {self.status} is outside 100..599")
        reason = _b(self.reason or _REASONS.get(self.status, "Status"))
        if _BAD_VALUE.search(reason):
            raise VauFormatError("HTTP reason phrase contains CR, LF or NUL")
        return b"HTTP/1.1 %d " % self.status + reason + b"\r\n" + _headers_and_body(self.headers, self.body)


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _events(conn: h11.Connection, raw: bytes, what: str) -> tuple[object, bytes]:
    if len(raw) > _MAX_MESSAGE:
        raise VauFormatError(f"inner HTTP {what} exceeds {_MAX_MESSAGE} bytes")
    head = None
    body = bytearray()
    try:
        conn.receive_data(bytes(raw))
        conn.receive_data(b"")
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Request | h11.Response | h11.InformationalResponse):
                if head is not None or isinstance(ev, h11.InformationalResponse):
                    raise VauFormatError(f"inner HTTP {what} holds more than one message head")
                head = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:  # NEED_DATA at EOF or ConnectionClosed: the message is incomplete
                raise VauFormatError(f"inner HTTP {what} is truncated")
    except h11.RemoteProtocolError as e:
        raise VauFormatError(f"inner HTTP {what} is malformed: {e}") from None
    trailing, _closed = conn.trailing_data
    if trailing:
        raise VauFormatError(f"inner HTTP {what} is followed by {len(trailing)} extra bytes")
    if head is None:
        raise VauFormatError(f"inner HTTP {what} is empty")
    return head, bytes(body)


def parse_request(raw: bytes) -> HttpRequest:
    """Parse exactly one serialised HTTP/1.1 request.

    Raises:
        VauFormatError: malformed, truncated, chunked-and-broken, or followed by extra bytes.
    """
    conn = h11.Connection(h11.SERVER)
    head, body = _events(conn, raw, "request")
    assert isinstance(head, h11.Request)
    if head.http_version != b"1.1":
        raise VauFormatError("inner HTTP request must be HTTP/1.1")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
    return HttpRequest(head.method.decode("ascii"), head.target.decode("latin-1"), headers, body)


def parse_response(raw: bytes, *, request_method: str = "POST") -> HttpResponse:
    """Parse exactly one serialised HTTP/1.1 response (to a request of ``request_method``).

    Raises:
        VauFormatError: malformed, truncated, or followed by extra bytes.
    """
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=request_method, target="/", headers=[("Host", "vau")]))
    conn.send(h11.EndOfMessage())
    head, body = _events(conn, raw, "response")
    assert isinstance(head, h11.Response)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
    return HttpResponse(head.status_code, headers, body, head.reason.decode("latin-1"))
