# ruff: noqa: E501  (the embedded upstream server script and parameter tables read better unwrapped)
"""The HTTP encryption proxy as a real process on a loopback port, in front of a real upstream
HTTP service (also a process) that stores what it receives in a SQLite file.

The upstream is deliberately naive: it stores request bodies and form fields verbatim and
answers searches by exact match, like any JSON API would. The tests assert that its SQLite file
never holds a protected field in plaintext, that records round-trip through the proxy, that
exact search through query parameters and path segments works, and that the proxy fails closed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import httpx
import pytest

from tests.support.proxy_stack import proxy_argv, proxy_stack
from tests.support.recording_upstream import SCHEMA, UPSTREAM, assert_no_plaintext, raw_count
from tests.support.shared import free_port

pytestmark = pytest.mark.slow  # starts processes on loopback

SEED = {"id": "patient-0001", "name": "Max Müller", "account": "1223123", "blood_group": "AB",
        "birth_date": "15.06.1980", "email": "max.mueller@example.de", "notes": "Penicillin-Allergie"}
SECRETS = ["Max Müller", "Müller", "1223123", "15.06.1980", "max.mueller", "Penicillin", "patient-0001",
           "Erika", "Mustermann", "1964-08-12", "patient-0002"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    db = tmp / "upstream.sqlite"
    with proxy_stack(tmp, UPSTREAM, [str(db)], SCHEMA, health="/raw", timeout=20.0) as s:
        yield {"proxy": s.proxy, "upstream": s.upstream, "db": db, "tmp": tmp, "env": s.env,
               "up_port": s.up_port}


def test_json_round_trip_search_and_no_plaintext_upstream(stack):
    px = stack["proxy"]
    r = httpx.post(px + "/records", json=SEED)
    assert r.status_code == 201, r.text
    body = r.json()
    rowid = body.pop("rowid")
    assert body == SEED  # revealed on the way back
    # what the upstream really holds
    stored = httpx.get(f"{stack['upstream']}/records/{rowid}").json()
    assert stored["blood_group"] == "AB" and stored["name"] != SEED["name"]
    assert len(stored["account"]) == 7 and stored["account"].isdigit()
    assert isinstance(stored["_safehold_kid"], int)
    # read back through the proxy
    got = httpx.get(f"{px}/records/{rowid}").json()
    assert got == SEED
    # exact search: query values are protected with the same deterministic transform
    hits = httpx.get(px + "/records", params={"id": "patient-0001"}).json()
    assert [h["name"] for h in hits] == ["Max Müller"]
    hits = httpx.get(px + "/records", params={"patient": "patient-0001", "blood_group": "AB"}).json()
    assert len(hits) == 1 and hits[0]["account"] == "1223123"
    assert httpx.get(px + "/records", params={"name": "Max Müller"}).json()[0]["id"] == "patient-0001"
    assert httpx.get(px + "/records", params={"id": "patient-9999"}).json() == []
    # a batch (JSON array) is protected element-wise
    r = httpx.post(px + "/records", json={"id": "patient-0002", "name": "Erika Mustermann",
                                          "birth_date": "1964-08-12", "account": 7654321})
    assert r.status_code == 201 and r.json()["account"] == 7654321
    assert_no_plaintext(stack["db"], SECRETS)


def test_scone_style_form_api_through_path_template(stack):
    px = stack["proxy"]
    form = {"fname": "Erika", "lname": "Mustermann", "dob": "1964-08-12", "ssn": "123456789",
            "city": "Berlin"}
    r = httpx.post(px + "/patient/patient-0002", data=form)
    assert r.status_code == 200, r.text
    assert r.json() == dict(form, id="patient-0002")
    again = httpx.post(px + "/patient/patient-0002", data=form)
    assert again.status_code == 403  # the upstream saw the same protected id
    got = httpx.get(px + "/patient/patient-0002")
    assert got.status_code == 200 and got.json() == dict(form, id="patient-0002", score=0.5)
    conn = sqlite3.connect(stack["db"])
    pids = [p for (p,) in conn.execute("SELECT pid FROM patients")]
    conn.close()
    assert pids and "patient-0002" not in pids
    assert httpx.get(px + "/patient/nobody-here").status_code == 404
    assert_no_plaintext(stack["db"], SECRETS)


@pytest.mark.parametrize("kwargs,status,msg", [
    ({"content": b'{"id": "patient-7", "name": ', "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"id=patient-7&name=Max%20M%C3%BCller&&&=", "headers":
      {"content-type": "application/x-www-form-urlencoded"}}, 400, "form"),
    ({"content": b"name=Max+M%FCller", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     400, "form"),
    ({"content": b"id=patient-7&name=Max+Mueller&name=x", "headers":
      {"content-type": "application/x-www-form-urlencoded"}}, 400, "more than once"),
    ({"content": b"id,name\npatient-7,Max Mueller\n", "headers": {"content-type": "text/csv"}}, 415, "text/csv"),
    ({"content": b"name=Max", "headers": {}}, 415, "unknown"),
    ({"json": {"id": "patient-7", "account": "12345"}}, 422, "'account'"),
    ({"json": {"id": "patient-7", "name": "Max 3000"}}, 422, "'name'"),
    ({"json": {"id": "patient-7", "birth_date": "31.02.1980"}}, 422, "'birth_date'"),
    ({"json": {"name": "Max Mueller", "birth_date": "01.02.1980"}}, 422, "context field 'id' is missing"),
    ({"json": {"id": "patient-7", "account": {"nested": 1}}}, 422, "'account'"),
    ({"json": {"id": "patient-7", "_safehold_kid": 5}}, 422, "twice"),
])
def test_fail_closed_nothing_forwarded(stack, kwargs, status, msg):
    before = raw_count(stack)
    r = httpx.post(stack["proxy"] + "/records", **kwargs)
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]
    assert "Max" not in r.json()["error"] and "12345" not in r.json()["error"]
    assert raw_count(stack) == before  # nothing reached the upstream


def test_query_on_non_searchable_field_refused(stack):
    before = raw_count(stack)
    r = httpx.get(stack["proxy"] + "/records", params={"notes": "Penicillin-Allergie"})
    assert r.status_code == 422 and "not deterministic" in r.json()["error"]
    r = httpx.get(stack["proxy"] + "/records", params={"birth_date": "15.06.1980"})
    assert r.status_code == 422
    assert raw_count(stack) == before


def test_tampered_upstream_data_gives_502(stack, tmp_path):
    px = stack["proxy"]
    rowid = httpx.post(px + "/records", json={"id": "patient-0003", "notes": "secret"}).json()["rowid"]
    conn = sqlite3.connect(stack["db"])
    doc = json.loads(conn.execute("SELECT doc FROM docs WHERE id = ?", (rowid,)).fetchone()[0])
    doc["notes"] = doc["notes"][:-4] + ("AAAA" if doc["notes"][-4:] != "AAAA" else "BBBB")
    conn.execute("UPDATE docs SET doc = ? WHERE id = ?", (json.dumps(doc), rowid))
    conn.commit()
    conn.close()
    r = httpx.get(f"{px}/records/{rowid}")
    assert r.status_code == 502 and "'notes'" in r.json()["error"]


def test_upstream_down_gives_502(stack):
    env = stack["env"]
    port = free_port()
    p = subprocess.Popen(
        proxy_argv(stack["tmp"] / "schema.toml", stack["tmp"] / "keyset.bin", f"http://127.0.0.1:{free_port()}", port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/records", json=SEED, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.1)
        assert r.status_code == 502 and "upstream unreachable" in r.json()["error"]
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_proxy_refuses_to_start_with_wrong_kek(stack):
    env = dict(stack["env"], SAFEHOLD_PROXY_KEK=os.urandom(32).hex())
    r = subprocess.run(
        proxy_argv(stack["tmp"] / "schema.toml", stack["tmp"] / "keyset.bin", stack["upstream"], free_port()),
        env=env, capture_output=True, timeout=30)
    assert r.returncode == 1 and b"error:" in r.stderr and b"Traceback" not in r.stderr


def test_bad_encodings_in_query_and_path_refused(stack):
    before = raw_count(stack)
    r = httpx.get(stack["proxy"] + "/records?id=patient%FF")
    assert r.status_code == 400 and "query" in r.json()["error"]
    r = httpx.get(stack["proxy"] + "/patient/patient%FF")
    assert r.status_code == 400 and "path" in r.json()["error"]
    assert raw_count(stack) == before


def test_repeated_response_headers_pass(stack):
    r = httpx.get(stack["proxy"] + "/cookies")
    assert r.status_code == 200 and r.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_oversized_body_refused(stack):
    before = raw_count(stack)
    big = b'{"notes": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = httpx.post(stack["proxy"] + "/records", content=big, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    assert raw_count(stack) == before
