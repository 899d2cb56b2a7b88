"""`safehold patients audit seal SEGMENT` takes --through from the file it seals.

--through was required and had to repeat the export's; a different number reached the service,
which answered 409 audit-chain-broken "segment 0..9 has SHA-256 …, not the one given (export it
again)" for a file that was fine. Now the file's last entry is the default and a --through that
differs from it is a usage error before anything is sent.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from safehold.cli.main import cli
from safehold.cli.patients import _segment_last_seq


def _segment(tmp_path, first: int, last: int):
    seg = tmp_path / "seg.ndjson"
    seg.write_text("".join(json.dumps({"seq": n, "op": "get"}) + "\n" for n in range(first, last + 1)))
    return seg


def test_a_through_other_than_the_files_is_refused_before_connecting(tmp_path):
    seg = _segment(tmp_path, 0, 10)
    r = CliRunner().invoke(cli, ["patients", "audit", "seal", "--through", "9",
                                 "--data-dir", str(tmp_path / "none"), str(seg)])
    assert r.exit_code == 2
    assert "ends at entry 10, not --through 9" in r.output


def test_without_through_the_files_last_entry_is_taken(tmp_path):
    seg = _segment(tmp_path, 0, 10)
    for extra in ([], ["--through", "10"]):
        r = CliRunner().invoke(cli, ["patients", "audit", "seal", *extra,
                                     "--data-dir", str(tmp_path / "none"), str(seg)])
        assert r.exit_code == 1  # past the argument checks: no stack to send it to
        assert "no records service known" in r.output


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    for body in (b"", b"not json\n", b"[1]\n", b'{"seq": "3"}\n', b'{"seq": true}\n', b"\xff\n"):
        f = tmp_path / "x.ndjson"
        f.write_bytes(body)
        assert _segment_last_seq(body) is None
        r = CliRunner().invoke(cli, ["patients", "audit", "seal", "--data-dir",
                                     str(tmp_path / "none"), str(f)])
        assert r.exit_code == 2 and "not an audit export" in r.output, (body, r.output)
