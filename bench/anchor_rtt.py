"""Benchmark: the CPU and wall time of one anchor round trip (issue 12).

Three anchor members on loopback (RA-TLS, simulated TEE, mutual TLS; ``LocalAnchor`` as in
``bench/freshness.py``) and one client process doing sequential ``QuorumAnchor.advance`` calls
(each a POST to all three members, quorum of two) and ``QuorumAnchor.head`` reads (a GET to all
three). Per round trip it reports wall time, the client's CPU (``time.process_time``) and each
member's CPU (``/proc/<pid>/stat`` utime + stime).

Same-run baselines:

* **client**: the h11 request/response path the client used before (``H11Conn`` below, the
  former ``anchor/client.py._Conn``), on its own ``QuorumAnchor`` against the same members;
  rounds alternate between it and the package's client, the best (least CPU) round counts;
* **members**: a plain uvicorn server on the members' stack (uvloop, httptools, TLS 1.3, an
  in-memory key) whose raw ASGI app answers a body of the advance reply's size — the floor a
  member's framework and route code sit on (``echo_ms``: its CPU per request).

Usage: ``python bench/anchor_rtt.py [--quick] [--rounds R] [--n N]``. To measure older code, run
it with ``PYTHONPATH=<that checkout>/src`` (client and members then both run that code). The
last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11

ADVANCE_REPLY = (b'{"status":"accepted","head":{"epoch":12345,"digest":"' + b"ab" * 32
                 + b'","signatures":[]},"reason":""}')


class H11Conn:
    """The former anchor client connection (h11 state machine), the client baseline."""

    keep_alive = True

    def __init__(self, sock: ssl.SSLSocket, host: str) -> None:
        self.sock, self.host = sock, host
        self.h11 = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: bytes | None) -> None:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        headers = [("Host", self.host), ("Content-Length", str(len(body or b"")))]
        if body:
            headers.append(("Content-Type", "application/json"))
        data = self.h11.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        status, parts = 0, []
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.h11.receive_data(chunk)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                parts.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                return status, b"".join(parts)
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("closed")

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the member baseline: plain uvicorn + TLS answering a fixed body -------------------------------

def echo_server(ready_file: str) -> None:
    """Serve ``ADVANCE_REPLY`` to every request (uvloop, httptools, TLS 1.3; key in memory)."""
    import uvicorn
    import uvloop
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from safehold.fsutil import write_atomic
    from safehold.ratls.memkey import ssl_context_from_memory

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA384()))
    ctx = ssl_context_from_memory(cert.public_bytes(serialization.Encoding.PEM),
                                  key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()),
                                  minimum_version=ssl.TLSVersion.TLSv1_3)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ADVANCE_REPLY)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ADVANCE_REPLY})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http="httptools", lifespan="off",
                                           log_level="warning", access_log=False, server_header=False,
                                           ssl_context_factory=lambda _c, _d: ctx, ssl_certfile="unused"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        write_atomic(ready_file, json.dumps({"port": port}).encode(), mode=0o644)
        await task

    uvloop.run(serve())


def echo_cpu_ms(n: int, conn_cls: type, body: bytes, tmp: Path) -> float:
    """The echo server's CPU per request (ms) for ``n`` sequential POSTs of ``body``."""
    ready = tmp / "echo.json"
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", str(ready)])
    try:
        end = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit("echo server did not start")
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # a local baseline, nothing secret
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = conn_cls(sock, f"127.0.0.1:{port}")
        for _ in range(50):
            conn.request("POST", "/v1/anchor/advance/records", body)
            conn.response()
        c0 = cpu_seconds(proc.pid)
        for _ in range(n):
            conn.request("POST", "/v1/anchor/advance/records", body)
            conn.response()
        ms = (cpu_seconds(proc.pid) - c0) / n * 1e3
        conn.close()
        return ms
    finally:
        proc.terminate()
        proc.wait()


# -- the anchor ----------------------------------------------------------------------------------

def _h11_quorum(anchor: Any) -> Any:
    """A QuorumAnchor whose connections are ``H11Conn`` (opened while the module's _Conn is
    swapped; the links keep their connections)."""
    from safehold.freshness.anchor import client as client_mod

    saved = client_mod._Conn
    client_mod._Conn = H11Conn  # type: ignore[misc,assignment]
    try:
        q = anchor.client()
        q.members()
    finally:
        client_mod._Conn = saved  # type: ignore[misc]
    return q


def _round(q: Any, kind: str, n: int, pids: list[int], state: dict[str, Any]) -> dict[str, Any]:
    from safehold.freshness.anchor.base import AnchorHead

    c0 = [cpu_seconds(p) for p in pids]
    me0, t0 = time.process_time(), time.perf_counter()
    if kind == "advance":
        prev = state["head"]
        for _ in range(n):
            prev = q.advance("records", prev, AnchorHead(prev.epoch + 1, os.urandom(32)))
        state["head"] = prev
    else:
        for _ in range(n):
            q.head("records")
    wall, me = time.perf_counter() - t0, time.process_time() - me0
    c1 = [cpu_seconds(p) for p in pids]
    return {"wall_ms": wall / n * 1e3, "client_cpu_ms": me / n * 1e3,
            "member_cpu_ms": [(b - a) / n * 1e3 for a, b in zip(c0, c1, strict=True)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 round trips a round, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="round trips per round and kind")
    ap.add_argument("--echo-server", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    n = args.n or (500 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 3)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import freshness as fb
    from safehold.freshness.anchor import client as client_mod
    from safehold.store.sqlite import SqliteStore

    tmp = Path(tempfile.mkdtemp(prefix="anchor-rtt-"))
    anchor = fb.Anchor(tmp)
    try:
        cur = anchor.client()
        fs = anchor.fresh(SqliteStore(str(tmp / "ledger.db")), cur, ledger="records")
        fs.close()
        base = _h11_quorum(anchor)
        state = {"head": cur.head("records")}
        pids = [p.pid for p in anchor.local.procs]
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(rounds):
            order = [("h11", base), ("current", cur)]
            if r % 2:
                order.reverse()
            for kind in ("advance", "head"):
                for name, q in order:
                    res = _round(q, kind, n, pids, state)
                    print(f"round {r + 1} {kind:7} {name:7} wall {res['wall_ms']:.3f} ms  client CPU "
                          f"{res['client_cpu_ms']:.3f} ms  members CPU "
                          f"{[round(x, 3) for x in res['member_cpu_ms']]} ms", flush=True)
                    results.setdefault((kind, name), []).append(res)
        base.close()
        cur.close()
        body = json.dumps({"prev": {"epoch": 1, "digest": "ab" * 32, "signatures": []},
                           "new": {"epoch": 2, "digest": "cd" * 32, "signatures": []}}).encode()
        echo = echo_cpu_ms(n, client_mod._Conn, body, tmp)
    finally:
        anchor.local.stop()

    out: dict[str, Any] = {"n": n, "rounds": rounds, "echo_server_cpu_ms": round(echo, 3)}
    for kind in ("advance", "head"):
        # the best round of each figure (the machine is shared: load only ever adds)
        c = {f: min(x[f] for x in results[(kind, "current")]) for f in ("wall_ms", "client_cpu_ms")}
        b = {f: min(x[f] for x in results[(kind, "h11")]) for f in ("wall_ms", "client_cpu_ms")}
        member = min(sum(x["member_cpu_ms"]) / len(pids) for xs in results.values() for x in xs
                     if xs is results[(kind, "current")] or xs is results[(kind, "h11")])
        out[kind] = {"wall_ms": round(c["wall_ms"], 3), "client_cpu_ms": round(c["client_cpu_ms"], 3),
                     "member_cpu_ms": round(member, 3),
                     "h11_client_cpu_ms": round(b["client_cpu_ms"], 3), "h11_wall_ms": round(b["wall_ms"], 3),
                     "client_cpu_vs_h11": round(c["client_cpu_ms"] / b["client_cpu_ms"], 2),
                     "member_cpu_vs_echo": round(member / echo, 2)}
        print(f"{kind}: wall {c['wall_ms']:.3f} ms (h11 client {b['wall_ms']:.3f}); client CPU "
              f"{c['client_cpu_ms']:.3f} ms (h11 {b['client_cpu_ms']:.3f}, "
              f"x{out[kind]['client_cpu_vs_h11']}); "
              f"member CPU {member:.3f} ms per round trip (plain uvicorn+TLS echo {echo:.3f} ms, "
              f"x{out[kind]['member_cpu_vs_echo']})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
