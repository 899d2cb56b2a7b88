"""Client side of RA-TLS: httpx transports that attest the server before sending a byte.

:class:`RATLSTransport` (sync) and :class:`AsyncRATLSTransport` replace httpcore's network
backend with one whose ``start_tls`` verifies the peer certificate (``ratls.verify``) right
after the TLS handshake and *before* returning the stream to the HTTP layer. A refused
connection is closed there, so no request line, header or body ever reaches an unattested
server. Verification runs on every new connection; pooled keep-alive connections were verified
when opened.

.. code-block:: python

    verifier = Verifier(AppraisalPolicy.from_toml("policy.toml"))
    with httpx.Client(transport=RATLSTransport(verifier)) as client:
        client.get("https://127.0.0.1:8443/")        # raises AppraisalError / RATLSError

Only ``https`` URLs are accepted. The TLS layer does no PKI validation (the certificate is
self-signed inside the TEE); authenticity comes from the Evidence and its key binding.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import typing
from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

import httpcore
import httpx

from safehold.attestation.verifier import Appraisal, Verifier
from safehold.errors import RATLSError
from safehold.ratls.verify import verify_certificate

Check = Callable[[bytes], Appraisal]


ClientCert = tuple[str | os.PathLike[str], str | os.PathLike[str]]


def client_ssl_context(client_cert: ClientCert | None = None) -> ssl.SSLContext:
    """TLS client context for RA-TLS: TLS >= 1.2, no PKI/hostname check (attestation instead).

    Args:
        client_cert: optional ``(certificate PEM file, private key PEM file)`` presented for
            mutual TLS (e.g. a client certificate issued by the broker's workload CA); with it
            the context requires TLS 1.3, so the certificate is never sent in clear.

    Raises:
        RATLSError: the client certificate or key does not load (names the file, not the key).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # noqa: S503 - the Evidence, not a CA, authenticates the peer
    if client_cert is not None:
        # TLS 1.3 encrypts the client certificate; under 1.2 it would go out in clear, before
        # the server's Evidence has been checked, and name the user to any on-path observer.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(os.fspath(client_cert[0]), os.fspath(client_cert[1]))
        except (OSError, ssl.SSLError) as e:
            raise RATLSError(f"client certificate {os.fspath(client_cert[0])!r} does not load: "
                             f"{getattr(e, 'reason', None) or e.__class__.__name__}") from None
    return ctx


def _peer_der(stream: typing.Any) -> bytes:
    obj = stream.get_extra_info("ssl_object")
    der = obj.getpeercert(True) if obj is not None else None
    if not der:
        raise RATLSError("TLS peer presented no certificate")
    return der


class _Recorder:
    def __init__(self, verifier: Verifier, nonce: bytes | None, at: datetime | None) -> None:
        self.verifier, self.nonce, self.at = verifier, nonce, at
        self.last_appraisal: Appraisal | None = None
        self.connections_verified = 0
        self._lock = threading.Lock()

    def __call__(self, der: bytes) -> Appraisal:
        a = verify_certificate(der, self.verifier, expected_nonce=self.nonce, at=self.at)
        with self._lock:
            self.last_appraisal = a
            self.connections_verified += 1
        return a


class _SyncStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, check: Check) -> None:
        self._inner, self._check = inner, check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(_peer_der(tls))
        except BaseException:
            tls.close()  # refuse before the HTTP layer can write anything
            raise
        return tls


class _SyncBackend(httpcore.NetworkBackend):
    def __init__(self, check: Check) -> None:
        self._inner = httpcore.SyncBackend()
        self._check = check

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        return _SyncStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options),
                           self._check)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[typing.Any] | None = None
                            ) -> httpcore.NetworkStream:
        return _SyncStream(self._inner.connect_unix_socket(path, timeout, socket_options), self._check)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, check: Check) -> None:
        self._inner, self._check = inner, check

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(_peer_der(tls))
        except BaseException:
            await tls.aclose()
            raise
        return tls


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, check: Check) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._check = check

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        s = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncStream(s, self._check)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        s = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncStream(s, self._check)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _require_https(request: httpx.Request) -> None:
    if request.url.scheme != "https":
        raise RATLSError(f"RA-TLS transport: expected an https URL, got {request.url.scheme}://")


def _pool_options(ctx: ssl.SSLContext, limits: httpx.Limits, http2: bool,
                  retries: int) -> dict[str, typing.Any]:
    """The httpcore pool settings httpx would derive from the same arguments."""
    return {"ssl_context": ctx, "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry, "http1": True, "http2": http2, "retries": retries}


class _Attested:
    """What both transports report about the connections they attested."""

    _rec: _Recorder

    @property
    def last_appraisal(self) -> Appraisal | None:
        return self._rec.last_appraisal

    @property
    def connections_verified(self) -> int:
        return self._rec.connections_verified


class RATLSTransport(_Attested, httpx.HTTPTransport):
    """httpx transport that attests every new connection's peer before sending the request.

    Args:
        verifier: Verifier with the appraisal policy.
        expected_nonce: nonce the peer's RA-TLS claims must carry (None = not checked).
        at: verification time (None = now; tests pin it).
        limits / retries / http2: as for :class:`httpx.HTTPTransport`.
        client_cert: ``(certificate PEM file, key PEM file)`` for mutual TLS, or None.

    Attributes:
        last_appraisal: the appraisal of the most recently opened connection.
        connections_verified: how many connections were attested.

    Raises (from requests):
        RATLSError / AppraisalError / EvidenceFormatError ...: the server was not attested; the
            connection was closed before any request bytes were written.
    """

    def __init__(self, verifier: Verifier, *, expected_nonce: bytes | None = None,
                 at: datetime | None = None, limits: httpx.Limits = httpx.Limits(),
                 retries: int = 0, http2: bool = False,
                 client_cert: ClientCert | None = None) -> None:
        ctx = client_ssl_context(client_cert)
        super().__init__(verify=ctx, trust_env=False, limits=limits, retries=retries, http2=http2)
        self._rec = _Recorder(verifier, expected_nonce, at)
        self._pool = httpcore.ConnectionPool(**_pool_options(ctx, limits, http2, retries),
                                             network_backend=_SyncBackend(self._rec))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _require_https(request)
        return super().handle_request(request)


class AsyncRATLSTransport(_Attested, httpx.AsyncHTTPTransport):
    """Async twin of :class:`RATLSTransport` (anyio: asyncio or trio)."""

    def __init__(self, verifier: Verifier, *, expected_nonce: bytes | None = None,
                 at: datetime | None = None, limits: httpx.Limits = httpx.Limits(),
                 retries: int = 0, http2: bool = False,
                 client_cert: ClientCert | None = None) -> None:
        ctx = client_ssl_context(client_cert)
        super().__init__(verify=ctx, trust_env=False, limits=limits, retries=retries, http2=http2)
        self._rec = _Recorder(verifier, expected_nonce, at)
        self._pool = httpcore.AsyncConnectionPool(**_pool_options(ctx, limits, http2, retries),
                                                  network_backend=_AsyncBackend(self._rec))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _require_https(request)
        return await super().handle_async_request(request)


def parse_target(url: str) -> tuple[str, int]:
    """``https://host:port/...`` or ``host:port`` → ``(host, port)`` (default port 443).

    Raises:
        RATLSError: not https, or no host.
    """
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme != "https":
        raise RATLSError(f"expected an https URL, got {parts.scheme}://")
    try:
        port = parts.port or 443
    except ValueError:
        raise RATLSError(f"invalid port in {url!r}") from None
    if not parts.hostname:
        raise RATLSError(f"no host in {url!r}")
    return parts.hostname, port


def fetch_peer_certificate(url: str, *, timeout: float = 10.0) -> bytes:
    """Connect, complete the TLS handshake, return the peer's leaf certificate (DER), and close
    without sending any application data. For ``safehold attest`` and diagnostics.

    Raises:
        RATLSError: connection refused/dropped, handshake failure or no certificate.
    """
    host, port = parse_target(url)
    ctx = client_ssl_context()
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(True)
    except (OSError, ssl.SSLError) as e:
        raise RATLSError(f"TLS connection to {host}:{port} failed: {e}") from None
    if not der:
        raise RATLSError(f"{host}:{port} presented no certificate")
    return der
