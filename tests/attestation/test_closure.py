"""The measured closure covers everything that can execute in a workload, and a workload started
by its launch spec measures itself exactly as the data owner computes the Reference Value.

Each bypass of the old package-only measurement is reproduced: a planted ``__pycache__/*.pyc``
(Python loads a timestamp-validated cache without reading the source), a ``sitecustomize.py``
on the path, a changed byte in a dependency, a new ``.pth`` file in site-packages. Each is shown
to work against a naive launch, and then either to change the measurement or provably not to
run under the launch spec. Nothing installed is modified: the tests use a snapshot of the
package and a throw-away virtual environment of this interpreter with one real dependency
(``tomli_w``) copied into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.attestation.closure import closure, interpreter_layout
from safehold.attestation.workload import BOOT, LaunchSpec
from safehold.errors import ConfigError

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[2] / "src" / "safehold"
SITE = Path(interpreter_layout().site_packages[0])

PROBE = """\
import json, os, sys
from safehold.attestation.workload import current_closure
print(json.dumps({"measurement": current_closure().hex(),
                  "sitecustomize": "sitecustomize" in sys.modules,
                  "path": sys.path}))
"""


def _snapshot(dest: Path) -> Path:
    """A copy of the package without byte code, plus a ``probe`` module that prints the
    workload's own measurement; returns the app directory (the copy's parent)."""
    shutil.copytree(SRC, dest / "safehold", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    (dest / "probe.py").write_text(PROBE)
    return dest


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return _snapshot(tmp_path / "app")


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A throw-away venv of this interpreter (no pip) with ``tomli_w`` copied in; returns its python."""
    d = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(d)], check=True, capture_output=True)
    py = d / "bin" / "python"
    site = Path(interpreter_layout(str(py)).site_packages[0])
    for name in ("tomli_w", "tomli_w-1.2.0.dist-info"):
        src = SITE / name
        if not src.exists():
            pytest.skip(f"{name} is not installed in this environment")
        shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    return py


def run(spec: LaunchSpec, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(spec.argv(), env=spec.env() if env is None else env, capture_output=True,
                          text=True, timeout=120, cwd="/")


def probe(spec: LaunchSpec) -> dict:
    r = run(spec)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- one source of truth -----------------------------------------------------------------------


def test_spec_launch_measures_itself_as_the_owner_computes(app: Path, tmp_path: Path):
    spec = LaunchSpec("probe", app_dir=str(app))
    ref = spec.closure()
    got = probe(spec)
    assert got["measurement"] == ref.hex()
    assert got["path"] == spec.sys_path()
    names = {f.name for f in ref.files}
    # everything that can execute: interpreter, libpython, stdlib incl. lib-dynload, every
    # distribution, the package, the app directory
    lay = interpreter_layout()
    assert f"interpreter/{os.path.basename(lay.real_executable)}" in names
    if lay.libpython:
        assert f"interpreter/{os.path.basename(lay.libpython)}" in names
    assert "stdlib/json/__init__.py" in names and any(n.startswith("stdlib/lib-dynload/") for n in names)
    assert "site-packages/cryptography/__init__.py" in names
    assert any(n.startswith("site-packages/cryptography/hazmat/bindings/_rust") for n in names)
    assert "app/safehold/attestation/closure.py" in names and "app/probe.py" in names
    assert not any(n.startswith("stdlib/site-packages/") for n in names)  # not on the path
    assert not any("/__pycache__/" in n and n.endswith(".pyc") for n in names)  # never loaded
    # the same files at another path give the same value (host-independent names)
    other = _snapshot(tmp_path / "elsewhere" / "deeper")
    assert LaunchSpec("probe", app_dir=str(other)).closure().digest == ref.digest
    # a config file and the module run are part of the value
    cfg = tmp_path / "records.toml"
    cfg.write_text("a = 1\n")
    with_cfg = spec.closure([cfg])
    assert ("config/records.toml", hashlib.sha384(b"a = 1\n").hexdigest()) in with_cfg.entries
    assert with_cfg.digest != ref.digest
    assert LaunchSpec("safehold.records.service", app_dir=str(app)).closure().digest != ref.digest


def test_interpreter_files_are_hashed_from_their_real_paths():
    lay = interpreter_layout()
    c = closure([], layout=lay)
    by_name = dict(c.entries)
    exe = Path(lay.real_executable)
    assert by_name[f"interpreter/{exe.name}"] == hashlib.sha384(exe.read_bytes()).hexdigest()
    if lay.libpython:
        lib = Path(lay.libpython)
        assert by_name[f"interpreter/{lib.name}"] == hashlib.sha384(lib.read_bytes()).hexdigest()


def test_unrecognised_launch_never_matches(app: Path):
    # the same code started another way (here: python -I -S -B with a plain -c) measures differently
    spec = LaunchSpec("probe", app_dir=str(app))
    code = f"import sys; sys.path[:0] = [{str(app)!r}]; import runpy; runpy.run_module('probe')"
    r = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", code], capture_output=True, text=True,
                       timeout=120, cwd="/", env=spec.env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["measurement"] != spec.closure().hex()


# --- the bypasses ------------------------------------------------------------------------------


def _plant_pyc(pkg_dir: Path, module: str, source: str, evil: str) -> None:
    """Write ``module.py`` (``source``) and a ``__pycache__`` entry compiled from ``evil`` whose
    header (source mtime and size) matches ``source``: CPython then runs ``evil``."""
    assert len(source) == len(evil)
    py = pkg_dir / f"{module}.py"
    py.write_text(evil)
    cache = py_compile.compile(str(py), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    st = py.stat()
    py.write_text(source)
    os.utime(py, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert Path(cache).parent.name == "__pycache__"


def test_planted_pycache_pyc_cannot_run_under_the_launch_spec(app: Path):
    _plant_pyc(app, "victim", "print('from source')\n", "print('PWNED!!!!!!')\n")
    # the attack, against a naive launch: the planted byte code runs instead of the source
    naive = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(app)!r}); "
                            "import victim"], capture_output=True, text=True, timeout=60)
    assert naive.stdout.strip() == "PWNED!!!!!!"
    # under the launch spec no cache is read: the measured source runs
    r = run(LaunchSpec("victim", app_dir=str(app)))
    assert r.returncode == 0 and r.stdout.strip() == "from source", (r.stdout, r.stderr[-500:])
    # and a process that would read caches measures them: the planted file changes that value
    lay = interpreter_layout()
    path = [str(app), *lay.stdlib_path[1:2]]
    with_caches = closure(path, layout=lay)
    assert "app/__pycache__/victim.cpython-311.pyc" in dict(with_caches.entries) or any(
        n.startswith("app/__pycache__/victim.") for n, _ in with_caches.entries)
    os.unlink(next((app / "__pycache__").iterdir()))
    assert closure(path, layout=lay).digest != with_caches.digest


def test_bytecode_prefix_directory_is_measured_when_it_exists(app: Path, tmp_path: Path):
    prefix = tmp_path / "pyc-prefix"
    lay = interpreter_layout()
    empty = closure([str(app)], pycache_prefix=str(prefix), layout=lay)
    (prefix / "x").mkdir(parents=True)
    (prefix / "x" / "victim.cpython-311.pyc").write_bytes(b"\x00planted")
    planted = closure([str(app)], pycache_prefix=str(prefix), layout=lay)
    assert planted.diff(empty) == [("bytecode/x/victim.cpython-311.pyc",
                                    hashlib.sha384(b"\x00planted").hexdigest(), None)]
    # the launch spec's prefix lies below the interpreter binary: it cannot be a directory
    spec_prefix = LaunchSpec("probe").argv()[7].split("=", 1)[1]
    assert Path(spec_prefix).parent == Path(lay.real_executable) and Path(lay.real_executable).is_file()


def test_sitecustomize_on_the_path_changes_the_measurement_and_never_runs(app: Path, tmp_path: Path):
    spec = LaunchSpec("probe", app_dir=str(app))
    before = spec.closure()
    marker = tmp_path / "ran"
    (app / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    after = spec.closure()
    assert [d[0] for d in after.diff(before)] == ["app/sitecustomize.py"]
    got = probe(spec)
    assert got["sitecustomize"] is False and not marker.exists()  # -S: site never imports it
    assert got["measurement"] == after.hex()
    # the PYTHONPATH route (what `safehold up` passed to its children): a naive launch runs it,
    # the launch spec's bootstrap refuses the variable before any workload code
    env = {**spec.env(), "PYTHONPATH": str(app)}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    r = run(spec, env=env)
    assert r.returncode != 0 and "PYTHONPATH" in r.stderr and "allow-list" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("var", ["LD_PRELOAD", "SSLKEYLOGFILE", "OPENSSL_CONF", "HTTPS_PROXY"])
def test_environment_outside_the_allow_list_is_refused_at_start(app: Path, var: str):
    spec = LaunchSpec("probe", app_dir=str(app), passthrough=("SAFEHOLD_RECORDS_PORT",))
    assert spec.env({"SAFEHOLD_RECORDS_PORT": "1", var: "x", "HOME": "/root"}) == {
        **spec.fixed_env, "SAFEHOLD_RECORDS_PORT": "1"}
    env = {**spec.env(), var: "/nonexistent"}
    r = run(spec, env=env)
    assert r.returncode != 0 and var in r.stderr
    r = run(spec, env={**spec.env(), "LC_ALL": "C"})  # a fixed variable with another value
    assert r.returncode != 0 and "LC_ALL" in r.stderr


def test_modified_file_in_a_dependency_changes_the_measurement(app: Path, venv: Path):
    spec = LaunchSpec("probe", app_dir=str(app), executable=str(venv))
    before = spec.closure()
    assert probe(spec)["measurement"] == before.hex()
    site = Path(interpreter_layout(str(venv)).site_packages[0])
    target = site / "tomli_w" / "_writer.py"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    after = spec.closure()
    assert [d[0] for d in after.diff(before)] == ["site-packages/tomli_w/_writer.py"]
    assert probe(spec)["measurement"] == after.hex() != before.hex()


def test_new_pth_file_in_site_packages_changes_the_measurement_and_never_runs(app: Path, venv: Path,
                                                                             tmp_path: Path):
    spec = LaunchSpec("probe", app_dir=str(app), executable=str(venv))
    before = spec.closure()
    site = Path(interpreter_layout(str(venv)).site_packages[0])
    marker = tmp_path / "pth-ran"
    (site / "zz-evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    # the attack, against a naive launch of that environment: the .pth line runs at start
    subprocess.run([str(venv), "-c", "pass"], check=True, timeout=60, env=spec.env())
    assert marker.exists()
    marker.unlink()
    after = spec.closure()
    assert [d[0] for d in after.diff(before)] == ["site-packages/zz-evil.pth"]
    assert probe(spec)["measurement"] == after.hex()
    assert not marker.exists()  # -S: no .pth file is processed


# --- robustness --------------------------------------------------------------------------------


def test_special_files_and_bad_names_are_refused(tmp_path: Path):
    d = tmp_path / "root"
    d.mkdir()
    (d / "ok.py").write_text("x = 1\n")
    lay = interpreter_layout()
    assert "app/ok.py" in dict(closure([str(d)], layout=lay).entries)
    os.mkfifo(d / "pipe")  # would block a naive open() for ever
    with pytest.raises(ConfigError, match="not a regular file or directory"):
        closure([str(d)], layout=lay)
    os.unlink(d / "pipe")
    (d / "line\nbreak.py").write_text("")
    with pytest.raises(ConfigError, match="line break"):
        closure([str(d)], layout=lay)


def test_another_interpreter_build_is_refused(tmp_path: Path):
    fake = tmp_path / "python3"
    fake.write_bytes(b"\x7fELF not an interpreter")
    with pytest.raises(ConfigError, match="another interpreter"):
        LaunchSpec("probe", executable=str(fake)).closure()


def test_boot_is_the_measured_launch():
    # the bootstrap text is part of the launch description, so changing it changes the value
    spec = LaunchSpec("probe")
    argv = json.loads(spec.description())["argv"]
    assert BOOT in argv and argv.count("{stdlib}") == 1 and "probe" in argv
    assert spec.argv("--port", "1")[-3:] == ["--", "--port", "1"]


def test_cli_measure_prints_the_closure_of_the_launch(app: Path, tmp_path: Path):
    from click.testing import CliRunner

    from safehold.cli.main import cli

    cfg = tmp_path / "records.toml"
    cfg.write_text("a = 1\n")
    spec = LaunchSpec("probe", app_dir=str(app), passthrough=("SAFEHOLD_RECORDS_PORT",))
    ref = spec.closure([cfg])
    args = ["measure", "--module", "probe", "--app-dir", str(app), "--env", "SAFEHOLD_RECORDS_PORT",
            "--config", str(cfg)]
    res = CliRunner().invoke(cli, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["measurement"] == ref.hex() and doc["file_count"] == len(ref.files)
    assert [(f["name"], f["sha384"]) for f in doc["files"]] == ref.entries
    res = CliRunner().invoke(cli, [*args, "--format", "manifest"])
    assert res.stdout.encode() == ref.canonical()
    assert hashlib.sha384(ref.canonical()).digest() == ref.digest


def test_cli_measure_refuses_a_module_the_workload_cannot_run(app: Path):
    # a Reference Value for a module that is not on the workload's sys.path matches no workload
    # (the old default, safehold.records.service, did not exist and was measured anyway)
    from click.testing import CliRunner

    from safehold.cli.main import cli

    for module in ("safehold.records.service", "probe.missing", "not-a-name"):
        res = CliRunner().invoke(cli, ["measure", "--module", module, "--app-dir", str(app)])
        assert res.exit_code == 2 and f"no module {module!r}" in res.output, res.output
    res = CliRunner().invoke(cli, ["measure", "--module", "probe", "--app-dir", str(app), "--format", "toml"])
    assert res.exit_code == 0 and "measurements = [" in res.stdout, res.output
