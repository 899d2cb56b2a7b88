"""`safehold up`, `safehold patients …`, `safehold status` and `safehold demo` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.devstack import SAMPLE, cli, wait_up
from tests.support.shared import DATA, free_port, need_shared

pytestmark = pytest.mark.slow  # starts processes on loopback


def test_up_import_get_search_list_delete_status_and_clean_stop(env, tmp_path):
    data = tmp_path / "safehold-data"
    bport, rport, sport = free_port(), free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data),
                           "--broker-port", str(bport), "--port", str(rport), "--scone-port", str(sport)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_up(up, data)
        assert info["records_url"] == f"https://127.0.0.1:{rport}"
        assert Path(info["ca"]).exists() and Path(info["policy"]).exists()
        owner = tmp_path / "safehold-data.owner"  # the owner's side, apart from the server's data
        assert oct((owner / "tokens.json").stat().st_mode & 0o777) == "0o600"
        assert oct((owner / "owner.key").stat().st_mode & 0o777) == "0o600"
        assert oct(owner.stat().st_mode & 0o777) == "0o700"
        assert not any((data / n).exists() for n in ("tokens.json", "owner.key", "owner.pub"))
        assert "admin_token" not in info
        d = ["--data-dir", str(data)]
        r = cli(env, "patients", "import", str(SAMPLE / "patients.csv"), str(SAMPLE / "bundle.json"), *d)
        assert "imported 8, skipped 0, failed 0" in r.stdout
        r = cli(env, "patients", "import", str(SAMPLE), *d)  # resumable / idempotent
        assert "imported 0, skipped 8, failed 0" in r.stdout
        r = cli(env, "patients", "get", "0a5e1c9e-5d1b-4b8e-9d0c-1f2a3b4c5d02", *d)
        assert json.loads(r.stdout)["LAST"] == "Ellery505"
        r = cli(env, "patients", "search", "--family", "okonkwo555", *d)
        assert r.stdout.startswith("5f0c2d7e-0000-4000-8000-000000000002\tIfeanyi666 Okonkwo555")
        r = cli(env, "patients", "list", *d)
        assert len(r.stdout.split()) == 8
        cli(env, "patients", "delete", "0a5e1c9e-5d1b-4b8e-9d0c-1f2a3b4c5d02", *d)
        r = cli(env, "patients", "get", "0a5e1c9e-5d1b-4b8e-9d0c-1f2a3b4c5d02", *d, check=False)
        assert r.returncode == 1 and "404" in r.stderr and "Traceback" not in r.stderr
        _audit_verify_export_and_seal(env, d, tmp_path)
        r = cli(env, "status", "--json", *d)
        st = json.loads(r.stdout)
        assert st["records"]["attested"] is True and st["records"]["records"] == 7
        assert st["broker"]["status"]["mode"] == "ready"
        # the broker CLI finds the running stack's broker and CA without --url / --cacert
        r = cli({**env, "SAFEHOLD_DATA_DIR": str(data)}, "broker", "status")
        assert "ready" in r.stdout, r.stdout
        assert st["scone_auth"] == "token"
        # the unchanged SCONE demo client (no token) gets 401 on a default `up`
        _assert_scone_demo_client_gets_401(info, sport)
        # a bad file gives counts and exit status 1, not a traceback
        bad = tmp_path / "bad.json"
        bad.write_text('{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}}]}')
        r = cli(env, "patients", "import", str(bad), *d, check=False)
        assert r.returncode == 1 and "imported 0, skipped 0, failed 1" in r.stdout
        assert "Traceback" not in r.stderr
        # the simulated-TEE warning: once, one line, no Python warnings display
        assert r.stderr.count("SIMULATED TEE") == 1 and "SimulatedTEEWarning" not in r.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert "stopped (records exit 0, broker exit 0)" in out
    assert "records API" in out and "client policy" in out and "workload CA" in out
    # the SCONE port authenticates by default (issue 11, finding 5); nothing to warn about
    assert "SCONE port authentication: token" in out and "NO AUTHENTICATION" not in err
    for pid in info["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    r = cli(env, "status", "--data-dir", str(data), check=False)
    assert r.returncode == 1 and "safehold up" in r.stderr


def _audit_verify_export_and_seal(env: dict, d: list[str], tmp_path: Path) -> None:
    """``safehold patients audit``: verify, export a segment (never overwriting a file), refuse
    to seal with another file's digest, seal with the export's, verify the whole chain again."""
    r = cli(env, "patients", "audit", "verify", *d)
    n = int(r.stdout.split()[3])  # "access audit verified: N entries"
    assert r.stdout.startswith("access audit verified: ") and n >= 5
    seg = tmp_path / "audit-0-2.ndjson"
    r = cli(env, "patients", "audit", "export", "--through", "2", str(seg), *d)
    assert r.stdout.startswith("exported entries 0..2 ") and len(seg.read_bytes().splitlines()) == 3
    assert oct(seg.stat().st_mode & 0o777) == "0o600"
    r = cli(env, "patients", "audit", "export", "--through", "1", str(seg), *d, check=False)
    assert r.returncode == 2 and "exists" in r.stderr and len(seg.read_bytes().splitlines()) == 3
    other = tmp_path / "other.ndjson"
    other.write_bytes(seg.read_bytes().replace(b'"', b" ", 1))
    r = cli(env, "patients", "audit", "seal", "--through", "2", str(other), *d, check=False)
    assert r.returncode == 1 and "not the one given" in r.stderr and "Traceback" not in r.stderr
    r = cli(env, "patients", "audit", "seal", "--through", "2", str(seg), *d)
    assert r.stdout.startswith("sealed entries 0..2 ")
    r = cli(env, "patients", "audit", "verify", "--full", *d)
    assert int(r.stdout.split()[3]) > n  # sealed entries still count; the seal is an entry itself
    gone = tmp_path / "gone.ndjson"
    r = cli(env, "patients", "audit", "export", "--through", "1", str(gone), *d, check=False)
    assert r.returncode == 1 and "not sealable" in r.stderr and not gone.exists()


def _assert_scone_demo_client_gets_401(info: dict, port: int) -> None:
    import ssl

    import httpx

    from safehold.records.scone import FIELDS

    values = httpx.get(f"{info['broker_url']}/v1/values/session=safehold",
                       verify=ssl.create_default_context(cafile=info["ca"])).json()
    ctx = ssl.create_default_context(cadata=values["values"]["api_ca_cert"]["value"])
    form = {f: "x" for f in FIELDS} | {"fname": "Jane", "lname": "Doe", "ssn": "999-11-2222"}
    with httpx.Client(verify=ctx, timeout=30) as c:
        for method, path, kw in (("POST", "/patient/scone_1", {"data": form}),
                                 ("GET", "/patient/scone_1", {}), ("GET", "/score/scone_1", {})):
            r = c.request(method, f"https://127.0.0.1:{port}{path}", extensions={"sni_hostname": "api"}, **kw)
            assert r.status_code == 401, (method, path, r.status_code, r.text)


def test_demo_with_packaged_sample(env, tmp_path):
    e = dict(env)
    e["SAFEHOLD_SHARED_DIR"] = str(tmp_path / "no-shared-here")
    work = tmp_path / "w" / "repo"  # ../shared/data does not exist from here
    work.mkdir(parents=True)
    r = cli(e, "demo", cwd=work, timeout=180)
    assert "the packaged sample" in r.stdout
    assert "imported 8, skipped 0, failed 0" in r.stdout
    assert "read back " in r.stdout and "via blind index" in r.stdout
    assert ": 0 found" in r.stdout
    db = work / "safehold-data" / "records.db"
    assert db.exists() and b"Okonkwo555" not in db.read_bytes()


def test_demo_with_shared_data(env, tmp_path):
    need_shared(DATA / "INDEX.md")
    e = dict(env)
    e["SAFEHOLD_SHARED_DIR"] = str(DATA.parent)
    r = cli(e, "demo", "--data-dir", str(tmp_path / "d"), timeout=180)
    assert f"shared data in {DATA}" in r.stdout
    assert "imported 69, skipped 0, failed 0" in r.stdout and ": 0 found" in r.stdout


def test_up_stops_cleanly_on_ctrl_c(env, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group."""
    data = tmp_path / "d"
    up = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data),
                           "--broker-port", str(free_port()), "--port", str(free_port()),
                           "--scone-port", "0"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    try:
        info = wait_up(up, data)
        assert info["scone_port"] is None
    finally:
        os.killpg(up.pid, signal.SIGINT)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert "stopped (records exit 0, broker exit 0)" in out
    for pid in info["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (data / "up.json").exists()


def _children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` runs (an unreaped zombie counts as exited)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except FileNotFoundError:
        return False


def test_children_stop_by_themselves_when_up_is_killed_and_up_starts_again(env, tmp_path):
    """``safehold up`` SIGKILLed: the broker, records service, records anchor members, SVR servers
    and SVR anchor members (--exit-with-parent) stop within seconds, so the next ``up`` on the
    same data directory finds its ports free, starts and serves."""
    data = tmp_path / "safehold-data"
    picked: list[int] = []
    while len(picked) < 8:
        p = free_port()
        if p not in picked:
            picked.append(p)
    args = [sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data), "--services", "svr",
            "--broker-port", str(picked[0]), "--port", str(picked[1]), "--scone-port", "0",
            "--svr-ports", ",".join(map(str, picked[2:5])),
            "--svr-anchor-ports", ",".join(map(str, picked[5:8]))]
    up = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        info = wait_up(up, data, timeout=240)
        children = _children(up.pid)
        assert set(info["pids"].values()) <= children
        assert {"broker", "records", "svr-0", "svr-anchor-0"} <= set(info["pids"])
        assert len(children) >= 11, children  # + the 3 records anchor members (not in up.json)
        up.kill()
        up.wait()
        end = time.monotonic() + 10
        while any(_running(p) for p in children) and time.monotonic() < end:
            time.sleep(0.1)
        left = {p for p in children if _running(p)}
        assert not left, f"still running after `up` was killed: {left}"
        print(f"every child of the killed `up` stopped {time.monotonic() - end + 10:.1f} s after it")
        # the records service stopped through its SIGTERM path (uvicorn's graceful shutdown)
        assert "Traceback" not in (data / "records.log").read_text(errors="replace")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for p in children:
            if _running(p):
                os.kill(p, signal.SIGKILL)
    up2 = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 240
        while (info2 := wait_up(up2, data, timeout=240))["pids"] == info["pids"]:  # the killed up's file
            assert time.monotonic() < end
            time.sleep(0.2)
        assert info2["broker_url"] == info["broker_url"]
        r = cli(env, "status", "--json", "--data-dir", str(data))  # exit 0: everything attested
        st = json.loads(r.stdout)
        assert st["records"]["attested"] is True and st["broker"]["status"]["mode"] == "ready"
        assert all(v["ok"] for v in st["services"].values()), st["services"]
    finally:
        up2.send_signal(signal.SIGTERM)
        out, _ = up2.communicate(timeout=60)
    assert up2.returncode == 0, out
