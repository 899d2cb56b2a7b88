"""Several writers of one ledger under the real anchor: three member processes on loopback
(RA-TLS, simulated TEE, mutual TLS), two FreshStores (two replicas, each with its own workload
certificate of CN ``records``) on one SQLite file and on one PostgreSQL schema, writing
concurrently; then a rollback by the database is still found by both."""

from __future__ import annotations

import time

import pytest

from safehold.freshness.anchor.statements import sign_owner_statement
from safehold.freshness.errors import LedgerUninitialisedError, RowRolledBackError
from safehold.freshness.recovery import statement_for
from safehold.freshness.store import FreshStore
from tests.freshness.test_multiwriter import NS, POST, run_two_writers
from tests.support.freshness import MAC_KEY, PLEN, POLICY

pytestmark = pytest.mark.slow


def _replica(engine, cluster, **kw) -> FreshStore:
    q = cluster.client("records")  # a certificate of its own, CN = the service's ledger
    cluster.wait_ready(q)
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=q, policy=POLICY, **kw)
    if isinstance(fs.problem, LedgerUninitialisedError):
        fs.reanchor(sign_owner_statement(statement_for(fs, "initialise"), cluster.owner.private_pem()))
    return fs


def test_two_replicas_write_one_ledger_with_real_members(engine, cluster):
    a = _replica(engine, cluster)
    b = _replica(engine, cluster, sync_interval=0.1)
    acked = run_two_writers(a, b, per_thread=10, threads=2)
    for fs in (a, b):
        for key in acked:
            assert fs.get(NS, key) is not None
        assert int(fs.get(NS, b"counter").value) == len(acked)
        groups = [fs.scan_prefix(POST, (b"family-%02d" % g).ljust(PLEN, b".")) for g in range(3)]
        assert sum(len(g) for g in groups) == len(acked)
        assert fs.audit() == []
    head = a.sync()
    assert head is not None and len(head.signatures) >= 2  # the members' signed head
    b.sync()
    assert a.state.anchored.same(b.state.anchored)
    # the database puts back the counter as it was before b's last acknowledged increment
    v = b.get(NS, b"counter").version
    engine.sql("UPDATE safehold_rows SET version = ?, value = ? WHERE "
               "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
               (v - 1, b"%d" % (len(acked) - 1), NS, b"counter"))
    for fs in (a, b):
        t0 = time.monotonic()
        with pytest.raises(RowRolledBackError):
            fs.get(NS, b"counter")
        assert time.monotonic() - t0 < 2
    a.close()
    b.close()
