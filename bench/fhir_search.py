"""Benchmark: what the FHIR search tokens cost (write amplification) and buy (search latency).

Two encrypted repositories on their own SQLite files (WAL, synchronous=FULL), each with the
access audit, get the same N Synthea-shaped FHIR Patients (names, birth dates and identifiers
varied from the real patients in ../shared/data):

* **before** — the posting format the records service had before FHIR search (format 1): one
  blind-index row per whole normalised value (family, given, birthDate, identifier).
* **after** — the current terms (records/tokens.py): folded whole values, word-start prefixes
  of 2..8 characters (plus the German spelling for umlauts), six date levels and the date's
  precision, identifiers.

Figures: index rows and index bytes (key + value as stored) per record; PUT throughput; search
latency (median of repeated runs) for an exact family search (both), and for a 4-letter name
prefix and a birth-date range — by prefix/date tokens (after) against what a user without them
would build: decrypt and check every record (a scan, the baseline measured in the same run).

Usage: ``python bench/fhir_search.py [--quick]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safehold.crypto.keyset import Keyset  # noqa: E402
from safehold.records.access_audit import AccessAuditLog  # noqa: E402
from safehold.records.commit import GroupCommit  # noqa: E402
from safehold.records.fhir.search import plan_search  # noqa: E402
from safehold.records.model import ValidRecord, normalise, parse_record, search_terms  # noqa: E402
from safehold.records.repository import PatientRepository  # noqa: E402
from safehold.store import open_store  # noqa: E402


def shared_patients() -> list[dict[str, Any]]:
    """The real FHIR Patients of ../shared/data (Synthea bundles and HL7 examples)."""
    for d in (os.environ.get("SAFEHOLD_SHARED_DIR"), ROOT.parent / "shared", ROOT / "shared"):
        if not d:
            continue
        data = Path(d) / "data"
        out = []
        for f in sorted((data / "synthea-fhir-r4-bundles-google-fhir-data-pipes").glob("*.json")):
            out += [e["resource"] for e in json.loads(f.read_bytes())["entry"]
                    if e["resource"]["resourceType"] == "Patient"]
        for f in sorted((data / "hl7-fhir-r4-patient-examples").glob("Patient-*.json")):
            out.append(json.loads(f.read_bytes()))
        if out:
            return out
    raise SystemExit("no shared patient data found (set SAFEHOLD_SHARED_DIR)")


def make_patients(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """``n`` patients shaped like the shared Synthea ones, names mixed across them."""
    real = shared_patients()
    synthea = [p for p in real if p.get("meta", {}).get("profile")]
    families = sorted({n["family"] for p in real for n in p.get("name", []) if n.get("family")})
    givens = sorted({g for p in real for n in p.get("name", []) for g in n.get("given", [])})
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        p = json.loads(json.dumps(rnd.choice(synthea)))
        p["id"] = f"bench-{i:06d}"
        fam = rnd.choice(families).rstrip("0123456789") + str(rnd.randint(1, 999))
        p["name"] = [{"use": "official", "family": fam, "given": [rnd.choice(givens).rstrip("0123456789")
                                                                  + str(rnd.randint(1, 999))]}]
        p["birthDate"] = f"{rnd.randint(1920, 2020)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"
        for ident in p.get("identifier", []):
            ident["value"] = f"{ident.get('value', 'x')[:8]}-{i}"
        out.append(p)
    return out


def format1_terms(record: dict[str, Any]) -> frozenset[str]:
    """The posting terms of format 1 (before FHIR search): whole normalised values."""
    return frozenset(f"{f}={v}" for f, v in search_terms(record)
                     if f in ("family", "given", "birthDate", "identifier")
                     and not (f == "identifier" and "|" in v))


def open_repo(path: Path) -> PatientRepository:
    store = open_store(f"sqlite:///{path}")
    c = GroupCommit(store)
    return PatientRepository(store, Keyset.generate(), committer=c, audit=AccessAuditLog(store, c))


def fill(repo: PatientRepository, recs: list[ValidRecord]) -> float:
    """PUT every record (8 threads, as concurrent clients); returns PUTs per second."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: repo.put("bench", r), recs))
    return len(recs) / (time.perf_counter() - t0)


def index_size(repo: PatientRepository) -> tuple[int, int]:
    """(rows, bytes of key + value) of the posting namespace."""
    rows = nbytes = 0
    for row in repo.engine.store.scan_all(repo.index.ns):
        rows += 1
        nbytes += len(row.key) + len(row.value)
    return rows, nbytes


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 patients, fewer runs (< 60 s)")
    args = ap.parse_args()
    n, runs = (300, 5) if args.quick else (3000, 15)
    pats = make_patients(n)
    after_recs = [parse_record(p["id"], p) for p in pats]
    before_recs = [ValidRecord(r.id, r.data, r.raw, format1_terms(r.data)) for r in after_recs]
    target = pats[n // 2]
    fam = target["name"][0]["family"]
    prefix = fam[:4]
    with tempfile.TemporaryDirectory(prefix="safehold-bench-") as d:
        before, after = open_repo(Path(d) / "before.db"), open_repo(Path(d) / "after.db")
        try:
            put_before = fill(before, before_recs)
            put_after = fill(after, after_recs)
            rows_b, bytes_b = index_size(before)
            rows_a, bytes_a = index_size(after)

            exact_b = median_ms(lambda: before.find("b", [[f"family={normalise(fam)}"]],
                                                    lambda _r, x: True, count=True), runs)
            exact_a = median_ms(lambda: after.search_hits("b", {"family": fam}), runs)

            prefix_plan = plan_search("Patient", [("family", prefix)])
            range_plan = plan_search("Patient", [("birthdate", "ge1970-03-15"), ("birthdate", "lt1971")])
            expected_prefix = after.find("b", prefix_plan.groups, prefix_plan.matches).total
            assert after.find("b", None, prefix_plan.matches).total == expected_prefix
            prefix_tok = median_ms(lambda: after.find("b", prefix_plan.groups, prefix_plan.matches), runs)
            prefix_scan = median_ms(lambda: after.find("b", None, prefix_plan.matches), max(2, runs // 3))
            range_tok = median_ms(lambda: after.find("b", range_plan.groups, range_plan.matches), runs)
            range_scan = median_ms(lambda: after.find("b", None, range_plan.matches), max(2, runs // 3))
            range_hits = after.find("b", range_plan.groups, range_plan.matches).total
            range_terms = sum(len(g) for g in range_plan.groups or [])
        finally:
            before.engine.store.close()
            after.engine.store.close()
    res = {
        "patients": n,
        "index_rows_per_record_before": round(rows_b / n, 2),
        "index_rows_per_record_after": round(rows_a / n, 2),
        "write_amplification_rows": round(rows_a / rows_b, 2),
        "index_bytes_per_record_before": round(bytes_b / n),
        "index_bytes_per_record_after": round(bytes_a / n),
        "put_per_s_before": round(put_before, 1),
        "put_per_s_after": round(put_after, 1),
        "put_after_vs_before": round(put_after / put_before, 3),
        "exact_search_ms_before": round(exact_b, 3),
        "exact_search_ms_after": round(exact_a, 3),
        "prefix_search_hits": expected_prefix,
        "prefix_search_ms_tokens": round(prefix_tok, 3),
        "prefix_search_ms_scan": round(prefix_scan, 3),
        "prefix_tokens_vs_scan_speedup": round(prefix_scan / prefix_tok, 1),
        "range_search_hits": range_hits,
        "range_search_terms": range_terms,
        "range_search_ms_tokens": round(range_tok, 3),
        "range_search_ms_scan": round(range_scan, 3),
        "range_tokens_vs_scan_speedup": round(range_scan / range_tok, 1),
    }
    for k, v in res.items():
        print(f"{k:34s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
