"""`safehold patients get|delete ID` of a missing record names ID.

The service's 404 names only the row's blind index (it never echoes an id), so the CLI printed
``error: records service: HTTP 404 not-found: no record at row 01993d… in namespace 'patients'``
for ``patients get pat3``: nothing the user typed.
"""

from __future__ import annotations

import contextlib

import pytest
from click.testing import CliRunner

from safehold.cli import patients as cli_patients
from safehold.cli.main import cli
from safehold.client.errors import RecordsClientError
from safehold.errors import RecordNotFoundError

ROW_404 = "records service: HTTP 404 not-found: no record at row 01993d24 in namespace 'patients'"


class _Fake:
    def __init__(self, status: int) -> None:
        self.status = status

    def _fail(self, _rid: str) -> None:
        if self.status == 404:  # what RecordsClient raises for a 404 not-found (_raise_for)
            raise RecordNotFoundError(ROW_404)
        raise RecordsClientError("HTTP 403 forbidden", self.status, "forbidden")

    get = delete = _fail


def _run(monkeypatch: pytest.MonkeyPatch, status: int, *args: str):
    monkeypatch.setattr(cli_patients, "load_connection", lambda *a: None)
    monkeypatch.setattr(cli_patients, "client", lambda conn: contextlib.nullcontext(_Fake(status)))
    return CliRunner().invoke(cli, ["patients", *args])


@pytest.mark.parametrize("cmd", ["get", "delete"])
def test_a_missing_record_is_named_by_the_id_given(monkeypatch, cmd):
    r = _run(monkeypatch, 404, cmd, "pat3")
    assert r.exit_code == 1
    assert f"error: no record 'pat3' ({ROW_404})" in r.output


def test_other_errors_are_passed_on_unchanged(monkeypatch):
    r = _run(monkeypatch, 403, "get", "pat3")
    assert r.exit_code == 1 and "error: HTTP 403 forbidden" in r.output and "pat3" not in r.output
