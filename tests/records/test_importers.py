"""Importers: the real Synthea CSV / FHIR bundles / HL7 examples, and bad input."""

from __future__ import annotations

import csv
import json

import pytest

from safehold.errors import RecordError
from safehold.records.errors import ImportFormatError, InvalidRecordError
from safehold.records.importers import ImportItem, ImportProblem, iter_bytes, iter_file
from safehold.records.model import (
    check_record_id,
    decode_for_match,
    decode_stored,
    encode_record,
    normalise,
    parse_record,
    search_terms,
)
from tests.support.shared import DATA, need_shared

CSV = DATA / "synthea-csv-27-ohdsi-dbt-synthea" / "patients.csv"
BUNDLES = DATA / "synthea-fhir-r4-bundles-google-fhir-data-pipes"
HL7 = DATA / "hl7-fhir-r4-patient-examples"


def items(it):
    return [x for x in it if isinstance(x, ImportItem)]


def test_synthea_csv_rows_are_flat_records_keyed_by_id():
    path = need_shared(CSV)
    got = items(iter_file(path))
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(got) == len(rows) == 27
    for item, row in zip(got, rows, strict=True):
        assert item.id == row["Id"]
        assert item.record == row  # every column, exactly as in the file
    terms = search_terms(got[0].record)
    assert ("family", normalise(rows[0]["LAST"])) in terms
    assert ("identifier", rows[0]["SSN"]) in terms
    assert ("gender", "male" if rows[0]["GENDER"] == "M" else "female") in terms


def test_fhir_bundles_give_one_patient_each_and_skip_other_resources():
    need_shared(BUNDLES)
    files = sorted(BUNDLES.glob("*.json"))
    assert len(files) == 20
    for f in files:
        out = list(iter_file(f))
        pats = items(out)
        assert len(pats) == 1, f
        bundle = json.loads(f.read_bytes())
        expected = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        assert pats[0].record == expected[0]
        assert pats[0].id in f.name
        assert all(p.skipped for p in out if isinstance(p, ImportProblem))
        assert len(out) == len(bundle["entry"])
        fields = {k for k, _ in search_terms(pats[0].record)}
        assert fields == {"family", "given", "birthDate", "gender", "identifier"}


def test_hl7_examples_incl_edge_cases_all_import():
    need_shared(HL7)
    files = sorted(HL7.glob("Patient-*.json"))
    assert len(files) == 22
    for f in files:
        (item,) = list(iter_file(f))
        assert isinstance(item, ImportItem), f
        assert item.record == json.loads(f.read_bytes())
    # non-Latin script, missing names: search extraction does not fail
    for f in files:
        search_terms(json.loads(f.read_bytes()))
    # the package.json next to them is not FHIR
    with pytest.raises(ImportFormatError, match="resourceType"):
        list(iter_file(HL7 / "package.json"))


def test_ndjson_and_bundle_without_ids():
    pat = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Ünal", "given": ["Ada"]}]}
    obs = {"resourceType": "Observation", "id": "o1"}
    nd = "\n".join([json.dumps(pat), json.dumps(obs), "{not json", json.dumps({**pat, "id": "p 2"}), ""])
    out = list(iter_bytes(nd.encode(), name="x.ndjson"))
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["ImportItem", "ImportProblem", "ImportProblem", "ImportProblem"]
    assert out[1].skipped and not out[2].skipped and not out[3].skipped
    assert ("family", "ünal") in search_terms(out[0].record)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b7e5a8e-1111-2222-3333-444455556666", "resource": {"resourceType": "Patient"}},
        {"resource": {"resourceType": "Patient"}},
        {"request": {"method": "DELETE"}},
    ]}
    out = list(iter_bytes(json.dumps(bundle).encode()))
    assert out[0].id == "0b7e5a8e-1111-2222-3333-444455556666"
    assert isinstance(out[1], ImportProblem) and "no id" in out[1].reason
    assert isinstance(out[2], ImportProblem) and not out[2].skipped


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
        (b"[1,2]", "array"),
        (b'{"resourceType": "Observation"}', "neither Bundle nor Patient"),
        (b'{"a": 1}', "without resourceType"),
        (b'{"resourceType": "Bundle", "entry": 3}', "not an array"),
        (b'{"resourceType": "Bundle", "entry": [', "neither JSON nor NDJSON"),
        (b"Name,Birth\nx,y\n", "no 'Id' column"),
        (b"Id,Id\n1,2\n", "repeats"),
        (b"[" * 100000, "array"),
    ],
)
def test_unreadable_files_raise_clear_errors(data, match):
    with pytest.raises(ImportFormatError, match=match):
        list(iter_bytes(data))


def test_truncated_and_garbled_csv_rows_fail_alone():
    need_shared(CSV)
    lines = CSV.read_bytes().splitlines(keepends=True)
    truncated = b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2]
    out = list(iter_bytes(truncated, name="t.csv"))
    assert len(items(out)) == 4
    assert isinstance(out[-1], ImportProblem) and "cells" in out[-1].reason
    garbled = lines[0] + b"not/a valid id!," + b",".join([b"x"] * 24) + b"\n" + lines[1]
    out = list(iter_bytes(garbled, name="g.csv"))
    assert isinstance(out[0], ImportProblem) and "record id" in out[0].reason
    assert isinstance(out[1], ImportItem)


def test_missing_file():
    with pytest.raises(ImportFormatError, match="cannot read"):
        list(iter_file("/nonexistent/patients.csv"))


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é", "a/b", "../x"])
def test_record_id_rules(bad):
    with pytest.raises(InvalidRecordError):
        check_record_id(bad)


@pytest.mark.parametrize(("bad", "what"), [
    ("bad id!", "got a space at position 4"),
    ("nul\x00x", r"got a control or invisible character \(U\+0000\) at position 4"),
    ("Müller", r"got a non-ASCII character \(U\+00FC\) at position 2"),
    ("a/b", "got '/' at position 2"),
    ("x" * 129, r"must be 1\.\.128 characters long \(got 129\)"),
    ("", r"must be 1\.\.128 characters long \(got 0\)"),
])
def test_record_id_errors_name_the_character_class_not_the_id(bad, what):
    with pytest.raises(InvalidRecordError, match=what) as e:
        check_record_id(bad)
    if len(bad) > 1:
        assert bad not in str(e.value)  # never the id itself (it may be built from a name)


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(const):
    """RFC 8259 §6: Python's json would accept these; the importers refuse them."""
    single = f'{{"resourceType": "Patient", "id": "n1", "x": {const}}}'.encode()
    with pytest.raises(ImportFormatError, match=f"{const} found: .*RFC 8259"):
        list(iter_bytes(single, name="p.json"))
    nd = (b'{"resourceType": "Patient", "id": "ok1"}\n'
          + f'{{"resourceType": "Patient", "id": "n2", "x": [1, {const}]}}\n'.encode())
    out = list(iter_bytes(nd, name="f.ndjson"))
    assert [x.id for x in items(out)] == ["ok1"]
    assert isinstance(out[1], ImportProblem) and not out[1].skipped and "RFC 8259" in out[1].reason
    with pytest.raises(InvalidRecordError, match="non-finite number"):
        parse_record("n3", {"x": float(const.replace("Infinity", "inf"))})


def test_scone_record_terms():
    rec = {"fname": "Jane", "lname": "DOE ", "dob": "1990-01-01", "ssn": "999-11-2222"}
    assert search_terms(rec) == {
        ("given", "jane"), ("family", "doe"), ("birthDate", "1990-01-01"), ("identifier", "999-11-2222")
    }


def test_search_terms_limited_to_fields_is_the_subset_of_all_terms():
    rec = {"resourceType": "Patient", "name": [{"family": "Ünal", "given": ["Ayşe", "B."]}],
           "birthDate": "1980-02-03", "gender": "female",
           "identifier": [{"system": "urn:oid:1.2.276.0.76.4.8", "value": "X110411675"}]}
    everything = search_terms(rec)
    for fields in ({"family"}, {"given", "identifier"}, {"gender"}, set()):
        assert search_terms(rec, fields) == {t for t in everything if t[0] in fields}


def test_decode_stored_is_exact_and_decode_for_match_agrees_on_text():
    recs = ({"resourceType": "Patient", "n": 1.5, "s": "Ünal \u2028", "seed": "seed: 3614890485086238546"},
            {"id": "big", "value": 2**80 + 1, "neg": -(2**70) - 3, "u64": 2**64 - 1},
            {"id": "in-arrays", "a": [12345678901234567890123, [-98765432109876543210987]]})
    for rec in recs:
        got = decode_stored(encode_record(rec))
        assert got == rec and all(type(got[k]) is type(v) for k, v in rec.items())
        fast = decode_for_match(encode_record(rec))
        assert {k: v for k, v in fast.items() if isinstance(v, str)} == {
            k: v for k, v in rec.items() if isinstance(v, str)}
    for decode in (decode_stored, decode_for_match):
        with pytest.raises(RecordError, match="not JSON"):
            decode(b'{"id": ')
        with pytest.raises(RecordError, match="not JSON"):
            decode(b'\xff\xfe{}')
        with pytest.raises(RecordError, match="not a JSON object"):
            decode(b"[1, 2]")
