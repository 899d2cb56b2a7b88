"""Gramine (GSC) manifests: trusted files equal to the measured closure, the documented 1.9
syntax, the launch as the image entrypoint; the image layout the chart assumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from safehold.deploy.gramine import check_manifest, gsc_artefacts, trusted_paths
from safehold.deploy.workloads import CONFIG_DIR, WORKLOADS, get, image_layout
from safehold.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PIN = "a" * 64


@pytest.fixture(scope="module")
def records_artefacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    cfg = d / "records.toml"
    cfg.write_text(f'host = "0.0.0.0"\nscone_auth = "token"\nbroker_ca_sha256 = "{PIN}"\n', "utf-8")
    return gsc_artefacts(get("records"), config_file=str(cfg), executable=sys.executable), cfg


@pytest.mark.slow  # measures the closure of this environment (a few seconds)
def test_trusted_files_are_the_measured_closure(records_artefacts) -> None:
    """One source of truth: the manifest lists exactly the files `safehold measure` hashes (the
    closure of the same launch), in its order; the config file at its in-container path."""
    art, cfg = records_artefacts
    spec = get("records").launch_spec(sys.executable, gramine=True)
    again = spec.closure([str(cfg)])
    assert again.hex() == art.closure.hex()
    want = [f"{CONFIG_DIR}/records.toml" if f.name == "config/records.toml" else f.path for f in again.files]
    assert list(trusted_paths(art.manifest)) == want
    assert len(want) == len(set(want)) > 1000


@pytest.mark.slow  # measures the closure of this environment (a few seconds)
def test_manifest_is_valid_gramine_19(records_artefacts) -> None:
    art, _ = records_artefacts
    doc = tomllib.loads(art.manifest)
    assert check_manifest(doc, gsc=True) == []
    assert doc["sgx"]["remote_attestation"] == "dcap" and doc["sgx"]["debug"] is False
    assert doc["sgx"]["max_threads"] == WORKLOADS["records"].max_threads >= 4
    env = doc["loader"]["env"]
    assert env["LC_ALL"] == "C.UTF-8" and env["SAFEHOLD_RECORDS_STORE_URL"] == {"passthrough": True}
    assert "PATH" not in env and "LD_LIBRARY_PATH" not in env  # GSC sets them (signed)
    assert set(env) | {"PATH", "LD_LIBRARY_PATH"} == set(get("records").gramine_passthrough) | {
        "LC_ALL",
        "TZ",
    }
    assert doc["sgx"]["allowed_files"] == ["file:/etc/safehold/broker-ca/ca.pem"]
    assert {m["path"] for m in doc["fs"]["mounts"]} == {"/tmp", "/var/lib/safehold/tee"}
    assert all(m["type"] == "tmpfs" for m in doc["fs"]["mounts"])


@pytest.mark.slow  # measures the closure of this environment (a few seconds)
def test_dockerfile_entrypoint_is_the_launch(records_artefacts) -> None:
    art, _ = records_artefacts
    line = next(ln for ln in art.dockerfile.splitlines() if ln.startswith("ENTRYPOINT "))
    argv = json.loads(line[len("ENTRYPOINT ") :])
    w = get("records")
    assert argv == w.launch_spec(sys.executable, gramine=True).argv(*w.args)
    assert argv[-2:] == ["--config", f"{CONFIG_DIR}/records.toml"]


@pytest.mark.slow  # measures the closure of this environment (a few seconds)
def test_generated_dockerfile_passes_hadolint(records_artefacts, tmp_path) -> None:
    art, _ = records_artefacts
    f = tmp_path / "records.Dockerfile"
    f.write_text(art.dockerfile, "utf-8")
    r = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(f)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow  # measures the closure of this environment (a few seconds)
def test_broker_gets_an_encrypted_state_mount(tmp_path) -> None:
    art = gsc_artefacts(get("broker"), executable=sys.executable)
    doc = tomllib.loads(art.manifest)
    enc = [m for m in doc["fs"]["mounts"] if m["type"] == "encrypted"]
    assert enc == [
        {
            "type": "encrypted",
            "path": "/var/lib/safehold/broker",
            "uri": "file:/var/lib/safehold/broker",
            "key_name": "_sgx_mrenclave",
        }
    ]
    assert "allowed_files" not in doc["sgx"]
    assert doc["loader"]["env"]["SAFEHOLD_BROKER_STORE_URL"] == {"passthrough": True}


def test_config_file_rules(tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs its measured config"):
        gsc_artefacts(get("anchor"), executable=sys.executable)
    wrong = tmp_path / "member.toml"
    wrong.write_text("", "utf-8")
    with pytest.raises(ConfigError, match="must be named anchor.toml"):
        gsc_artefacts(get("anchor"), config_file=str(wrong), executable=sys.executable)
    with pytest.raises(ConfigError, match="takes no config"):
        gsc_artefacts(get("broker"), config_file=str(wrong), executable=sys.executable)


GOOD = {
    "loader": {"log_level": "error", "env": {"A": "1", "B": {"passthrough": True}, "C": {"value": "x"}}},
    "fs": {"mounts": [{"type": "tmpfs", "path": "/tmp"}]},
    "sgx": {
        "remote_attestation": "dcap",
        "debug": False,
        "max_threads": 8,
        "enclave_size": "1G",
        "trusted_files": ["file:/usr/bin/python3.11", {"uri": "file:/x", "sha256": "00"}],
    },
}


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"sgx": {"thread_num": 8}}, "renamed sgx.max_threads"),
        ({"loader": {"entrypoint": "file:libsysdb.so"}}, "string form was removed"),
        ({"sgx": {"remote_attestation": True}}, 'only "none" or "dcap"'),
        ({"sgx": {"remote_attestation": "epid"}}, 'only "none" or "dcap"'),
        ({"loader": {"env": {"LD_PRELOAD": {"passthrough": False}}}}, "deny-lists"),
        ({"sgx": {"debug": True}}, "sgx.debug must be false"),
        ({"loader": {"insecure__use_host_env": True}}, "insecure options"),
        ({"sgx": {"enclave_size": "1 GB"}}, "is not a size"),
        ({"fs": {"mounts": [{"type": "overlay", "path": "/x"}]}}, "unknown type"),
        ({"sgx": {"trusted_files": ["/usr/bin/python3.11"]}}, "not a file: URI"),
        ({"sgx": {"max_threads": 2}}, "at least 4"),
        ({"loader": {"argv": ["python"]}}, "set by GSC"),
        ({"nonsense": {}}, "unknown table"),
    ],
)
def test_check_manifest_refuses(patch: dict, fragment: str) -> None:
    doc = json.loads(json.dumps(GOOD))
    for top, sub in patch.items():
        doc.setdefault(top, {}).update(sub)
    assert check_manifest(GOOD, gsc=True) == []
    problems = check_manifest(doc, gsc=True)
    assert any(fragment in p for p in problems), problems


DEBIAN_PYTHON = "/usr/bin/python3.11"


@pytest.mark.skipif(
    not os.path.exists(DEBIAN_PYTHON), reason="needs Debian's python3.11 (the image's interpreter)"
)
def test_image_layout_is_debians_python_with_a_venv(tmp_path) -> None:
    """The layout the chart's commands assume is what Debian 12's python3.11 with a venv
    reports (the image build re-checks it in the image with `safehold deploy check-image`)."""
    venv = tmp_path / "opt" / "safehold"
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    code = (
        "import json, sys; from safehold.attestation.closure import interpreter_layout as f; "
        "l = f(sys.argv[1]); print(json.dumps([l.executable, l.real_executable, list(l.stdlib_path), "
        "list(l.site_packages), [list(a) for a in l.anchors]]))"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", code, str(venv / "bin" / "python")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    if r.returncode != 0 and "-I" in r.stderr:
        pytest.fail(r.stderr)
    if r.returncode != 0:  # -I ignores PYTHONPATH: run without isolation, same layout
        r = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code, str(venv / "bin" / "python")],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT / "src")},
            check=True,
        )
    got = json.loads(r.stdout)
    want = image_layout(str(venv))
    assert got == [
        want.executable,
        want.real_executable,
        list(want.stdlib_path),
        list(want.site_packages),
        [list(a) for a in want.anchors],
    ]
