"""``import_files`` (what ``safehold patients import`` runs) against a running stack: a Synthea
CSV whose quote is never closed counts every row it lost as a failure, each with its line, and
the rows before it are stored (real Synthea rows; broker and records service as processes)."""

from __future__ import annotations

import csv

import pytest

from safehold.client.importer import import_files
from safehold.client.records import RecordsClient
from safehold.devstack import tokens
from safehold.errors import RecordNotFoundError
from tests.support.owner_operator import running_stack
from tests.support.shared import shared_path

pytestmark = pytest.mark.slow


def test_unclosed_quote_counts_every_lost_row_in_the_import_summary(tmp_path):
    lines = shared_path("data", "synthea-csv-27-ohdsi-dbt-synthea", "patients.csv").read_text(
        "utf-8").splitlines(keepends=True)
    first = next(csv.reader([lines[0]])).index("FIRST")
    row = next(csv.reader([lines[25]]))
    row[first] = '"' + row[first]  # line 26: a quote that never closes
    lines[25] = ",".join(row) + "\n"
    src = tmp_path / "patients.csv"
    src.write_text("".join(lines), "utf-8")
    ids = [next(csv.reader([line]))[0] for line in lines[1:]]

    failures: list[tuple[str, str]] = []
    with running_stack(tmp_path / "stack") as stack, RecordsClient(
            stack.records_url, token=tokens(stack.data_dir)["writer"], policy=stack.path("policy.toml")) as c:
        counts = import_files(c, [src], None, on_failure=lambda s, why: failures.append((s, why)))
        # before: "imported 24, failed 1" for 27 rows (lines 27 and 28 vanished into line 26)
        assert (counts.imported, counts.failed) == (24, 3)
        assert [s for s, _ in failures] == [f"{src}:{n}" for n in (26, 27, 28)]
        assert failures[0][1].startswith("CSV line 26: a quoted field is never closed")
        assert c.get(ids[23]).version == 1  # line 25, before the quote
        for rid in ids[24:]:
            with pytest.raises(RecordNotFoundError):
                c.get(rid)
