"""Benchmark: a new connection with RA-TLS verification vs. a plain TLS handshake, same server,
same run.

The server is the RA-TLS demo server (simulated TEE) in its own process on 127.0.0.1. Each
iteration opens a new TCP connection and completes the TLS handshake:

* plain: ordinary certificate validation (the server's certificate pinned as trust anchor,
  hostname checked) — the baseline;
* ratls: the handshake, then the RA-TLS check every Safehold client runs per connection —
  parse the certificate's Evidence, key binding, Verifier plug-in (ECDSA P-384 report
  signature + platform certificate chain) and appraisal policy.

The two are interleaved in blocks so drift on a shared machine hits both alike. Target:
``ratls_vs_plain_connect`` (median ratio) <= 2.0. Last line: one JSON object.

    .venv/bin/python bench/attestation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from safehold.attestation.errors import SimulatedTEEWarning
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.ratls.client import client_ssl_context, fetch_peer_certificate
from safehold.ratls.verify import verify_certificate


def start_server(tmp: Path) -> tuple[subprocess.Popen, dict]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "safehold.ratls.demo", "--data-dir", str(tmp / "d"),
                             "--port", "0", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise SystemExit("demo server failed to start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def connect(port: int, ctx: ssl.SSLContext, hostname: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        return tls.getpeercert(True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (< 60 s)")
    args = ap.parse_args()
    n_blocks, per_block = (10, 20) if args.quick else (25, 40)
    warnings.simplefilter("ignore", SimulatedTEEWarning)
    logging.getLogger("safehold.attestation.policy").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as td:
        proc, info = start_server(Path(td))
        try:
            port = info["port"]
            der = fetch_peer_certificate(f"https://127.0.0.1:{port}/")
            plain_ctx = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
            ratls_ctx = client_ssl_context()
            verifier = Verifier(AppraisalPolicy.from_toml(Path(info["policy"])))

            def plain_once() -> None:
                connect(port, plain_ctx, "localhost")

            def ratls_once() -> None:
                verify_certificate(connect(port, ratls_ctx, "localhost"), verifier)

            for _ in range(10):  # warm-up (imports, caches, server threads)
                plain_once()
                ratls_once()
            plain: list[float] = []
            ratls: list[float] = []
            verify_only: list[float] = []
            for _ in range(n_blocks):
                for fn, out in ((plain_once, plain), (ratls_once, ratls)):
                    for _ in range(per_block):
                        t0 = time.perf_counter()
                        fn()
                        out.append(time.perf_counter() - t0)
                for _ in range(per_block // 4):
                    t0 = time.perf_counter()
                    verify_certificate(der, verifier)
                    verify_only.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    med_p, med_r = statistics.median(plain), statistics.median(ratls)
    ratio = med_r / med_p
    print(f"plain TLS connect+handshake : median {med_p * 1e3:.2f} ms over {len(plain)}")
    print(f"RA-TLS connect+verify       : median {med_r * 1e3:.2f} ms over {len(ratls)}")
    print(f"RA-TLS verification alone   : median {statistics.median(verify_only) * 1e3:.2f} ms")
    print(f"ratio {ratio:.2f} (target <= 2.0): {'OK' if ratio <= 2.0 else 'MISSED'}")
    print(json.dumps({
        "ratls_vs_plain_connect": round(ratio, 3),
        "plain_connect_ms": round(med_p * 1e3, 3),
        "ratls_connect_ms": round(med_r * 1e3, 3),
        "ratls_verify_ms": round(statistics.median(verify_only) * 1e3, 3),
        "iterations": len(plain),
    }))


if __name__ == "__main__":
    main()
