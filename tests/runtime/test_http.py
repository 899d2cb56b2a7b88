"""safehold.runtime.http: the HTTP scaffold discovery and SVR share (access list, bearer check,
error answers, body limit), on a throw-away router."""

from __future__ import annotations

import hashlib

import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from safehold.errors import ConfigError, StoreError
from safehold.runtime.http import Principal, bearer_app, bearer_principal, parse_access, require_role

TOKEN = "t0ken"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


class _Body(BaseModel):
    n: int


router = APIRouter()


@router.post("/op")
def op(body: _Body, request: Request, who: Principal = Depends(bearer_principal)) -> dict[str, object]:
    require_role(who, "write")
    if body.n < 0:
        raise ValueError("negative")
    if body.n == 0:
        raise StoreError("down")
    return {"who": who.name}


def _client(max_body: int = 1024) -> TestClient:
    access = parse_access({DIGEST: {"name": "alice", "roles": ["read"]}}, ("read", "write"), ConfigError)
    access[hashlib.sha256(b"writer").digest()] = Principal("bob", frozenset({"write"}))
    app = bearer_app(
        title="t",
        router=router,
        access=access,
        max_body=max_body,
        errors={ValueError: (400, "invalid")},
        openapi_url=None,
    )
    return TestClient(app)


def test_access_list_is_checked() -> None:
    roles = ("a", "b")
    assert parse_access({DIGEST: {"name": "n", "roles": ["a"]}}, roles, ConfigError) == {
        bytes.fromhex(DIGEST): Principal("n", frozenset({"a"}))
    }
    for bad in (
        [],
        {"zz": {"name": "n", "roles": ["a"]}},
        {DIGEST: {"roles": ["a"]}},
        {DIGEST: {"name": "n", "roles": []}},
        {DIGEST: {"name": "n", "roles": ["c"]}},
        {DIGEST: "n"},
    ):
        with pytest.raises(ConfigError):
            parse_access(bad, roles, ConfigError)
    long = {DIGEST: {"name": "x" * 257, "roles": ["a"]}}
    assert parse_access(long, roles, ConfigError)  # no bound unless asked
    with pytest.raises(ConfigError):
        parse_access(long, roles, ConfigError, max_name_bytes=256)


def test_answers() -> None:
    c = _client()
    bob = {"Authorization": "Bearer writer"}
    assert c.post("/op", json={"n": 1}, headers=bob).json() == {"who": "bob"}
    r = c.post("/op", json={"n": 1})
    assert (r.status_code, r.json()["error"]) == (401, "unauthenticated")
    r = c.post("/op", json={"n": 1}, headers={"Authorization": "Bearer nope"})
    assert (r.status_code, r.json()) == (401, {"error": "unauthenticated", "detail": "unknown token"})
    r = c.post("/op", json={"n": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = c.post("/op", json={"n": -1}, headers=bob)
    assert (r.status_code, r.json()) == (400, {"error": "invalid", "detail": "negative"})
    r = c.post("/op", json={"n": "x"}, headers=bob)
    assert (r.status_code, r.json()["error"]) == (400, "invalid")
    assert r.json()["detail"].startswith("malformed request: body.n")
    r = c.post("/op", json={"n": 0}, headers=bob)
    assert (r.status_code, r.json()) == (503, {"error": "store-unavailable", "detail": "StoreError"})
    r = c.get("/nowhere")
    assert (r.status_code, r.json()["error"]) == (404, "no-such-endpoint")
    r = c.post("/op", content=b"{" + b" " * 2000 + b"}", headers=bob)
    assert (r.status_code, r.json()["error"]) == (413, "too-large")
