"""The SCONE-compatible API's contract, in-process (``httpx.ASGITransport``) over the same real
SQLite file and keyset as the native API: the demo's paths, form fields, status codes and JSON
members; records it creates are ordinary records of the native API; ``scone_auth = "token"``.
The demo's own ``curl`` and ``requests`` lines against the service process (TLS name ``api``,
the broker's CA) are in tests/records/test_server.py."""

from __future__ import annotations

import pytest

from safehold.crypto.keyset import Keyset
from safehold.records.scone import FIELDS
from safehold.records.server import assemble_apps
from safehold.store import open_store
from tests.support.records_service import Service, access_list

FORM = {f: f"v-{f}" for f in FIELDS} | {"fname": "Jane", "lname": "Doe", "ssn": "999-11-2222",
                                        "dob": "1990-01-01"}


def test_demo_flow_status_codes_and_bodies(service: Service) -> None:
    api = service.scone_api()
    r = api.post("/patient/patient_3", data=FORM)
    assert r.status_code == 200 and r.json() == {**FORM, "id": "patient_3"}
    r = api.post("/patient/patient_3", data={**FORM, "fname": "Other"})
    assert r.status_code == 403 and r.json() == {"error": "already exists"}
    r = api.get("/patient/patient_3")
    body = r.json()
    score = body.pop("score")
    assert r.status_code == 200 and body == {**FORM, "id": "patient_3"}
    assert isinstance(score, float) and 0 <= score < 1
    assert api.get("/score/patient_3").json() == {"id": "patient_3", "score": score}
    for path in ("/patient/nobody", "/score/nobody"):
        r = api.get(path)
        assert r.status_code == 404 and r.json() == {"error": "unknown patient_id"}
    assert api.get("/healthz").json() == {"status": "ok"}
    assert "/patient/{patient_id}" in api.get("/openapi.json").json()["paths"]


def test_form_errors_name_the_fields_never_the_values(service: Service) -> None:
    api = service.scone_api()
    r = api.post("/patient/p4", data={"fname": "Secretfirst"})
    assert r.status_code == 400 and r.json()["error"].startswith("missing fields: lname")
    assert "Secretfirst" not in r.text
    r = api.post("/patient/p4", data={**FORM, "fname": "x" * 5000})
    assert r.status_code == 400 and r.json() == {"error": "field fname must be text of at most 4096 chars"}
    r = api.post("/patient/p4", data=FORM, files={"lname": ("l.txt", b"Doe")})  # a file, not text
    assert r.status_code == 400 and "field lname must be text" in r.json()["error"]
    r = api.post("/patient/bad%20id", data=FORM)
    assert r.status_code == 400 and r.json()["error"] == "invalid"
    assert "record id may contain only" in r.json()["detail"]
    assert api.get("/patient/p4").status_code == 404  # nothing was stored


def test_multipart_form_and_the_same_record_on_the_native_api(service: Service) -> None:
    r = service.scone_api().post("/patient/mp1", data=FORM, files={"unused": ("u.txt", b"ignored")})
    assert r.status_code == 200, r.text
    native = service.api("reader")
    assert native.get("/v1/patients/mp1").json() == FORM
    hits = native.get("/v1/patients", params={"identifier": "999-11-2222"}).json()["records"]
    assert [h["id"] for h in hits] == ["mp1"]
    # without authentication every access is still audited, under the client's address
    who = {e.body["who"] for e in service.repo.audit.entries()}
    assert "scone:127.0.0.1" in who


def test_token_auth_uses_the_native_tokens_and_roles(token_service: Service) -> None:
    anon = token_service.scone_api()
    r = anon.post("/patient/t1", data=FORM)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert anon.get("/patient/t1").status_code == 401
    r = token_service.scone_api("reader").post("/patient/t1", data=FORM)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert token_service.scone_api("writer").post("/patient/t1", data=FORM).status_code == 200
    assert token_service.scone_api("reader").get("/patient/t1").json()["lname"] == "Doe"
    token_service.repo.audit.flush()  # read entries are buffered (one flush interval)
    assert {"writer", "reader"} <= {e.body["who"] for e in token_service.repo.audit.entries()}


def test_scone_auth_modes(tmp_path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with pytest.raises(ValueError, match="auth must be 'none' or 'token'"):
            assemble_apps(store, Keyset.generate(), access_list(), scone_auth="open")
        _, scone, _ = assemble_apps(store, Keyset.generate(), access_list(), scone_auth=None)
        assert scone is None  # the SCONE port is off
    finally:
        store.close()
