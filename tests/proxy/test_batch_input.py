"""``safehold tokenize`` / ``detokenize`` input handling (``safehold.proxy.batch``) on real files:
every protected value is protected or the whole file is refused with a message naming the
line, and nothing is written on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import ConfigError, TransformError
from safehold.proxy.batch import run_batch
from safehold.proxy.core import Protector
from safehold.proxy.schema import Schema

SCHEMA = {
    "fields": {
        "name": {"transform": "token", "kind": "name"},
        "address.city": {"transform": "token", "kind": "name"},
        "ssn": {"transform": "fpe", "alphabet": "digits"},
    }
}


@pytest.fixture(scope="module")
def protector() -> Protector:
    return Protector(Schema.from_dict(SCHEMA), Keyset.generate())


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def test_csv_column_spelling_a_dotted_field_is_protected(protector, tmp_path):
    # a CSV export names nested fields by their dotted path: that column is the field
    src = write(tmp_path, "in.csv", "id,name,address.city\n1,Maximilian,Berlinerstadt\n")
    dst = tmp_path / "out.csv"
    assert run_batch(protector, src, dst, reveal=False, fmt="csv") == 1
    out = dst.read_text("utf-8")
    assert "Berlinerstadt" not in out and "Maximilian" not in out
    back = tmp_path / "back.csv"
    run_batch(protector, dst, back, reveal=True, fmt="csv")
    assert back.read_text("utf-8") == "id,name,address.city\n1,Maximilian,Berlinerstadt\n"


def test_csv_text_where_a_nested_field_expects_an_object_is_refused(protector, tmp_path):
    # a column "address" holding text where the schema has address.city: refused, not passed on
    src = write(tmp_path, "in.csv", "id,address\n1,Berlinerstadt Hauptstrasse 1\n2,\n")
    dst = tmp_path / "out.csv"
    with pytest.raises(TransformError, match=r"CSV row 1 \(line 2\): field 'address.city': found a string"):
        run_batch(protector, src, dst, reveal=False, fmt="csv")
    assert not dst.exists() and os.listdir(tmp_path) == ["in.csv"]


def test_csv_unclosed_quote_names_the_line_and_the_rows_it_swallowed(protector, tmp_path):
    # the quote opened on line 3 is never closed: lines 4..5 run into that one field. Before,
    # this said "CSV row 2 is malformed: Error" and did not say that three rows were lost
    src = write(tmp_path, "in.csv", 'id,ssn\n1,123456789\n2,"234567890\n3,345678901\n4,456789012\n')
    with pytest.raises(ConfigError) as ei:
        run_batch(protector, src, tmp_path / "out.csv", reveal=False, fmt="csv")
    msg = str(ei.value)
    assert msg.startswith("CSV line 3: a quoted field is never closed") and "lines 4..5" in msg, msg
    assert "nothing was written" in msg and "345678901" not in msg
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]


def test_csv_field_over_the_csv_module_size_limit_says_so(protector, tmp_path):
    import csv

    limit = csv.field_size_limit()
    src = write(tmp_path, "in.csv", "id,ssn\n1,123456789\n2," + "7" * (limit + 1) + "\n")
    want = rf"CSV line 3: a field is longer than the CSV reader's limit of {limit}"
    with pytest.raises(ConfigError, match=want):
        run_batch(protector, src, tmp_path / "out.csv", reveal=False, fmt="csv")
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]


def test_csv_stray_quote_names_the_line(protector, tmp_path):
    src = write(tmp_path, "in.csv", 'id,ssn\n1,123456789\n2,"234567890"x\n')
    with pytest.raises(ConfigError, match="CSV line 3 is malformed: ',' expected after '\"'"):
        run_batch(protector, src, tmp_path / "out.csv", reveal=False, fmt="csv")


def test_ndjson_lone_surrogate_is_refused_naming_the_line(protector, tmp_path):
    # "\ud800" decodes to a lone surrogate: not Unicode text, cannot be written as UTF-8
    src = write(tmp_path, "in.ndjson", '{"ssn": "123456789"}\n{"name": "Er\\ud800ika"}\n')
    with pytest.raises(ConfigError, match="NDJSON line 2 holds a lone UTF-16 surrogate escape"):
        run_batch(protector, src, tmp_path / "out.ndjson", reveal=False, fmt="ndjson")
    assert sorted(os.listdir(tmp_path)) == ["in.ndjson"]
