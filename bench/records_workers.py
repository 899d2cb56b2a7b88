"""Benchmark: the records service with 2 worker processes vs. the same service with 1.

Two stacks run side by side from one snapshot of the package (each ``safehold up``-equivalent:
broker, three anchor members, records service with freshness, encryption and audit on, SQLite
WAL), identical except ``workers`` in the measured ``records.toml`` (issue 17, item 3). The
baseline is the single-process service — what runs without this feature. Rounds alternate
between the two stacks so that both see the same machine load; 8 closed-loop clients (threads
with their own keep-alive RA-TLS connection, 8 connections spread by the kernel over the
workers), phases ``get`` (random ids written before), ``put`` (new Patients) and ``import``
(batches of 100).

The clients run on the same cores as the services (this machine has 2 cores and no cgroup
control for us): the load generator's own CPU (TLS, JSON) is part of every figure, so the
ratio is a lower bound of what the workers add on a machine with cores to spare.

Usage: ``python bench/records_workers.py [--quick] [--rounds N]``; last line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import benchutil

ROOT = Path(__file__).resolve().parents[1]


def _bench_records() -> Any:
    """bench/records.py as a module (its load generator and record shape)."""
    spec = importlib.util.spec_from_file_location("bench_records", Path(__file__).with_name("records.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 s per phase, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (2 if args.quick else 3)
    rb = _bench_records()
    body = rb.patient_record()
    tmp = benchutil.snapshot_package("safehold-bench-workers-")
    from safehold.devstack import prepare, start, stop, tokens

    stacks: dict[int, Any] = {}
    figures: dict[int, dict[str, list[float]]] = {1: {}, 2: {}}
    try:
        for w in (1, 2):
            data = tmp / f"data-{w}"
            stacks[w] = prepare(data, broker_port=rb.free_port(), records_port=rb.free_port(),
                                scone_port=None, package_root=str(tmp / "pkg" / "safehold"),
                                records_workers=w)
            start(stacks[w])
        ids: dict[int, list[str]] = {1: [], 2: []}

        def client(w: int) -> Any:
            s = stacks[w]
            return rb.SafeholdLoad(s.records_url, tokens(s.data_dir)["writer"], s.path("policy.toml"))

        print(f"record: FHIR Patient, {len(json.dumps(body))} bytes JSON; {rb.CLIENTS} clients; "
              f"{seconds:.0f} s per phase; {rounds} alternating rounds", flush=True)
        for rnd in range(rounds):
            for w in (1, 2) if rnd % 2 == 0 else (2, 1):
                put = rb.run_load(lambda w=w: client(w), "put", seconds, [], body, f"w{w}r{rnd}p")
                ids[w] += put.pop("ids")
                c0 = os.times()
                get = rb.run_load(lambda w=w: client(w), "get", seconds, ids[w], body, f"w{w}r{rnd}")
                c1 = os.times()
                # the load generator's own CPU per GET (this process: TLS, HTTP, JSON)
                f_cpu = (c1.user + c1.system - c0.user - c0.system) / max(1, get["n"]) * 1000
                imp = rb.run_load(lambda w=w: client(w), "import", seconds, [], body, f"w{w}r{rnd}i")
                f = figures[w]
                f.setdefault("put", []).append(put["per_s"])
                f.setdefault("get", []).append(get["per_s"])
                f.setdefault("import", []).append(round(len(imp["ids"]) / seconds, 1))
                f.setdefault("get_p50_ms", []).append(get["p50_ms"])
                f.setdefault("client_cpu_ms_per_get", []).append(round(f_cpu, 3))
                print(f"round {rnd} workers={w}: put {put['per_s']:7.1f}/s | get {get['per_s']:7.1f}/s "
                      f"p50 {get['p50_ms']:6.2f} ms (client CPU {f_cpu:.2f} ms/GET) | "
                      f"import {f['import'][-1]:7.1f} rec/s", flush=True)
    finally:
        for s in stacks.values():
            stop(s)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {w: {k: statistics.median(v) for k, v in figures[w].items()} for w in (1, 2)}
    keys = ("put", "get", "import", "get_p50_ms", "client_cpu_ms_per_get")
    out = {f"{k}_1w": med[1][k] for k in keys}
    out.update({f"{k}_2w": med[2][k] for k in keys})
    out.update({f"two_vs_one_{k}": round(med[2][k] / med[1][k], 3) for k in ("put", "get", "import")})
    out.update({"clients": rb.CLIENTS, "seconds_per_phase": seconds, "rounds": rounds,
                "target_two_vs_one": 1.6, "note": "clients share the 2 cores with the services"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
