"""A small RA-TLS demo server on the SIMULATED TEE, to try ``safehold attest`` locally.

    python -m safehold.ratls.demo --data-dir /tmp/sh --port 8443
    # or: safehold ratls-demo-server --data-dir /tmp/sh --port 8443

It measures the installed ``safehold`` package (plus ``--config`` files), creates the simulated
platform keys under ``--data-dir``, generates an ECDSA P-384 key and an RA-TLS certificate
whose Evidence binds it, writes a ready-to-use appraisal policy (``--policy-out``), and serves
``GET /`` with a JSON greeting over TLS (stdlib ``http.server``; no web framework).

``--log FILE`` appends one line per TLS connection: ``request <METHOD> <path>`` when a request
arrived, ``no-request`` when the client closed without sending one (what a refusing RA-TLS
client does). ``--ready-file FILE`` receives JSON ``{port, measurement, simulated_root,
policy}`` once the server listens (port 0 = pick a free port).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.fsutil import write_atomic
from safehold.ratls.cert import create_identity
from safehold.ratls.server import server_ssl_context


def policy_toml(measurement_hex: str, root: Path, *, debug_allowed: bool = False) -> str:
    """An appraisal policy accepting exactly this simulated workload."""
    return (
        "# Appraisal policy for the Safehold RA-TLS demo server (SIMULATED TEE).\n"
        'name = "ratls-demo"\n'
        "allowed_tee_types = []\n"
        "allow_simulated = true\n"
        f"simulated_root = {json.dumps(str(root))}\n"
        f"debug_allowed = {'true' if debug_allowed else 'false'}\n"
        'report_data = "key-binding"\n\n'
        "[reference_values]\n"
        f'measurements = ["{measurement_hex}"]\n'
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    log_path: Path | None = None
    greeting: bytes = b"{}"
    _log_lock = threading.Lock()

    def log_line(self, line: str) -> None:
        if self.log_path is None:
            return
        with self._log_lock, self.log_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        self._saw_request = False
        try:
            super().handle()
        except (OSError, ValueError):
            pass
        if not self._saw_request:
            self.server.log_line("no-request")

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if getattr(self, "raw_requestline", b""):
            self._saw_request = True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.server.log_line(f"request GET {self.path}")
        body = self.server.greeting
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return  # access logs stay quiet; --log records what tests need


def main(argv: list[str] | None = None) -> int:
    """Run the demo server until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(prog="safehold-ratls-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="simulated TEE key directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8443, help="0 = any free port")
    ap.add_argument("--config", action="append", default=[], help="workload config file (measured)")
    ap.add_argument("--debug", action="store_true", help="report a debug-mode TEE")
    ap.add_argument("--log", help="append per-connection lines here")
    ap.add_argument("--ready-file", help="write JSON {port, measurement, ...} when listening")
    ap.add_argument("--policy-out", help="write a matching appraisal policy TOML here")
    args = ap.parse_args(argv)

    attester = SimulatedAttester(args.data_dir, workload_files=args.config, debug=args.debug)
    identity = create_identity(attester, hostnames=("localhost",), ip_addresses=(args.host,)
                               if _is_ip(args.host) else ())
    ctx = server_ssl_context(identity)
    httpd = _Server((args.host, args.port), _Handler, bind_and_activate=False)
    httpd.allow_reuse_address = True
    httpd.server_bind()
    httpd.server_activate()
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.log_path = Path(args.log) if args.log else None
    mhex = attester.measurement.hex()
    httpd.greeting = json.dumps({"hello": "from a SIMULATED TEE", "measurement": mhex}).encode()
    port = httpd.server_address[1]
    policy_path = Path(args.policy_out) if args.policy_out else Path(args.data_dir) / "demo-policy.toml"
    policy_path.write_text(policy_toml(mhex, attester.root_ca_path), encoding="utf-8")
    info = {"port": port, "measurement": mhex, "simulated_root": str(attester.root_ca_path),
            "policy": str(policy_path)}
    if args.ready_file:
        write_atomic(args.ready_file, json.dumps(info), mode=0o644)
    print(f"RA-TLS demo server (SIMULATED TEE) on https://{args.host}:{port}/", flush=True)
    print(f"measurement {mhex}", flush=True)
    print(f"policy      {policy_path}", flush=True)
    print(f"try:        safehold attest https://{args.host}:{port}/ --policy {policy_path}", flush=True)

    def _stop(signum: int, frame: object) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
    return 0


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
