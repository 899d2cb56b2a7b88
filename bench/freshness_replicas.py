"""Benchmark: two replicas writing one freshness ledger (docs/freshness.md, "Several writers").

Three anchor member processes on loopback (RA-TLS, simulated TEE, mutual TLS), as
``bench/freshness.py``. Per engine (SQLite file; PostgreSQL schema):

* **reads, bounded staleness vs linearizable**: 4 threads of ``FreshStore.get`` on one replica;
  baseline = the default read (checked against the map, ``sync_interval`` polling); the
  linearizable read calls ``FreshStore.sync()`` (one anchor head read) before each get.
* **writes, two replicas vs one**: 8 client threads of single-row transactions; baseline = all
  8 on one FreshStore; two replicas = 4 threads on each of two FreshStores on the same database
  (the ledger is shared: journal-slot collisions are caught up and retried).
* **cost of polling**: CPU seconds per second of an idle replica with ``sync_interval`` 0.2 s
  vs 0 (no polling), and the measured staleness bound: time from replica A's acknowledged write
  until replica B refuses a database that serves B the previous row.

Usage: ``python bench/freshness_replicas.py [--no-postgres] [--seconds S]``. Ratios are against
the same-run baseline; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import benchutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freshness import Anchor  # noqa: E402 - the sibling benchmark's member setup
from safehold.errors import ConflictError  # noqa: E402
from safehold.freshness.errors import RowRolledBackError  # noqa: E402
from safehold.store.base import Store  # noqa: E402

NS = "records:bench"


def _run(fn, threads: int, seconds: float) -> float:  # noqa: ANN001
    """Operations per second of ``fn(thread, i)`` on ``threads`` threads for ``seconds``."""
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        i = 0
        while time.monotonic() < stop:
            fn(t, i)
            i += 1
        counts[t] = i

    ts = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def bench_engine(name: str, open_inner, anchor: Anchor, seconds: float) -> dict[str, float]:  # noqa: ANN001
    out: dict[str, float] = {}
    qa, qb = anchor.client(), anchor.client()
    a = anchor.fresh(open_inner("mw"), qa, ledger=f"records/{name}")
    b = anchor.fresh(open_inner("mw"), qb, ledger=f"records/{name}")
    for i in range(200):
        a.put(NS, b"row-%06d" % i, os.urandom(256), expected_version=0)
    b.sync()

    plain = _run(lambda t, i: b.get(NS, b"row-%06d" % ((t * 31 + i) % 200)), 4, seconds)

    def linear(t: int, i: int) -> None:
        b.sync(full=False)
        b.get(NS, b"row-%06d" % ((t * 31 + i) % 200))

    lin = _run(linear, 4, seconds)
    out[f"{name}_get_per_s"] = round(plain)
    out[f"{name}_get_linearizable_per_s"] = round(lin)
    out[f"{name}_get_linearizable_vs_default"] = round(lin / plain, 3)

    keys = [0]
    lock = threading.Lock()

    def writer(fs_of):  # noqa: ANN001, ANN202
        def w(t: int, i: int) -> None:
            with lock:
                keys[0] += 1
                n = keys[0]
            try:
                fs_of(t).put(NS, b"w-%08d" % n, b"x" * 256, expected_version=0)
            except ConflictError:
                pass
        return w

    one = _run(writer(lambda t: a), 8, seconds)
    two = _run(writer(lambda t: a if t % 2 else b), 8, seconds)
    out[f"{name}_put_one_replica_per_s"] = round(one)
    out[f"{name}_put_two_replicas_per_s"] = round(two)
    out[f"{name}_put_two_vs_one_replica"] = round(two / one, 3)

    # staleness bound: b last read the row, a acknowledges a newer one, the database then
    # serves the old row to b
    key = b"row-000007"
    old = b.get(NS, key)
    assert old is not None
    a.put(NS, key, b"new", expected_version=old.version)
    t_ack = time.monotonic()
    table = "safehold_rows"
    inner = open_inner.sql  # the operator's SQL, see main()
    inner(f"UPDATE {table} SET version = ?, value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
          f"WHERE name = ?) AND key = ?",
          (old.version, old.value, NS, key))
    while time.monotonic() - t_ack < 30:
        try:
            b.get(NS, key)
        except RowRolledBackError:
            break
        time.sleep(0.002)
    else:
        raise SystemExit(f"{name}: replica b did not notice the rollback within 30 s")
    out[f"{name}_staleness_bound_ms"] = round((time.monotonic() - t_ack) * 1000, 1)
    for fs in (a, b):
        fs.close()
    return out


def idle_cpu(anchor: Anchor, root: Path, interval: float, seconds: float) -> float:
    """CPU seconds per second of this process with one idle replica."""
    from safehold.store.sqlite import SqliteStore

    fs = anchor.fresh(SqliteStore(root / f"idle-{interval}.db"), anchor.client(),
                      ledger=f"records/idle-{interval}", sync_interval=interval)
    time.sleep(0.5)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(seconds)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    fs.close()
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / seconds


def main() -> int:
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    benchutil.add_postgres_options(ap)
    ap.add_argument("--no-sqlite", action="store_true")
    args = ap.parse_args()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="safehold-bench-replicas-") as d:
        root = Path(d)
        anchor = Anchor(root)
        try:
            import sqlite3

            from safehold.store.sqlite import SqliteStore

            class SqliteOpen:
                def __call__(self, tag: str) -> Store:
                    return SqliteStore(root / f"{tag}.db")

                def sql(self, stmt: str, params: tuple) -> None:
                    with sqlite3.connect(root / "mw.db") as c:
                        c.execute(stmt, params)

            if not args.no_sqlite:
                figures.update(bench_engine("sqlite", SqliteOpen(), anchor, args.seconds))
            if not args.no_postgres:
                import psycopg

                from safehold.store.postgres import PostgresStore

                schema = f"bench_mw_{uuid.uuid4().hex[:8]}"

                class PgOpen:
                    def __call__(self, tag: str) -> Store:
                        return PostgresStore(args.postgres_dsn, schema=schema, max_size=4)

                    def sql(self, stmt: str, params: tuple) -> None:
                        with psycopg.connect(args.postgres_dsn, autocommit=True) as c:
                            c.execute(f'SET search_path TO "{schema}"')
                            c.execute(stmt.replace("?", "%s"), params)

                try:
                    figures.update(bench_engine("postgres", PgOpen(), anchor, args.seconds))
                finally:
                    with psycopg.connect(args.postgres_dsn, autocommit=True) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            base = idle_cpu(anchor, root, 0.0, args.seconds * 2)
            polled = idle_cpu(anchor, root, 0.2, args.seconds * 2)
            figures["idle_cpu_no_poll"] = round(base, 4)
            figures["idle_cpu_poll_200ms"] = round(polled, 4)
            figures["poll_cost_cpu_per_s"] = round(polled - base, 4)
        finally:
            anchor.local.stop()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
