"""Fixtures for the proxy tests in this folder: a capturing upstream and the real proxy, both
as processes on loopback (``tests.proxy_helpers.proxy_stack``)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from tests.proxy_helpers import ProxyStack, proxy_stack

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


@pytest.fixture(scope="module")
def capture_stack_factory(tmp_path_factory) -> Iterator:
    """Call with a schema (TOML text) to get a running :class:`ProxyStack`; stopped at module end."""
    from contextlib import ExitStack

    with ExitStack() as es:
        def make(schema: str) -> ProxyStack:
            tmp = tmp_path_factory.mktemp("proxy")
            return es.enter_context(proxy_stack(tmp, CAPTURE_UPSTREAM, [], schema, health="/_captured"))

        yield make


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    """A shared HTTP client for requests to the proxy."""
    return _client


@pytest.fixture(scope="module")
def upstream_log():
    """The :func:`captured` helper, as a fixture (test modules do not import conftest)."""
    return captured
