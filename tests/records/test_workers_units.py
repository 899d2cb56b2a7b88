"""records.workers: the ports the service process reserves and the listeners its workers open."""

from __future__ import annotations

import asyncio
import socket

import pytest

from safehold.errors import ConfigError
from safehold.records.workers import bind_listeners, worker_listeners


def _nodelay_of_accepted(sk: socket.socket) -> int:
    port = sk.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
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
    return seen[0]


def test_worker_listeners_give_connections_without_nagle():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a listener made with
    proto 0 (socket.create_server) cost every response ~40 ms (Nagle + delayed ACK)."""
    reserved = bind_listeners("127.0.0.1", [0])
    try:
        (sk,) = worker_listeners("127.0.0.1", [socket.socket(fileno=socket.dup(reserved[0].fileno()))])
        assert sk.proto == socket.IPPROTO_TCP
        assert _nodelay_of_accepted(sk) != 0
    finally:
        reserved[0].close()


def test_connections_are_spread_over_the_workers_listeners():
    """Each worker listens on its own SO_REUSEPORT socket of the reserved port: the kernel
    spreads connections over them (one shared listening socket let one worker take most); the
    reservation itself never accepts."""
    (reserved,) = bind_listeners("127.0.0.1", [0])
    port = reserved.getsockname()[1]
    a = worker_listeners("127.0.0.1", [socket.socket(fileno=socket.dup(reserved.fileno()))])[0]
    b = worker_listeners("127.0.0.1", [socket.socket(fileno=socket.dup(reserved.fileno()))])[0]
    try:
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        got = {}
        for name, sk in (("a", a), ("b", b)):
            sk.setblocking(False)
            n = 0
            while True:
                try:
                    c, _ = sk.accept()
                except BlockingIOError:
                    break
                c.close()
                n += 1
            got[name] = n
        assert got["a"] + got["b"] == 40 and got["a"] > 0 and got["b"] > 0, got
        for c in clients:
            c.close()
    finally:
        for s in (a, b, reserved):
            s.close()


def test_a_port_in_use_is_named():
    plain = socket.create_server(("127.0.0.1", 0))  # another process's listener, no SO_REUSEPORT
    port = plain.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listeners("127.0.0.1", [0, port])
    finally:
        plain.close()
