"""Operator attack on the clients' appraisal policy in the data directory (docs/threat-model.md,
the ``D/policy.toml`` row).

The operator owns the data directory of ``safehold up``: it can widen ``D/policy.toml`` (add
the measurement of its own server, allow debug Evidence) and point ``up.json`` at that server.
Without ``--policy``, ``safehold patients`` (and ``svr``, ``discovery``, ``epa``, ``erezept``,
``status``) must use only the policy the *owner* pinned when ``up`` wrote it
(``<owner dir>/pins.json``), so that the records token and patient data never go to an
impostor. Real processes for the records CLI (``safehold up`` from a package snapshot, an
impostor RA-TLS server on a copy of the stack's simulated TEE: the operator can read its keys);
the other CLIs in-process over a data directory pinned as ``up`` pins it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.verifier import Verifier
from safehold.client.connection import load_connection
from safehold.client.owner_pins import CLIENT_POLICIES, pinned_policy
from safehold.devstack.datadir import pin_client_policies
from safehold.errors import ConfigError
from tests.support.devstack import cli, wait_up
from tests.support.shared import free_port

M_REAL, M_OPERATOR = "ab" * 32, "cd" * 32


def _policy_text(root: Path, *measurements: str, name: str = "p") -> str:
    return tomli_w.dumps({"name": name, "allow_simulated": True, "simulated_root": str(root),
                          "report_data": "required",
                          "reference_values": {"measurements": list(measurements)}})


def _add_measurement(f: Path, m: str) -> None:
    """The operator's edit: one more accepted measurement (its own server's)."""
    pol = tomllib.loads(f.read_text("utf-8"))
    pol["reference_values"]["measurements"].append(m)
    f.write_text(tomli_w.dumps(pol), "utf-8")


# --- in-process: a data directory pinned as `safehold up` pins it ---------------------------------


@pytest.fixture
def pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory holding the four client policies and a simulated root, pinned in
    ``<data dir>.owner/pins.json`` (what ``safehold up`` writes), and an up.json naming every
    service at a port nothing listens on."""
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    monkeypatch.delenv("SAFEHOLD_TOKEN", raising=False)
    d = tmp_path / "data"
    d.mkdir()
    root = SimulatedAttester(d / "tee").root_ca_path
    texts = {}
    for service, fname in CLIENT_POLICIES.items():
        texts[service] = _policy_text(root, M_REAL, name=service)
        (d / fname).write_text(texts[service], "utf-8")
    pin_client_policies(d, None, texts, root)
    dead = f"https://127.0.0.1:{free_port()}"
    (d / "up.json").write_text(json.dumps({
        "records_url": dead, "policy": str(d / "policy.toml"), "ca": str(d / "ca.pem"),
        "svr": {"urls": [dead], "policy": str(d / "svr-policy.toml")},
        "discovery": {"url": dead, "policy": str(d / "discovery-policy.toml")},
        "erezept": {"url": dead, "policy": str(d / "vau-policy.toml"), "epa": True,
                    "idp_issuer": "x", "idp_key": str(tmp_path / "none.key")}}))
    owner = tmp_path / "data.owner"
    tok = {"admin": "a" * 43, "writer": "w" * 43, "reader": "r" * 43}
    (owner / "tokens.json").write_text(json.dumps(tok))
    return d


def _measurements(v: Verifier) -> list[str]:
    return [m.hex() for m in v.policy.measurements]


def test_the_pinned_policy_is_loaded_once_from_the_data_directory(pinned) -> None:
    conn = load_connection(pinned)
    assert isinstance(conn.policy, Verifier) and _measurements(conn.policy) == [M_REAL]
    # held in memory: a later edit of the file does not reach the loaded policy
    _add_measurement(pinned / "policy.toml", M_OPERATOR)
    assert _measurements(conn.policy) == [M_REAL]


@pytest.mark.parametrize("service", sorted(CLIENT_POLICIES))
def test_an_edited_policy_is_refused_naming_the_file_and_what_to_do(pinned, service) -> None:
    f = pinned / CLIENT_POLICIES[service]
    assert _measurements(pinned_policy(pinned, service)) == [M_REAL]
    _add_measurement(f, M_OPERATOR)
    with pytest.raises(ConfigError) as e:
        pinned_policy(pinned, service)
    msg = str(e.value)
    assert f"{f} is not the appraisal policy the owner pinned" in msg
    assert "restart `safehold up`" in msg and "--policy" in msg


def test_no_pin_for_the_data_directory_is_refused(pinned) -> None:
    (pinned.parent / "data.owner" / "pins.json").unlink()
    with pytest.raises(ConfigError,
                       match=r"policy\.toml: .*pins\.json pins no records client policy.*--policy"):
        load_connection(pinned)


def test_a_replaced_simulated_root_is_refused(pinned) -> None:
    root = pinned / "tee" / "simulated-tee" / "root-ca.pem"
    other = SimulatedAttester(pinned.parent / "operator-tee").root_ca_pem()
    root.write_bytes(other)
    with pytest.raises(ConfigError, match=r"root-ca\.pem \(the simulated root CA policy\.toml names\) is not "
                                          r"the one the owner pinned"):
        load_connection(pinned)


def test_up_json_naming_another_policy_file_changes_nothing(pinned, tmp_path, monkeypatch) -> None:
    evil = tmp_path / "operator-policy.toml"
    evil.write_text(_policy_text(pinned / "tee" / "simulated-tee" / "root-ca.pem", M_OPERATOR), "utf-8")
    up = json.loads((pinned / "up.json").read_text())
    up["policy"] = str(evil)
    up["discovery"]["policy"] = str(evil)
    (pinned / "up.json").write_text(json.dumps(up))
    conn = load_connection(pinned)
    assert isinstance(conn.policy, Verifier) and _measurements(conn.policy) == [M_REAL]
    import safehold.client.discovery as sdk
    from safehold.cli.discovery import _client

    seen = {}
    monkeypatch.setattr(sdk, "DiscoveryClient", lambda url, **kw: seen.update(kw))
    _client(None, None, None, False, str(pinned), "admin")
    assert isinstance(seen["policy"], Verifier) and _measurements(seen["policy"]) == [M_REAL]


def test_an_explicit_policy_still_wins(pinned, tmp_path) -> None:
    """A production client keeps its policy on its own side: --policy needs no pin."""
    (pinned.parent / "data.owner" / "pins.json").unlink()
    own = tmp_path / "mine.toml"
    conn = load_connection(pinned, policy=str(own))
    assert conn.policy == str(own)


def test_service_clis_refuse_an_edited_policy_before_building_a_client(pinned) -> None:
    """``svr``, ``discovery``, ``epa``, ``erezept`` without --url / --policy."""
    from safehold.cli import discovery, epa, erezept, svr

    for f in CLIENT_POLICIES.values():
        _add_measurement(pinned / f, M_OPERATOR)
    d = str(pinned)
    calls = {
        "svr-policy.toml": lambda: svr._client("svr3", (), None, (), False, data_dir=d),
        "discovery-policy.toml": lambda: discovery._client(None, None, None, False, d, "admin"),
        "vau-policy.toml": lambda: epa._Ctx(d, None, None, None, "admin"),
    }
    for fname, call in [*calls.items(), ("vau-policy.toml", lambda: erezept._Ctx(d, None, None))]:
        with pytest.raises(ConfigError, match=rf"{fname} is not the appraisal policy the owner pinned"):
            call()


# --- real processes: `safehold up`, `safehold patients`, an impostor --------------------------------


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory):
    """``safehold up`` (records only) from a package snapshot; yields data dir and up.json."""
    data = tmp_path_factory.mktemp("pin") / "d"
    args = ["--broker-port", str(free_port()), "--port", str(free_port()), "--scone-port", "0"]
    up = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_up(up, data)
        yield {"data": data, "info": info}
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.support.devstack import snapshot_env

    return snapshot_env(tmp_path_factory)


@pytest.fixture
def operator_files(stack):
    """Put the data directory's up.json and policy.toml back after each operator edit."""
    d = stack["data"]
    saved = {n: (d / n).read_bytes() for n in ("up.json", "policy.toml")}
    yield d
    for n, b in saved.items():
        (d / n).write_bytes(b)


@pytest.fixture
def impostor(stack, env, tmp_path):
    """The operator's RA-TLS server: the demo server on a copy of the stack's simulated TEE
    (whose keys the operator reads), so its Evidence is signed by the root the stack's policy
    trusts, but it runs other code (another measurement). Logs one line per connection:
    ``request GET …`` or ``no-request``. Yields (url, measurement, log path)."""
    tee = tmp_path / "operator-tee"
    shutil.copytree(stack["data"] / "tee", tee)
    ready, log = tmp_path / "ready.json", tmp_path / "connections.log"
    p = subprocess.Popen([sys.executable, "-m", "safehold.ratls.demo", "--data-dir", str(tee), "--port", "0",
                          "--log", str(log), "--ready-file", str(ready),
                          "--policy-out", str(tmp_path / "p.toml")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)  # `-m` puts the cwd on sys.path: the demo would measure it
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        yield f"https://127.0.0.1:{info['port']}", info["measurement"], log
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


def _point_up_json_at(d: Path, url: str) -> None:
    up = json.loads((d / "up.json").read_text())
    up["records_url"] = url
    (d / "up.json").write_text(json.dumps(up))


def _log_lines(log: Path, *, wait: float = 0.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if lines or time.monotonic() >= deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.slow
def test_patients_works_against_the_stack_up_started(env, stack) -> None:
    r = cli(env, "patients", "list", "--data-dir", str(stack["data"]))
    assert "not the appraisal policy" not in r.stderr


@pytest.mark.slow
def test_operator_edited_policy_toml_is_refused_before_any_request(env, stack, operator_files,
                                                                    impostor) -> None:
    d = operator_files
    url, m_impostor, log = impostor
    _add_measurement(d / "policy.toml", m_impostor)
    _point_up_json_at(d, url)
    r = cli(env, "patients", "list", "--data-dir", str(d), check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"{d / 'policy.toml'} is not the appraisal policy the owner pinned" in r.stderr
    assert "Traceback" not in r.stderr
    assert _log_lines(log, wait=1.0) == []  # not even a TLS connection to the operator's server
    # the same records under `safehold status`: not attested, the pin named
    st = cli(env, "status", "--data-dir", str(d), "--json", check=False)
    rec = json.loads(st.stdout)["records"]
    assert rec["attested"] is False and "is not the appraisal policy the owner pinned" in rec["error"], rec
    assert _log_lines(log) == []
    # control: the attack is real: the same edited file given explicitly (what the CLI used to
    # do with the data directory's file) takes the records token to the operator's server
    r = cli(env, "patients", "list", "--data-dir", str(d), "--policy", str(d / "policy.toml"), check=False)
    assert any(line.startswith("request GET") for line in _log_lines(log, wait=5.0)), (r.stdout, r.stderr)


@pytest.mark.slow
def test_up_json_pointed_at_an_impostor_is_refused_at_attestation(env, stack, operator_files,
                                                                   impostor) -> None:
    d = operator_files
    url, m_impostor, log = impostor
    _point_up_json_at(d, url)
    r = cli(env, "patients", "list", "--data-dir", str(d), check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.splitlines()[-1]
    assert err.startswith("error: ") and "measurement" in err and m_impostor in err, r.stderr
    assert "Traceback" not in r.stderr
    lines = _log_lines(log, wait=5.0)
    assert lines and all(line == "no-request" for line in lines), lines  # no request, no token
