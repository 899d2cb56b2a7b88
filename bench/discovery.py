"""Contact discovery: oblivious lookup vs a dict, OPRF vs raw libsodium, memory per entry.

    .venv/bin/python bench/discovery.py [--quick]

Figures (same run, same machine):
- server-side lookup time of a 1,000-identifier query (half registered) against 100 k, 1 M and
  (full run only) 10 M registered identifiers, in the oblivious table (safehold.discovery.table),
  against the non-oblivious baseline a user would build instead: a Python dict
  tag -> 48-byte result. ratio = oblivious time / dict time = the price of obliviousness;
- the tag derivation the registry adds per query (HMAC-SHA256 of 1,000 OPRF outputs);
- OPRF BlindEvaluate per second (safehold.crypto.oprf.blind_evaluate) against raw libsodium
  crypto_scalarmult_ristretto255 called through ctypes with a preallocated buffer (target >= 0.8);
  RFC 9497 Evaluate (registration) and client Blind+Finalize per second;
- memory: table bytes per registered identifier, and the process's peak RSS.

The LAST line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hmac
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from benchutil import best_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pysodium  # noqa: E402

from safehold.crypto import oprf  # noqa: E402
from safehold.discovery.protocol import RESULT_SIZE  # noqa: E402
from safehold.discovery.table import ObliviousTable  # noqa: E402

QUERY = 1000


def lookup_case(n: int, runs: int, rng: np.random.Generator) -> dict[str, float]:
    """Oblivious table vs dict for a 1,000-tag query (half registered) against ``n`` entries."""
    hi = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    lo = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    val = rng.integers(0, 256, (n, RESULT_SIZE), dtype=np.uint8)
    val[:, 0] = 1
    table = ObliviousTable()
    t0 = time.perf_counter()
    table.build_arrays(hi, lo, val)
    build_s = time.perf_counter() - t0
    tag_bytes = np.stack([hi, lo], axis=1).astype(">u8").tobytes()
    hits = rng.choice(n, QUERY // 2, replace=False)
    query = [tag_bytes[i * 16:(i + 1) * 16] for i in hits] + [os.urandom(16) for _ in range(QUERY // 2)]
    t0 = time.perf_counter()
    values = val.tobytes()
    baseline = {tag_bytes[i * 16:(i + 1) * 16]: values[i * 48:(i + 1) * 48] for i in range(n)}
    dict_build_s = time.perf_counter() - t0
    missing = bytes(48)
    got = table.lookup(query)
    assert got == [baseline.get(q, missing) for q in query], "oblivious table disagrees with the dict"
    obl = best_of(lambda: table.lookup(query), runs)
    dct = best_of(lambda: [baseline.get(q, missing) for q in query], runs * 20)
    out = {"oblivious_ms": obl * 1e3, "dict_ms": dct * 1e3, "ratio": obl / dct,
           "table_bytes_per_entry": table.nbytes() / n, "table_build_s": build_s,
           "dict_build_s": dict_build_s}
    gc.collect()
    return out


def oprf_rates(count: int, passes: int) -> dict[str, float]:
    """BlindEvaluate vs raw scalarmult (interleaved passes), Evaluate, Blind+Finalize."""
    kp = oprf.generate_key_pair()
    elements = [pysodium.crypto_core_ristretto255_random() for _ in range(count)]
    fn = pysodium.sodium.crypto_scalarmult_ristretto255
    buf = ctypes.create_string_buffer(32)

    def raw() -> None:
        for p in elements:
            fn(buf, kp.sk, p)

    best_raw = best_be = float("inf")
    for _ in range(passes):
        best_raw = min(best_raw, best_of(raw, 1))
        best_be = min(best_be, best_of(lambda: oprf.blind_evaluate(kp.sk, elements), 1))
    inputs = [f"+4915{i:09d}".encode() for i in range(count // 4)]
    ev = best_of(lambda: oprf.evaluate(kp.sk, inputs), 2)

    def client() -> None:
        b = oprf.blind(inputs)
        oprf.finalize(inputs, b.blinds, oprf.blind_evaluate(kp.sk, b.elements))

    cl = best_of(client, 2)
    return {"raw_scalarmult_per_s": count / best_raw, "blind_evaluate_per_s": count / best_be,
            "blind_evaluate_vs_raw": best_raw / best_be, "evaluate_per_s": len(inputs) / ev,
            "client_round_trip_per_s": len(inputs) / cl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100 k and 1 M only, fewer runs (< 60 s)")
    args = ap.parse_args()
    rng = np.random.default_rng(2026)
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    runs = 3 if args.quick else 7
    out: dict[str, object] = {"query": QUERY, "quick": args.quick}
    for n in sizes:
        label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
        for k, v in lookup_case(n, runs, rng).items():
            out[f"{label}_{k}"] = v
    key = os.urandom(32)
    outputs = [os.urandom(64) for _ in range(QUERY)]
    out["tags_1000_ms"] = best_of(lambda: [hmac.digest(key, o, "sha256") for o in outputs], 20) * 1e3
    out.update(oprf_rates(1000 if args.quick else 4000, 5 if args.quick else 9))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for k, v in out.items():
        print(f"{k:40s} {v:,.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
