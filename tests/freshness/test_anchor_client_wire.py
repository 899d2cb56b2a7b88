"""The anchor client's HTTP/1.1 path (``anchor/client.py``: fixed request bytes, httptools'
response parser) against a real RA-TLS server on loopback that answers ``/v1/anchor/info`` as a
member does and everything else with the bytes a test scripts: malformed, truncated, oversized
or mis-framed responses fail closed — a clear error, the connection dropped, never a reply."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable

import pytest

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.freshness.anchor.client import (
    MAX_RESPONSE_BODY,
    MemberLink,
    QuorumAnchor,
    memory_client_context,
)
from safehold.freshness.anchor.core import MemberCore
from safehold.freshness.anchor.statements import load_owner_public_key
from safehold.freshness.anchor.wire import WireError, info_to
from safehold.freshness.errors import AnchorUnavailableError
from safehold.ratls.cert import create_identity
from safehold.ratls.server import server_ssl_context
from tests.support.freshness import Owner

UNKNOWN = b'{"status":"unknown","head":null,"reason":""}'
LENGTH = b"content-length: %d" % len(UNKNOWN)


def ok(body: bytes = UNKNOWN, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\ncontent-type: application/json\r\n%s\r\n%s" % (
        len(body), extra, body)


class FakeMember:
    """A TLS server thread with a real RA-TLS identity (simulated TEE): ``/v1/anchor/info`` as a
    member answers it; any other request gets ``answer(path)`` — ``(bytes, close after)``."""

    def __init__(self, ctx: ssl.SSLContext, info: bytes) -> None:
        self.ctx, self.info = ctx, info
        self.answer: Callable[[str], tuple[bytes, bool]] = lambda _p: (ok(), False)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as sock:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    lines = head.decode().split("\r\n")
                    length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:])
                                   if k.lower() == "content-length"), 0)
                    while len(buf) < length:
                        buf += sock.recv(65536)
                    buf = buf[length:]
                    path = lines[0].split(" ")[1]
                    if path == "/v1/anchor/info":
                        data, close = ok(self.info).replace(b"404 Not Found", b"200 OK"), False
                    else:
                        data, close = self.answer(path)
                    sock.sendall(data)
                    if close:
                        return
        except OSError:
            return

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def attested(tmp_path_factory):
    att = SimulatedAttester(tmp_path_factory.mktemp("sim"))
    ident = create_identity(att, common_name="fake anchor member")
    core = MemberCore(1, load_owner_public_key(Owner().public_pem()), tls_key=ident.private_key)
    verifier = Verifier(AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                                        measurements=(att.measurement.digest,)))
    return server_ssl_context(ident), json.dumps(info_to(core.info())).encode(), verifier


@pytest.fixture
def member(attested):
    m = FakeMember(attested[0], attested[1])
    yield m
    m.stop()


@pytest.fixture
def link(member, attested):
    lk = MemberLink(member.url, attested[2], memory_client_context(None, None), timeout=1.0)
    yield lk
    lk.close()


def _ask(link: MemberLink) -> tuple[int, object]:
    link.send("GET", "/v1/anchor/ledgers/records")
    return link.receive()


def test_a_well_formed_answer_is_read_and_the_connection_kept(member, link):
    assert _ask(link) == (404, json.loads(UNKNOWN))
    assert _ask(link) == (404, json.loads(UNKNOWN))
    assert member.connections == 1  # keep-alive: one connection for info and both requests
    body = b'{"status":"unknown","head":null,"reason":"chunked"}'
    member.answer = lambda _p: (b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                                b"0\r\n\r\n" % (len(body), body), False)
    assert _ask(link)[1]["reason"] == "chunked"  # chunked framing is HTTP/1.1 too


@pytest.mark.parametrize(("answer", "error", "match"), [
    (b"HTTP/1.1 2x0 OK\r\ncontent-length: 2\r\n\r\n{}", WireError, "malformed HTTP response"),
    (b"HTTX/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", WireError, "malformed HTTP response"),
    (b"hello, this is not HTTP\r\n\r\n", WireError, "malformed HTTP response"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", WireError, "malformed"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n{}", WireError, "malformed"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", WireError, "informational"),
    # wrong Content-Length, too short: the rest of the body arrives as bytes after the response
    (ok().replace(LENGTH, b"content-length: 20"), WireError, "bytes after its response"),
    (ok(b"x" * (MAX_RESPONSE_BODY + 1)), WireError, f"body over {MAX_RESPONSE_BODY} bytes"),
    (ok(extra=b"x-filler: " + b"a" * 20000 + b"\r\n"), WireError, "head over"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
     + (b"10000\r\n" + b"x" * 0x10000 + b"\r\n") * 17, WireError, f"body over {MAX_RESPONSE_BODY} bytes"),
])
def test_malformed_answers_fail_closed(member, link, answer, error, match):
    member.answer = lambda _p: (answer, False)
    with pytest.raises(error, match=match):
        _ask(link)
    assert link.sock() is None  # dropped: a connection whose framing is lost is never reused
    assert member.connections == 2  # the request went once more on a fresh, attested connection


@pytest.mark.parametrize("answer", [
    ok()[:30],  # truncated head
    ok()[:-10],  # truncated body
    ok().replace(LENGTH, b"content-length: 450"),  # wrong Content-Length, too long
])
def test_truncated_answers_fail_closed(member, link, answer):
    member.answer = lambda _p: (answer, True)  # then the member closes the connection
    with pytest.raises(ConnectionError, match="closed the connection"):
        _ask(link)
    assert link.sock() is None


def test_an_answer_short_of_its_content_length_times_out(member, link):
    member.answer = lambda _p: (ok().replace(LENGTH, b"content-length: 450"), False)
    with pytest.raises(TimeoutError):
        _ask(link)
    assert link.sock() is None


def test_a_body_that_is_not_json_is_an_error(member, link):
    member.answer = lambda _p: (ok(b"{not json"), False)
    with pytest.raises(ValueError, match="Expecting"):
        _ask(link)  # well framed: the connection may stay, the callers drop it (fan-out: failed())


def test_connection_close_is_honoured(member, link):
    member.answer = lambda _p: (ok(extra=b"connection: close\r\n"), True)
    assert _ask(link)[0] == 404
    assert link.sock() is None  # closed after the answer, as the member said
    assert _ask(link)[0] == 404 and member.connections == 2


def test_a_quorum_counts_a_malformed_answer_as_a_missing_member(member, attested):
    q = QuorumAnchor([member.url], attested[2], timeout=1.0)
    assert q.head("records") is None  # a well-formed "unknown": no head yet
    member.answer = lambda _p: (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}{}{}{}", False)
    with pytest.raises(AnchorUnavailableError, match="bytes after its response"):
        q.head("records")
    q.close()


def test_request_targets_must_be_visible_ascii(member, link):
    assert _ask(link)[0] == 404
    with pytest.raises(WireError, match="not visible ASCII"):
        link.send("GET", "/v1/anchor/ledgers/rec ords\r\nX-Injected: 1")
