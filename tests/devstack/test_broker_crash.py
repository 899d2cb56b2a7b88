"""Issue 11, finding 6: a broker crash does not take the records service down.

``safehold up`` runs as a real process (from a snapshot of the package); the broker is
SIGKILLed under a load of records GETs and PUTs. Every request succeeds (the records service
needs the broker only at start), the supervisor restarts the broker (logged, shown by
``safehold status``), and a new ``safehold patients import`` works afterwards. On the way, the
data owner's ``safehold measure`` of the records workload equals what the launched service
reports.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from safehold.devstack.stack import RECORDS_ENV, RECORDS_MODULE
from tests.support.devstack import SAMPLE, cli, wait_up
from tests.support.shared import free_port

pytestmark = pytest.mark.slow  # starts `safehold up`


def _broker_ready(url: str, ca: str) -> bool:
    try:
        r = httpx.get(f"{url}/status", verify=ssl.create_default_context(cafile=ca), timeout=2)
        return r.status_code == 200 and r.json().get("mode") == "ready"
    except (httpx.HTTPError, ValueError):
        return False


def test_broker_sigkill_under_load_records_keeps_serving_broker_restarts(env, tmp_path: Path) -> None:
    data = tmp_path / "safehold-data"
    up = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data),
                           "--broker-port", str(free_port()), "--port", str(free_port()),
                           "--scone-port", "0"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_up(up, data, timeout=240)
        # the owner's `safehold measure` value is what the launched records service reports
        ready = json.loads((data / "records-ready.json").read_text())
        assert info["measurements"][0] == ready["measurement"]
        envs = [a for n in RECORDS_ENV for a in ("--env", n)]
        r = cli(env, "measure", "--config", str(data / "records.toml"), "--module", RECORDS_MODULE,
                "--app-dir", env["PYTHONPATH"], *envs, "--format", "toml")
        assert f'measurements = ["{ready["measurement"]}"]' in r.stdout
        # the defaults (module, environment allow-list) are the records workload `up` launches
        r = cli(env, "measure", "--config", str(data / "records.toml"), "--app-dir", env["PYTHONPATH"],
                "--format", "toml")
        assert f'measurements = ["{ready["measurement"]}"]' in r.stdout
        tok = json.loads((tmp_path / "safehold-data.owner" / "tokens.json").read_text())["writer"]
        ctx = ssl.create_default_context(cafile=info["ca"])
        results: list[tuple[str, int | str]] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            with httpx.Client(base_url=info["records_url"], verify=ctx, timeout=30,
                              headers={"Authorization": f"Bearer {tok}"}) as h:
                i = 0
                while not stop.is_set():
                    rid = f"crash-{worker}-{i % 20}"
                    try:
                        r = h.put(f"/v1/patients/{rid}", json={"FIRST": f"n{i}", "LAST": "Crash"})
                        results.append(("PUT", r.status_code))
                        r = h.get(f"/v1/patients/{rid}")
                        results.append(("GET", r.status_code))
                    except httpx.HTTPError as e:
                        results.append(("ERR", type(e).__name__))
                    i += 1

        threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            before = len(results)
            bpid = info["pids"]["broker"]
            os.kill(bpid, signal.SIGKILL)
            # the broker comes back (a new process), records serving throughout
            deadline = time.monotonic() + 180
            new_pid = None
            while time.monotonic() < deadline:
                cur = json.loads((data / "up.json").read_text())
                if (cur.get("pids", {}).get("broker") not in (None, bpid)
                        and cur.get("restarts", {}).get("broker", {}).get("count", 0) >= 1
                        and _broker_ready(info["broker_url"], info["ca"])):
                    new_pid = cur["pids"]["broker"]
                    break
                assert up.poll() is None, up.communicate()
                time.sleep(0.2)
            assert new_pid is not None, "the broker was not restarted"
            during = len(results) - before
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert during > 0  # requests were served while the broker was down / restarting
        bad = [r for r in results if r[0] == "ERR" or r[1] not in (200, 201)]
        assert not bad, bad[:10]
        assert up.poll() is None  # `safehold up` is still running

        # the restart is logged and shown by `safehold status`
        assert "broker exited with status -9" in (data / "broker.log").read_text(errors="replace")
        st = json.loads(cli(env, "status", "--data-dir", str(data), "--json").stdout)
        assert st["restarts"]["broker"]["count"] >= 1 and st["restarts"]["broker"]["last_exit_status"] == -9
        assert st["broker"]["ok"] and st["records"]["attested"]
        assert "restarts broker: " in cli(env, "status", "--data-dir", str(data)).stdout

        # a new import works after the restart
        r = cli(env, "patients", "import", str(SAMPLE / "patients.csv"), "--data-dir", str(data))
        assert "failed 0" in r.stdout, r.stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
