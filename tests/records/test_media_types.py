"""The native API parses only bodies declared as JSON: ``text/plain``, form and multipart bodies,
a missing or doubled ``Content-Type`` and a non-UTF-8 charset are 415, nothing stored."""

from __future__ import annotations

import json

import pytest

from safehold.errors import RecordNotFoundError
from tests.support.records_app import records_app

RECORD = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Mosciski958"}]}
BODY = json.dumps(RECORD).encode()


@pytest.fixture
def app(tmp_path):
    with records_app(tmp_path) as a:
        yield a


REFUSED = [
    {"headers": {"Content-Type": "text/plain"}, "content": BODY},
    {"headers": {"Content-Type": "application/x-www-form-urlencoded"}, "content": BODY},
    {"data": {"resourceType": "Patient", "id": "p1"}},  # a real form body
    {"files": {"record": ("p.json", BODY, "application/json")}},  # multipart/form-data
    {"content": BODY},  # no Content-Type at all
    {"headers": {"Content-Type": "application/json; charset=latin-1"}, "content": BODY},
    {"headers": [("Content-Type", "application/json"), ("Content-Type", "text/plain")], "content": BODY},
    {"headers": {"Content-Type": "application/fhir+json"}, "content": BODY},  # FHIR routes only
]


@pytest.mark.parametrize("kw", REFUSED, ids=["text", "form-type", "form", "multipart", "none",
                                              "latin1", "two-headers", "fhir-json"])
def test_put_with_a_body_not_declared_as_json_is_415_and_nothing_is_stored(app, kw):
    r = app.request("PUT", "/v1/patients/p1", **kw)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported-media-type"
    assert "application/json" in r.json()["detail"] and "Mosciski958" not in r.text
    with pytest.raises(RecordNotFoundError):
        app.repo.get("test", "p1")


@pytest.mark.parametrize("kw", REFUSED[:2] + REFUSED[4:5], ids=["text", "form-type", "none"])
def test_batch_with_a_body_not_declared_as_json_is_415(app, kw):
    body = json.dumps({"records": [{"id": "p1", "record": RECORD}]}).encode()
    r = app.request("POST", "/v1/patients:batch", **{**kw, "content": body})
    assert r.status_code == 415, r.text
    with pytest.raises(RecordNotFoundError):
        app.repo.get("test", "p1")


def test_json_with_parameters_and_any_case_is_accepted(app):
    r = app.request("PUT", "/v1/patients/p1", content=BODY,
                    headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 201, r.text
    r = app.request("POST", "/v1/patients:batch", json={"records": [{"id": "p2", "record": RECORD}]})
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "created"


def test_authentication_comes_before_the_media_type(app):
    text = {"content": BODY, "headers": {"Content-Type": "text/plain"}}
    assert app.request("PUT", "/v1/patients/p1", role=None, **text).status_code == 401
    assert app.request("PUT", "/v1/patients/p1", role="reader", **text).status_code == 403
