"""Drive an ASGI app (FastAPI) in-process through ``httpx.ASGITransport``: real routing,
middleware, exception handlers and serialisation, no socket and no server process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class AsgiClient:
    """Synchronous HTTP calls into ``app``; every call runs in a fresh event loop.

    Args:
        app: the ASGI application.
        base_url: scheme and host the app sees (``https`` so secure cookies are kept).
        headers: sent with every request (e.g. ``Authorization``); per-call headers add to them.
    """

    def __init__(self, app: Any, base_url: str = "https://service.test",
                 headers: dict[str, str] | None = None) -> None:
        self.app = app
        self.base_url = base_url
        self.headers = dict(headers or {})

    def session(self, fn: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """Run ``fn(client)`` with one client for several requests (its cookies persist)."""

        async def go() -> T:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url=self.base_url,
                                         headers=self.headers) as c:
                return await fn(c)

        return asyncio.run(go())

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; ``kw`` as for :meth:`httpx.AsyncClient.request`."""
        return self.session(lambda c: c.request(method, path, **kw))

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def put(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def as_role(self, token: str) -> AsgiClient:
        """The same app, calling with ``Authorization: Bearer <token>``."""
        return AsgiClient(self.app, self.base_url, {**self.headers, "Authorization": f"Bearer {token}"})
