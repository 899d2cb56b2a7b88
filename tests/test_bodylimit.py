"""``safehold.bodylimit``: the shared request-body limit (declared and streamed), driven as
plain ASGI (the services' own limits and error shapes are in tests/<service>/test_http.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safehold.bodylimit import BodyLimit, digits_over, refuse_declared_over


class _Overflow(Exception):
    pass


def _refusal(tag: str) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "refused", "tag": tag})
    return app


async def _reader(scope: Any, receive: Any, send: Any) -> None:
    """The wrapped app: reads the whole body, then answers how much it got."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "read", "size": size})


def _run(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes],
         scope_type: str = "http") -> list[dict[str, Any]]:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": scope_type, "headers": headers}, receive, send))
    return sent


def _limit(answer: bool = False) -> BodyLimit:
    return BodyLimit(_reader, 10, declared=lambda v: _refusal(v.decode()) if digits_over(v, 10) else None,
                     overflow=_Overflow, answer=(lambda: _refusal("streamed")) if answer else None)


def test_digits_over() -> None:
    assert digits_over(b"11", 10) and not digits_over(b"10", 10)
    assert not digits_over(b"-11", 10) and not digits_over(b" 11", 10) and not digits_over(b"", 10)
    refusal = _refusal("over")
    check = refuse_declared_over(10, lambda: refusal)
    assert check(b"11") is refusal and check(b"10") is None and check(b"x") is None


def test_declared_over_the_limit_is_refused_before_the_app_runs() -> None:
    assert _run(_limit(), [(b"content-length", b"11")], [b"x" * 11]) == [{"type": "refused", "tag": "11"}]
    # every Content-Length header is checked, not only the last one
    assert _run(_limit(), [(b"content-length", b"99"), (b"content-length", b"3")],
                [b"abc"]) == [{"type": "refused", "tag": "99"}]


def test_body_within_the_limit_reaches_the_app() -> None:
    sent = _run(_limit(), [(b"content-length", b"10")], [b"x" * 4, b"x" * 6])
    assert sent == [{"type": "read", "size": 10}]


def test_streamed_body_over_the_limit_raises_inside_the_app() -> None:
    with pytest.raises(_Overflow):
        _run(_limit(), [], [b"x" * 6, b"x" * 6])


def test_streamed_overflow_answered_when_asked() -> None:
    assert _run(_limit(answer=True), [(b"content-length", b"3")],
                [b"x" * 6, b"x" * 6]) == [{"type": "refused", "tag": "streamed"}]


def test_other_errors_of_the_app_propagate() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")
    app = BodyLimit(broken, 10, declared=lambda v: None, overflow=_Overflow, answer=lambda: _refusal("x"))
    with pytest.raises(RuntimeError, match="boom"):
        _run(app, [], [b""])


def test_non_http_scopes_pass_through() -> None:
    assert _run(_limit(), [(b"content-length", b"99")], [b"x" * 20], scope_type="websocket") == \
        [{"type": "read", "size": 20}]
