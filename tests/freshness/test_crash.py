"""Kill at many points: a writer process is SIGKILLed at a different moment of its writes in
every run (a deterministic schedule of delays after it is ready), sometimes together with an
anchor member (a minority) or — on PostgreSQL — with its database session terminated by the
server; in one run the anchor hangs after a COMMIT, so that kill lands between COMMIT and the
anchor advance for sure. After every run the store is reopened: no acknowledged write is lost, no rollback or
fork is reported, and the interrupted transaction is entirely there or entirely absent."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from safehold.freshness.store import FreshStore
from tests.support.fresh_cluster import AnchorCluster, ClientIdentity
from tests.support.fresh_writer import posting_key, record_key
from tests.support.freshness import (
    MAC_KEY,
    PLEN,
    POLICY,
    POSTINGS_NS,
    Owner,
    PostgresEngine,
    SqliteEngine,
)

pytestmark = pytest.mark.slow
WRITER = Path(__file__).resolve().parents[1] / "support" / "fresh_writer.py"
RUNS = 12
STALL_RUN = 2  # a run with neither a member kill nor a session kill


@pytest.fixture(params=["sqlite", "postgres"])
def crash_engine(request, tmp_path):
    if request.param == "sqlite":
        return SqliteEngine(tmp_path / "records.db")
    return PostgresEngine(request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema"))


def _job(engine, cluster: AnchorCluster, ident: ClientIdentity, start: int, stall_at: int | None) -> dict:
    job = {"members": cluster.urls, "policy": cluster.policy_toml(), "cert": ident.cert_pem.decode(),
           "key": ident.key_pem.decode(), "mac_key": MAC_KEY.hex(), "start": start, "count": 100_000,
           "stall_at": stall_at}
    if engine.name == "sqlite":
        job.update(engine="sqlite", path=str(engine.path))
    else:
        job.update(engine="postgres", dsn=engine.dsn, schema=engine.schema)
    return job


def _terminate_writer_sessions(engine) -> None:
    engine.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE application_name = 'fresh-writer'")


def _verify(engine, quorum, acked: set[int]) -> tuple[int, int]:
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=quorum, policy=POLICY)
    try:
        fs.check()  # no false rollback / fork alarm; unanchored commits were rolled forward
        present = {int(r.key[4:]) for r in fs.scan_all("records:patients")}
        assert acked <= present, f"acknowledged writes lost: {sorted(acked - present)[:5]}"
        for t in range(3):  # all-or-nothing: a record is there exactly with its three postings
            posted = {int(r.key[PLEN + 4:]) for r in fs.scan_prefix(POSTINGS_NS, bytes([t]) * PLEN)}
            assert posted == present, f"term {t}: postings {sorted(posted ^ present)[:5]} without record"
        for i in sorted(acked)[-3:]:
            assert fs.get("records:patients", record_key(i)).value == b"record %d" % i
            assert fs.get(POSTINGS_NS, posting_key(1, i)) is not None
        assert fs.audit() == []
        return max(present, default=-1) + 1, fs.rolled_forward
    finally:
        fs.close()


def test_kill_at_many_points(crash_engine, tmp_path, package):
    cluster = AnchorCluster(tmp_path, package, Owner())
    cluster.start_all()
    ident = ClientIdentity(cluster.ca, "records")
    quorum = cluster.client(identity=ident)
    try:
        cluster.wait_ready(quorum)
        from safehold.freshness.anchor.statements import sign_owner_statement
        from safehold.freshness.recovery import statement_for

        fs = FreshStore(crash_engine.open(), ledger="records", mac_key=MAC_KEY, anchor=quorum, policy=POLICY)
        fs.reanchor(sign_owner_statement(statement_for(fs, "initialise"), cluster.owner.private_pem()))
        fs.close()
        rnd = random.Random(12)  # the schedule is fixed: the same kill points on every run of the test
        acked: set[int] = set()
        nxt, outcomes = 0, []
        for run in range(RUNS):
            delay = 0.01 + rnd.random() * 0.4
            member = run % 3 if run % 4 == 1 else None
            pg_kill = crash_engine.name == "postgres" and run % 4 == 3
            stall = run == STALL_RUN
            proc = subprocess.Popen([sys.executable, str(WRITER)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(_job(crash_engine, cluster, ident, nxt, nxt + 5 if stall else None)))
            proc.stdin.close()
            lines: list[str] = []
            reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True)
            reader.start()
            end = time.monotonic() + 60
            while "ready\n" not in lines:
                assert proc.poll() is None, f"writer died: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < end, "writer never became ready"
                time.sleep(0.005)
            if stall:  # killed while the anchor hangs after the database COMMIT
                while "stalled\n" not in lines:
                    assert proc.poll() is None, f"writer died: {proc.stderr.read()[-2000:]}"
                    assert time.monotonic() < end, "writer never stalled"
                    time.sleep(0.005)
            elif member is not None:  # an anchor member dies mid-write as well
                time.sleep(delay / 2)
                cluster.kill(member)
                time.sleep(delay / 2)
            elif pg_kill:  # the database server drops the writer's session mid-write
                time.sleep(delay)
                _terminate_writer_sessions(crash_engine)
                time.sleep(0.05)
            else:
                time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join(timeout=5)
            got = {int(line.split()[1]) for line in lines if line.startswith("ack ")}
            acked |= got
            if member is not None:
                cluster.start(member)
                cluster.wait_ready(quorum)
            start = nxt
            nxt, rolled = _verify(crash_engine, quorum, acked)
            outcomes.append((round(delay, 3), len(got), nxt - start, rolled))
        print("crash runs (delay s, acks, records found, entries rolled forward):", outcomes)
        assert len(acked) > RUNS, f"the writer hardly wrote anything: {outcomes}"
        # the interesting cases happened: a write stored but never acknowledged came back whole,
        # and a crash between COMMIT and anchor advance was rolled forward at start-up
        assert any(found > acks for _, acks, found, _ in outcomes), outcomes
        assert any(rolled for *_, rolled in outcomes), outcomes
    finally:
        quorum.close()
        cluster.stop()
