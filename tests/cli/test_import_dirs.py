"""`safehold patients import DIR` with nothing importable directly in DIR is a usage error.

It used to print "imported 0, skipped 0, failed 0" with exit status 0 for `../shared/data/`,
whose data sits one level down, while `safehold demo` imports the same tree.
"""

from __future__ import annotations

from click.testing import CliRunner

from safehold.cli.main import cli


def test_a_directory_with_nothing_to_import_is_refused_before_connecting(tmp_path):
    sub = tmp_path / "synthea"
    sub.mkdir()
    (sub / "patients.csv").write_text("Id\np1\n", encoding="utf-8")
    (tmp_path / "conditions.csv").write_text("a\n", encoding="utf-8")  # not patients.csv
    r = CliRunner().invoke(cli, ["patients", "import", "--data-dir", str(tmp_path / "none"),
                                 str(tmp_path)])
    assert r.exit_code == 2
    assert "no file to import directly in this directory" in r.output
    assert "subdirectories are not searched" in r.output
    # the subdirectory itself passes the check and reaches the connection step
    r = CliRunner().invoke(cli, ["patients", "import", "--data-dir", str(tmp_path / "none"), str(sub)])
    assert r.exit_code == 1
    assert "no records service known" in r.output
