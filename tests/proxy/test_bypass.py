# ruff: noqa: E501  (the request tables read better unwrapped)
"""Requests that an upstream could read as carrying a protected value, although the proxy would
not protect it (look-alikes of the schema's paths, names and keys), must be refused (4xx) and
never reach the upstream. A security review found the first one: a trailing slash after a
``paths`` template let a plaintext id through.

The proxy and the recording upstream (tests/support/recording_upstream.py) run as real loopback processes; the
upstream stores every request it receives (method, path with query, content type, body) in SQLite.
Requests are sent with ``http.client`` / a raw socket so the request target goes out byte for byte
(httpx would normalise it). Each refused request must leave the upstream's request count unchanged;
requests that are forwarded must arrive protected, and the upstream's SQLite file must never hold a
plaintext secret of this module.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.support.proxy_stack import proxy_stack
from tests.support.recording_upstream import SCHEMA, UPSTREAM, assert_no_plaintext, raw_count

pytestmark = pytest.mark.slow  # starts processes on loopback

PID = "123-45-6789"  # a plaintext patient id: the upstream must never see it
NAME = "Max Müller"
SECRETS = [PID, NAME, "Müller", "Erika Musterfrau", "Musterfrau", "9876543"]
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy-bypass")
    db = tmp / "upstream.sqlite"
    with proxy_stack(tmp, UPSTREAM, [str(db)], SCHEMA, health="/raw", timeout=20.0) as s:
        st = {"proxy": s.proxy, "upstream": s.upstream, "db": db}
        # one legitimate, protected request so the upstream's storage is not empty
        r = httpx.post(s.proxy + f"/patient/{PID}", data={"fname": "Erika", "lname": "Musterfrau"})
        assert r.status_code == 200, r.text
        yield st


def _send(stack, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes = b"",
          chunked: bool = False) -> tuple[int, dict | None]:
    """Send one request with ``target`` exactly as given; returns (status, JSON body or None)."""
    u = urlsplit(stack["proxy"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders(iter([body[:5], body[5:]]), encode_chunked=True)
        else:
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


def _refused(stack, status: int, expect: int, doc: dict | None, msg: str | None, before: int) -> None:
    assert status == expect, (status, doc)
    if msg is not None:
        assert doc is not None and msg in doc["error"], doc
        assert PID not in doc["error"] and "Max" not in doc["error"]
    assert raw_count(stack) == before, "the refused request reached the upstream"
    assert_no_plaintext(stack["db"], SECRETS)


FULLWIDTH = quote("ｐａｔｉｅｎｔ")  # NFKC: "patient"

PATH_BYPASSES = [
    ("GET", f"/patient/{PID}/"),                 # trailing slash (the first bypass found)
    ("GET", f"//patient/{PID}"),                 # empty leading segment
    ("GET", f"/patient//{PID}"),                 # empty segment before the id
    ("GET", f"/Patient/{PID}"),                  # case of a fixed segment
    ("GET", f"/PATIENT/{PID}"),
    ("GET", f"/pati%65nt/{PID}"),                # percent-encoded fixed segment
    ("GET", f"/pati%2565nt/{PID}"),              # double-encoded
    ("GET", f"/patient%2F{PID}"),                # encoded slash
    ("GET", f"/patient%252F{PID}"),              # double-encoded slash
    ("GET", f"/patient\\{PID}"),                 # backslash as separator
    ("GET", f"/records/../patient/{PID}"),       # dot segments (httpx itself would resolve them)
    ("GET", f"/records/%2e%2e/patient/{PID}"),   # encoded dot segments
    ("GET", f"/./patient/{PID}"),
    ("GET", f"/patient;v=1/{PID}"),              # path parameters (servlet containers drop them)
    ("GET", f"/ patient/{PID}".replace(" ", "%20")),  # whitespace around a segment
    ("GET", f"/{FULLWIDTH}/{PID}"),              # fullwidth letters (NFKC)
    ("GET", f"/patient/{PID}/history"),          # more segments than the template
    ("HEAD", f"/patient/{PID}/"),
    ("OPTIONS", f"/patient/{PID}/"),
    ("DELETE", f"/Patient/{PID}"),
    ("PATCH", f"/patient/{PID}/"),
]


@pytest.mark.parametrize("method,target", PATH_BYPASSES)
def test_path_resembling_a_template_is_refused(stack, method, target):
    before = raw_count(stack)
    status, doc = _send(stack, method, target)
    _refused(stack, status, 400, doc, None if method == "HEAD" else "resembles path template '/patient/{id}'", before)


def test_form_post_to_trailing_slash_path_refused(stack):
    before = raw_count(stack)
    status, doc = _send(stack, "POST", f"/patient/{PID}/", [("Content-Type", FORM)],
                        b"fname=Erika&lname=Musterfrau")
    _refused(stack, status, 400, doc, "resembles path template", before)


def test_non_origin_form_targets_refused(stack):
    before = raw_count(stack)
    for method, target in (("OPTIONS", "*"), ("OPTIONS", f"*/patient/{PID}"), ("GET", f"patient/{PID}")):
        status, _ = _send(stack, method, target)
        assert 400 <= status < 500, (target, status)
    assert raw_count(stack) == before
    # absolute-form (RFC 9112 section 3.2.2): the server hands the app its path, which is protected
    status, doc = _send(stack, "GET", f"{stack['proxy']}/patient/{PID}")
    assert status == 200 and doc["lname"] == "Musterfrau"
    assert raw_count(stack) == before + 1
    assert_no_plaintext(stack["db"], SECRETS)


def test_exact_paths_still_protected_and_unrelated_paths_pass(stack):
    before = raw_count(stack)
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        status, _ = _send(stack, method, f"/patient/{PID}")
        assert status in (200, 404), (method, status)
    assert raw_count(stack) == before + 4  # forwarded, with the id protected
    status, _ = _send(stack, "GET", "/patient/")  # no id segment: nothing to protect
    assert status == 404
    status, _ = _send(stack, "GET", "/records/../records")  # resolves to an unrelated path
    assert status in (200, 404)
    assert_no_plaintext(stack["db"], SECRETS)


QUERY_BYPASSES = [
    f"Patient={PID}", f"PATIENT={PID}", f"patient[]={PID}", f"patient%5B%5D={PID}", f"patient[0]={PID}",
    f"filter[patient]={PID}", f"filter[id]={PID}", f"pat%2569ent={PID}", f"patient%20={PID}", f"+patient={PID}",
    f"_id={PID}", f"patient_id={PID}", f"Id={PID}", f"patient:exact={PID}", f"Name={quote(NAME)}",
    f"blood_group=AB&NAME={quote(NAME)}",
]


@pytest.mark.parametrize("query", QUERY_BYPASSES)
def test_query_name_resembling_a_protected_one_is_refused(stack, query):
    before = raw_count(stack)
    status, doc = _send(stack, "GET", "/records?" + query)
    _refused(stack, status, 400, doc, "resembles a protected field", before)


def test_repeated_protected_query_parameter_protects_every_value(stack):
    before = raw_count(stack)
    status, doc = _send(stack, "GET", f"/records?patient={PID}&patient=9876543&id={PID}")
    assert status == 200 and doc == []
    assert raw_count(stack) == before + 1
    assert_no_plaintext(stack["db"], SECRETS)


BODY_BYPASSES = [
    # duplicate keys: Python keeps the last, many parsers the first
    ([("Content-Type", JSON)], b'{"id": "p-1", "name": "Erika Musterfrau", "name": "Max M\\u00fcller"}', 400, "twice"),
    ([("Content-Type", JSON)], b'{"id": "p-1", "name": "Erika Musterfrau", "na\\u006de": "Max M\\u00fcller"}', 400, "twice"),
    ([("Content-Type", JSON)], b'[{"id": "p-1", "x": {"a": 1, "a": 2}}]', 400, "twice"),
    # keys a case-insensitive deserializer reads as a protected field
    ([("Content-Type", JSON)], '{"id": "p-1", "Name": "Max Müller"}'.encode(), 400, "'Name'"),
    ([("Content-Type", JSON)], '{"id": "p-1", "NAME ": "Max Müller"}'.encode(), 400, "only by case"),
    ([("Content-Type", JSON)], b'{"ID": "123-45-6789"}', 400, "'ID'"),
    ([("Content-Type", JSON)], '{"id": "p-1", "ａｃｃｏｕｎｔ": "9876543"}'.encode(), 400, "only by case"),
    # form names a PHP/Rails/qs-style upstream reads as the field
    ([("Content-Type", FORM)], b"Fname=Erika&lname=Musterfrau", 400, "'Fname'"),
    ([("Content-Type", FORM)], b"name[]=Max+M%C3%BCller", 400, "'name[]'"),
    ([("Content-Type", FORM)], b"record[name]=Max+M%C3%BCller", 400, "'record[name]'"),
    ([("Content-Type", FORM)], b"na%256De=Max+M%C3%BCller", 400, "resembles"),
    # ambiguous framing and encodings the proxy cannot inspect
    ([("Content-Type", FORM), ("Content-Type", JSON)], b"name=Max+M%C3%BCller", 400, "more than one Content-Type"),
    ([("Content-Type", "application/json; charset=latin-1")], '{"name": "Max Müller"}'.encode("latin-1"), 415, "charset"),
    ([("Content-Type", 'application/json; charset="utf-16"')], '{"name": "Max Müller"}'.encode("utf-16"), 415, "charset"),
    ([("Content-Type", JSON), ("Content-Encoding", "gzip")], gzip.compress('{"name": "Max Müller"}'.encode()), 415, "Content-Encoding"),
    ([("Content-Type", JSON), ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")], gzip.compress('{"name": "Max Müller"}'.encode()), 415, "Content-Encoding"),
    ([("Content-Type", JSON), ("Content-Encoding", "identity, br")], '{"name": "Max Müller"}'.encode(), 415, "Content-Encoding"),
    ([("Content-Type", "text/json")], '{"name": "Max Müller"}'.encode(), 415, "text/json"),
    ([("Content-Type", "multipart/form-data; boundary=x")], b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nMax\r\n--x--\r\n', 415, "multipart"),
]


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("headers,body,expect,msg", BODY_BYPASSES)
def test_body_bypass_refused(stack, method, headers, body, expect, msg):
    before = raw_count(stack)
    status, doc = _send(stack, method, "/records", headers, body)
    _refused(stack, status, expect, doc, msg, before)


ACCEPTED = [
    # media-type spellings that are parsed and protected, not passed through
    ("POST", [("Content-Type", "application/json; charset=UTF-8")], False),
    ("POST", [("Content-Type", "Application/JSON")], False),
    ("POST", [("Content-Type", "application/fhir+json;charset=utf-8")], False),
    ("POST", [("Content-Type", "application/json"), ("Content-Encoding", "identity")], False),
    ("POST", [("Content-Type", "application/json")], True),   # Transfer-Encoding: chunked
    ("GET", [("Content-Type", "application/json")], False),   # a body on GET is protected too
    ("GET", [("Content-Type", "application/json")], True),
]


@pytest.mark.parametrize("method,headers,chunked", ACCEPTED)
def test_body_variants_are_protected_before_forwarding(stack, method, headers, chunked):
    before = raw_count(stack)
    body = json.dumps({"id": PID, "name": NAME, "account": "9876543"}, ensure_ascii=False).encode()
    status, doc = _send(stack, method, "/records", headers, body, chunked=chunked)
    assert status in (200, 201), (status, doc)
    assert raw_count(stack) == before + 1
    assert_no_plaintext(stack["db"], SECRETS)


def test_form_content_type_casing_is_protected(stack):
    before = raw_count(stack)
    status, doc = _send(stack, "POST", "/patient/other-0001",
                        [("Content-Type", "Application/X-WWW-Form-Urlencoded; Charset=UTF-8")],
                        b"fname=Erika&lname=Musterfrau&ssn=9876543")
    assert status == 200 and doc["lname"] == "Musterfrau", doc
    assert raw_count(stack) == before + 1
    assert_no_plaintext(stack["db"], SECRETS)


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "CONNECT", "get", "Post"])  # methods are case-sensitive
def test_other_methods_not_forwarded(stack, method):
    before = raw_count(stack)
    status, _ = _send(stack, method, f"/patient/{PID}", [("Content-Type", JSON)],
                      json.dumps({"name": NAME}).encode())
    assert 400 <= status < 500, status
    assert raw_count(stack) == before
    assert_no_plaintext(stack["db"], SECRETS)


def test_request_smuggling_framing_refused(stack):
    """Content-Length and Transfer-Encoding together (RFC 9112 section 6.1): rejected by the
    proxy's HTTP server before the app sees it; nothing reaches the upstream."""
    before = raw_count(stack)
    u = urlsplit(stack["proxy"])
    body = json.dumps({"name": NAME}, ensure_ascii=False).encode()
    chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    req = (b"POST /records HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(req)
        reply = s.recv(4096)
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:200]
    assert raw_count(stack) == before
    assert_no_plaintext(stack["db"], SECRETS)


NESTED = [
    ("POST", "/records", [("Content-Type", JSON)], json.dumps({"id": "p-1", "payload": json.dumps({"name": NAME})}).encode()),
    ("POST", "/records", [("Content-Type", JSON)], json.dumps({"id": "p-1", "x": [{"y": " " + json.dumps([{"Name": NAME}])}]}).encode()),
    ("POST", "/records", [("Content-Type", JSON)], json.dumps({"id": "p-1", "payload": json.dumps(json.dumps({"id": PID}))}).encode()),
    ("POST", "/records", [("Content-Type", JSON)], json.dumps({"id": "p-1", "payload": quote(json.dumps({"name": NAME}))}).encode()),
    ("POST", "/records", [("Content-Type", FORM)], ("payload=" + quote(json.dumps({"account": "9876543"}))).encode()),
    ("GET", "/records?q=" + quote(json.dumps({"filter": {"patient": PID}})), [], b""),
]


@pytest.mark.parametrize("method,target,headers,body", NESTED)
def test_record_encoded_inside_a_value_is_refused(stack, method, target, headers, body):
    before = raw_count(stack)
    status, doc = _send(stack, method, target, headers, body)
    _refused(stack, status, 400, doc, "encoded JSON record", before)


def test_json_looking_values_without_protected_keys_pass(stack):
    before = raw_count(stack)
    body = json.dumps({"id": PID, "meta": json.dumps({"page": 2}), "note": "{not json", "tags": "[1, 2]"}).encode()
    status, doc = _send(stack, "POST", "/records", [("Content-Type", JSON)], body)
    assert status == 201 and doc["meta"] == '{"page": 2}', doc
    assert raw_count(stack) == before + 1
    assert_no_plaintext(stack["db"], SECRETS)
