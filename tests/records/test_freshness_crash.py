"""Crash safety of freshness through the service (issue 12, requirement 3): ``safehold up``'s
stack on a real SQLite file; concurrent writers over HTTPS while the records service is
SIGKILLed at many points of its writes (some together with an anchor member), and the broker
SIGKILLed and restarted. After every restart: no acknowledged write lost, no false rollback
alarm (``/healthz`` 200, the store serving), every interrupted write all or nothing (the record
and its search postings agree)."""

from __future__ import annotations

import random
import signal
import ssl
import subprocess
import threading
import time

import httpx
import pytest

from safehold.devstack import (
    base_env,
    broker_cmd,
    prepare,
    records_cmd,
    records_env,
    start,
    stop,
    tokens,
    wait_records,
)
from safehold.devstack.processes import wait_broker
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow

WRITERS = 4
IDS_PER_WRITER = 5
POINTS = 6


class Writers:
    """Writer threads: PUT ``w<t>-<i>`` with family ``F<t>x<i>n<counter>``; remembers what was
    acknowledged and what was in flight when the connection died."""

    def __init__(self, url: str, ca: str, token: str) -> None:
        self.url, self.ca, self.token = url, ca, token
        self.acked: dict[str, int] = {}
        self.maybe: dict[str, int] = {}
        self.stop = threading.Event()
        self.counter = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _run(self, t: int) -> None:
        ctx = ssl.create_default_context(cafile=self.ca)
        with httpx.Client(base_url=self.url, verify=ctx, timeout=10,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            i = 0
            while not self.stop.is_set():
                rid = f"w{t}-{i % IDS_PER_WRITER}"
                i += 1
                with self.lock:
                    self.counter += 1
                    n = self.counter
                body = {"resourceType": "Patient", "name": [{"family": f"F{rid}n{n}", "given": ["Kim"]}]}
                try:
                    r = c.put(f"/v1/patients/{rid}", json=body)
                except httpx.HTTPError:
                    self.maybe[rid] = n  # the service died with this write in flight
                    return
                if r.status_code in (200, 201):
                    self.acked[rid] = n
                    self.maybe.pop(rid, None)
                else:  # 503 while the service shuts down: not acknowledged, maybe stored
                    self.maybe[rid] = n
                    return

    def start(self) -> None:
        self.stop.clear()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(WRITERS)]
        for th in self.threads:
            th.start()

    def join(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(30)


def _family(rid: str, body: dict) -> int:
    return int(body["name"][0]["family"].rsplit("n", 1)[1])


def _check(c: httpx.Client, w: Writers) -> None:
    h = c.get("/healthz")
    assert h.status_code == 200, h.text  # no false alarm
    for rid, n in sorted(w.acked.items()):
        r = c.get(f"/v1/patients/{rid}")
        assert r.status_code == 200, (rid, r.text)
        got = _family(rid, r.json())
        allowed = {n} | ({w.maybe[rid]} if rid in w.maybe and w.maybe[rid] > n else set())
        assert got in allowed, (rid, got, allowed)  # acknowledged: never lost
        fam = r.json()["name"][0]["family"]
        hits = c.get("/v1/patients", params={"family": fam}).json()["records"]
        assert [x["id"] for x in hits] == [rid]  # postings agree with the record: all or nothing
    for rid, n in w.maybe.items():
        if rid not in w.acked:
            r = c.get(f"/v1/patients/{rid}")
            assert r.status_code in (200, 404), r.text
            if r.status_code == 200:
                assert _family(rid, r.json()) == n


def test_kill_records_member_and_broker_at_many_points(tmp_path):
    pkg = snapshot_package(tmp_path / "pkg")
    s = prepare(tmp_path / "data", broker_port=free_port(), records_port=free_port(), scone_port=None,
                package_root=str(pkg))
    start(s)
    rng = random.Random(12)
    tok = tokens(s.data_dir, s.owner_dir)["admin"]
    ca = str(s.path("ca.pem"))
    rolled_forward = 0
    try:
        url = s.info["records_url"]
        w = Writers(url, ca, tok)
        for point in range(POINTS):
            w.start()
            time.sleep(rng.uniform(0.2, 1.2))  # somewhere inside the writes (group commits)
            if point % 3 == 1:  # an anchor member dies at the same moment
                s.anchor.kill(point % 3)
            s.procs["records"].send_signal(signal.SIGKILL)
            s.procs["records"].wait()
            w.join()
            if point % 3 == 1:
                s.anchor.start(point % 3)
            if point == 3:  # the broker too: its ledger is still fresh when it comes back
                s.procs["broker"].send_signal(signal.SIGKILL)
                s.procs["broker"].wait()
                blog = s.path("broker.log").open("ab")
                s.procs["broker"] = subprocess.Popen(broker_cmd(s), stdout=blog, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, env=base_env(s),
                                                     start_new_session=True)
                wait_broker(s, s.procs["broker"], 120)
            s.path("records-ready.json").unlink(missing_ok=True)
            rlog = s.path("records.log").open("ab")
            s.procs["records"] = subprocess.Popen(records_cmd(s), env=records_env(s), stdout=rlog,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True)
            info = wait_records(s, s.procs["records"], s.path("records-ready.json"), 120)
            assert info["records_url"] == url
            with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca), timeout=30,
                              headers={"Authorization": f"Bearer {tok}"}) as c:
                for _ in range(100):  # the service compares with the anchor at start
                    if c.get("/healthz").status_code == 200:
                        break
                    time.sleep(0.2)
                st = c.get("/v1/freshness").json()
                assert st["serving"] and st["problem"] is None, st
                rolled_forward += st["rolled_forward"]
                _check(c, w)
            with httpx.Client(base_url=s.broker_url, verify=ssl.create_default_context(cafile=ca),
                              timeout=30) as b:
                assert b.get("/status").json()["mode"] == "ready"
        assert len(w.acked) == WRITERS * IDS_PER_WRITER
    finally:
        stop(s)
    print(f"rolled forward {rolled_forward} entr(y/ies) over {POINTS} kills")
