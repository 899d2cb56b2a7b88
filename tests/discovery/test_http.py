"""HTTP contract of the discovery router, in process (status codes, error shapes, sizes)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from fastapi.testclient import TestClient

from safehold.crypto import oprf
from safehold.discovery.errors import DiscoveryConfigError
from safehold.discovery.http import create_app, parse_access
from safehold.discovery.identifiers import oprf_input
from safehold.discovery.protocol import RESULT_SIZE, decode_results


def sha(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()


@pytest.fixture
def http(service):
    access = parse_access({sha("q"): {"name": "querier", "roles": ["query"]},
                           sha("r"): {"name": "registrar", "roles": ["register"]}})
    with TestClient(create_app(service, access)) as c:
        yield c


def auth(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def b64(items: list[bytes]) -> str:
    return base64.b64encode(b"".join(items)).decode()


def outputs_via_http(http, idents):
    inputs = [oprf_input(k, i) for k, i in idents]
    b = oprf.blind(inputs)
    r = http.post("/v1/discovery/evaluate", json={"blinded": b64(b.elements)}, headers=auth("q"))
    assert r.status_code == 200, r.text
    ev = base64.b64decode(r.json()["evaluated"])
    return oprf.finalize(inputs, b.blinds, [ev[i * 32:(i + 1) * 32] for i in range(len(inputs))])


def test_register_then_query_fixed_size(http):
    r = http.post("/v1/discovery/register", headers=auth("r"), json={
        "entries": [{"kind": "e164", "identifier": "020 1234567", "user_id": "alice"},
                    {"kind": "kvnr", "identifier": "X110411675", "user_id": "bob"}], "region": "NL"})
    assert r.json() == {"registered": 2}
    sizes = []
    for idents in ([("e164", "+31201234567"), ("kvnr", "X110411675")],
                   [("e164", "+31648352638"), ("kvnr", "A000000002")]):
        outs = outputs_via_http(http, idents)
        r = http.post("/v1/discovery/query", headers=auth("q"), json={"new": b64(outs)})
        assert r.status_code == 200, r.text
        body = r.json()
        sizes.append(len(body["results"]))
        raw = base64.b64decode(body["results"])
        assert len(raw) == 2 * RESULT_SIZE and len(base64.b64decode(body["token"])) == 65
    assert sizes[0] == sizes[1]
    info = http.get("/v1/discovery/info").json()
    assert info["registered"] == 2 and info["suite"] == "ristretto255-SHA512"


def test_first_query_answers(http):
    http.post("/v1/discovery/register", headers=auth("r"),
              json={"entries": [{"kind": "kvnr", "identifier": "X110411675", "user_id": "bob"}]})
    outs = outputs_via_http(http, [("kvnr", "X110411675"), ("kvnr", "A000000002")])
    body = http.post("/v1/discovery/query", headers=auth("q"), json={"new": b64(outs)}).json()
    assert decode_results(base64.b64decode(body["results"]), 2) == ["bob", None]


@pytest.mark.parametrize("headers,status,code", [
    ({}, 401, "unauthenticated"), (auth("nope"), 401, "unauthenticated"), (auth("q"), 403, "forbidden"),
])
def test_register_auth(http, headers, status, code):
    r = http.post("/v1/discovery/register", headers=headers,
                  json={"entries": [{"kind": "kvnr", "identifier": "X110411675", "user_id": "b"}]})
    assert (r.status_code, r.json()["error"]) == (status, code)


def test_query_needs_query_role(http):
    r = http.post("/v1/discovery/evaluate", headers=auth("r"), json={"blinded": ""})
    assert r.status_code == 403


@pytest.mark.parametrize("body,code", [
    ({"blinded": "!!"}, "invalid"), ({"blinded": base64.b64encode(b"x" * 31).decode()}, "invalid"),
    ({"blinded": b64([bytes(32)])}, "invalid"), ({"blinded": ""}, "invalid"), ({}, "invalid"),
])
def test_evaluate_bad_input(http, body, code):
    r = http.post("/v1/discovery/evaluate", headers=auth("q"), json=body)
    assert (r.status_code, r.json()["error"]) == (400, code)
    assert "detail" in r.json()


def test_query_errors(http):
    outs = outputs_via_http(http, [("kvnr", "X110411675")])
    r = http.post("/v1/discovery/query", headers=auth("q"), json={"prev": b64(outs)})
    assert (r.status_code, r.json()["error"]) == (400, "invalid-token")
    r = http.post("/v1/discovery/query", headers=auth("q"), json={"new": b64(outs + outs)})
    assert (r.status_code, r.json()["error"]) == (400, "invalid")
    r = http.post("/v1/discovery/register", headers=auth("r"),
                  json={"entries": [{"kind": "kvnr", "identifier": "X110411676", "user_id": "b"}]})
    assert r.status_code == 400 and "check digit" in r.json()["detail"] and "X11041167" not in r.text


def test_rate_limited_is_429_with_retry_after(store, keys):
    from safehold.discovery.core import DiscoveryService

    svc = DiscoveryService(store, keys, limit=1, period=600)
    svc.load()
    app = create_app(svc, parse_access({sha("q"): {"name": "q", "roles": ["query"]}}))
    with TestClient(app) as c:
        outs = outputs_via_http(c, [("kvnr", "X110411675"), ("kvnr", "A000000002")])
        r = c.post("/v1/discovery/query", headers=auth("q"), json={"new": b64(outs)})
        assert r.status_code == 429 and r.json()["error"] == "rate-limited"
        assert 0 < int(r.headers["retry-after"]) <= 600


def test_too_large_and_unknown_path(http):
    from safehold.discovery.http import MAX_BODY

    r = http.post("/v1/discovery/query", headers=auth("q"), content=b"{" + b" " * MAX_BODY + b"}")
    assert (r.status_code, r.json()["error"]) == (413, "too-large")
    assert http.get("/v1/nope").json()["error"] == "no-such-endpoint"


def test_access_list_validation():
    with pytest.raises(DiscoveryConfigError, match="64 hex"):
        parse_access({"abc": {"name": "x", "roles": ["query"]}})
    with pytest.raises(DiscoveryConfigError, match="roles"):
        parse_access({sha("x"): {"name": "x", "roles": ["admin"]}})
