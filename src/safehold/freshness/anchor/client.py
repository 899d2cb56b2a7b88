"""QuorumAnchor: the anchor client a FreshStore uses — parallel requests to the ``n`` members
over RA-TLS, majority rule (``anchor/base.py``).

Each member gets one persistent connection (:class:`MemberLink`: a TLS socket, each request
fixed bytes in one write, each response parsed by ``httptools``' C parser with size limits —
:class:`_Conn`; it matters because the anchor sits on every commit: ``bench/anchor_rtt.py``).
A new connection is accepted only after the member's RA-TLS certificate verifies against the
anchor's appraisal policy (its own Reference Value;
``safehold.ratls.verify.verify_certificate``) — before any request byte is sent — and its
statement key's endorsement verifies with the certificate's key. Requests go to all members at
once; answers are collected with ``select`` until the outcome is decided or the timeout passes.
All anchor requests are idempotent, so a request on a connection that turned out dead is sent
again on a fresh one.

Mutual TLS: the client presents its workload certificate (issued by the broker's CA, CN = the
workload name = the ledger it may advance). The certificate and key are handed over as bytes
and loaded through ``memfd_create`` (anonymous memory, no file system path), never a file.
Member signatures on heads are verified when a head is read (:meth:`QuorumAnchor.head`) and on
owner statements; advance replies are authenticated by the attested channel itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httptools

from safehold.attestation.verifier import Verifier
from safehold.errors import ConfigError, RATLSError
from safehold.freshness.anchor.base import (
    ACCEPTED,
    AnchorHead,
    MemberInfo,
    MemberReply,
    combine_advance,
    combine_head,
    combine_owner,
    majority,
)
from safehold.freshness.anchor.statements import (
    SignedOwnerStatement,
    verify_endorsement,
    verify_head_signatures,
)
from safehold.freshness.anchor.wire import WireError, head_to, info_from, reply_from
from safehold.freshness.errors import AnchorUnavailableError
from safehold.ratls.cert import load_certificate
from safehold.ratls.client import client_ssl_context, parse_target
from safehold.ratls.memkey import load_chain_from_memory
from safehold.ratls.verify import verify_certificate

__all__ = ["MemberLink", "QuorumAnchor", "memory_client_context"]

Reply = MemberReply | BaseException

#: Largest response head (status line and headers) a member may send, bytes (h11's default).
MAX_RESPONSE_HEAD = 16 * 1024
#: Largest response body, bytes: a reply is < 2 KiB; ``/v1/anchor/state`` lists every ledger
#: (~100 bytes each).
MAX_RESPONSE_BODY = 1024 * 1024
_TOKEN = re.compile(r"[\x21-\x7e]{1,2048}")  # a request target or Host value: visible ASCII


def memory_client_context(cert_pem: bytes | None, key_pem: bytes | None) -> ssl.SSLContext:
    """An RA-TLS client context (``safehold.ratls.client.client_ssl_context``) presenting
    ``cert_pem`` / ``key_pem`` from memory (:func:`safehold.ratls.memkey.load_chain_from_memory`:
    a ``memfd``, no file is written); with a certificate the context requires TLS 1.3 (RFC 8446)
    so the certificate never travels in clear.

    Raises:
        ConfigError: only one of the two given, no ``memfd_create`` on this platform, or the
            certificate and key do not load.
    """
    if cert_pem is None and key_pem is None:
        return client_ssl_context(None)
    if cert_pem is None or key_pem is None:
        raise ConfigError("a client certificate needs both the certificate and its key")
    ctx = client_ssl_context(None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # as client_ssl_context with a certificate
    load_chain_from_memory(ctx, cert_pem, key_pem)
    return ctx


class _Conn:
    """One TLS socket and its HTTP/1.1 state.

    A request is fixed bytes in one write (request line, ``Host``, ``Content-Length``, the JSON
    body's ``Content-Type``; HTTP/1.1 keeps the connection alive by default, RFC 9112 §9.3). A
    response is parsed by ``httptools`` (llhttp, C: status line, headers, ``Content-Length`` /
    chunked framing, RFC 9112 §6) through the ``on_*`` callbacks below; ~0.05 ms of client CPU
    per response where h11's pure-Python state machine took ~0.17 ms. A response that is not
    well-formed HTTP/1.1, has a head over :data:`MAX_RESPONSE_HEAD` or a body over
    :data:`MAX_RESPONSE_BODY` bytes, or is followed by bytes nobody asked for raises
    :class:`WireError`; the connection is then unusable and the caller closes it.
    """

    def __init__(self, sock: ssl.SSLSocket, host: str) -> None:
        if not _TOKEN.fullmatch(host):
            raise WireError(f"anchor member host {host[:80]!r} is not a valid Host header value")
        self.sock, self.host = sock, host
        self.keep_alive = True  # False once a response said the connection closes after it
        self._parser = httptools.HttpResponseParser(self)
        self._parts: list[bytes] = []
        self._size, self._head_size, self._head, self._done = 0, 0, False, False

    def request(self, method: str, path: str, body: bytes | None) -> None:
        """Send one request in one write.

        Raises:
            WireError: ``path`` is not a request target (visible ASCII, RFC 9112 §3.2).
            OSError: the write failed.
        """
        if not _TOKEN.fullmatch(path):
            raise WireError(f"anchor request target {path[:80]!r} is not visible ASCII")
        body = body or b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
                + ("Content-Type: application/json\r\n\r\n" if body else "\r\n"))
        self.sock.sendall(head.encode("ascii") + body)

    def response(self) -> tuple[int, bytes]:
        """Read one response: ``(status code, body)``.

        Raises:
            ConnectionError: the member closed the connection before the response ended.
            WireError: malformed or oversized response (class docstring).
            OSError: reading failed or timed out.
        """
        self._parts, self._size, self._head_size, self._head, self._done = [], 0, 0, False, False
        fed = 0
        while not self._done:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("anchor member closed the connection")
            fed += len(chunk)
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserCallbackError as e:  # one of the checks below
                raise (e.__context__ if isinstance(e.__context__, WireError)
                       else WireError(f"anchor member response: {e}")) from None
            except httptools.HttpParserError as e:
                raise WireError(f"anchor member sent a malformed HTTP response: {e}") from None
            if not self._head and fed > MAX_RESPONSE_HEAD:
                raise WireError(f"anchor member response head over {MAX_RESPONSE_HEAD} bytes")
        status = self._parser.get_status_code()
        if status < 200:
            raise WireError(f"anchor member sent an unexpected informational response ({status})")
        return status, b"".join(self._parts)

    # httptools callbacks (called from feed_data)

    def on_message_begin(self) -> None:
        if self._done:
            raise WireError("anchor member sent bytes after its response (wrong Content-Length?)")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_RESPONSE_HEAD:
            raise WireError(f"anchor member response head over {MAX_RESPONSE_HEAD} bytes")
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > MAX_RESPONSE_BODY:
            raise WireError(f"anchor member response body over {MAX_RESPONSE_BODY} bytes")

    def on_headers_complete(self) -> None:
        self._head = True
        self.keep_alive = self._parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_RESPONSE_BODY:
            raise WireError(f"anchor member response body over {MAX_RESPONSE_BODY} bytes")
        self._parts.append(data)

    def on_message_complete(self) -> None:
        self._done = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class MemberLink:
    """One persistent RA-TLS connection to one member (see the module docstring).

    Args:
        url: ``https://host:port``. verifier: the anchor's appraisal policy.
        context: TLS client context (:func:`memory_client_context`). timeout: seconds.
    """

    def __init__(self, url: str, verifier: Verifier, context: ssl.SSLContext, timeout: float) -> None:
        self.url = url
        self.host, self.port = parse_target(url)
        self._verifier, self._ctx, self.timeout = verifier, context, timeout
        self._conn: _Conn | None = None
        self._pending: tuple[str, str, bytes | None] | None = None
        self.info: MemberInfo | None = None
        self.down_until = 0.0
        self._backoff = 0.0
        self._probe: threading.Thread | None = None

    def failed(self) -> None:
        """The member did not answer: close, and skip it for a while (0.2 s doubling to 5 s),
        so a dead or hung minority member costs the others nothing. After the pause a
        background thread reconnects (a hung member then stalls that thread, not the callers)."""
        self.close()
        self._backoff = min(max(self._backoff * 2, 0.2), 5.0)
        self.down_until = time.monotonic() + self._backoff

    def _reconnect(self) -> None:
        try:
            conn = self._open()
        except Exception:  # noqa: BLE001 - still down: skipped for longer
            self.failed()
        else:
            self._conn, self.down_until = conn, 0.0

    def succeeded(self) -> None:
        """The member answered: forget earlier failures."""
        self._backoff, self.down_until = 0.0, 0.0

    def close(self) -> None:
        """Drop the connection (the next request opens and attests a new one)."""
        if self._conn is not None:
            self._conn.close()
        self._conn, self._pending = None, None

    def _open(self) -> _Conn:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        conn = _Conn(sock, f"{self.host}:{self.port}")
        try:
            der = sock.getpeercert(True)
            if not der:
                raise RATLSError(f"anchor member {self.url}: no TLS certificate")
            verify_certificate(der, self._verifier)  # before any request byte
            conn.request("GET", "/v1/anchor/info", None)
            _, data = conn.response()
            info = info_from(json.loads(data), der)
            if not verify_endorsement(load_certificate(der).public_key(), info.member, info.public_key,
                                      info.endorsement):
                raise RATLSError(f"anchor member {self.url}: its statement key is not endorsed by "
                                 "its attested TLS key")
        except BaseException:
            conn.close()
            raise
        self.info = info
        return conn

    def send(self, method: str, path: str, body: bytes | None = None) -> None:
        """Send one request (opening / re-opening the connection as needed).

        Raises:
            AnchorUnavailableError: the member is being skipped after a failure.
            OSError, RATLSError, AppraisalError ...: connecting or attesting failed.
        """
        if self._pending is not None:
            self._drain()
        if self._probe is not None and self._probe.is_alive():
            raise AnchorUnavailableError(f"anchor member {self.url} is being reconnected")
        if self.down_until:
            if time.monotonic() >= self.down_until:
                self._probe = threading.Thread(target=self._reconnect, daemon=True,
                                               name=f"safehold-anchor-probe-{self.port}")
                self._probe.start()
            raise AnchorUnavailableError(f"anchor member {self.url} is skipped after a failure")
        for attempt in (0, 1):
            fresh = self._conn is None
            if fresh:
                self._conn = self._open()
            try:
                assert self._conn is not None
                self._conn.request(method, path, body)
                self._pending = (method, path, body)
                return
            except OSError:
                self.close()
                if fresh or attempt:
                    raise

    def _drain(self) -> None:
        """Read (and drop) the answer to an earlier request whose result was not needed."""
        sock = self.sock()
        if sock is None or not (sock.pending() or select.select([sock], [], [], 0.005)[0]):
            self.failed()  # slower than that: skipped for a while, then reconnected
            return
        try:
            self.receive()
        except (OSError, WireError, ValueError):
            self.close()

    def sock(self) -> ssl.SSLSocket | None:
        """The TLS socket (for select), or None."""
        return self._conn.sock if self._conn is not None else None

    def receive(self) -> tuple[int, Any]:
        """Read the pending answer: ``(status code, JSON)``. A dead connection or a malformed
        response closes the connection and sends the request once more on a fresh one.

        Raises:
            OSError, WireError: also on the fresh connection (which is then closed).
            ValueError: the body is not JSON.
            RATLSError, AppraisalError ...: re-connecting or attesting failed.
        """
        assert self._conn is not None and self._pending is not None
        try:
            status, data = self._conn.response()
        except (OSError, WireError):  # dead connection or broken framing: never reused
            pending = self._pending
            self.close()
            self.send(*pending)  # idempotent: once more on a fresh connection
            assert self._conn is not None
            try:
                status, data = self._conn.response()
            except BaseException:
                self.close()
                raise
        self._pending = None
        if not self._conn.keep_alive:  # the member closes it after this response
            self.close()
        return status, json.loads(data)


class QuorumAnchor:
    """The anchor as ``n`` member processes (see the module docstring and ``anchor/base.py``).

    Args:
        members: the members' ``https://host:port`` URLs (from the relying party's measured
            configuration).
        verifier: appraisal policy with the anchor's Reference Value.
        client_cert_pem / client_key_pem: the workload certificate (mutual TLS), or None for a
            read-only client.
        timeout: seconds to wait for a majority.

    Raises (constructor):
        ConfigError: no members, or a certificate without key.
    """

    def __init__(self, members: Sequence[str], verifier: Verifier, *, client_cert_pem: bytes | None = None,
                 client_key_pem: bytes | None = None, timeout: float = 2.0) -> None:
        if not members:
            raise ConfigError("an anchor needs at least one member URL")
        ctx = memory_client_context(client_cert_pem, client_key_pem)
        self.links = [MemberLink(u, verifier, ctx, timeout) for u in members]
        self.n = len(self.links)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._verified: set[tuple[Any, ...]] = set()  # heads whose signatures verified (_checked)

    def close(self) -> None:
        """Close every connection."""
        for link in self.links:
            link.close()

    def _fan_out(self, method: str, path: str, payload: Any | None,
                 done: Callable[[list[Reply]], bool]) -> list[Reply]:
        body = None if payload is None else json.dumps(payload).encode()
        replies: dict[int, Reply] = {}
        with self._lock:
            waiting = {}
            for i, link in enumerate(self.links):
                try:
                    link.send(method, path, body)
                    waiting[i] = link
                except AnchorUnavailableError as e:  # being skipped
                    replies[i] = e
                except Exception as e:  # noqa: BLE001 - one member down is a reply, not a failure
                    link.failed()
                    replies[i] = e
            end = time.monotonic() + self.timeout
            decided = False
            while waiting:
                if not decided and done(list(replies.values())):
                    decided = True  # stragglers get a short grace, so their answer is not left unread
                    end = min(end, time.monotonic() + 0.002)
                ready = [i for i, lk in waiting.items() if (s := lk.sock()) is not None and s.pending()]
                if not ready:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    socks: dict[ssl.SSLSocket, int] = {}
                    for i, lk in waiting.items():
                        if (s := lk.sock()) is not None:
                            socks[s] = i
                    r, _, _ = select.select(list(socks), [], [], left)
                    ready = [socks[s] for s in r]
                    if not r:
                        if not socks or time.monotonic() >= end:
                            break
                        continue
                for i in ready:
                    link = waiting.pop(i)
                    try:
                        _, obj = link.receive()
                        replies[i] = reply_from(obj)
                        link.succeeded()
                    except Exception as e:  # noqa: BLE001 - counted as a missing member
                        link.failed()
                        replies[i] = e
            for i, link in waiting.items():
                if not decided:
                    link.failed()
                replies.setdefault(i, AnchorUnavailableError(f"anchor member {link.url} did not answer "
                                                             f"in time ({self.timeout:g} s)"))
        return [replies[i] for i in sorted(replies)]

    def _trusted(self) -> dict[bytes, bytes]:
        return {lk.info.member: lk.info.public_key for lk in self.links if lk.info is not None}

    def _checked(self, ledger: str, replies: list[Reply]) -> list[Reply]:
        """Replace replies whose head signature does not verify by an error.

        A head that verified before is not verified again: the memo's key is everything the
        check depends on — ledger, epoch, digest, the signatures as received and the statement
        keys trusted now for their members — so a hit is the same computation with the same
        inputs (a member that restarted has a new incarnation id and key: a miss)."""
        trusted = self._trusted()
        out: list[Reply] = []
        for r in replies:
            if isinstance(r, MemberReply) and r.head is not None:
                memo = (ledger, r.head.epoch, r.head.digest, r.head.signatures,
                        tuple(trusted.get(s.member) for s in r.head.signatures))
                if memo not in self._verified:
                    if verify_head_signatures(ledger, r.head, trusted) < 1:
                        out.append(AnchorUnavailableError(
                            "an anchor member's signature on its head does not verify"))
                        continue
                    if len(self._verified) >= 4 * self.n:
                        self._verified.clear()
                    self._verified.add(memo)
            out.append(r)
        return out

    def head(self, ledger: str) -> AnchorHead | None:
        """Majority read (see :meth:`safehold.freshness.anchor.base.Anchor.head`)."""
        replies = self._fan_out("GET", f"/v1/anchor/ledgers/{ledger}", None, lambda rs: len(rs) >= self.n)
        return combine_head(ledger, self._checked(ledger, replies), self.n)

    def advance(self, ledger: str, prev: AnchorHead, new: AnchorHead) -> AnchorHead:
        """Advance on a majority (see :meth:`safehold.freshness.anchor.base.Anchor.advance`)."""
        q = majority(self.n)
        replies = self._fan_out(
            "POST", f"/v1/anchor/advance/{ledger}", {"prev": head_to(prev), "new": head_to(new)},
            lambda rs: sum(isinstance(r, MemberReply) and r.status == ACCEPTED for r in rs) >= q)
        return combine_advance(ledger, new, replies, self.n)

    def initialise(self, statement: SignedOwnerStatement) -> AnchorHead:
        """Apply an owner statement on a majority (waits for every member's answer)."""
        st = statement.statement
        replies = self._fan_out("POST", "/v1/anchor/owner", statement.to_json(), lambda rs: len(rs) >= self.n)
        return combine_owner(st.ledger, st.head(), self._checked(st.ledger, replies), self.n)

    def members(self) -> list[MemberInfo]:
        """The reachable members' self-descriptions (fresh ``GET /v1/anchor/info`` each)."""
        out = []
        with self._lock:
            for link in self.links:
                try:
                    link.send("GET", "/v1/anchor/info")
                    _, obj = link.receive()
                    info = info_from(obj, link.info.certificate if link.info else b"")
                    if link.info is not None and info.member == link.info.member:
                        out.append(info)
                except Exception:  # noqa: BLE001 - unreachable members are left out
                    link.close()
        if len(out) < majority(self.n):
            raise AnchorUnavailableError(f"anchor: {len(out)} of {self.n} members answered, "
                                         f"{majority(self.n)} needed")
        return out
