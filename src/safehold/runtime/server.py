"""Serving for the workload runtime: one or more ASGI apps on uvicorn, on one event loop, with
TLS contexts built in memory (``Provisioned.server_context``) — never a key file.

.. code-block:: python

    from safehold.runtime.server import Listener, serve

    ctx = prov.server_context(client_ca=True)
    asyncio.run(serve([Listener(native_app, "127.0.0.1", 8700, ctx),
                       Listener(other_app, "127.0.0.1", 0, ctx)],          # 0: a free port
                      on_ready=lambda ports: write_ready_file(ports)))

Each request's verified client certificate (DER, or None) is in ``request.state.tls_peer_cert``
(ASGI has no standard field for it). :func:`serve` returns after SIGINT/SIGTERM (or ``stop``):
in-flight requests finish, idle keep-alive connections are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from safehold.errors import ConfigError

__all__ = ["GC_GEN0_THRESHOLD", "Listener", "PeerCertH11Protocol", "PeerCertHTTPProtocol", "serve",
           "tune_gc"]

#: Allocations between two young-generation collections while serving (CPython's default: 700).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Set the cyclic garbage collector up for serving, once start-up is over: everything built
    so far (framework, configuration, keys' wrappers, the verifier map's tables) moves to the
    permanent generation (:func:`gc.freeze`), so full collections no longer walk it, and young
    collections run every :data:`GC_GEN0_THRESHOLD` allocations instead of every 700. A 100-hit
    search allocates ~15,000 objects (the decoded candidates), most freed by reference counting;
    with the defaults it paid for ~20 collections each. Process-wide: call it from a service's
    main process, never from a library or a test."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)


def _with_peer_cert(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    class PeerCertProtocol(base):  # type: ignore[valid-type, misc]  # a base chosen at run time
        """uvicorn's HTTP protocol that exposes the verified client certificate (DER) to the
        app as ``request.state.tls_peer_cert``."""

        app_state: dict[str, object]  # uvicorn's per-connection state, copied into each request

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            self.app_state = {**self.app_state, "tls_peer_cert": der}

    PeerCertProtocol.__name__ = f"PeerCert{base.__name__}"
    return PeerCertProtocol


PeerCertH11Protocol = _with_peer_cert(H11Protocol)
try:  # httptools (C parser) when installed: several times less CPU per request than h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    PeerCertHTTPProtocol = _with_peer_cert(HttpToolsProtocol)
except ImportError:  # pragma: no cover - httptools is a dependency
    PeerCertHTTPProtocol = PeerCertH11Protocol


@dataclass
class Listener:
    """One listening endpoint.

    Attributes:
        app: the ASGI app.
        host / port: where to listen (port 0: a free port); ignored when ``sock`` is given.
        ssl_context: the TLS context (from memory), or None for plain HTTP (tests only).
        sock: an already bound socket to serve on (e.g. bound before privileges are dropped).
    """

    app: Any
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    sock: socket.socket | None = None


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve`."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def _config(lst: Listener) -> uvicorn.Config:
    ctx = lst.ssl_context
    return uvicorn.Config(
        lst.app, host=lst.host, port=lst.port, http=PeerCertHTTPProtocol, lifespan="off",
        log_level="warning", access_log=False, server_header=False, timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
        # the context built in memory is used as is: uvicorn never reads a key file
        ssl_context_factory=(lambda _c, _d: ctx) if ctx is not None else None,
        ssl_certfile="unused" if ctx is not None else None,
    )


async def serve(listeners: Sequence[Listener], *, on_ready: Callable[[list[int]], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve every listener on the running loop until SIGINT/SIGTERM (or ``stop`` is set).

    Args:
        listeners: the endpoints (:class:`Listener`).
        on_ready: called with the bound ports, in order, once every listener is open.
        stop: an event that ends serving (default: only the signals).

    Raises:
        ConfigError: a listener failed to start (e.g. its port is in use).
    """
    servers = [_Server(_config(lst)) for lst in listeners]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    tasks = [asyncio.create_task(s.serve(sockets=[lst.sock] if lst.sock is not None else None))
             for s, lst in zip(servers, listeners, strict=True)]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            raise ConfigError("a listener failed to start (port in use?)")
        await asyncio.sleep(0.02)
    ports = [s.servers[0].sockets[0].getsockname()[1] for s in servers]
    if on_ready:
        on_ready(ports)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for s in servers:
        s.should_exit = True
    # graceful: in-flight requests finish; then idle keep-alive TLS connections are dropped
    # without waiting for each peer's close_notify
    _, pending = await asyncio.wait(tasks, timeout=2.0)
    if pending:
        for s in servers:
            s.force_exit = True
        _, pending = await asyncio.wait(pending, timeout=3.0)
        for t in pending:
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
