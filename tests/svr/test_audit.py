"""The background audit: a row the operator rolls back and nobody reads is still found, and the
server stops reporting healthy (``/healthz`` 503) — docs/svr.md, "In `safehold up`"."""

from __future__ import annotations

import time

from safehold.svr.protocol import ZERO_TOKEN, backup_id
from tests.support.svr import open_service

BID = backup_id("patient-1", "default")
DATA, PIN, WRONG = b"\x01" * 40, b"\xaa" * 32, b"\xbb" * 32


def _wait_runs(svc, n: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while svc._audit.runs < n:
        assert time.monotonic() < end, "the audit did not run"
        time.sleep(0.02)


def test_a_rolled_back_row_nobody_reads_turns_health_to_503(engine, anchor):
    svc = open_service(engine.open(), anchor)
    try:
        svc.svr2.backup(BID, DATA, PIN, 10, ZERO_TOKEN)
        svc.svr2.expose(BID, DATA)
        ns, key = "svr:svr2", svc.engine.row_index("svr2", BID.hex())
        with engine.open() as raw:
            before = raw.get(ns, key)
        for _ in range(3):
            svc.svr2.restore(BID, WRONG)
        svc.start_audit(0.05)
        _wait_runs(svc, 1)
        assert svc.health() == (True, "")  # a clean run: healthy
        engine.sql("UPDATE safehold_rows SET version = ?, value = ? WHERE "
                   "ns = (SELECT id FROM safehold_namespaces WHERE name = ?) AND key = ?",
                   (before.version, before.value, ns, key))  # three tries come back, unread
        runs = svc._audit.runs
        _wait_runs(svc, runs + 2)
        ok, why = svc.health()
        assert not ok and "RowRolledBackError" in why and "freshness audit" in why
    finally:
        svc.close()
