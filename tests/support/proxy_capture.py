"""A capturing upstream (it answers every request with what it received) and the real proxy in
front of it, both as processes on loopback (``tests.support.proxy_stack.proxy_stack``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.proxy_stack import ProxyStack, proxy_stack

#: An upstream that keeps every request it receives (method, target, body) in memory and
#: answers 200 with ``{"ok": true}``; ``GET /_captured?since=N`` returns requests N.. as JSON
#: (bodies as latin-1 text, so every byte is kept).
CAPTURE_UPSTREAM = r'''
import json, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

seen, lock = [], threading.Lock()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *a):
        pass

    def reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        u = urlsplit(self.path)
        if u.path == "/_captured":
            since = int(dict(parse_qsl(u.query)).get("since", "0"))
            with lock:
                return self.reply({"n": len(seen), "requests": seen[since:]})
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        with lock:
            seen.append({"method": self.command, "target": self.path, "body": body.decode("latin-1")})
        self.reply({"ok": True})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


_client = httpx.Client(timeout=30)  # one client: building one per call costs ~20 ms (TLS context)


def captured(stack: ProxyStack, since: int = 0) -> tuple[int, list[dict]]:
    """``(total count, requests since index)`` as the upstream received them."""
    doc = _client.get(stack.upstream + "/_captured", params={"since": since}).json()
    return doc["n"], doc["requests"]


@contextmanager
def capture_stack(tmp: Path, schema: str) -> Iterator[ProxyStack]:
    """The real proxy with ``schema`` (TOML text) in front of :data:`CAPTURE_UPSTREAM`; both
    processes are stopped on exit."""
    with proxy_stack(tmp, CAPTURE_UPSTREAM, [], schema, health="/_captured") as s:
        yield s


def client() -> httpx.Client:
    """The shared HTTP client (building one per request costs ~20 ms: TLS context)."""
    return _client
