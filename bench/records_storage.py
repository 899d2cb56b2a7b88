"""Benchmark: database bytes per record and start-up to the first GET (issue 17, items 4 and 5).

Builds a records database the way the service writes it — ``PatientRepository`` over a
``FreshStore`` (``FreshGroupCommit``, the access audit, postings), imported through
``batch`` in batches of 100 Synthea-sized Patients (the records of ``bench/records.py``) —
on SQLite, then:

* **bytes per record**: the file size (after a freshness snapshot, which drops the journal
  entries it covers, and a WAL checkpoint) over the record count, against the same records'
  plaintext JSON (the baseline: what a plain JSON store would hold, ratio target <= 1.3), and
  the bytes per namespace from SQLite's ``dbstat`` table; the free pages (``PRAGMA
  freelist_count``) and the live bytes (pages in use) per record; the largest file size seen
  (every 1,000 records) during the import; the same database copied with ``VACUUM INTO`` at
  other page sizes.
* **import CPU per record**: process CPU time (all threads: the caller making and parsing the
  records, the group committer, the anchorer) of the import over the record count — on a
  shared machine a steadier figure than records/s.
* **start-up to the first GET, cold cache**: the service's O(database) start-up steps, in
  process: open the store, rebuild the FreshStore verifier map (snapshot + journal), check the
  audit head, open the repository (index format marker), GET one record. The page cache is
  dropped for the database files with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``fsync``
  (no root needed; ``/proc/sys/vm/drop_caches`` is not writable here). ``PRAGMA quick_check``
  runs in the background after serving starts (``integrity_check = "background"``) and is
  timed separately. The anchor is the labelled in-process test double (the members' round
  trip is not O(database)); attestation and key release are not O(database) either.

Records are written as the service writes them by default: compressed and padded inside the
AEAD (measured ``compress = true``, frame version 2); ``--no-compress`` measures the exact-length
frame (``compress = false``). Record ids are random version-4 UUIDs in canonical text form by
default, as Synthea and most FHIR servers assign them (posting format 4 stores those in 17
bytes); ``--ids short`` uses ``p0``, ``p1``, … (the figures before posting format 4).

Usage: ``python bench/records_storage.py [--records N] [--no-compress] [--ids uuid|short]``
(default 100,000; ``--quick``: 5,000); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (fsync first: only clean pages are dropped)."""
    for p in paths:
        if not p.exists():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def postgres_sizes(n: int, import_all, anchor) -> dict[str, int]:  # noqa: ANN001
    """Import the same records into a fresh PostgreSQL schema; bytes per record of the rows table
    (heap, TOAST, indexes) after a plain ``VACUUM`` (what a running database holds) and after
    ``VACUUM FULL`` (rewritten compactly). The schema is dropped after."""
    import uuid

    import psycopg
    from tests.support.freshness import open_fresh

    from safehold.store.postgres import PostgresStore

    dsn = os.environ.get("SAFEHOLD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_storage_{uuid.uuid4().hex[:8]}"
    try:
        fs = open_fresh(PostgresStore(dsn, schema=schema, max_size=4), anchor, ledger="records/pg")
        import_all(fs)
        fs.close()
        rel = f"{schema}.safehold_rows"
        out: dict[str, int] = {}
        with psycopg.connect(dsn, autocommit=True) as c:
            for when in ("vacuum", "vacuum_full"):
                c.execute(f"VACUUM {'FULL ' if when == 'vacuum_full' else ''}{rel}")
                heap, total, idx = c.execute(
                    "SELECT pg_relation_size(%s), pg_total_relation_size(%s), pg_indexes_size(%s)",
                    (rel, rel, rel)).fetchone()
                out[f"{when}_total"] = round(total / n)
                out[f"{when}_heap"] = round(heap / n)
                out[f"{when}_indexes"] = round(idx / n)
                out[f"{when}_toast"] = round((total - heap - idx) / n)
        return out
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compress", action="store_true",
                    help="exact-length frames (the measured compress = false)")
    ap.add_argument("--ids", choices=("short", "uuid"), default="uuid")
    ap.add_argument("--postgres", action="store_true",
                    help="also import the same records into a fresh PostgreSQL schema and report "
                         "its relation sizes (DSN: SAFEHOLD_TEST_POSTGRES_DSN)")
    args = ap.parse_args()
    n = 5_000 if args.quick else args.records
    import uuid

    id_rnd = random.Random(2)  # its own stream: the records' other fields stay the same
    ids = ([f"p{i}" for i in range(n)] if args.ids == "short"
           else [str(uuid.UUID(int=id_rnd.getrandbits(128), version=4)) for _ in range(n)])

    from tests.support.freshness import InProcessAnchor, open_fresh

    from records import distinct, patient_record  # bench/records.py
    from safehold.crypto.keyset import Keyset
    from safehold.freshness.group import FreshGroupCommit
    from safehold.records.access_audit import AccessAuditLog
    from safehold.records.model import parse_batch
    from safehold.records.repository import PatientRepository
    from safehold.store import open_store

    tmp = Path(tempfile.mkdtemp(prefix="safehold-storage-"))
    db = tmp / "records.db"
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    anchor = InProcessAnchor()  # test double: in-process members, same rules
    ks = Keyset.generate()
    body = patient_record()

    def repo_on(fs):  # noqa: ANN001, ANN202
        c = FreshGroupCommit(fs)
        return PatientRepository(fs, ks, committer=c,
                                 audit=AccessAuditLog(fs, c, mac_key=b"k" * 32, checkpointed=True),
                                 compress=not args.no_compress)

    from safehold.records.reindex import ensure_search_index

    def import_all(fs) -> int:  # noqa: ANN001 - the same records each time (seeded); JSON bytes
        rnd = random.Random(1)
        repo = repo_on(fs)
        ensure_search_index(repo)  # the service's first start writes the index format marker
        json_bytes = 0
        t0 = time.perf_counter()
        for j in range(0, n, 100):
            batch = [(ids[j + i], distinct(body, ids[j + i], rnd)) for i in range(min(100, n - j))]
            json_bytes += sum(len(json.dumps(b, separators=(",", ":")).encode()) for _, b in batch)
            res = repo.batch("importer", parse_batch(batch))
            assert all(r["status"] == "created" for r in res), res[:3]
            if j and j % 10_000 == 0:
                print(f"  {j} records, {j / (time.perf_counter() - t0):.0f} rec/s", flush=True)
            if j % 1_000 == 0:  # the file between snapshots: journal pages and free pages
                peak[0] = max(peak[0], db.stat().st_size)
        # what the service does every 300 s; run() answers False while the snapshotter is already
        # writing one (started by the journal size after a commit): wait for it, then snapshot
        # whatever it did not cover
        while not fs.snapshotter.run():
            assert fs.snapshotter.last_error is None, fs.snapshotter.last_error
            time.sleep(0.1)
        return json_bytes

    peak = [0]  # largest database file size seen every 1,000 records (WAL not counted)
    fs = open_fresh(open_store(f"sqlite:///{db}"), anchor)
    t0, c0 = time.perf_counter(), time.process_time()
    json_bytes = import_all(fs)
    import_s = time.perf_counter() - t0
    import_cpu_s = time.process_time() - c0  # all threads; includes making the records
    fs.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    file_bytes = db.stat().st_size
    stat = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
    # per namespace name (schema version 2: rows carry the name's integer id, a 1-byte varint)
    payload = dict(conn.execute(
        "SELECT n.name, sum(length(r.key) + length(r.value) + 1 + 8) FROM safehold_rows r "
        "JOIN safehold_namespaces n ON n.id = r.ns GROUP BY n.name").fetchall())
    rows = dict(conn.execute(
        "SELECT n.name, count(*) FROM safehold_rows r "
        "JOIN safehold_namespaces n ON n.id = r.ns GROUP BY n.name").fetchall())
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
    auto_vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    conn.close()
    live_bytes = (page_count - freelist) * page_size  # pages in use (B-trees, pointer maps)
    sizes = {}
    for ps in (4096, 8192, 16384, 32768, 65536):
        out = tmp / f"vac-{ps}.db"
        c = sqlite3.connect(db)
        c.execute(f"PRAGMA page_size = {ps}")
        c.execute("VACUUM INTO ?", (str(out),))
        c.close()
        c = sqlite3.connect(out)
        got_ps = c.execute("PRAGMA page_size").fetchone()[0]
        c.close()
        sizes[got_ps] = out.stat().st_size
        out.unlink()

    # start-up to the first GET, cold cache
    drop_cache(files)
    t = time.perf_counter()
    store = open_store(f"sqlite:///{db}")
    t_open = time.perf_counter() - t
    fs = open_fresh(store, anchor, initialise=False)
    assert fs.problem is None, fs.problem
    t_fresh = time.perf_counter() - t
    repo = repo_on(fs)
    repo.audit.check_head()
    assert ensure_search_index(repo) == 0
    rec, _ = repo.get("reader", ids[n // 2])
    first_get = time.perf_counter() - t
    assert rec["id"] == ids[n // 2]
    fs.close()
    drop_cache(files)
    store = open_store(f"sqlite:///{db}")
    t = time.perf_counter()
    store.quick_check()
    quick_check_s = time.perf_counter() - t
    store.close()

    pg = postgres_sizes(n, import_all, anchor) if args.postgres else None

    per_record = file_bytes / n
    json_per_record = json_bytes / n
    print(f"{n} records imported in {import_s:.1f} s ({n / import_s:.0f} rec/s, one process; "
          f"{import_cpu_s / n * 1000:.2f} ms CPU per record)")
    print(f"file {file_bytes} bytes = {per_record:.0f} B/record; JSON {json_per_record:.0f} B/record; "
          f"ratio {per_record / json_per_record:.2f} (target <= 1.3); page size {page_size}")
    print(f"  pages {page_count}, free {freelist} ({freelist * page_size / n:.0f} B/record); live "
          f"{live_bytes / n:.0f} B/record = {live_bytes / json_bytes:.2f} x; auto_vacuum {auto_vacuum}; "
          f"largest file seen during the import {peak[0] / 1e6:.1f} MB (final {file_bytes / 1e6:.1f} MB)")
    for name, size in sorted(stat, key=lambda x: -x[1]):
        print(f"  btree {name}: {size / n:.0f} B/record")
    for ns in sorted(payload, key=lambda k: -payload[k]):
        print(f"  namespace {ns}: {rows[ns]} rows, {payload[ns] / n:.0f} B/record of keys + values")
    for ps, size in sorted(sizes.items()):
        print(f"  VACUUM INTO at page size {ps}: {size / n:.0f} B/record")
    print(f"start-up to first GET, cold cache: {first_get:.2f} s (open {t_open:.2f} s, verifier map "
          f"{t_fresh - t_open:.2f} s); quick_check (background) {quick_check_s:.2f} s")
    out = {"records": n, "compress": not args.no_compress, "ids": args.ids,
           "bytes_per_record": round(per_record),
           "json_bytes_per_record": round(json_per_record),
           "bytes_vs_json": round(per_record / json_per_record, 3), "target_bytes_vs_json": 1.3,
           "page_size": page_size, "page_count": page_count, "freelist_pages": freelist,
           "free_bytes_per_record": round(freelist * page_size / n),
           "live_bytes_per_record": round(live_bytes / n), "auto_vacuum": auto_vacuum,
           "largest_file_during_import_bytes": peak[0],
           "bytes_per_record_by_page_size": {str(k): round(v / n) for k, v in sizes.items()},
           "payload_bytes_per_record_by_namespace": {k: round(v / n) for k, v in payload.items()},
           "startup_first_get_s": round(first_get, 3), "target_startup_s": 2.0,
           "startup_verifier_map_s": round(t_fresh - t_open, 3),
           "quick_check_background_s": round(quick_check_s, 3),
           "import_records_per_s_in_process": round(n / import_s, 1),
           "import_cpu_ms_per_record_in_process": round(import_cpu_s / n * 1000, 3)}
    if pg is not None:
        print("PostgreSQL (same records, fresh schema), bytes per record: " +
              ", ".join(f"{k} {v}" for k, v in pg.items()))
        out["postgres_bytes_per_record"] = pg
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
