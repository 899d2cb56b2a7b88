"""``safehold tokenize`` / ``detokenize`` / ``proxy-keyset`` as real CLI processes on real Synthea data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.shared import DATA, need_shared

pytestmark = pytest.mark.slow  # runs the CLI as child processes

SCHEMA = """
[fields.Id]
transform = "deterministic"
[fields.BIRTHDATE]
transform = "date-shift"
context = "Id"
[fields.DEATHDATE]
transform = "date-shift"
context = "Id"
[fields.SSN]
transform = "fpe"
alphabet = "digits"
[fields.DRIVERS]
transform = "fpe"
alphabet = "alnum"
[fields.FIRST]
transform = "token"
kind = "alnum"
[fields.LAST]
transform = "token"
kind = "alnum"
[fields.ADDRESS]
transform = "randomized"
[fields.LAT]
transform = "randomized"
[fields.LON]
transform = "randomized"
"""
PROTECTED = ["Id", "SSN", "FIRST", "LAST", "ADDRESS", "LAT", "LON"]


def _run(args, env, check=True):
    r = subprocess.run([sys.executable, "-m", "safehold.cli.main", *args], env=env, capture_output=True,
                       timeout=120, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def work(tmp_path):
    env = dict(os.environ, SAFEHOLD_PROXY_KEK=os.urandom(32).hex())
    (tmp_path / "schema.toml").write_text(SCHEMA)
    _run(["proxy-keyset", "new", str(tmp_path / "ks.bin")], env)
    return tmp_path, env


def test_csv_round_trip_on_synthea_patients(work):
    tmp, env = work
    src = need_shared(DATA / "synthea-csv-27-ohdsi-dbt-synthea" / "patients.csv")
    common = ["--schema", str(tmp / "schema.toml"), "--keyset", str(tmp / "ks.bin")]
    _run(["tokenize", *common, str(src), str(tmp / "tok.csv")], env)
    _run(["detokenize", *common, str(tmp / "tok.csv"), str(tmp / "back.csv")], env)
    assert (tmp / "back.csv").read_bytes() == src.read_bytes()
    orig = list(csv.DictReader(src.open(newline="")))
    tok = list(csv.DictReader((tmp / "tok.csv").open(newline="")))
    assert len(tok) == len(orig) > 20
    for o, t in zip(orig, tok, strict=True):
        for col in PROTECTED:
            if o[col]:
                assert t[col] != o[col], col
        assert len(t["SSN"]) == len(o["SSN"]) and t["SSN"][3] == "-" and t["SSN"][6] == "-"
        assert t["GENDER"] == o["GENDER"] and t["_safehold_kid"].isdigit()
        assert len(t["BIRTHDATE"]) == 10 and t["BIRTHDATE"] != o["BIRTHDATE"]
    text = (tmp / "tok.csv").read_text()
    for o in orig:
        assert o["Id"] not in text and o["SSN"] not in text and o["ADDRESS"] not in text


def test_ndjson_round_trip_and_rotation(work):
    tmp, env = work
    recs = [{"Id": f"p{i}", "SSN": f"999-{i:02d}-{1000 + i}", "FIRST": "Jürgen", "LAST": f"Müller{i}",
             "BIRTHDATE": "2000-02-29", "LAT": 42.5 + i} for i in range(50)]
    (tmp / "in.ndjson").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    common = ["--schema", str(tmp / "schema.toml"), "--keyset", str(tmp / "ks.bin")]
    _run(["tokenize", *common, str(tmp / "in.ndjson"), str(tmp / "old.ndjson")], env)
    _run(["proxy-keyset", "rotate", str(tmp / "ks.bin")], env)
    _run(["tokenize", *common, str(tmp / "in.ndjson"), str(tmp / "new.ndjson")], env)
    old = [json.loads(x) for x in (tmp / "old.ndjson").read_text().splitlines()]
    new = [json.loads(x) for x in (tmp / "new.ndjson").read_text().splitlines()]
    assert old[0]["_safehold_kid"] != new[0]["_safehold_kid"]
    for name in ("old", "new"):
        _run(["detokenize", *common, str(tmp / f"{name}.ndjson"), str(tmp / f"{name}.back.ndjson")], env)
        back = [json.loads(x) for x in (tmp / f"{name}.back.ndjson").read_text().splitlines()]
        assert back == recs


def test_failures_leave_no_output(work):
    tmp, env = work
    common = ["--schema", str(tmp / "schema.toml"), "--keyset", str(tmp / "ks.bin")]
    good = [{"Id": f"p{i}", "SSN": "999-17-5017"} for i in range(300)]
    bad = [*good, {"Id": "p-bad", "SSN": "12"}]  # too short for FF1's minimum domain
    (tmp / "bad.ndjson").write_text("\n".join(json.dumps(r) for r in bad))
    r = _run(["tokenize", *common, str(tmp / "bad.ndjson"), str(tmp / "out.ndjson")], env, check=False)
    assert r.returncode == 1 and "line 301" in r.stderr and "'SSN'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp / "out.ndjson").exists() and not list(tmp.glob(".out.ndjson*"))
    (tmp / "garbled.ndjson").write_text('{"Id": "p1"}\n{"Id": \n')
    r = _run(["tokenize", *common, str(tmp / "garbled.ndjson"), str(tmp / "out.ndjson")], env, check=False)
    assert r.returncode == 1 and "line 2 is not JSON" in r.stderr
    assert not (tmp / "out.ndjson").exists()
    # tokenizing twice is refused; detokenizing a plaintext file fails on the first record
    (tmp / "in.ndjson").write_text("\n".join(json.dumps(r) for r in good))
    _run(["tokenize", *common, str(tmp / "in.ndjson"), str(tmp / "tok.ndjson")], env)
    r = _run(["tokenize", *common, str(tmp / "tok.ndjson"), str(tmp / "tok2.ndjson")], env, check=False)
    assert r.returncode == 1 and "twice" in r.stderr
    r = _run(["detokenize", *common, str(tmp / "in.ndjson"), str(tmp / "x.ndjson")], env, check=False)
    assert r.returncode == 1 and "'Id'" in r.stderr
    # wrong KEK, missing KEK, unknown format, keyset overwrite
    r = _run(["detokenize", *common, str(tmp / "tok.ndjson"), str(tmp / "x.ndjson")],
             dict(env, SAFEHOLD_PROXY_KEK=os.urandom(32).hex()), check=False)
    assert r.returncode == 1 and "error:" in r.stderr
    r = _run(["detokenize", *common, str(tmp / "tok.ndjson"), str(tmp / "x.ndjson")],
             dict(env, SAFEHOLD_PROXY_KEK="abc"), check=False)
    assert r.returncode == 1 and "SAFEHOLD_PROXY_KEK" in r.stderr
    r = _run(["tokenize", *common, str(tmp / "in.ndjson"), str(tmp / "x.txt")], env, check=False)
    (tmp / "in.txt").write_text("x")
    r = _run(["tokenize", *common, str(tmp / "in.txt"), str(tmp / "x.ndjson")], env, check=False)
    assert r.returncode == 1 and "--format" in r.stderr
    r = _run(["proxy-keyset", "new", str(tmp / "ks.bin")], env, check=False)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr
    assert not (tmp / "x.ndjson").exists()


def test_csv_tampered_cell_fails_closed(work):
    tmp, env = work
    common = ["--schema", str(tmp / "schema.toml"), "--keyset", str(tmp / "ks.bin")]
    (tmp / "in.csv").write_text("Id,ADDRESS,GENDER\np1,1 Main St,F\np2,2 Side St,M\n")
    _run(["tokenize", *common, str(tmp / "in.csv"), str(tmp / "tok.csv")], env)
    rows = list(csv.reader((tmp / "tok.csv").open(newline="")))
    rows[2][1] = rows[2][1][:-2] + ("AA" if rows[2][1][-2:] != "AA" else "BB")
    with (tmp / "tok.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    r = _run(["detokenize", *common, str(tmp / "tok.csv"), str(tmp / "back.csv")], env, check=False)
    assert r.returncode == 1 and "row 2" in r.stderr and "'ADDRESS'" in r.stderr
    assert not Path(tmp / "back.csv").exists()
