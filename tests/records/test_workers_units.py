"""records.workers: the listening sockets the forked workers share."""

from __future__ import annotations

import asyncio
import socket

import pytest

from safehold.errors import ConfigError
from safehold.records.workers import bind_listeners


def test_shared_listeners_give_connections_without_nagle():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a listener made with
    proto 0 (socket.create_server) cost every response ~40 ms (Nagle + delayed ACK)."""
    (sk,) = bind_listeners("127.0.0.1", [0])
    port = sk.getsockname()[1]
    assert sk.proto == socket.IPPROTO_TCP and sk.get_inheritable()
    seen: list[int] = []

    async def main() -> None:
        def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            s = writer.get_extra_info("socket")
            seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_conn, sock=sk)
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_a_port_in_use_is_named():
    (sk,) = bind_listeners("127.0.0.1", [0])
    port = sk.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listeners("127.0.0.1", [0, port])
    finally:
        sk.close()
