"""The discovery server as a process on loopback, driven by the SDK and the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from safehold.client.discovery import DiscoveryClient, QueryState
from safehold.discovery.errors import RateLimitedError
from tests.support.discovery import kvnrs, patient_phone_numbers
from tests.support.processes import child_env, stop, wait_ready
from tests.support.shared import snapshot_package

pytestmark = pytest.mark.slow


def write_config(path, store_url, ready, limit=6):
    q, r = hashlib.sha256(b"query-token").hexdigest(), hashlib.sha256(b"register-token").hexdigest()
    path.write_text(f'''store_url = "{store_url}"
port = 0
limit = {limit}
period = 3600
ready_file = "{ready}"
[access.{q}]
name = "practice-1"
roles = ["query"]
[access.{r}]
name = "registrar"
roles = ["register"]
''')


def start(snapshot, config, ready, secret):
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "safehold.discovery.server", "--config", str(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env(snapshot))
    proc.stdin.write(secret.hex().encode() + b"\n")
    proc.stdin.close()
    return proc, wait_ready(proc, ready)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return snapshot_package(tmp_path_factory.mktemp("snap")).parent


def test_server_register_query_restart(tmp_path, snapshot):
    secret = bytes(range(32))
    config, ready = tmp_path / "d.toml", tmp_path / "ready.json"
    write_config(config, f"sqlite:///{tmp_path / 'd.db'}", ready)
    proc, info = start(snapshot, config, ready, secret)
    phones = patient_phone_numbers()[:3]
    try:
        with pytest.warns(UserWarning, match="NOT attested"):
            reg = DiscoveryClient(info["url"], token="register-token", insecure_loopback=True)
        with reg:
            assert reg.register([("e164", p, f"p{i}") for i, p in enumerate(phones)]
                                + [("kvnr", kvnrs(1)[0], "k0")]) == 4
        with pytest.warns(UserWarning):
            cli = DiscoveryClient(info["url"], token="query-token", insecure_loopback=True)
        with cli:
            asked = [("e164", p) for p in phones] + [("kvnr", kvnrs(2)[1]), ("kvnr", kvnrs(1)[0])]
            res = cli.query(asked)
            assert list(res.matches.values()) == ["p0", "p1", "p2", None, "k0"]
            assert (res.charged, res.used, res.limit) == (5, 5, 6)
            state_json = res.state.to_json()
    finally:
        stop(proc)
    # restart on the same store: registrations and the spent budget are still there
    proc, info = start(snapshot, config, ready, secret)
    try:
        with pytest.warns(UserWarning):
            cli = DiscoveryClient(info["url"], token="query-token", insecure_loopback=True)
        with cli:
            again = cli.query(asked, state=QueryState.from_json(state_json))
            assert again.charged == 0 and list(again.matches.values()) == ["p0", "p1", "p2", None, "k0"]
            with pytest.raises(RateLimitedError):
                cli.query([("kvnr", k) for k in kvnrs(4)[2:]], state=again.state)
    finally:
        stop(proc)


def test_cli_register_and_query(tmp_path, snapshot):
    secret = bytes(range(1, 33))
    config, ready = tmp_path / "d.toml", tmp_path / "ready.json"
    write_config(config, f"sqlite:///{tmp_path / 'd.db'}", ready, limit=100)
    proc, info = start(snapshot, config, ready, secret)
    try:
        reg = tmp_path / "reg.csv"
        reg.write_text("kind,identifier,user_id\ne164,020 1234567,alice\nkvnr,X110411675,bob\n")
        q = tmp_path / "q.txt"
        q.write_text("# contacts\n+31 20 1234567\n0648352638\n")
        base = [sys.executable, "-m", "safehold.cli.main", "discovery"]
        opts = ["--url", info["url"], "--insecure-loopback", "--region", "NL"]
        r = subprocess.run(base + ["register", str(reg), *opts], capture_output=True, text=True,
                           env=child_env(snapshot, SAFEHOLD_DISCOVERY_TOKEN="register-token"))
        assert r.returncode == 0 and "registered 2" in r.stderr, r.stderr
        state = tmp_path / "state.json"
        env = child_env(snapshot, SAFEHOLD_DISCOVERY_TOKEN="query-token")
        r = subprocess.run(base + ["query", str(q), *opts, "--state", str(state)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["kind,identifier,registered,user_id",
                                         "e164,+31201234567,yes,alice", "e164,+31648352638,no,"]
        assert "NOT attested" in r.stderr and "charged 2 new" in r.stderr
        assert (state.stat().st_mode & 0o777) == 0o600
        r = subprocess.run(base + ["query", str(q), *opts, "--state", str(state)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "charged 0 new" in r.stderr
        bad = tmp_path / "bad.txt"
        bad.write_text("X110411675\nX110411676\n")
        r = subprocess.run(base + ["query", str(bad), *opts, "--kind", "kvnr"], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 1 and "bad.txt:2: kvnr: wrong check digit" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        stop(proc)


def test_server_refuses_bad_secret_and_non_loopback(tmp_path, snapshot):
    config, ready = tmp_path / "d.toml", tmp_path / "ready.json"
    write_config(config, f"sqlite:///{tmp_path / 'd.db'}", ready)
    r = subprocess.run([sys.executable, "-m", "safehold.discovery.server", "--config", str(config)],
                       input=b"not-hex\n", capture_output=True, env=child_env(snapshot), timeout=60)
    assert r.returncode == 1 and b"discovery secret" in r.stderr and b"not-hex" not in r.stderr
    config.write_text(config.read_text().replace('port = 0', 'port = 0\nhost = "0.0.0.0"'))
    r = subprocess.run([sys.executable, "-m", "safehold.discovery.server", "--config", str(config)],
                       input=b"00" * 32 + b"\n", capture_output=True, env=child_env(snapshot), timeout=60)
    assert r.returncode == 1 and b"not loopback" in r.stderr
