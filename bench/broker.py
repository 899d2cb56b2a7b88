"""Benchmark: a full KBS round trip (auth → Evidence → attest → fetch one resource as JWE) vs. a
plain HTTPS GET of a static value from the same broker process, same run.

The broker runs as its own process on 127.0.0.1 (SQLite store, simulated TEE). One client, one
keep-alive HTTPS connection for both measurements, so the ratio isolates the protocol's cost:
each KBS round trip makes a fresh ECDSA P-256 ``tee-pubkey``, gets simulated Evidence binding
it (ECDSA P-384 signature), has the broker verify and appraise it, sign an EAR (ES256), write
two audit entries, and decrypt the JWE (ECDH-ES+A256KW, A256GCM). The two kinds run in
interleaved blocks so drift on a shared machine hits both alike.

    .venv/bin/python bench/broker.py [--quick]

Last line: one JSON object, ``kbs_vs_plain_get`` = (KBS round trips/s) / (plain GETs/s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.client.broker import BrokerClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(tmp: Path, manifest: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold.cli.main", "broker", "serve", "--data-dir", str(tmp / "broker"),
         "--manifest", str(manifest), "--port", str(port), "--static-value", "x" * 32],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("broker exited during start-up")
        try:
            if httpx.get(url + "/status", verify=False, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("broker did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    args = ap.parse_args()
    block_s = 1.0 if args.quick else 3.0
    blocks = 4 if args.quick else 8
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        wl = SimulatedAttester(tmp / "workload")
        manifest = tmp / "manifest.json"
        manifest.write_text(json.dumps({
            "workloads": {"bench": {"secrets": ["bench-key"], "policy": {
                "allow_simulated": True, "simulated_root": str(wl.root_ca_path),
                "accepted_tcb_statuses": ["UpToDate", "Simulated"], "report_data": "key-binding",
                "reference_values": {"measurements": [wl.measurement.hex()]}}}},
            "secrets": {"bench-key": {"type": "keyset"}},
        }))
        proc, url = start_broker(tmp, manifest)
        try:
            ca = ssl.create_default_context(cafile=str(tmp / "broker" / "ca.pem"))
            with BrokerClient(url, wl, verify=ca, workload="bench") as kbs:
                plain = kbs._http  # the same keep-alive HTTPS connection for the baseline

                def kbs_once() -> None:
                    kbs.attest(new_key=True)
                    kbs.get_keyset("bench-key")

                def plain_once() -> None:
                    r = plain.get("/static")
                    assert r.status_code == 200 and len(r.content) == 32

                for f in (kbs_once, plain_once):  # warm up
                    for _ in range(3):
                        f()
                counts = {"kbs": 0, "plain": 0}
                secs = {"kbs": 0.0, "plain": 0.0}
                for _ in range(blocks):
                    for name, f in (("kbs", kbs_once), ("plain", plain_once)):
                        t0 = time.perf_counter()
                        while time.perf_counter() - t0 < block_s:
                            f()
                            counts[name] += 1
                        secs[name] += time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    kbs_rate = counts["kbs"] / secs["kbs"]
    plain_rate = counts["plain"] / secs["plain"]
    print(f"KBS attest+fetch round trips: {kbs_rate:8.1f} /s  ({counts['kbs']} in {secs['kbs']:.1f} s)")
    print(f"plain HTTPS GET (same server): {plain_rate:8.1f} /s  "
          f"({counts['plain']} in {secs['plain']:.1f} s)")
    print(f"cpu count: {os.cpu_count()}")
    print(json.dumps({"kbs_round_trips_per_s": round(kbs_rate, 1), "plain_get_per_s": round(plain_rate, 1),
                      "kbs_vs_plain_get": round(kbs_rate / plain_rate, 4)}))


if __name__ == "__main__":
    main()
