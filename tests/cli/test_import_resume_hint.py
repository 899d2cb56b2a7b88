"""`safehold patients import --restart …` that stops part-way must not tell the user to run "the
same command again to resume": --restart again forgets the checkpoint and starts over."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from safehold.cli import patients as cli_patients
from safehold.cli.main import cli
from safehold.errors import SafeholdError


@pytest.mark.parametrize(("restart", "hint"), [
    ((), "run the same command again to resume"),
    (("--restart",), "run the same command again without --restart to resume"),
])
def test_the_resume_hint_drops_restart(monkeypatch, tmp_path, restart, hint):
    def fail_part_way(conn, paths, ckpt, restart_, counts, failures, on_conflict="fail"):
        counts.acknowledged = 7
        raise SafeholdError("cannot reach the records service at https://x: connection refused")

    monkeypatch.setattr(cli_patients, "load_connection", lambda *a: None)
    monkeypatch.setattr(cli_patients, "_run_import", fail_part_way)
    f = tmp_path / "p.json"
    f.write_text('{"resourceType": "Patient", "id": "x"}')
    r = CliRunner().invoke(cli, ["patients", "import", *restart, str(f), "--data-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert f"7 records checkpointed; {hint}" in r.output
