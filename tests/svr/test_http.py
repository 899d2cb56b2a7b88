"""The HTTP contract of the SVR routes, in-process (status codes, error shapes, roles, limits,
the owner's initialisation of the freshness ledger)."""

from __future__ import annotations

import base64

import pytest

from safehold.client.svr import sign_statement
from safehold.svr.errors import SvrConfigError
from safehold.svr.http import create_app, parse_access
from tests.support.asgi import AsgiClient
from tests.support.freshness import Owner, SqliteEngine
from tests.support.svr import ADMIN_TOKEN, OTHER_TOKEN, USER_TOKEN, access_list, open_service


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


ZERO = b64(bytes(16))


@pytest.fixture
def app(service):
    return create_app(service, parse_access(access_list()))


@pytest.fixture
def user(app):
    return AsgiClient(app).as_role(USER_TOKEN)


def _backup(client, pin=b"\xaa" * 32, data=b"\x01" * 30, tries=5):
    r = client.post("/v1/svr2/backup", json={"data": b64(data), "pin": b64(pin), "max_tries": tries,
                                             "token": ZERO})
    assert r.status_code == 200 and r.json()["status"] == "OK", r.text
    assert client.post("/v1/svr2/expose", json={"data": b64(data)}).json()["status"] == "OK"


def test_health_and_info_are_public(app):
    c = AsgiClient(app)
    assert c.get("/healthz").json() == {"status": "ok"}
    info = c.get("/v1/svr/info").json()
    assert info["name"] == "svr-0" and info["protocols"] == ["svr2", "svr3"] and info["serving"] is True
    assert info["suite"] == "ristretto255-SHA512" and info["max_tries"] == 255


def test_svr2_round_trip_and_statuses(user):
    q = user.post("/v1/svr2/query", json={}).json()
    assert q["status"] == "MISSING" and q["token"] == ZERO and len(bytes.fromhex(q["backup_id"])) == 16
    _backup(user)
    r = user.post("/v1/svr2/restore", json={"pin": b64(b"\xbb" * 32)}).json()
    assert (r["status"], r["tries"], r["data"]) == ("PIN_MISMATCH", 4, "")
    r = user.post("/v1/svr2/restore", json={"pin": b64(b"\xaa" * 32)}).json()
    assert (r["status"], r["tries"], base64.b64decode(r["data"])) == ("OK", 4, b"\x01" * 30)
    stale = user.post("/v1/svr2/backup", json={"data": b64(b"\x01" * 30), "pin": b64(b"\xaa" * 32),
                                               "max_tries": 5, "token": ZERO}).json()
    assert stale["status"] == "ALREADY_EXISTS"


def test_each_principal_reaches_only_its_own_backups(app, user):
    _backup(user)
    other = AsgiClient(app).as_role(OTHER_TOKEN)
    assert other.post("/v1/svr2/query", json={}).json()["status"] == "MISSING"
    assert other.post("/v1/svr2/restore", json={"pin": b64(b"\xaa" * 32)}).json()["status"] == "MISSING"
    assert user.post("/v1/svr2/query", json={}).json()["tries"] == 5  # untouched


@pytest.mark.parametrize(("token", "path", "status"), [
    (None, "/v1/svr2/query", 401), ("nope", "/v1/svr2/query", 401), (ADMIN_TOKEN, "/v1/svr2/query", 403),
    (USER_TOKEN, "/v1/svr/freshness", 403), (None, "/v1/svr3/restore1", 401),
])
def test_authentication_and_roles(app, token, path, status):
    c = AsgiClient(app) if token is None else AsgiClient(app).as_role(token)
    r = c.get(path) if path.endswith("freshness") else c.post(path, json={})
    assert r.status_code == status and r.json()["error"] in ("unauthenticated", "forbidden")


@pytest.mark.parametrize("body", [
    {"pin": "not base64!"},
    {"pin": b64(b"x" * 31)},
    {"pin": b64(b"x" * 32), "label": "no spaces"},
    {"pin": b64(b"x" * 32), "label": "x" * 65},
    {"pin": b64(b"x" * 32), "surprise": 1},
    {},
    {"pin": 12},
])
def test_malformed_restore_is_400_and_charges_nothing(user, service, body):
    _backup(user)
    epoch = service.fresh.state.committed.epoch
    r = user.post("/v1/svr2/restore", json=body)
    assert r.status_code == 400 and r.json()["error"] == "invalid"
    assert service.fresh.state.committed.epoch == epoch
    assert user.post("/v1/svr2/query", json={}).json()["tries"] == 5


@pytest.mark.parametrize(("field", "value"), [
    ("max_tries", 0), ("max_tries", 256), ("data", b64(b"x" * 16)), ("data", b64(b"x" * 273)),
    ("token", b64(bytes(15))),
])
def test_malformed_backup_is_400(user, field, value):
    body = {"data": b64(b"x" * 30), "pin": b64(b"x" * 32), "max_tries": 5, "token": ZERO, field: value}
    r = user.post("/v1/svr2/backup", json=body)
    assert r.status_code == 400 and r.json()["error"] == "invalid"


def test_svr3_element_must_be_a_valid_ristretto255_encoding(user):
    for bad in (bytes(32), (2**255 - 19).to_bytes(32, "little"), b"\x01" * 31):
        r = user.post("/v1/svr3/restore1", json={"blinded": b64(bad)})
        assert r.status_code == 400 and r.json()["error"] == "invalid"


def test_oversized_body_is_413(user):
    r = user.post("/v1/svr2/restore", content=b"{" + b" " * 20000 + b"}",
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too-large"


def test_a_new_server_waits_for_the_owner(tmp_path, anchor):
    svc = open_service(SqliteEngine(tmp_path / "new.db").open(), anchor, initialise=False)
    app = create_app(svc, parse_access(access_list()))
    user, admin = AsgiClient(app).as_role(USER_TOKEN), AsgiClient(app).as_role(ADMIN_TOKEN)
    r = user.post("/v1/svr2/query", json={})
    assert r.status_code == 503 and r.json()["error"] == "not-fresh" and "initialise" in r.json()["detail"]
    assert AsgiClient(app).get("/healthz").status_code == 503
    st = admin.get("/v1/svr/freshness").json()
    assert st["action"] == "initialise" and st["proposal"]["ledger"] == "svr-0"
    forged = sign_statement(st["payload"], Owner().private_pem())  # not the pinned owner
    r = admin.post("/v1/svr/freshness", json=forged)
    assert r.status_code == 400 and r.json()["error"] == "invalid-statement"
    r = admin.post("/v1/svr/freshness", json=sign_statement(st["payload"], anchor.owner.private_pem()))
    assert r.status_code == 200 and r.json()["epoch"] == 0
    assert user.post("/v1/svr2/query", json={}).json()["status"] == "MISSING"
    assert AsgiClient(app).get("/healthz").status_code == 200
    svc.close()


@pytest.mark.parametrize("access", [
    {"zz": {"name": "a", "roles": ["backup"]}},
    {"ab" * 32: {"name": "", "roles": ["backup"]}},
    {"ab" * 32: {"name": "a", "roles": ["root"]}},
    {"ab" * 32: {"name": "a", "roles": []}},
    [],
])
def test_access_list_is_checked(access):
    with pytest.raises(SvrConfigError):
        parse_access(access)
