"""The records CLI under hostile use: a second `up`, bad data dirs and ports, SCONE auth,
unreachable / dying services, failed and duplicate input, concurrent and interrupted imports.

Real processes throughout (``safehold up`` from a package snapshot, ``safehold patients`` as
child processes); the checkpoint, error mapping and warning display also in-process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from safehold.client.connection import load_connection, service_errors, simulated_tee_notice, transport_reason
from safehold.client.errors import ServiceUnreachableError
from safehold.client.importer import ImportCheckpoint, file_digest
from safehold.devstack import main_records_config, records_config
from safehold.errors import ConfigError
from safehold.records.importers import ImportItem, ImportProblem, iter_bytes
from tests.support.devstack import SAMPLE, cli, snapshot_env, wait_up
from tests.support.shared import free_port

RECORD_IDS = ("0a5e1c9e-5d1b-4b8e-9d0c-1f2a3b4c5d01", "0a5e1c9e-5d1b-4b8e-9d0c-1f2a3b4c5d02")


def _up_cmd(data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data), *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return snapshot_env(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory):
    """`safehold up --scone-auth none` (the explicit opt-in), stopped, then `up --scone-auth token`
    on the same data dir (the broker holds the first manifest: `up` signs the changed one as an
    update with the dev owner key); yields data dir, up.json, ports, process, first output."""
    data = tmp_path_factory.mktemp("robust") / "d"
    ports = {"broker": free_port(), "records": free_port(), "scone": free_port()}
    args = ["--broker-port", str(ports["broker"]), "--port", str(ports["records"]),
            "--scone-port", str(ports["scone"])]
    first = subprocess.Popen(_up_cmd(data, *args, "--scone-auth", "none"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert wait_up(first, data)["scone_auth"] == "none"
        # the opt-in stays loud: `safehold status` repeats it, the service logged it at start
        st = cli(env, "status", "--data-dir", str(data))
        assert "NO AUTHENTICATION" in st.stderr and "auth none" in st.stdout
        assert "WITHOUT AUTHENTICATION" in (data / "records.log").read_text()
    finally:
        first.send_signal(signal.SIGTERM)
        out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0 and "NO AUTHENTICATION" in err1
    up = subprocess.Popen(_up_cmd(data, *args, "--scone-auth", "token"),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_up(up, data)
        yield {"data": data, "info": info, "ports": ports, "proc": up}
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    assert "manifest update version 2, signed with" in out, (out, err)
    assert "SCONE port authentication: token" in out and "NO AUTHENTICATION" not in err


def big_csv(path: Path, n: int, *, prefix: str = "gen") -> Path:
    """A Synthea-shaped patients.csv of ``n`` rows (header and cells from the packaged sample)."""
    rows = list(csv.reader((SAMPLE / "patients.csv").open(encoding="utf-8", newline="")))
    header, row = rows[0], rows[1]
    idx, last = header.index("Id"), header.index("LAST")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i in range(n):
        r = list(row)
        r[idx], r[last] = f"{prefix}-{i:06d}", f"Family{i % 97}"
        w.writerow(r)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def _counts(stdout: str) -> tuple[int, int, int, int]:
    """(imported, skipped, failed, other resources) from the import summary line."""
    m = re.search(r"imported (\d+), skipped (\d+), failed (\d+); other FHIR resources "
                  r"\(Observation, Condition, …\): imported \d+, skipped \d+(?:, ignored (\d+))?", stdout)
    assert m, stdout
    return tuple(int(x or 0) for x in m.groups())  # type: ignore[return-value]


def _d(stack) -> list[str]:
    return ["--data-dir", str(stack["data"])]


def _no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


# --- safehold up ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_up_on_a_running_data_dir_refuses_at_once_and_leaves_it_alone(env, stack):
    data = stack["data"]
    before = (data / "up.json").read_bytes()
    t0 = time.monotonic()
    r = subprocess.run(_up_cmd(data, "--broker-port", str(free_port()), "--port", str(free_port()),
                               "--scone-port", "0"),
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t0 < 20
    assert "another `safehold up` or `safehold demo`" in r.stderr and str(data) in r.stderr
    assert f"pid {stack['proc'].pid}" in r.stderr
    _no_traceback(r)
    assert (data / "up.json").read_bytes() == before  # the running stack's up.json is untouched
    st = cli(env, "status", "--json", *_d(stack))
    assert json.loads(st.stdout)["records"]["attested"] is True


@pytest.mark.slow
def test_up_names_an_unusable_data_dir_and_bad_or_busy_ports(env, stack, tmp_path):
    r = cli(env, "up", "--data-dir", "/proc/nope/d", check=False)
    assert r.returncode == 1 and "data directory /proc/nope/d: cannot create it" in r.stderr
    _no_traceback(r)
    f = tmp_path / "a-file"
    f.write_text("x")
    r = cli(env, "up", "--data-dir", str(f), check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr
    for opt in ("--port", "--broker-port", "--scone-port"):
        r = cli(env, "up", "--data-dir", str(tmp_path / "p"), opt, "70000", check=False)
        assert r.returncode == 2 and "70000 is not in the range" in r.stderr
    busy = stack["ports"]["records"]
    r = cli(env, "up", "--data-dir", str(tmp_path / "busy"), "--broker-port", str(free_port()),
            "--port", str(busy), "--scone-port", "0", check=False)
    assert r.returncode == 1 and f"port {busy} on 127.0.0.1 is in use (--port)" in r.stderr
    _no_traceback(r)
    assert not (tmp_path / "busy" / "up.json").exists() and not (tmp_path / "busy" / "broker.log").exists()
    same = free_port()
    r = cli(env, "up", "--data-dir", str(tmp_path / "same"), "--broker-port", str(same),
            "--port", str(same), "--scone-port", "0", check=False)
    assert r.returncode == 1 and f"--broker-port and --port are both {same}" in r.stderr


@pytest.mark.slow
def test_scone_port_with_token_auth_refuses_anonymous_access(stack):
    info, port = stack["info"], stack["ports"]["scone"]
    tok = json.loads((stack["data"].with_name("d.owner") / "tokens.json").read_text())
    ca = httpx.get(f"{info['broker_url']}/v1/values/session=safehold",
                   verify=ssl.create_default_context(cafile=info["ca"])).json()
    pem = stack["data"].parent / "scone-ca.pem"
    pem.write_text(ca["values"]["api_ca_cert"]["value"])
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pem))) as c:
        url = f"https://127.0.0.1:{port}/patient/{RECORD_IDS[0]}"
        # the TLS name is `api`; verify against it through the SNI extension
        r = c.get(url, extensions={"sni_hostname": "api"})
        assert r.status_code == 401
        r = c.get(url, extensions={"sni_hostname": "api"},
                  headers={"Authorization": f"Bearer {tok['reader']}"})
        assert r.status_code in (200, 404)
    assert info["scone_auth"] == "token"


def test_records_toml_edits_are_kept_or_refused_never_overwritten(tmp_path):
    import tomli_w

    d = tmp_path
    tok = {"admin": "a", "writer": "w", "reader": "r"}
    base = {**records_config(tok), "broker_ca_sha256": "ab" * 32}
    # no file yet: default token (authentication on); none only when asked for
    assert main_records_config(d, tok, "ab" * 32, None, False)["scone_auth"] == "token"
    (d / "records.toml").write_text(tomli_w.dumps({**base, "scone_auth": "token"}))
    # the user's scone_auth = "token" is kept when up is run without --scone-auth
    assert main_records_config(d, tok, "ab" * 32, None, False)["scone_auth"] == "token"
    # an explicit --scone-auth is a requested change
    assert main_records_config(d, tok, "ab" * 32, "none", False)["scone_auth"] == "none"
    (d / "records.toml").write_text(tomli_w.dumps({**base, "audit": False, "host": "0.0.0.0"}))
    with pytest.raises(ConfigError, match=r"key\(s\): audit, host.*--reset"):
        main_records_config(d, tok, "ab" * 32, None, False)
    with pytest.raises(ConfigError, match="audit"):
        main_records_config(d, tok, "ab" * 32, "token", False)
    assert main_records_config(d, tok, "ab" * 32, None, True)["audit"] is True
    (d / "records.toml").write_text("garbage = = =")
    with pytest.raises(ConfigError, match="unparsable"):
        main_records_config(d, tok, "ab" * 32, None, False)


# --- unreachable services -------------------------------------------------------------------------


@pytest.mark.slow
def test_every_patients_command_reports_a_closed_port_in_one_line(env, stack, tmp_path):
    dead = f"https://127.0.0.1:{free_port()}"
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Patient", "id": "x1"}')
    for args in (["get", "x1"], ["list"], ["search", "--family", "x"], ["delete", "x1"],
                 ["import", str(bad)]):
        r = cli(env, "patients", *args, *_d(stack), "--url", dead, check=False)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert f"cannot reach the records service at {dead}: connection refused" in r.stderr, args
        _no_traceback(r)
        assert "skipped" not in r.stdout


@pytest.mark.slow
def test_status_of_a_stale_stack_exits_1_with_a_clear_line(env, stack, tmp_path):
    d = tmp_path / "stale"
    d.mkdir()
    info = dict(stack["info"], records_url=f"https://127.0.0.1:{free_port()}",
                broker_url=f"https://127.0.0.1:{free_port()}")
    (d / "up.json").write_text(json.dumps(info))
    # a data directory the owner pinned nothing for: its policy and CA are not used
    r = cli(env, "status", "--data-dir", str(d), check=False)
    assert r.returncode == 1 and "pins no records client policy" in r.stdout, r.stdout
    _no_traceback(r)
    # pinned as the stack's (same policy, same CA): the dead URLs are named
    data = stack["data"]
    pins = json.loads((data.parent / f"{data.name}.owner" / "pins.json").read_text())[str(data.resolve())]
    for n in ("policy.toml", "ca.pem"):
        shutil.copy(data / n, d / n)
    (tmp_path / "stale.owner").mkdir()
    (tmp_path / "stale.owner" / "pins.json").write_text(json.dumps({str(d.resolve()): pins}))
    r = cli(env, "status", "--data-dir", str(d), check=False)
    assert r.returncode == 1
    assert f"cannot reach the records service at {info['records_url']}: connection refused" in r.stdout
    assert f"cannot reach the broker at {info['broker_url']}: connection refused" in r.stdout
    _no_traceback(r)
    (d / "up.json").write_text("{not json")
    r = cli(env, "status", "--data-dir", str(d), check=False)
    assert r.returncode == 1 and "unreadable" in r.stderr
    _no_traceback(r)


def test_transport_reasons_and_the_one_mapping():
    req = httpx.Request("GET", "https://x")
    cases = [
        (httpx.ConnectError("[Errno 111] Connection refused", request=req), "connection refused"),
        (httpx.ConnectTimeout("timed out", request=req), "connection timed out"),
        (httpx.ReadTimeout("timed out", request=req), "no answer within the timeout"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response.", request=req),
         "closed before a complete answer"),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", request=req),
         "TLS handshake failed"),
    ]
    for exc, want in cases:
        assert want in transport_reason(exc)
        with pytest.raises(ServiceUnreachableError, match=f"at https://h:1: .*{want}"), service_errors("https://h:1"):
            raise exc


def test_simulated_tee_warning_is_one_line_once(capsys):
    from safehold.attestation.errors import SimulatedTEEWarning

    with simulated_tee_notice():
        for _ in range(3):
            warnings.warn("accepting SIMULATED TEE Evidence: test", SimulatedTEEWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "warning: accepting SIMULATED TEE Evidence: test\n"


# --- import ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reimport_after_delete_imports_again_and_checkpoint_is_cleared(env, stack):
    d = _d(stack)
    r = cli(env, "patients", "import", str(SAMPLE / "patients.csv"), *d)
    assert "failed 0" in r.stdout
    state = json.loads(_state(stack).read_text())
    assert state == {"version": 2, "files": {}}  # done files leave no checkpoint behind
    cli(env, "patients", "delete", RECORD_IDS[0], *d)
    r = cli(env, "patients", "import", str(SAMPLE / "patients.csv"), *d)
    assert "imported 1, skipped 4, failed 0" in r.stdout
    assert json.loads(cli(env, "patients", "get", RECORD_IDS[0], *d).stdout)["Id"] == RECORD_IDS[0]


@pytest.mark.slow
def test_stale_checkpoint_is_detected_and_the_file_starts_over(env, stack, tmp_path):
    """A checkpoint whose last record is gone from the service (new store / deleted) is not trusted."""
    d = _d(stack)
    f = big_csv(tmp_path / "patients.csv", 150, prefix="stale")
    ck = ImportCheckpoint(_state(stack), load_connection(stack["data"]).target)
    ck.set(file_digest(f), 100, "stale-000099", f.name)  # claims 100 rows done; none are there
    r = cli(env, "patients", "import", str(f), *d)
    assert "imported 150, skipped 0, failed 0" in r.stdout
    assert "importing the file from the start" in r.stderr


@pytest.mark.slow
def test_failed_files_and_records_are_counted_named_and_exit_1(env, stack, tmp_path):
    files = {
        "wrongcols.csv": b"Name,Birth\nx,y\n",
        "binary.json": b"\xff\xfe\x00\x01garbage",
        "empty.json": b"",
        "array.json": b"[1, 2]",
        "truncated.json": b'{"resourceType": "Bundle", "entry": [',
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    r = cli(env, "patients", "import", *paths, str(SAMPLE / "bundle.json"), *_d(stack), check=False)
    assert r.returncode == 1
    assert "failed 5;" in r.stdout and "5 of them whole files" in r.stderr
    for name in files:
        assert f"failed {tmp_path / name}: " in r.stderr, name
    _no_traceback(r)
    r = cli(env, "patients", "import", str(SAMPLE / "bundle.json"), *_d(stack))
    assert r.returncode == 0 and "failed 0" in r.stdout


@pytest.mark.slow
def test_duplicate_ids_in_one_csv_first_wins_and_is_reported(env, stack, tmp_path):
    rows = (SAMPLE / "patients.csv").read_text(encoding="utf-8").splitlines()
    header, first = rows[0], rows[1]
    idx = header.split(",").index("LAST")
    cells = first.split(",")
    cells[idx] = "Changedlater"
    f = tmp_path / "patients.csv"
    f.write_text("\n".join([header, first, ",".join(cells), rows[2]]) + "\n", encoding="utf-8")
    out = list(iter_bytes(f.read_bytes(), name="p.csv"))
    assert [type(o) for o in out] == [ImportItem, ImportProblem, ImportItem]
    assert "duplicate record id (first at p.csv:2)" in out[1].reason and not out[1].skipped
    assert RECORD_IDS[0] not in out[1].reason
    cli(env, "patients", "delete", RECORD_IDS[0], *_d(stack), check=False)
    r = cli(env, "patients", "import", str(f), *_d(stack), check=False)
    assert r.returncode == 1 and "failed 1;" in r.stdout
    assert f"{f}:3: duplicate record id" in r.stderr
    rec = json.loads(cli(env, "patients", "get", RECORD_IDS[0], *_d(stack)).stdout)
    assert rec["LAST"] != "Changedlater"  # the first row won


def test_checkpoint_concurrent_writers_and_garbage(tmp_path):
    p = tmp_path / "import-state.json"
    a, b = ImportCheckpoint(p, "https://a"), ImportCheckpoint(p, "https://b")
    a.set("f" * 64, 10, "r10", "x.csv")
    assert a.get("f" * 64) == (10, "r10") and b.get("f" * 64) == (0, None)  # keyed on the target

    def work(n: int) -> None:
        ck = ImportCheckpoint(p, f"t{n}")
        for i in range(40):
            ck.set(f"{i:064x}", i + 1, f"r{i}", "x")

    ts = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(ImportCheckpoint(p, f"t{n}").get(f"{39:064x}") == (40, "r39") for n in range(4))
    assert not list(tmp_path.glob("*.tmp"))
    a.clear("f" * 64)
    assert a.get("f" * 64) == (0, None)
    for garbage in ("{not json", '{"f": 3}', json.dumps({"version": 2, "files": {a.key("f" * 64): "x"}})):
        p.write_text(garbage)
        assert a.get("f" * 64) == (0, None)


@pytest.mark.slow
def test_parallel_imports_on_one_data_dir_never_crash(env, stack, tmp_path):
    f = big_csv(tmp_path / "patients.csv", 300, prefix="par")
    args = [sys.executable, "-m", "safehold.cli.main", "patients", "import", "--restart",
            str(f), str(SAMPLE / "bundle.json"), *_d(stack)]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
        imported, skipped, failed, other = _counts(out)
        # the same counts in every run; the bundle's one other resource is stored through /fhir
        assert (imported + skipped, failed, other) == (303, 0, 0)
        fhir = re.search(r"other FHIR resources \(.*?\): imported (\d+), skipped (\d+)", out)
        assert fhir.groups() in (("1", "0"), ("0", "1"))
    json.loads(_state(stack).read_text())
    assert not list(_state(stack).parent.glob("import-state.json.*.tmp"))
    assert not (stack["data"] / "import-state.json").exists()  # never in the operator's data dir


def _state(stack) -> Path:
    """The import checkpoint: in the owner directory (``<data dir>.owner``), not the data dir."""
    d = stack["data"]
    return d.with_name(d.name + ".owner") / "import-state.json"


def _import_in_background(env, stack, f: Path, *, done: int) -> subprocess.Popen:
    """``safehold patients import f`` as a child process, returned once its checkpoint
    (``import-state.json``) lists ``f`` with at least ``done`` records done (60 s at most)."""
    state = _state(stack)
    p = subprocess.Popen([sys.executable, "-m", "safehold.cli.main", "patients", "import", str(f),
                          *_d(stack)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        try:
            files = json.loads(state.read_text())["files"]
        except (OSError, ValueError, KeyError):
            files = {}
        if any(e.get("file") == f.name and e["done"] >= done for e in files.values()):
            return p
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_import_says_how_to_resume_and_resumes(env, stack, tmp_path, sig, code):
    n = 1500
    f = big_csv(tmp_path / "patients.csv", n, prefix=f"sig{code}")
    p = _import_in_background(env, stack, f, done=200)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    done = int(err.split("interrupted: ")[1].split()[0])
    assert 200 <= done < n
    r = cli(env, "patients", "import", str(f), *_d(stack))
    imported, skipped, _, _ = _counts(r.stdout)
    assert imported + skipped == n and skipped >= done and imported > 0


@pytest.mark.slow
def test_records_service_killed_mid_import_is_one_clear_error(env, stack, tmp_path):
    """Runs last: it kills the module's records service."""
    f = big_csv(tmp_path / "patients.csv", 3000, prefix="kill")
    p = _import_in_background(env, stack, f, done=0)
    os.kill(stack["info"]["pids"]["records"], signal.SIGKILL)
    out, err = p.communicate(timeout=90)
    assert p.returncode == 1, err
    assert f"cannot reach the records service at {stack['info']['records_url']}:" in err
    assert "records checkpointed; run the same command again to resume" in err
    assert "Traceback" not in err


def test_cli_runner_import_of_nothing_reachable_is_clean(tmp_path):
    """In-process (CliRunner): no up.json and no --url → one line, exit 1."""
    from safehold.cli.main import cli as main_cli

    f = tmp_path / "p.json"
    f.write_text('{"resourceType": "Patient", "id": "x"}')
    r = CliRunner().invoke(main_cli, ["patients", "import", str(f), "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no records service known" in r.output


def test_unwritable_checkpoint_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"  # (works as root too, unlike a read-only directory)
    not_a_dir.write_text("x")
    ck = ImportCheckpoint(not_a_dir / "import-state.json", "t")
    assert ck.get("a" * 64) == (0, None)
    for call in (lambda: ck.set("a" * 64, 1, "r", "f"), lambda: ck.clear("a" * 64), ck.reset):
        with pytest.raises(ConfigError, match="cannot write the import checkpoint.*writable --data-dir"):
            call()


def test_records_workers_kept_or_changed_on_request(tmp_path):
    """``--records-workers`` is a requested change of records.toml; without it the file's value
    stays (and a default file has no ``workers`` key: its measurement is unchanged)."""
    import tomli_w

    d = tmp_path
    tok = {"admin": "a", "writer": "w", "reader": "r"}
    base = {**records_config(tok), "broker_ca_sha256": "ab" * 32}
    assert "workers" not in main_records_config(d, tok, "ab" * 32, None, False)
    (d / "records.toml").write_text(tomli_w.dumps(base))
    assert main_records_config(d, tok, "ab" * 32, None, False, workers=2)["workers"] == 2
    (d / "records.toml").write_text(tomli_w.dumps({**base, "workers": 2}))
    assert main_records_config(d, tok, "ab" * 32, None, False)["workers"] == 2
    assert "workers" not in main_records_config(d, tok, "ab" * 32, None, False, workers=1)
