"""``safehold patients import`` (client/importer.py) against the records service process: an id
that two import files use for different content is reported and, by default, not overwritten;
``--on-conflict skip`` / ``overwrite``; clinical resources go through /fhir."""

from __future__ import annotations

import json

import pytest

from safehold.client.importer import import_files
from safehold.client.records import RecordsClient
from safehold.devstack import tokens
from tests.support.records_stack import running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("pkg"), tmp_path_factory.mktemp("safehold-data")) as s:
        yield s


def token(stack, role: str = "writer") -> str:
    return tokens(stack.data_dir)[role]


def test_conflicting_ids_across_import_files(stack, tmp_path):
    """Two files reuse one Patient id for different people: by default the second is reported
    and not written; skip keeps the first quietly; overwrite lets the later one win."""
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    first = {"resourceType": "Patient", "id": "dup-1", "name": [{"family": "Erste"}]}
    second = {"resourceType": "Patient", "id": "dup-1", "name": [{"family": "Zweite"}]}
    obs1 = {"resourceType": "Observation", "id": "dup-o", "status": "final", "code": {"text": "a"},
            "subject": {"reference": "Patient/dup-1"}}
    obs2 = {**obs1, "code": {"text": "b"}}
    a.write_text(json.dumps(first) + "\n" + json.dumps(obs1) + "\n")
    b.write_text(json.dumps(second) + "\n" + json.dumps(obs2) + "\n")
    failures: list[tuple[str, str]] = []
    with RecordsClient(stack.records_url, token=token(stack), policy=stack.path("policy.toml")) as c:
        counts = import_files(c, [a, b], None, on_failure=lambda s, r: failures.append((s, r)))
        assert (counts.conflicts, counts.failed) == (2, 2)
        assert all("different content" in r and "Erste" not in r for _, r in failures)
        assert c.get("dup-1").data["name"][0]["family"] == "Erste"
        assert c.fhir_read("Observation", "dup-o").data["code"]["text"] == "a"
        notes: list[str] = []
        counts = import_files(c, [a, b], None, on_conflict="skip", on_notice=notes.append)
        assert (counts.conflicts, counts.failed) == (2, 0) and len(notes) == 2
        assert c.get("dup-1").data["name"][0]["family"] == "Erste"
        counts = import_files(c, [a, b], None, on_conflict="overwrite")
        assert (counts.conflicts, counts.failed) == (2, 0)
        assert c.get("dup-1").data["name"][0]["family"] == "Zweite"
        assert c.fhir_read("Observation", "dup-o").data["code"]["text"] == "b"
        # identical content in two files is no conflict
        counts = import_files(c, [b, b], None)
        assert counts.conflicts == 0 and counts.failed == 0

