"""``safehold up`` starts SVR, contact discovery and the E-Rezept VAU as attested workloads whose
keys the broker releases; the CLIs work against them (issues 13, 14, 15: "done when").

One stack per module (process tests are expensive on the shared 2-core machine), run from a
snapshot of the package, every port picked free.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from safehold.client.connection import owner_dir
from tests.support.devstack import SAMPLE, cli, wait_up
from tests.support.kbv import kvnr
from tests.support.shared import free_port

pytestmark = pytest.mark.slow


def _pty(env: dict[str, str], args: list[str], answers: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, typing each answer after a prompt ending in ':'."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI, its terminal is the pty
        os.execve(sys.executable, [sys.executable, "-m", "safehold.cli.main", *args], env)
    out, end, todo = b"", time.monotonic() + timeout, list(answers)
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.5)
            if not r:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
            if todo and out.rstrip().endswith(b":"):
                os.write(fd, (todo.pop(0) + "\n").encode())
                out += b"<typed>"
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory):
    data = tmp_path_factory.mktemp("services") / "data"
    picked: list[int] = []
    while len(picked) < 10:  # ten distinct free ports (free_port alone may repeat one)
        p = free_port()
        if p not in picked:
            picked.append(p)
    ports = dict(zip(("broker", "records", "disc", "vau"), picked[:4], strict=True))
    svr, anchor = picked[4:7], picked[7:10]
    t0 = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data), "--services", "all",
         "--broker-port", str(ports["broker"]), "--port", str(ports["records"]), "--scone-port", "0",
         "--svr-ports", ",".join(map(str, svr)), "--svr-anchor-ports", ",".join(map(str, anchor)),
         "--discovery-port", str(ports["disc"]), "--vau-port", str(ports["vau"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = wait_up(up, data, timeout=240)
        info["startup_s"] = time.monotonic() - t0
        yield {"data": data, "info": info, "up": up, "env": {**env, "SAFEHOLD_DATA_DIR": str(data)}}
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def test_up_starts_every_service_as_its_own_measured_workload(stack):
    info, data = stack["info"], stack["data"]
    print(f"safehold up with every service: {info['startup_s']:.1f} s to up.json")
    assert len(info["svr"]["urls"]) == 3 and info["discovery"]["url"].startswith("https://")
    assert info["erezept"]["url"].startswith("https://")
    manifest = tomllib.loads((data / "manifest.toml").read_text())
    seen = set()
    for name in ("svr-0", "svr-1", "svr-2", "discovery", "vau"):
        ready = json.loads((data / f"{name}-ready.json").read_text())
        want = manifest["workloads"][name]["policy"]["reference_values"]["measurements"]
        assert want == [ready["measurement"]], name  # each pinned to its own Reference Value
        seen.add(ready["measurement"])
        # launched through LaunchSpec: isolated interpreter, nothing but the fixed variables
        argv = Path(f"/proc/{ready['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[1:4] == [b"-I", b"-S", b"-B"], name
        environ = Path(f"/proc/{ready['pid']}/environ").read_bytes().split(b"\0")
        assert sorted(e.split(b"=")[0] for e in environ if e) == [b"LC_ALL", b"TZ"], name
    assert len(seen) == 5
    r = cli(stack["env"], "status", "--json")  # exit 0: everything attested
    st = json.loads(r.stdout)
    # every workload's appraisal accepts simulated Evidence: still one warning line in all
    assert r.stderr.count("SIMULATED TEE") == 1, r.stderr
    assert {n: v["ok"] for n, v in st["services"].items()} == dict.fromkeys(
        ["svr-0", "svr-1", "svr-2", "discovery", "vau"], True)
    # secrets come from the broker: none in argv (checked above: only paths and ports) or files
    tokens = json.loads((owner_dir(data) / "tokens.json").read_text())
    for f in data.glob("*.toml"):
        assert not any(t in f.read_text() for t in tokens.values()), f


def test_svr_backup_then_restore_with_the_pin_on_a_terminal(stack, tmp_path):
    env = stack["env"]
    secret = tmp_path / "secret.bin"
    secret.write_bytes("schlüssel-für-den-export".encode())
    code, out = _pty(env, ["svr", "backup", "--secret-file", str(secret), "--tries", "5"], ["4711", "4711"])
    assert code == 0, out
    assert "4711" not in out  # not echoed
    code, out = _pty(env, ["svr", "restore", "--out", str(tmp_path / "wrong.bin")], ["1234"])
    assert code != 0 and not (tmp_path / "wrong.bin").exists()
    q = cli(env, "svr", "query").stdout
    assert q.count("tries=4/5") == 3, q
    code, out = _pty(env, ["svr", "restore", "--out", str(tmp_path / "back.bin")], ["4711"])
    assert code == 0, out
    assert (tmp_path / "back.bin").read_bytes() == secret.read_bytes()


def test_discovery_register_and_query_through_the_cli(stack, tmp_path):
    env = stack["env"]
    k1, k2 = kvnr("A", "12345678"), kvnr("B", "61020277")
    (tmp_path / "reg.csv").write_text(f"+491701234567,alice\nkvnr,{k1},bob\n")
    cli(env, "discovery", "register", str(tmp_path / "reg.csv"), "--region", "DE")
    (tmp_path / "q.txt").write_text(f"0170 1234567\n+4930123456\nkvnr,{k1}\nkvnr,{k2}\n")
    out = cli(env, "discovery", "query", str(tmp_path / "q.txt"), "--region", "DE").stdout
    rows = out.strip().splitlines()[1:]
    assert rows == ["e164,+491701234567,yes,alice", "e164,+4930123456,no,", f"kvnr,{k1},yes,bob",
                    f"kvnr,{k2},no,"]
    raw = (stack["data"] / "discovery.db").read_bytes()
    assert b"491701234567" not in raw and k1.encode() not in raw


def test_erezept_create_to_dispense_through_the_cli(stack, tmp_path):
    env = stack["env"]
    patient = kvnr("Z", "04022900")
    t = json.loads(cli(env, "erezept", "create").stdout)
    assert t["status"] == "draft"
    bundle = cli(env, "erezept", "sample-bundle", t["id"], "--kvnr", patient, "--family", "Çelik-Weiß",
                 "--given", "Zoë", "--birth-date", "2004-02-29").stdout
    (tmp_path / "b.json").write_text(bundle)
    wrong = {**env, "SAFEHOLD_EREZEPT_ACCESS_CODE": "0" * 64}
    r = cli(wrong, "erezept", "activate", t["id"], "--bundle", str(tmp_path / "b.json"), "--dev-sign",
            check=False)
    assert r.returncode != 0 and "403" in r.stderr
    ac = {**env, "SAFEHOLD_EREZEPT_ACCESS_CODE": t["access_code"]}
    a = json.loads(cli(ac, "erezept", "activate", t["id"], "--bundle", str(tmp_path / "b.json"),
                       "--dev-sign").stdout)
    assert a["status"] == "ready"
    acc = json.loads(cli(ac, "erezept", "accept", t["id"]).stdout)
    assert acc["status"] == "in-progress" and acc["kvnr"] == patient
    sec = {**env, "SAFEHOLD_EREZEPT_SECRET": acc["secret"]}
    done = json.loads(cli(sec, "erezept", "close", t["id"], "--kvnr", patient).stdout)
    assert done["status"] == "completed" and done["title"] == "Quittung"
    assert done["receipt"]["prescription_id"] == t["id"]
    assert len(base64.b64decode(done["receipt"]["prescription_digest"])) == 32  # SHA-256
    lines = cli(env, "erezept", "list", "--kvnr", patient).stdout.strip().splitlines()
    assert json.loads(lines[0]) == {"id": t["id"], "status": "completed"}
    raw = b"".join(p.read_bytes() for p in stack["data"].glob("erezept.db*"))
    for s in ("Çelik-Weiß", "Zoë", patient, "Ibuprofen", "04020784"):
        assert s.encode() not in raw, s


def test_epa_vau_in_front_of_records_reaches_the_records_api_with_the_callers_token(stack):
    import httpx

    from safehold.client.records import attesting_transport
    from safehold.client.vau import AttestedVauKeyTrust, EpaVauHttpClient

    env, data = stack["env"], stack["data"]
    cli(env, "patients", "import", str(SAMPLE / "patients.csv"))
    e = stack["info"]["erezept"]
    assert e["epa"]
    http = httpx.Client(transport=attesting_transport(e["policy"]), timeout=30)
    c = EpaVauHttpClient(e["url"], trust=AttestedVauKeyTrust(http, e["url"]), http=http)
    admin_token = json.loads((owner_dir(data) / "tokens.json").read_text())["admin"]
    admin = [("Authorization", "Bearer " + admin_token)]
    try:
        r = c.request("GET", "/v1/patients?limit=3", headers=admin)  # M1..M4, then user data
        assert r.status == 200, r.body
        ids = json.loads(r.body)["ids"]
        assert ids
        r = c.request("GET", f"/v1/patients/{ids[0]}", headers=admin)
        assert r.status == 200
        direct = json.loads(cli(env, "patients", "get", ids[0]).stdout)  # over RA-TLS, no VAU
        assert direct and json.loads(r.body) == direct  # the same record through the ePA VAU
        assert (r.header("etag") or "").startswith('"')  # the records service's ETag comes back
        assert c.request("GET", "/v1/patients?limit=3").status == 401  # no token: records refuses
    finally:
        http.close()


def test_epa_cli_handshakes_and_reads_a_record_through_the_vau(stack):
    env = stack["env"]
    cli(env, "patients", "import", "--on-conflict", "skip", str(SAMPLE / "patients.csv"))
    hs = json.loads(cli(env, "epa", "handshake").stdout)  # attest, pin AUT-VAU, M1..M4
    assert hs["cid"].startswith("/VAU/epa/") and len(bytes.fromhex(hs["key_id"])) == 32
    assert len(hs["aut_vau_certificate_sha256"]) == 1 and hs["vau_keys"]["exp"] > time.time()
    ids = cli(env, "epa", "list", "--limit", "3").stdout.split()
    assert ids and ids == cli(env, "patients", "list", "--limit", "3").stdout.split()
    via_vau = json.loads(cli(env, "epa", "get", ids[0]).stdout)
    assert via_vau and via_vau == json.loads(cli(env, "patients", "get", ids[0]).stdout)
    # the records service still decides: a token it does not know is refused behind the VAU
    r = cli({**env, "SAFEHOLD_TOKEN": "not-a-token"}, "epa", "get", ids[0], check=False)
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr
    r = cli(env, "epa", "get", "no-such-record", check=False)
    assert r.returncode == 1 and "HTTP 404" in r.stderr
    r = cli(env, "epa", "--url", stack["info"]["erezept"]["url"], "handshake", check=False)
    assert r.returncode == 1 and "--policy is needed" in r.stderr  # never unattested


def test_a_killed_svr_server_is_restarted_and_serves_its_ledger_again(stack, tmp_path):
    env, data = stack["env"], stack["data"]
    old = json.loads((data / "svr-1-ready.json").read_text())["pid"]
    os.kill(old, signal.SIGKILL)
    end = time.monotonic() + 120
    while True:  # the supervisor of `safehold up` restarts it (bounded back-off)
        assert time.monotonic() < end, (data / "svr-1.log").read_text()[-2000:]
        ready = data / "svr-1-ready.json"
        if ready.exists() and json.loads(ready.read_text()).get("pid") != old:
            break
        time.sleep(0.2)
    q = cli(env, "svr", "query").stdout  # needs all three: svr-1 found its ledger on the anchor
    assert q.count("tries=") == 3, q
    st = json.loads(cli(env, "status", "--json").stdout)
    assert st["restarts"]["svr-1"]["count"] >= 1 and st["services"]["svr-1"]["ok"]


def test_a_service_whose_measurement_is_not_in_the_manifest_gets_no_keys(stack, tmp_path):
    from safehold.attestation.workload import LaunchSpec

    data, env = stack["data"], stack["env"]
    cfg = tomllib.loads((data / "svr-0.toml").read_text())
    changed = tmp_path / "svr-0.toml"  # one measured setting differs: another measurement
    changed.write_text((data / "svr-0.toml").read_text().replace(
        f"wait_timeout = {cfg['wait_timeout']}", "wait_timeout = 7.5"))
    assert changed.read_text() != (data / "svr-0.toml").read_text()
    spec = LaunchSpec(module="safehold.svr.server", app_dir=env["PYTHONPATH"])
    info = stack["info"]
    r = subprocess.run(
        spec.argv("--config", str(changed), "--store-url", f"sqlite:///{tmp_path / 'x.db'}", "--port", "0",
                  "--data-dir", str(data / "tee"), "--broker-url", info["broker_url"],
                  "--broker-ca", str(data / "ca.pem")),
        env=spec.env({}), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "released no keys to workload 'svr-0'" in r.stderr
    assert not (tmp_path / "x.db").exists()  # never opened its store, never served
