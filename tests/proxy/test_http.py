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
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest

from tests.support.proxy_stack import proxy_argv, proxy_stack
from tests.support.shared import free_port

UPSTREAM = r'''
import json, sqlite3, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit, unquote

port, db = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
conn = sqlite3.connect(db, check_same_thread=False)
conn.execute("CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, method TEXT, path TEXT, ctype TEXT, body BLOB)")
conn.execute("CREATE TABLE IF NOT EXISTS docs (id INTEGER PRIMARY KEY, doc TEXT)")
conn.execute("CREATE TABLE IF NOT EXISTS patients (pid TEXT PRIMARY KEY, doc TEXT)")
conn.commit()

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        b = self.rfile.read(n)
        with lock:
            conn.execute("INSERT INTO raw (method, path, ctype, body) VALUES (?,?,?,?)",
                         (self.command, self.path, self.headers.get("Content-Type", ""), b))
            conn.commit()
        return b

    def do_POST(self):
        u = urlsplit(self.path)
        b = self.body()
        if u.path == "/records":
            doc = json.loads(b)
            with lock:
                cur = conn.execute("INSERT INTO docs (doc) VALUES (?)", (json.dumps(doc),))
                conn.commit()
            return self.send(201, dict(doc, rowid=cur.lastrowid))
        if u.path.startswith("/patient/"):
            pid = unquote(u.path[len("/patient/"):])
            form = dict(parse_qsl(b.decode()))
            with lock:
                try:
                    conn.execute("INSERT INTO patients (pid, doc) VALUES (?,?)", (pid, json.dumps(form)))
                    conn.commit()
                except sqlite3.IntegrityError:
                    return self.send(403, {"error": "exists"})
            return self.send(200, dict(form, id=pid))
        self.send(404, {"error": "no route"})

    def do_GET(self):
        u = urlsplit(self.path)
        # the upstream's own search API: ?patient=<id> searches the id field
        q = {("id" if k == "patient" else k): v for k, v in parse_qsl(u.query)}
        if u.path != "/raw":
            self.body()
        with lock:
            if u.path == "/records":
                rows = [json.loads(d) for (d,) in conn.execute("SELECT doc FROM docs")]
                return self.send(200, [r for r in rows if all(str(r.get(k)) == v for k, v in q.items())])
            if u.path.startswith("/records/"):
                row = conn.execute("SELECT doc FROM docs WHERE id = ?", (int(u.path.rsplit("/", 1)[1]),)).fetchone()
                return self.send(200, json.loads(row[0])) if row else self.send(404, {"error": "not found"})
            if u.path.startswith("/patient/"):
                pid = unquote(u.path[len("/patient/"):])
                row = conn.execute("SELECT doc FROM patients WHERE pid = ?", (pid,)).fetchone()
                return self.send(200, dict(json.loads(row[0]), id=pid, score=0.5)) if row else self.send(404, {"error": "nf"})
            if u.path == "/cookies":
                self.send_response(200)
                self.send_header("Set-Cookie", "a=1")
                self.send_header("Set-Cookie", "b=2")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if u.path == "/raw":
                return self.send(200, {"n": conn.execute("SELECT count(*) FROM raw").fetchone()[0]})
        self.send(404, {"error": "no route"})

    # every other method is recorded too, so the tests see whatever reaches the upstream
    def do_PUT(self):
        self.body()
        self.send(404, {"error": "no route"})

    do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_PROPFIND = do_PUT

    def do_HEAD(self):
        self.body()
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

SCHEMA = """
[proxy]
key_id_field = "_safehold_kid"
paths = ["/patient/{id}"]

[proxy.query]
patient = "id"

[fields.id]
transform = "deterministic"
[fields.name]
transform = "token"
kind = "name"
[fields.account]
transform = "fpe"
alphabet = "digits"
[fields.blood_group]
transform = "keep"
[fields.birth_date]
transform = "date-shift"
context = "id"
[fields.email]
transform = "token"
kind = "email"
[fields.ssn]
transform = "fpe"
alphabet = "digits"
[fields.notes]
transform = "randomized"
[fields.fname]
transform = "token"
kind = "name"
[fields.lname]
transform = "token"
kind = "name"
[fields.dob]
transform = "date-shift"
context = "id"
"""

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


def _raw_count(stack) -> int:
    return httpx.get(stack["upstream"] + "/raw").json()["n"]


def _assert_no_plaintext(db: Path, secrets: list[str] = SECRETS) -> None:
    blob = b""
    for suffix in ("", "-wal", "-journal"):
        f = Path(str(db) + suffix)
        if f.exists():
            blob += f.read_bytes()
    assert blob, "upstream stored nothing"
    conn = sqlite3.connect(db)
    rows = [r for t in ("raw", "docs", "patients") for r in conn.execute(f"SELECT * FROM {t}")]  # noqa: S608
    conn.close()
    dump = json.dumps(rows, default=lambda b: b.decode("utf-8", "replace"), ensure_ascii=False)
    for secret in secrets:
        encodings = (secret.encode(), secret.encode("latin-1", "ignore"), quote(secret).encode(),
                     quote_plus(secret).encode(), json.dumps(secret)[1:-1].encode())
        for enc in encodings:
            assert enc not in blob, secret
        assert secret not in dump, secret


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
    _assert_no_plaintext(stack["db"])


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
    _assert_no_plaintext(stack["db"])


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
    before = _raw_count(stack)
    r = httpx.post(stack["proxy"] + "/records", **kwargs)
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]
    assert "Max" not in r.json()["error"] and "12345" not in r.json()["error"]
    assert _raw_count(stack) == before  # nothing reached the upstream


def test_query_on_non_searchable_field_refused(stack):
    before = _raw_count(stack)
    r = httpx.get(stack["proxy"] + "/records", params={"notes": "Penicillin-Allergie"})
    assert r.status_code == 422 and "not deterministic" in r.json()["error"]
    r = httpx.get(stack["proxy"] + "/records", params={"birth_date": "15.06.1980"})
    assert r.status_code == 422
    assert _raw_count(stack) == before


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
    before = _raw_count(stack)
    r = httpx.get(stack["proxy"] + "/records?id=patient%FF")
    assert r.status_code == 400 and "query" in r.json()["error"]
    r = httpx.get(stack["proxy"] + "/patient/patient%FF")
    assert r.status_code == 400 and "path" in r.json()["error"]
    assert _raw_count(stack) == before


def test_repeated_response_headers_pass(stack):
    r = httpx.get(stack["proxy"] + "/cookies")
    assert r.status_code == 200 and r.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_oversized_body_refused(stack):
    before = _raw_count(stack)
    big = b'{"notes": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = httpx.post(stack["proxy"] + "/records", content=big, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    assert _raw_count(stack) == before
