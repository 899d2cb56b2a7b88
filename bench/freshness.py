"""Benchmark: the freshness layer (FreshStore + a real 3-member anchor) vs. the bare store.

Measures, in one run:

* **put** throughput, 8 client threads, each write what the records service does per record:
  an AES-256-GCM record (``RecordEngine.put``, 1 KiB) plus 3 blind-index postings
  (``PostingIndex.add``) in one unit, group-committed. Baseline: the bare store with the records
  service's ``GroupCommit`` (``records/commit.py``). Fresh: a ``FreshStore`` over another
  database of the same engine, anchored by 3 member processes on loopback (RA-TLS, simulated
  TEE, mutual TLS) with ``FreshGroupCommit`` (anchor advance off the committer's path); also
  reported: the unchanged ``GroupCommit`` over the FreshStore (``fresh_serial``).
* **get** throughput, 8 threads of ``RecordEngine.get`` (decrypt + authenticate) on the
  records just written, bare vs. fresh.
* **memory** of the verifier map per 1 M rows: point rows (16-byte blind indexes: records,
  broker state), and the records service's mix (1 record + 3 postings in shared groups).
* **rebuild** at start-up for 100 k records (+ 300 k postings; 25 k with ``--quick``): from
  the journal alone, and from a snapshot plus the journal.

Rounds of bare and fresh alternate; the best of each counts (the machine is shared). Both
engines: SQLite (file, WAL, synchronous=FULL) and PostgreSQL (fresh schemas, dropped after).
Targets (issue 12): put >= 0.85 x bare, get >= 0.95 x bare, rebuild of 100 k < 10 s.

Usage: ``python bench/freshness.py [--quick] [--postgres-dsn DSN] [--no-postgres]``.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import benchutil
from safehold.broker.ca import WorkloadCA
from safehold.crypto.keyset import Keyset
from safehold.freshness.anchor.client import QuorumAnchor
from safehold.freshness.anchor.launch import LocalAnchor
from safehold.freshness.anchor.statements import sign_owner_statement
from safehold.freshness.errors import LedgerUninitialisedError
from safehold.freshness.group import FreshGroupCommit
from safehold.freshness.recovery import statement_for
from safehold.freshness.store import FreshStore
from safehold.freshness.vmap import POINT, POSTINGS, Change, NamespacePolicy, VerifierMap
from safehold.records.commit import GroupCommit
from safehold.records.engine import RecordEngine
from safehold.records.fresh import POSTINGS_POLICY
from safehold.records.search import NAMESPACE_SUFFIX, PREFIX_LEN, PostingIndex
from safehold.store.base import Store

CLIENTS = 8
NS = "patients"
POLICY = NamespacePolicy(POSTINGS_POLICY)
POSTINGS_NS = f"records:{NS}{NAMESPACE_SUFFIX}"  # "records:patients.postings"
MAC_KEY = os.urandom(32)


class Anchor:
    """3 members on loopback, a broker CA, a client certificate, the owner."""

    def __init__(self, root: Path) -> None:
        self.owner = ed25519.Ed25519PrivateKey.generate()
        ca = WorkloadCA.generate("bench")
        (root / "ca.pem").write_text(ca.cert_pem())
        pub = self.owner.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.local = LocalAnchor(root / "anchor", data_dir=root / "tee", client_ca_file=root / "ca.pem",
                                 owner_public_key=pub)
        key = ec.generate_private_key(ec.SECP256R1())
        self.cert = ca.issue(key.public_key(), common_name="records",
                             attested=True).public_bytes(serialization.Encoding.PEM)
        self.key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        self.local.start_all()

    def client(self) -> QuorumAnchor:
        q = QuorumAnchor(self.local.urls, self.local.verifier(), client_cert_pem=self.cert,
                         client_key_pem=self.key, timeout=5.0)
        end = time.monotonic() + 30
        while time.monotonic() < end:  # the members catch up among themselves after starting
            try:
                if all(m.ready for m in q.members()):
                    return q
            except Exception:  # noqa: BLE001 - not all up yet
                pass
            time.sleep(0.1)
        raise SystemExit("anchor members did not become ready")

    def fresh(self, inner: Store, quorum: QuorumAnchor, ledger: str = "records", **kw: object) -> FreshStore:
        fs = FreshStore(inner, ledger=ledger, mac_key=MAC_KEY, anchor=quorum, policy=POLICY, **kw)  # type: ignore[arg-type]
        if isinstance(fs.problem, LedgerUninitialisedError):
            pem = self.owner.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
            fs.reanchor(sign_owner_statement(statement_for(fs, "initialise"), pem))
        fs.check()
        return fs


def _terms(rnd: random.Random) -> list[str]:
    return [f"family={rnd.randrange(2000)}", f"given={rnd.randrange(500)}",
            f"birthDate={rnd.randrange(30000)}"]


def _threads(fn: Callable[[int], None], clients: int = CLIENTS) -> float:
    """Run ``fn(client)`` on ``clients`` threads; seconds."""
    ts = [threading.Thread(target=fn, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


class Side:
    """One side of the comparison: a store, its engine, index and committer."""

    def __init__(self, store: Store, keyset: Keyset, committer: object) -> None:
        self.store, self.committer = store, committer
        self.engine = RecordEngine(store, keyset)
        self.index = PostingIndex(store, keyset, POSTINGS_NS)
        self.ids: list[str] = []

    def put_round(self, tag: str, per_client: int, value: bytes, clients: int = CLIENTS) -> float:
        errors: list[BaseException] = []

        def client(c: int) -> None:
            rnd = random.Random(f"{tag}{c}")
            try:
                for i in range(per_client):
                    rid = f"{tag}-{c}-{i}"
                    terms = _terms(rnd)

                    def unit(rid: str = rid, terms: list[str] = terms) -> int:
                        v = self.engine.put(NS, rid, value, expected_version=0)
                        self.index.add(rid, terms)
                        return v

                    self.committer.run(unit)  # type: ignore[attr-defined]
                    self.ids.append(rid)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        dt = _threads(client, clients)
        if errors:
            raise SystemExit(f"put round failed: {errors[0]!r}")
        return clients * per_client / dt

    def get_round(self, per_client: int) -> float:
        ids = list(self.ids)

        def client(c: int) -> None:
            rnd = random.Random(c)
            for _ in range(per_client):
                self.engine.get(NS, ids[rnd.randrange(len(ids))])

        return CLIENTS * per_client / _threads(client)


def bench_engine(name: str, open_inner: Callable[[str], Store], anchor: Anchor, quorum: QuorumAnchor,
                 quick: bool) -> dict[str, object]:
    ks = Keyset.generate()
    value = os.urandom(1024)
    bare_store = open_inner("bare")
    fresh_store = anchor.fresh(open_inner("fresh"), quorum, ledger=f"records/{name}")
    bare = Side(bare_store, ks, GroupCommit(bare_store))
    fresh = Side(fresh_store, ks, FreshGroupCommit(fresh_store))
    serial = Side(fresh_store, ks, GroupCommit(fresh_store))
    per, rounds = (40, 2) if quick else (250, 5)
    order = [("bare", bare), ("fresh", fresh), ("fresh_serial", serial)]
    for label, side in order:
        side.put_round(f"{label}-warm", 5, value)
    best = {"bare": 0.0, "fresh": 0.0, "fresh_serial": 0.0}
    for r in range(rounds):
        for label, side in order if r % 2 == 0 else order[::-1]:
            best[label] = max(best[label], side.put_round(f"{label}-r{r}", per, value))
    gbest = {"bare": 0.0, "fresh": 0.0}
    gper = 300 if quick else 2000
    for r in range(rounds):
        for label, side in [("bare", bare), ("fresh", fresh)][:: 1 if r % 2 == 0 else -1]:
            gbest[label] = max(gbest[label], side.get_round(gper))
    put_ratio, get_ratio = best["fresh"] / best["bare"], gbest["fresh"] / gbest["bare"]
    wide: dict[str, float] = {}
    if not quick:  # informative: more concurrent writers fill each anchored commit
        for r in range(3):
            for label, side in [("bare", bare), ("fresh", fresh)]:
                wide[label] = max(wide.get(label, 0.0), side.put_round(f"{label}-w{r}", 60, value, 32))
        print(f"{name:9s} put with 32 clients: bare {wide['bare']:.0f}/s fresh {wide['fresh']:.0f}/s "
              f"ratio {wide['fresh'] / wide['bare']:.3f}")
    st = fresh_store.status()
    print(f"{name:9s} put  bare {best['bare']:7.0f}/s  fresh {best['fresh']:7.0f}/s  ratio {put_ratio:.3f}   "
          f"(fresh with records GroupCommit {best['fresh_serial']:.0f}/s, "
          f"{best['fresh_serial'] / best['bare']:.3f}); entries {st['committed_epoch']}")
    print(f"{name:9s} get  bare {gbest['bare']:7.0f}/s  fresh {gbest['fresh']:7.0f}/s  ratio {get_ratio:.3f}")
    if fresh_store.audit():
        raise SystemExit("benchmark data failed the freshness audit")
    fresh_store.close()
    bare_store.close()
    return {f"{name}_put_bare_per_s": round(best["bare"], 1),
            f"{name}_put_fresh_per_s": round(best["fresh"], 1),
            f"{name}_put_fresh_vs_bare": round(put_ratio, 4),
            f"{name}_put_fresh_groupcommit_vs_bare": round(best["fresh_serial"] / best["bare"], 4),
            f"{name}_get_bare_per_s": round(gbest["bare"], 1),
            f"{name}_get_fresh_per_s": round(gbest["fresh"], 1),
            f"{name}_get_fresh_vs_bare": round(get_ratio, 4),
            **({f"{name}_put32_fresh_vs_bare": round(wide["fresh"] / wide["bare"], 4)} if wide else {})}


def _build_map(n: int, records_mix: bool) -> VerifierMap:
    from safehold.freshness.digests import FreshKeys

    rnd = random.Random(7)
    vmap = VerifierMap(FreshKeys(MAC_KEY), POLICY)
    batch: list[Change] = []
    for _ in range(n):
        batch.append(Change("records:patients", rnd.randbytes(16), POINT, 1, rnd.randbytes(16)))
        if records_mix:  # 3 postings per record in groups shared like family / given / birth date
            for t in range(3):
                prefix = (t * 100_000 + rnd.randrange((2000, 500, 30000)[t])).to_bytes(PREFIX_LEN, "big")
                batch.append(Change(POSTINGS_NS, prefix + rnd.randbytes(16), POSTINGS, 1))
        if len(batch) >= 20_000:
            vmap.apply(batch)
            batch = []
    vmap.apply(batch)
    for table in vmap._tables.values():
        table.merge()
    return vmap


def bench_memory(n: int, traced: int) -> dict[str, object]:
    """Map memory per 1 M records: the map's own byte count at ``n`` records, cross-checked
    with tracemalloc (numpy and Python objects alike) at ``traced`` records."""
    out: dict[str, object] = {}
    for label, records_mix in (("point_rows", False), ("records_mix", True)):
        tracemalloc.start()
        vmap = _build_map(traced, records_mix)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del vmap
        big = _build_map(n, records_mix)
        per = big.nbytes() / n
        print(f"memory   {label:12s} {per:6.1f} B per record at {n} -> {per * 1e6 / 2**20:6.1f} MiB per 1 M "
              f"records (tracemalloc at {traced}: {current / traced:.1f} B per record)")
        out[f"memory_{label}_bytes_per_record"] = round(per, 1)
        out[f"memory_{label}_MiB_per_1M"] = round(per * 1e6 / 2**20, 1)
        out[f"memory_{label}_traced_bytes_per_record"] = round(current / traced, 1)
        del big
    return out


def bench_rebuild(anchor: Anchor, quorum: QuorumAnchor, root: Path, n: int) -> dict[str, object]:
    """Start-up time of a FreshStore holding ``n`` records + 3n postings (SQLite)."""
    from safehold.store.sqlite import SqliteStore

    path = root / "rebuild.db"
    fs = anchor.fresh(SqliteStore(path), quorum, ledger="records/rebuild", snapshot_every=0)
    rnd = random.Random(3)
    value = os.urandom(1100)  # the size of a sealed 1 KiB record
    for start in range(0, n, 2000):  # rows shaped like the records service's, written directly
        with fs.transaction() as tx:
            for _ in range(start, min(n, start + 2000)):
                key = rnd.randbytes(16)
                tx.put("records:patients", key, value, expected_version=0)
                for t, term in enumerate(_terms(rnd)):
                    prefix = (t * 100_000 + int(term.split("=")[1])).to_bytes(PREFIX_LEN, "big")
                    tx.put(POSTINGS_NS, prefix + key, value[:60], expected_version=0)
    entries = fs.status()["committed_epoch"]
    fs.close()
    t0 = time.perf_counter()
    fs = anchor.fresh(SqliteStore(path), quorum, ledger="records/rebuild", snapshot_every=0)
    journal_s = time.perf_counter() - t0
    fs.snapshotter.run()
    fs.close()
    t0 = time.perf_counter()
    fs = anchor.fresh(SqliteStore(path), quorum, ledger="records/rebuild", snapshot_every=0)
    snap_s = time.perf_counter() - t0
    rows = fs.status()["rows"]
    fs.close()
    print(f"rebuild  {n} records ({rows}): journal only ({entries} entries) {journal_s:.2f} s, "
          f"snapshot + journal {snap_s:.2f} s")
    return {"rebuild_records": n, "rebuild_journal_only_s": round(journal_s, 3),
            "rebuild_snapshot_s": round(snap_s, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under 60 s on 2 cores")
    benchutil.add_postgres_options(ap, no_postgres_help="skip the PostgreSQL half")
    args = ap.parse_args()
    figures: dict[str, object] = {"quick": args.quick, "clients": CLIENTS}
    with tempfile.TemporaryDirectory(prefix="safehold-bench-fresh-") as d:
        root = Path(d)
        anchor = Anchor(root)
        quorum = anchor.client()
        try:
            from safehold.store.sqlite import SqliteStore

            figures.update(bench_engine("sqlite", lambda tag: SqliteStore(root / f"{tag}.db"), anchor, quorum,
                                        args.quick))
            if not args.no_postgres:
                import psycopg

                from safehold.store.postgres import PostgresStore

                schemas: list[str] = []

                def pg(tag: str) -> Store:
                    schemas.append(f"bench_{tag}_{uuid.uuid4().hex[:8]}")
                    return PostgresStore(args.postgres_dsn, schema=schemas[-1], max_size=4)

                try:
                    figures.update(bench_engine("postgres", pg, anchor, quorum, args.quick))
                finally:
                    with psycopg.connect(args.postgres_dsn, autocommit=True) as conn:
                        for s in schemas:
                            conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
            figures.update(bench_memory(50_000, 50_000) if args.quick else bench_memory(1_000_000, 200_000))
            figures.update(bench_rebuild(anchor, quorum, root, 25_000 if args.quick else 100_000))
        finally:
            quorum.close()
            anchor.local.stop()
    engines = ["sqlite"] + ([] if args.no_postgres else ["postgres"])
    num = {k: float(v) for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    figures["target_put_0.85_met"] = all(num[f"{e}_put_fresh_vs_bare"] >= 0.85 for e in engines)
    figures["target_get_0.95_met"] = all(num[f"{e}_get_fresh_vs_bare"] >= 0.95 for e in engines)
    rebuild = max(num["rebuild_snapshot_s"], num["rebuild_journal_only_s"])
    figures["target_rebuild_10s_met"] = None if args.quick else rebuild < 10
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
