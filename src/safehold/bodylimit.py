"""Request-body limit as plain ASGI middleware, shared by the services' HTTP layers.

A body is refused in two places, so no route ever buffers more than ``limit`` bytes:

1. before the app runs, from every ``Content-Length`` header (RFC 9110 §8.6): the caller's
   ``declared(value)`` decides, returning the ASGI response that answers instead or ``None``;
2. while the app reads it (chunked or under-declared bodies): the ``receive`` the app gets
   counts the ``http.request`` body bytes and, once past ``limit``, raises ``overflow()``
   inside the app, whose exception handlers answer it. If the exception escapes the app and
   ``answer`` is given, ``answer()`` is sent instead.

The response shapes (RFC 7807 problem for the broker, ``{"error", "detail"}`` for SVR and
discovery) stay in each service's ``http.py``; this module imports no web framework (ASGI is
only the calling convention, `asgiref`'s spec), so it is a shared leaf like ``fsutil``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "BodyLimit", "digits_over", "refuse_declared_over"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def digits_over(value: bytes, limit: int) -> bool:
    """True if the ``Content-Length`` ``value`` is all ASCII digits and over ``limit`` bytes."""
    return value.isdigit() and int(value) > limit


def refuse_declared_over(limit: int, refusal: Callable[[], ASGIApp]) -> Callable[[bytes], ASGIApp | None]:
    """A ``declared`` check for :class:`BodyLimit`: a ``Content-Length`` of digits over ``limit``
    is answered by ``refusal()``; any other value goes on (the streamed count still applies)."""
    return lambda value: refusal() if digits_over(value, limit) else None


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused (module docstring).

    Args:
        app: the wrapped ASGI app.
        limit: largest body accepted, bytes.
        declared: called with each ``Content-Length`` header value (raw bytes); returns the ASGI
            response to send instead of running ``app``, or ``None`` to go on.
        overflow: the exception raised from ``receive`` once the streamed body passes ``limit``.
        answer: if given, the response sent when ``overflow``'s exception escapes ``app``
            (otherwise it propagates).
    """

    def __init__(self, app: ASGIApp, limit: int, *, declared: Callable[[bytes], ASGIApp | None],
                 overflow: Callable[[], Exception], answer: Callable[[], ASGIApp] | None = None) -> None:
        self.app, self.limit = app, limit
        self.declared, self.overflow, self.answer = declared, overflow, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                refusal = self.declared(value)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        seen = 0
        overflowed: Exception | None = None

        async def limited() -> Message:
            nonlocal seen, overflowed
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    overflowed = self.overflow()
                    raise overflowed
            return message

        if self.answer is None:
            await self.app(scope, limited, send)
            return
        try:
            await self.app(scope, limited, send)
        except Exception as exc:
            if exc is not overflowed:
                raise
            await self.answer()(scope, receive, send)
