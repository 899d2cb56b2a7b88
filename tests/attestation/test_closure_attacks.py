"""Issue 11, finding 2: every way to run code the measurement skipped, tried on a launched
workload. Each bypass either changes the measurement (the broker refuses the keys, naming
expected vs got) or provably cannot run (refused at start by the environment allow-list, or
never imported).

The victim is a small workload module (``probe_workload``, beside a snapshot of the package:
both in the measured ``app`` root) launched through
:class:`safehold.attestation.workload.LaunchSpec` from a THROW-AWAY virtual environment in the
test's tmp dir whose site-packages holds symlinks to this venv's distributions: planting a
``.pth`` file or editing a dependency there touches no shared venv (a changed dependency is a
real copy replacing its symlink). Each payload, if it ever ran, would create a marker file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.workload import LaunchSpec
from tests.support.broker_process import manifest_dict, start_broker, write_keys, write_manifest
from tests.support.shared import snapshot_package

pytestmark = pytest.mark.slow  # builds a venv, launches workloads and a broker

PROBE = '''\
"""Test workload: measure (simulated TEE), optionally attest to a broker, write JSON."""
import json, sys
from safehold.runtime import NoKeysError, attest_and_fetch, simulated_attester

data, out = sys.argv[1], sys.argv[2]
att = simulated_attester(data)
res = {"measurement": att.measurement.hex(), "sys_path": sys.path}
if len(sys.argv) > 3:
    try:
        p = attest_and_fetch(sys.argv[3], open(sys.argv[4], "rb").read(), workload="records",
                             attester=att, keysets={"k": "default/keyset/records-keyset"})
        res["keys"] = sorted(p.keysets)
    except NoKeysError as e:
        res["refused"] = str(e)
open(out, "w").write(json.dumps(res))
'''


def _payload(marker: Path) -> str:
    return f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``{app, venv_python, site, data}``: a package snapshot with the probe, a throw-away venv."""
    root = tmp_path_factory.mktemp("closure-attacks")
    app = snapshot_package(root / "app").parent
    (app / "probe_workload.py").write_text(PROBE, "utf-8")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    mine = Path(sysconfig.get_paths()["purelib"])
    for entry in mine.iterdir():
        if entry.name.startswith("__editable__") or entry.name.startswith("safehold"):
            continue  # the package comes from the snapshot (app root), not the editable install
        (site / entry.name).symlink_to(entry)
    data = root / "tee"
    SimulatedAttester(data)  # the simulated TEE's keys, created once
    return {"app": app, "python": str(venv / "bin" / "python"), "site": site, "data": data,
            "root": root}


def _spec(world) -> LaunchSpec:
    return LaunchSpec("probe_workload", app_dir=str(world["app"]), executable=world["python"])


def _launch(world, tmp: Path, *extra: str, env_extra: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    spec = _spec(world)
    out = tmp / "out.json"
    env = {**spec.env(), **(env_extra or {})}
    return subprocess.run(spec.argv(str(world["data"]), str(out), *extra), env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=180)


def _report(tmp: Path) -> dict:
    return json.loads((tmp / "out.json").read_text())


def test_owner_measure_equals_what_the_launched_workload_reports(world, tmp_path: Path) -> None:
    """The data owner's `safehold measure` value is the launched workload's own measurement."""
    r = subprocess.run([world["python"], "-m", "safehold.cli.main", "measure", "--module", "probe_workload",
                        "--app-dir", str(world["app"]), "--format", "toml"],
                       env={**os.environ, "PYTHONPATH": str(world["app"])}, capture_output=True,
                       text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    owner = r.stdout.split('measurements = ["')[1].split('"')[0]
    assert _launch(world, tmp_path).returncode == 0
    assert _report(tmp_path)["measurement"] == owner == _spec(world).closure().hex()


def test_planted_pycache_pyc_newer_than_source_never_runs(world, tmp_path: Path) -> None:
    """A ``__pycache__/*.pyc`` newer than its source: plain Python loads it without reading the
    source (the attack is real); the launched workload never reads byte code (pycache_prefix
    under the interpreter file), so it neither runs nor changes the Reference Value."""
    import py_compile

    marker = tmp_path / "pyc-ran"
    reference = _spec(world).closure().hex()
    target = world["app"] / "safehold" / "errors.py"  # imported by every workload
    pyc = world["app"] / "safehold" / "__pycache__" / f"errors.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir(exist_ok=True)
    evil = tmp_path / "errors.py"
    evil.write_text(target.read_text().replace("from __future__ import annotations\n",
                                               "from __future__ import annotations\n" + _payload(marker), 1))
    py_compile.compile(str(evil), cfile=str(pyc), doraise=True)
    # a timestamp-validated pyc carrying the source's mtime and size: CPython trusts it
    st = target.stat()
    data = bytearray(pyc.read_bytes())
    data[8:12] = int(st.st_mtime).to_bytes(4, "little")
    data[12:16] = (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc.write_bytes(bytes(data))
    try:
        # the attack is real: a plain interpreter runs the planted byte code
        plain = subprocess.run([world["python"], "-c", "import safehold.errors"],
                               env={"PYTHONPATH": str(world["app"])}, cwd=tmp_path, timeout=60)
        assert plain.returncode == 0 and marker.exists()
        marker.unlink()
        r = _launch(world, tmp_path)
        assert r.returncode == 0, r.stderr
        assert not marker.exists()  # never loaded
        assert _report(tmp_path)["measurement"] == reference
    finally:
        shutil.rmtree(pyc.parent)


def test_sitecustomize_on_pythonpath_is_refused_at_start(world, tmp_path: Path) -> None:
    """A ``sitecustomize.py`` on ``PYTHONPATH``: the launch never passes PYTHONPATH (devstack
    children included); given one anyway, ``-I -S`` ignore it and the boot refuses to start,
    naming the variable."""
    marker = tmp_path / "sitecustomize-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(_payload(marker))
    plain = subprocess.run([world["python"], "-c", "pass"], env={"PYTHONPATH": str(evil)}, timeout=60)
    assert plain.returncode == 0 and marker.exists()  # the attack is real without the launch
    marker.unlink()
    assert "PYTHONPATH" not in _spec(world).env({"PYTHONPATH": str(evil)})
    r = _launch(world, tmp_path, env_extra={"PYTHONPATH": str(evil)})
    assert r.returncode != 0
    assert "refusing to start" in r.stderr and "PYTHONPATH" in r.stderr
    assert not marker.exists() and not (tmp_path / "out.json").exists()


def test_devstack_children_get_no_pythonpath_ld_preload_or_python_variables(tmp_path: Path,
                                                                             monkeypatch) -> None:
    """``safehold up``'s children get only the allow-list, whatever the caller's environment."""
    from safehold.devstack.processes import records_env
    from safehold.devstack.stack import Stack, base_env

    for k, v in {"PYTHONPATH": "/evil", "LD_PRELOAD": "/evil.so", "PYTHONSTARTUP": "/evil.py",
                 "PYTHONINSPECT": "1", "SSLKEYLOGFILE": "/tmp/keys", "SAFEHOLD_TOKEN": "t"}.items():
        monkeypatch.setenv(k, v)
    s = Stack(tmp_path, 1, 2, None)
    for env in (base_env(s), records_env(s)):
        assert not {k for k in env if k.startswith(("PYTHON", "LD_", "SSL"))}
        assert "SAFEHOLD_TOKEN" not in env


def test_ld_preload_and_python_variables_are_refused_at_start(world, tmp_path: Path) -> None:
    """LD_PRELOAD / PYTHON* in the workload's environment: refused at start, named. (With a
    SIMULATED TEE the dynamic loader has already mapped an LD_PRELOAD library when the boot
    refuses; that is why the launcher never passes one — Gramine ignores the host's.)"""
    libc = next(p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                            "/lib64/libc.so.6") if os.path.exists(p))
    r = _launch(world, tmp_path, env_extra={"LD_PRELOAD": libc, "PYTHONINSPECT": "1",
                                            "PYTHONWARNINGS": "error"})
    assert r.returncode != 0
    assert "refusing to start" in r.stderr
    for name in ("LD_PRELOAD", "PYTHONINSPECT", "PYTHONWARNINGS"):
        assert name in r.stderr
    assert not (tmp_path / "out.json").exists()


def _appraise_refused(world, tmp_path: Path, reference: str) -> str:
    """Start a broker whose manifest pins ``reference`` for workload records; the probe attests
    and must be refused. Returns the refusal message."""
    keys = write_keys(tmp_path / "keys")
    root = SimulatedAttester(world["data"]).root_ca_path
    mp = write_manifest(tmp_path / "m.json", manifest_dict(measurement=reference, simulated_root=str(root),
                                                          keys=keys))
    b = start_broker(tmp_path / "broker", manifest=mp, env={"PYTHONPATH": str(world["app"])})
    try:
        r = _launch(world, tmp_path, b.url, b.cacert)
        assert r.returncode == 0, r.stderr
        rep = _report(tmp_path)
        with b.client() as h:  # the owner reads expected vs got in the audit log
            audit = h.get("/admin/audit", headers={"Authorization": f"Bearer {keys['owner_token']}"})
            assert audit.status_code == 200, audit.text
    finally:
        b.stop()
    assert "keys" not in rep, rep
    assert "measurement" in rep["refused"], rep["refused"]
    assert reference not in rep["refused"]  # no Reference Value is told to the workload
    assert reference in audit.text and rep["measurement"] in audit.text
    return rep["refused"]


def test_pth_file_in_site_packages_changes_measurement_and_never_runs(world, tmp_path: Path) -> None:
    """A ``.pth`` file planted in site-packages: ``-S`` never executes it, and it is measured,
    so the broker refuses the keys naming expected vs got."""
    reference = _spec(world).closure().hex()
    marker = tmp_path / "pth-ran"
    pth = world["site"] / "zz-evil.pth"
    pth.write_text(_payload(marker).replace("\n", "; ").rstrip("; ") + "\n")
    try:
        plain = subprocess.run([world["python"], "-c", "pass"], env={}, timeout=60)
        assert plain.returncode == 0 and marker.exists()  # the attack is real without -S
        marker.unlink()
        refused = _appraise_refused(world, tmp_path, reference)
        assert not marker.exists()
        assert "measurement" in refused
    finally:
        pth.unlink()


def test_changed_byte_in_a_dependency_changes_measurement_keys_refused(world, tmp_path: Path) -> None:
    """One changed byte in an installed distribution (``cbor2``, used by the Evidence code):
    the measurement changes and the broker refuses the keys, naming expected vs got."""
    reference = _spec(world).closure().hex()
    link = world["site"] / "cbor2"
    real = link.resolve()
    link.unlink()
    shutil.copytree(real, link)
    try:
        f = link / "__init__.py"
        f.write_bytes(f.read_bytes() + b"\n# one more byte\n")
        assert _spec(world).closure().hex() != reference
        _appraise_refused(world, tmp_path, reference)
    finally:
        shutil.rmtree(link)
        link.symlink_to(real)
    assert _spec(world).closure().hex() == reference  # restored: the same value again


def test_self_restoring_payload_in_a_package_module_changes_measurement_keys_refused(
        world, tmp_path: Path) -> None:
    """A payload appended to a module the workload imports (``safehold/runtime/__init__.py``)
    that writes the original bytes back as soon as it runs: measured at boot, before the
    workload's module is imported, so the value changes and the broker refuses the keys. (With
    the measurement taken at the first attestation, the file was clean again by then and the
    keys were released.)"""
    reference = _spec(world).closure().hex()
    target = world["app"] / "safehold" / "runtime" / "__init__.py"
    original = target.read_bytes()
    marker = tmp_path / "payload-ran"
    target.write_bytes(original + (
        f"\nimport pathlib as _pl\n_pl.Path({str(target)!r}).write_bytes({original!r})\n"
        f"_pl.Path({str(marker)!r}).write_text('ran')\n").encode())
    try:
        refused = _appraise_refused(world, tmp_path, reference)
        assert marker.exists()  # it ran (the workload's own import) and restored the file ...
        assert target.read_bytes() == original
        assert "measurement" in refused  # ... but after the boot measurement: no keys
    finally:
        target.write_bytes(original)
    assert _spec(world).closure().hex() == reference
