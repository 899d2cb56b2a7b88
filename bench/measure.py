"""Benchmark: measuring the whole workload closure (``safehold measure``) vs. coreutils.

The closure of the records workload as ``LaunchSpec.closure()`` computes it (interpreter,
libpython, standard library, site-packages, the package, the launch): walk, SHA-384 of every
file in a thread pool, canonical digest. The baseline is what an operator would script instead,
built well: ``sha384sum`` from coreutils over the same file list, run by ``xargs -P <CPUs>``.

* cold: each file's pages are first dropped from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (only these files; no privilege, nothing else evicted),
  then measured once — the first ``safehold measure`` after a deploy;
* warm: the median of several runs with the files cached.

Target: warm closure under 2 s on the reference machine. Ratios: closure / baseline in the same
state. Last line: one JSON object.

    .venv/bin/python bench/measure.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from safehold.attestation.workload import LaunchSpec, package_app_dir


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def baseline(paths: list[str]) -> float:
    """Seconds for ``xargs -0 -P <cpus> -n 256 sha384sum`` over ``paths``."""
    data = b"\0".join(p.encode() for p in paths) + b"\0"
    t = time.perf_counter()
    subprocess.run(["xargs", "-0", "-P", str(os.cpu_count() or 1), "-n", "256", "sha384sum"],
                   input=data, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm repetitions")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    spec = LaunchSpec("safehold.records.service", app_dir=package_app_dir())
    first = spec.closure()
    paths = [f.path for f in first.files]
    print(f"closure: {len(first.files)} files, {first.total_bytes / 1e6:.1f} MB, "
          f"{len(first.roots)} roots; measurement {first.hex()[:16]}...")

    drop_cache(paths)
    t = time.perf_counter()
    cold = spec.closure()
    cold_s = time.perf_counter() - t
    drop_cache(paths)
    cold_base = baseline(paths)
    assert cold.digest == first.digest

    warm, warm_base = [], []
    for _ in range(reps):  # interleaved, so drift on a shared machine hits both alike
        t = time.perf_counter()
        spec.closure()
        warm.append(time.perf_counter() - t)
        warm_base.append(baseline(paths))
    w, wb = statistics.median(warm), statistics.median(warm_base)
    print(f"cold:  closure {cold_s:.2f} s   sha384sum x{os.cpu_count()} {cold_base:.2f} s")
    print(f"warm:  closure {w:.2f} s (median of {reps})   sha384sum x{os.cpu_count()} {wb:.2f} s")
    print(json.dumps({"files": len(first.files), "bytes": first.total_bytes,
                      "closure_cold_s": round(cold_s, 3), "closure_warm_s": round(w, 3),
                      "baseline_cold_s": round(cold_base, 3), "baseline_warm_s": round(wb, 3),
                      "closure_vs_sha384sum_cold": round(cold_s / cold_base, 3),
                      "closure_vs_sha384sum_warm": round(w / wb, 3),
                      "warm_under_2s": w < 2.0}))


if __name__ == "__main__":
    main()
