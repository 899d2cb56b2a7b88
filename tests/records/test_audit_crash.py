"""Crash safety of the batched access audit (issue 17): a repository process doing writes,
batches and reads on 6 threads is SIGKILLed; on both store engines, afterwards: every
acknowledged write is there with its audit entry (write entries share the write's
transaction), every read answered more than ``max_lag`` before the last answered read has its
entry (the durability rule of :mod:`safehold.records.access_audit`), and the chain verifies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safehold.crypto.keyset import Keyset
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.repository import PatientRepository
from tests.support.engine_backends import ENGINES, Backend, make_backend

pytestmark = pytest.mark.slow  # a child process, killed mid-operation

MAX_LAG = 0.25

CHILD = r"""
import sys, threading, time
from pathlib import Path
from safehold.crypto.keyset import Keyset
from safehold.errors import RecordNotFoundError
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.model import parse_batch, parse_record
from safehold.records.repository import PatientRepository
from safehold.store import open_store

url, ks_path, kek_hex = sys.argv[1:4]
ks = Keyset.unwrap(Path(ks_path).read_bytes(), bytes.fromhex(kek_hex))
store = open_store(url)
c = GroupCommit(store)
repo = PatientRepository(store, ks, committer=c,
                         audit=AccessAuditLog(store, c, mac_key=b"k" * 32, max_lag=float(sys.argv[4])))
out = threading.Lock()

def say(line):
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def pat(rid):
    return {"resourceType": "Patient", "id": rid, "name": [{"family": "Crash", "given": [rid]}]}

def writer(k):
    i = 0
    while True:
        rid = f"w{k}-{i}"
        repo.put("writer", parse_record(rid, pat(rid)))
        say(f"ack put {rid}")
        i += 1

def batcher():
    j = 0
    while True:
        ids = [f"b{j}-{n}" for n in range(20)]
        res = repo.batch("writer", parse_batch([(r, pat(r)) for r in ids]))
        assert all(r["status"] == "created" for r in res), res
        say("ack batch " + " ".join(ids))
        j += 1

def reader(k):
    i = 0
    while True:
        rid = f"q{k}-{i}"
        t0 = time.monotonic()
        try:
            repo.get("reader", rid)
        except RecordNotFoundError:
            pass
        say(f"ack read {rid} {t0!r} {time.monotonic()!r}")
        i += 1

for fn, args in [(writer, (0,)), (writer, (1,)), (batcher, ()), (reader, (0,)), (reader, (1,)),
                 (reader, (2,))]:
    threading.Thread(target=fn, args=args, daemon=True).start()
say("ack started")
threading.Event().wait()
"""


@pytest.fixture(params=ENGINES)
def backend(request, tmp_path):
    b = make_backend(request.param, request, tmp_path)
    b.open().close()
    yield b
    b.close()


def _run_and_kill(backend: Backend, tmp_path: Path, ks: Keyset, seconds: float) -> list[str]:
    kek = os.urandom(32)
    ks_path = tmp_path / "keyset.bin"
    ks_path.write_bytes(ks.wrap(kek))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, backend.url, str(ks_path), kek.hex(), str(MAX_LAG)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or sum(ln.startswith("ack put") for ln in lines) < 20:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"child exited early (rc={proc.poll()}): {proc.stderr.read()[-2000:]}")
        lines.append(line.strip())
        assert time.monotonic() < end + 60, "child too slow"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lines += [ln.strip() for ln in proc.stdout.read().splitlines()]
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_sigkill_during_reads_and_writes(backend: Backend, tmp_path: Path, seconds: float):
    ks = Keyset.generate()
    lines = _run_and_kill(backend, tmp_path, ks, seconds)
    puts = [ln.split()[2] for ln in lines if ln.startswith("ack put")]
    batched = [rid for ln in lines if ln.startswith("ack batch") for rid in ln.split()[2:]]
    reads = [ln.split()[2:] for ln in lines if ln.startswith("ack read")]
    assert puts and reads
    store = backend.open()
    try:
        c = GroupCommit(store)
        repo = PatientRepository(store, ks, committer=c, audit=AccessAuditLog(store, c, mac_key=b"k" * 32))
        n = repo.audit.verify()  # the chain and its head hold after the kill
        entries = [e.body for e in repo.audit.entries()]
        assert len(entries) == n
        written = {b["record"] for b in entries if b["op"] == "put" and b["outcome"] == "created"}
        written |= {h for b in entries if b["op"] == "put" and b["outcome"].startswith("created:")
                    for h in b["hits"]}  # a batch: one entry per outcome
        read = {b["record"] for b in entries if b["op"] == "get"}
        for rid in puts + batched:  # no acknowledged write, no write-audit entry lost
            assert repo.get("check", rid)[0]["id"] == rid
            assert repo.blind_index(rid).hex() in written, rid
        last_start = max(float(t0) for _, t0, _ in reads)
        must = [rid for rid, _, t1 in reads if float(t1) < last_start - MAX_LAG]
        missing = [rid for rid in must if repo.blind_index(rid).hex() not in read]
        assert not missing, f"{len(missing)} of {len(must)} reads older than max_lag lost their entry"
        lost = sum(repo.blind_index(rid).hex() not in read for rid, _, _ in reads)
        print(f"{len(puts)} puts, {len(batched)} batched, {len(reads)} reads acknowledged; "
              f"{lost} read entries lost (all within the last {MAX_LAG} s)")
    finally:
        store.close()
