"""The Synthea CSV importer accounts for every row: a quote that is never closed, a field over the
csv module's size limit and other malformed rows each name their line, and no row disappears
from the counts (real Synthea rows from the shared data)."""

from __future__ import annotations

import csv

import pytest

from safehold.records.errors import ImportFormatError
from safehold.records.importers import ImportItem, ImportProblem, iter_bytes
from tests.support.shared import shared_path


def synthea_lines() -> list[str]:
    """The real 27-patient Synthea patients.csv, as lines (header first)."""
    path = shared_path("data", "synthea-csv-27-ohdsi-dbt-synthea", "patients.csv")
    return path.read_text("utf-8").splitlines(keepends=True)


def split(out):
    out = list(out)
    return ([x for x in out if isinstance(x, ImportItem)], [x for x in out if isinstance(x, ImportProblem)])


def test_unclosed_quote_counts_every_swallowed_row_and_names_each_line():
    text = 'Id,FIRST,LAST\n1,Ada,Lovelace\n2,"Grace,Hopper\n3,Alan,Turing\n4,Edsger,Dijkstra\n'
    items, problems = split(iter_bytes(text.encode(), name="p.csv"))
    assert [i.id for i in items] == ["1"]
    # before: one problem ("row has 2 cells") for three lost rows, and no line named but the first
    assert [p.source for p in problems] == ["p.csv:3", "p.csv:4", "p.csv:5"]
    assert problems[0].reason.startswith("CSV line 3: a quoted field is never closed")
    assert "lines 4..5 were read into it" in problems[0].reason
    for p in problems[1:]:
        assert p.reason.startswith("not imported: this line was read into the field that starts on line 3")
    assert not any(p.skipped for p in problems)
    for name in ("Grace", "Hopper", "Alan", "Turing", "Dijkstra"):  # no cell content in a reason
        assert not any(name in p.reason for p in problems)


def test_unclosed_quote_in_real_synthea_rows_loses_no_row_from_the_count():
    lines = synthea_lines()
    header = next(csv.reader([lines[0]]))
    first = header.index("FIRST")
    row10 = next(csv.reader([lines[10]]))
    row10[first] = '"' + row10[first]  # the quote opens, nothing closes it
    lines[10] = ",".join(row10) + "\n"
    items, problems = split(iter_bytes("".join(lines).encode(), name="patients.csv"))
    assert len(items) + len(problems) == 27  # every patient row is imported or reported
    assert len(items) == 9 and [p.source for p in problems] == [f"patients.csv:{n}" for n in range(11, 29)]
    assert all(i.source == f"patients.csv:{n}" for i, n in zip(items, range(2, 11), strict=True))


def test_field_over_the_csv_size_limit_says_so_and_the_next_rows_import():
    limit = csv.field_size_limit()
    text = "Id,NOTE\n1,a\n2," + "x" * (limit + 1) + "\n3,c\n"
    items, problems = split(iter_bytes(text.encode(), name="big.csv"))
    assert [i.id for i in items] == ["1", "3"]
    assert [p.source for p in problems] == ["big.csv:3"]
    # before: "CSV syntax error: field larger than field limit (131072)", and row 3 was lost
    assert problems[0].reason.startswith(
        f"CSV line 3: a field is longer than the CSV reader's limit of {limit} characters")


def test_other_malformed_row_names_its_line_and_reading_goes_on():
    text = 'Id,FIRST\n1,a\n2,"b"c\n3,d\n'
    items, problems = split(iter_bytes(text.encode(), name="m.csv"))
    assert [i.id for i in items] == ["1", "3"]
    assert [p.source for p in problems] == ["m.csv:3"]
    assert problems[0].reason.startswith("CSV line 3 is malformed:")


def test_a_row_with_a_quoted_line_break_is_named_by_its_first_line():
    text = 'Id,ADDRESS\n1,"Main St 1\nApt 2"\n2,Elm St\n'
    items, problems = split(iter_bytes(text.encode(), name="q.csv"))
    assert not problems
    assert [(i.id, i.source) for i in items] == [("1", "q.csv:2"), ("2", "q.csv:4")]
    assert items[0].record["ADDRESS"] == "Main St 1\nApt 2"


def test_unclosed_quote_in_the_header_is_a_file_error():
    with pytest.raises(ImportFormatError, match="CSV line 1: a quoted field is never closed"):
        list(iter_bytes(b'Id,"FIRST\n1,a\n', name="h.csv"))
