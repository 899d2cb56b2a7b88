"""Ids no URL can address are refused by the SDK before anything is sent.

``GET /v1/patients/.`` becomes ``GET /v1/patients/`` after dot-segment removal (RFC 3986
§5.2.4), so ``safehold patients get .`` printed the id list as a record and ``delete ''``
reported ``deleted`` after hitting the collection.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from safehold.client.errors import RecordsClientError
from safehold.client.records import RecordsClient


def _client(sent: list[httpx.Request]) -> RecordsClient:
    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204 if request.method == "DELETE" else 201, json={"version": 1})

    return RecordsClient("https://records.invalid", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("rid", ["", ".", ".."])
def test_unaddressable_ids_are_refused_before_sending(rid):
    sent: list[httpx.Request] = []
    with _client(sent) as c:
        for call in (lambda: c.get(rid), lambda: c.delete(rid), lambda: c.put(rid, {"a": 1}),
                     lambda: c.fhir_read("Patient", rid)):
            with pytest.raises(RecordsClientError) as e:
                call()
            assert e.value.code == "invalid"
    assert sent == []


def test_other_ids_are_sent_as_one_encoded_segment():
    sent: list[httpx.Request] = []
    with _client(sent) as c:
        c.delete("a.b")
        assert c.put("x/y", {"a": 1}) == 1
    assert [r.url.raw_path for r in sent] == [b"/v1/patients/a.b", b"/v1/patients/x%2Fy"]


_LIST_SCRIPT = """
import contextlib, sys
import safehold.cli.patients as p
from safehold.client.connection import service_errors
from safehold.cli.main import main

class Fake:
    def list_ids(self):
        return (f"id-{i:06d}" for i in range(200000))

@contextlib.contextmanager
def client(conn):
    with service_errors("https://records.invalid"):
        yield Fake()

p.load_connection = lambda *a: None
p.client = client
sys.argv = ["safehold", "patients", "list"]
main()
"""


@pytest.mark.slow
def test_list_into_a_closed_pipe_is_not_reported_as_an_unreachable_service():
    proc = subprocess.Popen([sys.executable, "-c", _LIST_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"id-000000\n"
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
