"""``safehold tokenize`` / ``detokenize`` input handling (``safehold.proxy.batch``) on real files:
every protected value is protected or the whole file is refused with a message naming the
line, and nothing is written on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safehold.crypto.keyset import Keyset
from safehold.errors import TransformError
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
    with pytest.raises(TransformError, match=r"CSV row 1.*: field 'address.city': found a string"):
        run_batch(protector, src, dst, reveal=False, fmt="csv")
    assert not dst.exists() and os.listdir(tmp_path) == ["in.csv"]
