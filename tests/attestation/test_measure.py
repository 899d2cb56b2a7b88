"""Workload measurement: canonical, reproducible, sensitive to every byte; policy refuses a
changed workload. Uses a copy of the real package tree (never modifies the installed files)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.attestation.errors import ReferenceValueMismatchError, SimulatedTEEWarning
from safehold.attestation.measure import MANIFEST_HEADER, measure_workload, package_root
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.workload import current_closure
from safehold.cli.main import cli
from safehold.errors import ConfigError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    dst = tmp_path / "a" / "safehold"
    shutil.copytree(package_root(), dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def test_reproducible_across_paths_and_caches(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "deep" / "safehold"
    shutil.copytree(tree, other)
    (other / "__pycache__").mkdir()
    (other / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00junk")
    (other / "stray.pyc").write_bytes(b"junk")
    a, b = measure_workload(root=tree), measure_workload(root=other)
    assert a.digest == b.digest and len(a.digest) == 48
    assert a.manifest == b.manifest


def test_canonical_form_is_documented_bytes(tree: Path) -> None:
    m = measure_workload(root=tree)
    text = m.canonical().decode()
    assert text.startswith(MANIFEST_HEADER + "\n")
    paths = [line.split("  ", 1)[1] for line in text.splitlines()[1:]]
    assert paths == sorted(paths, key=str.encode)
    assert "safehold/attestation/measure.py" in paths
    assert hashlib.sha384(m.canonical()).digest() == m.digest
    # each entry's hash is the file's SHA-256
    p, d = next(x for x in m.manifest if x[0] == "safehold/attestation/measure.py")
    assert hashlib.sha256((tree / "attestation/measure.py").read_bytes()).hexdigest() == d
    assert m.to_toml().count(m.hex()) == 1


def test_one_changed_byte_changes_measurement_and_policy_refuses(tree: Path, tmp_path: Path) -> None:
    before = measure_workload(root=tree)
    target = tree / "attestation" / "claims.py"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    after = measure_workload(root=tree)
    assert after.digest != before.digest
    changed = [p for (p, d), (_, d2) in zip(before.manifest, after.manifest, strict=True) if d != d2]
    assert changed == ["safehold/attestation/claims.py"]

    # the simulated TEE reports the closure of the running process, never the package-only
    # value: a package-only Reference Value is refused, naming expected vs got
    att = SimulatedAttester(tmp_path / "data")
    assert att.measurement.digest == current_closure().digest
    assert att.measurement.digest not in (before.digest, after.digest)
    policy = AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                             measurements=(after.digest,))
    rd = bytes(range(64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)
        with pytest.raises(ReferenceValueMismatchError) as ei:
            Verifier(policy).appraise(att.attest(rd), expected_report_data=rd)
        assert ei.value.failures == [("measurement", after.hex(), att.measurement.hex())]
        # and the process's own value is accepted
        ok = AppraisalPolicy(allow_simulated=True, simulated_root=att.root_ca_path,
                             measurements=(att.measurement.digest,))
        assert Verifier(ok).appraise(att.attest(rd), expected_report_data=rd).ok


def test_added_or_removed_file_changes_measurement(tree: Path) -> None:
    base = measure_workload(root=tree).digest
    (tree / "extra.txt").write_text("x")
    added = measure_workload(root=tree).digest
    (tree / "extra.txt").unlink()
    (tree / "py.typed").unlink()
    removed = measure_workload(root=tree).digest
    assert len({base, added, removed}) == 3


def test_config_files_are_measured(tree: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "records.toml"
    cfg.write_text("a = 1\n")
    m1 = measure_workload([cfg], root=tree)
    assert ("config/records.toml", hashlib.sha256(b"a = 1\n").hexdigest()) in m1.manifest
    cfg.write_text("a = 2\n")
    assert measure_workload([cfg], root=tree).digest != m1.digest
    # the same config content at another path gives the same value
    other = tmp_path / "sub"
    other.mkdir()
    (other / "records.toml").write_text("a = 1\n")
    assert measure_workload([other / "records.toml"], root=tree).digest == m1.digest


def test_bad_inputs(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        measure_workload(root=tmp_path / "missing")
    with pytest.raises(ConfigError, match="not found"):
        measure_workload([tmp_path / "nope.toml"], root=tree)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "c.toml").write_text("")
    (tmp_path / "y" / "c.toml").write_text("")
    with pytest.raises(ConfigError, match="two workload config files"):
        measure_workload([tmp_path / "x" / "c.toml", tmp_path / "y" / "c.toml"], root=tree)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no files"):
        measure_workload(root=empty)


def test_cli_measure_matches_library(tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["measure", "--root", str(tree)])
    assert res.exit_code == 0, res.output
    m = measure_workload(root=tree)
    assert res.output.splitlines()[0] == m.hex()
    assert "[reference_values]" in res.output
    res = runner.invoke(cli, ["measure", "--root", str(tree), "--format", "json"])
    doc = json.loads(res.output)
    assert doc["measurement"] == m.hex() and len(doc["files"]) == len(m.manifest)
    res = runner.invoke(cli, ["measure", "--root", str(tree), "--format", "manifest"])
    assert res.output.encode() == m.canonical()
    # the TOML snippet is a valid policy fragment
    res = runner.invoke(cli, ["measure", "--root", str(tree), "--format", "toml"])
    pol = AppraisalPolicy.from_toml('allowed_tee_types = ["sgx"]\n' + res.output)
    assert pol.measurements == (m.digest,)
