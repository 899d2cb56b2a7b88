# ruff: noqa: E501  (the embedded upstream server script reads better unwrapped)
"""A deliberately naive upstream for the proxy tests, run as its own process by
:func:`tests.support.proxy_stack.proxy_stack`: it stores every request it receives (method, path
with query, content type, body) and request bodies and form fields verbatim in a SQLite file,
and answers searches by exact match, like any JSON API would. ``GET /raw`` counts the stored
requests, so a test can prove a refused request never reached it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx

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

# The proxy schema the tests put in front of this upstream.
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


def raw_count(stack: dict) -> int:
    """How many requests the recording upstream has stored so far."""
    return httpx.get(stack["upstream"] + "/raw").json()["n"]


def assert_no_plaintext(db: Path, secrets: list[str]) -> None:
    """Assert that no ``secrets`` entry, in any of its usual encodings, is in the upstream's SQLite
    file (main file, WAL and journal bytes, and every stored row)."""
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
