"""The records service's native API contract, in-process: the app the service process serves,
assembled over a real SQLite file and a real keyset (tests/records/conftest.py), called through
``httpx.ASGITransport``. Status codes, the ``{"error", "detail"}`` shape of every refusal
(FastAPI's own 404/405/validation answers included), ETag / If-Match, bad ids, non-finite
numbers, body limits, roles. The same service as a process behind TLS and the broker is tested
in tests/records/test_server.py."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from safehold.client.errors import RecordsClientError
from safehold.client.records import _raise_for
from safehold.records.model import MAX_BATCH, MAX_RECORD_BYTES
from safehold.store.migrations import ROWS_TABLE
from tests.support.records_service import Service

JSON = {"Content-Type": "application/json"}


def err(r: httpx.Response, status: int, code: str) -> str:
    """Assert ``r`` is a refusal in the documented shape; return its detail."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


def patient(rid: str, family: str = "Contract", **extra) -> dict:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family}], **extra}


# --- create, read, update, delete; ETag and If-Match -----------------------------------------


def test_put_get_delete_with_etags_and_if_match(service: Service) -> None:
    api = service.api("writer")
    r = api.put("/v1/patients/p1", json=patient("p1"))
    assert r.status_code == 201 and r.headers["etag"] == '"1"'
    assert r.json() == {"id": "p1", "version": 1, "status": "created"}
    r = api.put("/v1/patients/p1", json=patient("p1", gender="other"))
    assert r.status_code == 200 and r.json()["status"] == "updated" and r.headers["etag"] == '"2"'
    r = api.get("/v1/patients/p1")
    assert r.status_code == 200 and r.json() == patient("p1", gender="other")
    assert r.headers["etag"] == '"2"' and r.headers["content-type"] == "application/json"
    # compare-and-set: a stale version is refused and changes nothing; the current one (weak
    # or strong ETag form) is accepted
    assert "version" in err(api.put("/v1/patients/p1", json=patient("p1", gender="male"),
                                    headers={"If-Match": '"1"'}), 412, "precondition-failed")
    assert api.get("/v1/patients/p1").json()["gender"] == "other"
    r = api.put("/v1/patients/p1", json=patient("p1", gender="male"), headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.headers["etag"] == '"3"'
    assert "If-Match" in err(api.put("/v1/patients/p1", json=patient("p1"), headers={"If-Match": "*x"}),
                             400, "invalid")
    # create-only: If-None-Match: * on an existing id
    err(api.put("/v1/patients/p1", json=patient("p1"), headers={"If-None-Match": "*"}), 409, "exists")
    assert api.put("/v1/patients/p2", json=patient("p2"), headers={"If-None-Match": "*"}).status_code == 201
    # delete: If-Match as for PUT, then 204, then 404
    err(api.delete("/v1/patients/p1", headers={"If-Match": '"1"'}), 412, "precondition-failed")
    r = api.delete("/v1/patients/p1", headers={"If-Match": '"3"'})
    assert r.status_code == 204 and r.content == b""
    err(api.get("/v1/patients/p1"), 404, "not-found")
    err(api.delete("/v1/patients/p1"), 404, "not-found")


def test_bodies_that_are_not_a_json_object_are_refused(service: Service) -> None:
    api = service.api("writer")
    assert "not JSON" in err(api.put("/v1/patients/b1", content=b"{nope", headers=JSON), 400, "invalid")
    assert "JSON object" in err(api.put("/v1/patients/b1", json=[1, 2]), 400, "invalid")
    # a form body is not a record: refused by its media type before it is read
    err(api.put("/v1/patients/b1", data={"fname": "Jane"}), 415, "unsupported-media-type")
    err(api.put("/v1/patients/b1", content=b"", headers=JSON), 400, "invalid")
    err(api.get("/v1/patients/b1"), 404, "not-found")


# --- roles -----------------------------------------------------------------------------------


def test_roles_and_credentials(service: Service) -> None:
    assert service.api("writer").put("/v1/patients/r1", json=patient("r1")).status_code == 201
    assert "authentication required" in err(service.api(None).get("/v1/patients/r1"), 401, "unauthorized")
    bad = service.api(None).as_role("not-a-token")
    assert "not recognised" in err(bad.get("/v1/patients/r1"), 401, "unauthorized")
    reader = service.api("reader")
    assert reader.get("/v1/patients/r1").status_code == 200
    assert reader.get("/v1/patients").json()["ids"] == ["r1"]
    assert "needs 'writer'" in err(reader.put("/v1/patients/r1", json=patient("r1")), 403, "forbidden")
    err(reader.delete("/v1/patients/r1"), 403, "forbidden")
    err(reader.post("/v1/patients:batch", json={"records": []}), 403, "forbidden")
    writer = service.api("writer")
    err(writer.get("/v1/audit/verify"), 403, "forbidden")
    err(writer.post("/v1/audit/reseal"), 403, "forbidden")
    r = service.api("admin").get("/v1/audit/verify")
    assert r.status_code == 200 and r.json()["entries"] >= 8
    # refused calls are audited too (as "denied")
    outcomes = [(e.body["who"], e.body["outcome"]) for e in service.repo.audit.entries()]
    assert ("reader", "denied") in outcomes and ("writer", "denied") in outcomes


# --- error shapes: body limits, query validation, unknown paths and methods ------------------


def test_oversized_bodies_are_413_naming_the_limit_and_nothing_is_stored(service: Service) -> None:
    api = service.api("writer")
    big = b'{"x": "' + b"a" * (MAX_RECORD_BYTES + 10) + b'"}'
    d = err(api.put("/v1/patients/big1", content=big, headers=JSON), 413, "too-large")
    assert f"{MAX_RECORD_BYTES} bytes" in d

    async def chunks():  # no Content-Length: the limit counts what arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    d = err(api.put("/v1/patients/big2", content=chunks(), headers=JSON), 413, "too-large")
    assert f"{MAX_RECORD_BYTES} bytes" in d
    for rid in ("big1", "big2"):
        err(api.get(f"/v1/patients/{rid}"), 404, "not-found")
    assert api.get("/healthz").status_code == 200  # still serving


def test_query_errors_name_the_parameter_never_the_value(service: Service) -> None:
    api = service.api("reader")
    for bad in ("abc", "-1", "0", "100000"):
        d = err(api.get("/v1/patients", params={"limit": bad}), 400, "invalid")
        assert "query parameter 'limit'" in d and bad not in d.replace("1000", "")
    d = err(api.get("/v1/patients", params={"family": "Secretname" * 60}), 400, "invalid")
    assert "query parameter 'family'" in d and "Secretname" not in d
    d = err(api.get("/v1/patients", params={"address": "Main Street"}), 400, "invalid")
    assert "unknown query parameters ['address']" in d and "Main" not in d
    # gender alone is a bounded scan (docs/search-leakage.md), not an error
    assert api.get("/v1/patients", params={"gender": "female"}).status_code == 200
    assert "cursor" in err(api.get("/v1/patients", params={"cursor": "forged"}), 400, "invalid")


def test_unknown_paths_and_methods_keep_the_shape(service: Service) -> None:
    api = service.api("admin")
    d = err(api.get("/v1/no/such/Doe-Jane"), 404, "no-such-endpoint")
    assert "Doe-Jane" not in d
    assert "POST" in err(api.post("/v1/patients/x1", json={}), 405, "method-not-allowed")
    err(api.request("PATCH", "/v1/patients/x1", json={}), 405, "method-not-allowed")
    # the SDK (and so the CLI) shows the code, not a bare "HTTP 404"; an unknown endpoint is
    # not mistaken for a missing record
    with pytest.raises(RecordsClientError, match="HTTP 404 no-such-endpoint: no such endpoint") as e:
        _raise_for(api.get("/v1/nope"))
    assert e.type is RecordsClientError


# --- record rules at the edge: ids, non-finite numbers ---------------------------------------


def test_bad_ids_name_the_character_class_and_position(service: Service) -> None:
    api = service.api("writer")
    d = err(api.put("/v1/patients/bad%20id!", json={"a": 1}), 400, "invalid")
    assert d == "record id may contain only A-Z a-z 0-9 . _ ~ : @ - (got a space at position 4)"
    d = err(api.put("/v1/patients/nu%00l", json={"a": 1}), 400, "invalid")
    assert "control or invisible character (U+0000) at position 3" in d
    d = err(api.get("/v1/patients/M%C3%BCller"), 400, "invalid")
    assert "non-ASCII character (U+00FC) at position 2" in d and "ller" not in d
    d = err(api.put("/v1/patients/" + "a" * 129, json={"a": 1}), 400, "invalid")
    assert "1..128 characters" in d


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_never_stored(service: Service, const: str) -> None:
    """JSON has no NaN / Infinity (RFC 8259 §6), although Python's json module accepts them."""
    api = service.api("writer")
    body = f'{{"resourceType": "Patient", "x": {{"y": [1, {const}]}}}}'
    d = err(api.put("/v1/patients/nan1", content=body, headers=JSON), 400, "invalid")
    assert f"{const} found" in d and "RFC 8259" in d
    batch = f'{{"records": [{{"id": "nan2", "record": {{"x": {const}}}}}]}}'
    assert "RFC 8259" in err(api.post("/v1/patients:batch", content=batch, headers=JSON), 400, "invalid")
    for rid in ("nan1", "nan2"):
        err(api.get(f"/v1/patients/{rid}"), 404, "not-found")


# --- batch -----------------------------------------------------------------------------------


def test_malformed_batch_item_is_a_400_naming_it_and_nothing_is_written(service: Service) -> None:
    api = service.api("writer")
    good = {"resourceType": "Patient", "id": "x"}
    cases = [
        ({"id": "nb-b", "record": None}, "batch item 1: record must be a JSON object, got null"),
        ({"id": "nb-b"}, "batch item 1: record must be a JSON object, got null"),
        ({"id": "nb-b", "record": [1]}, "batch item 1: record must be a JSON object, got list"),
        ({"id": "", "record": good}, "batch item 1: id must be a non-empty string"),
        ({"id": 7, "record": good}, "batch item 1: id must be a non-empty string"),
        ("nb-b", "batch item 1: must be"),
    ]
    for bad, detail in cases:
        body = {"records": [{"id": "nb-a", "record": good}, bad, {"id": "nb-c", "record": good}]}
        assert err(api.post("/v1/patients:batch", json=body), 400, "invalid").startswith(detail)
    for envelope in ([], {"records": "x"}, {"items": []},
                     {"records": [{"id": f"n{i}", "record": good} for i in range(MAX_BATCH + 1)]}):
        assert "records" in err(api.post("/v1/patients:batch", json=envelope), 400, "invalid")
    assert "not JSON" in err(api.post("/v1/patients:batch", content=b"{", headers=JSON), 400, "invalid")
    for rid in ("nb-a", "nb-c", "n0"):
        err(api.get(f"/v1/patients/{rid}"), 404, "not-found")
    # a well-formed batch is not atomic: a record the rules refuse fails alone
    r = api.post("/v1/patients:batch", json={"records": [
        {"id": "nb-a", "record": good}, {"id": "bad id", "record": good}, {"id": "nb-c", "record": good}]})
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["created", "failed", "created"]
    assert "record id may contain only" in res[1]["error"]
    assert api.get("/v1/patients/nb-c").json() == good


# --- list and search -------------------------------------------------------------------------


def test_list_pages_and_search_with_versions(service: Service) -> None:
    api = service.api("writer")
    for i in range(5):
        api.put(f"/v1/patients/s{i}", json=patient(f"s{i}", "Searchfamily", birthDate=f"1970-01-0{i + 1}"))
    api.put("/v1/patients/s0", json=patient("s0", "Searchfamily", birthDate="1970-01-01", gender="female"))
    reader = service.api("reader")
    first = reader.get("/v1/patients", params={"limit": 2}).json()
    assert len(first["ids"]) == 2 and first["next"]
    seen = list(first["ids"])
    nxt = first["next"]
    while nxt:
        page = reader.get("/v1/patients", params={"limit": 2, "cursor": nxt}).json()
        seen += page["ids"]
        nxt = page["next"]
    assert sorted(seen) == [f"s{i}" for i in range(5)]
    hits = reader.get("/v1/patients", params={"family": "SEARCHFAMILY"}).json()
    assert [(h["id"], h["version"]) for h in hits["records"]] == [("s0", 2), ("s1", 1), ("s2", 1),
                                                                    ("s3", 1), ("s4", 1)]
    assert hits["records"][0]["record"]["gender"] == "female" and "truncated" not in hits
    some = reader.get("/v1/patients", params={"family": "searchfamily", "limit": 2}).json()
    assert len(some["records"]) == 2 and some["truncated"] is True
    one = reader.get("/v1/patients", params={"family": "searchfamily", "birthDate": "1970-01-03"}).json()
    assert [h["id"] for h in one["records"]] == ["s2"]
    assert reader.get("/v1/patients", params={"family": "nobody"}).json() == {"records": []}


# --- what the database can do: tampering, a cut audit log ------------------------------------


def test_tampered_row_is_409_record_tampered(service: Service) -> None:
    api = service.api("writer")
    api.put("/v1/patients/t1", json=patient("t1"))
    api.put("/v1/patients/t2", json=patient("t2"))
    conn = sqlite3.connect(service.db)
    key, value = conn.execute(
        f"SELECT key, value FROM {ROWS_TABLE} WHERE ns = (SELECT id FROM safehold_namespaces "
        f"WHERE name = 'records:patients')").fetchone()
    flipped = bytearray(value)
    flipped[-5] ^= 0x40
    conn.execute(f"UPDATE {ROWS_TABLE} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records:patients') AND key = ?",
                 (bytes(flipped), key))
    conn.commit()
    conn.close()
    statuses = sorted(api.get(f"/v1/patients/{rid}").status_code for rid in ("t1", "t2"))
    assert statuses == [200, 409]
    bad = next(rid for rid in ("t1", "t2") if api.get(f"/v1/patients/{rid}").status_code == 409)
    assert key.hex() in err(api.get(f"/v1/patients/{bad}"), 409, "record-tampered")
    assert "Contract" not in api.get(f"/v1/patients/{bad}").text  # no record content in errors


def test_healthz_openapi_and_a_cut_audit_log(service: Service) -> None:
    anon = service.api(None)
    r = anon.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    spec = anon.get("/openapi.json").json()
    assert {"/v1/patients/{rid}", "/v1/patients", "/v1/patients:batch",
            "/v1/audit/verify"} <= set(spec["paths"])
    assert "/healthz" not in spec["paths"]
    api = service.api("admin")
    api.put("/v1/patients/h1", json=patient("h1"))
    # the database operator removes the audit log's last entry: the authenticated head names it
    conn = sqlite3.connect(service.db)
    conn.execute(f"DELETE FROM {ROWS_TABLE} WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit') AND key = "
                 f"(SELECT max(key) FROM {ROWS_TABLE} WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records.audit'))")
    conn.commit()
    conn.close()
    service.repo.audit.invalidate()  # as after a restart: the head is read from the store again
    r = anon.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}  # and nothing else
    assert "missing" in err(api.get("/v1/audit/verify"), 409, "audit-chain-broken")
    err(api.get("/v1/patients/h1"), 409, "audit-chain-broken")  # audited accesses fail closed
    r = api.post("/v1/audit/reseal")
    assert r.status_code == 200 and r.json()["outcome"]
    assert api.get("/v1/patients/h1").status_code == 200
    assert anon.get("/healthz").status_code == 200


def test_error_bodies_hold_no_record_content(service: Service) -> None:
    api = service.api("writer")
    secret = "Geheimname-4711"
    api.put("/v1/patients/c1", json=patient("c1", family=secret))
    for r in (api.put("/v1/patients/c1", json=patient("c1", family=secret), headers={"If-Match": '"9"'}),
              api.put("/v1/patients/c1", json=patient("c1", family=secret), headers={"If-None-Match": "*"}),
              api.put("/v1/patients/c1", content=json.dumps({"n": secret, "x": float("nan")}), headers=JSON)):
        assert r.status_code >= 400 and secret not in r.text


@pytest.mark.parametrize("bad", ["1970-13-45", "1970-02-29", "70-01-01", "1970-1-1", "1970-01-01T00:00:00Z",
                                 " 1970", 19700101, None])
def test_a_patient_birthdate_that_is_not_a_fhir_date_is_refused_unechoed(service: Service, bad) -> None:
    api = service.api("writer")
    detail = err(api.put("/v1/patients/bd", json=patient("bd", birthDate=bad)), 400, "invalid")
    assert "birthDate" in detail and "FHIR date" in detail and str(bad) not in detail
    items = [{"id": "bd", "record": patient("bd", birthDate=bad)},
             {"id": "ok", "record": patient("ok", birthDate="1972-02-29")}]
    r = api.post("/v1/patients:batch", json={"records": items})
    assert r.status_code in (200, 207), r.text
    assert api.get("/v1/patients/bd").status_code == 404 and api.get("/v1/patients/ok").status_code == 200
    # not a Patient (a flat CSV row or a SCONE form): its dates are its own business
    assert api.put("/v1/patients/row", json={"BIRTHDATE": "1970-13-45", "LAST": "Row"}).status_code == 201
    for good in ("1970", "1970-01", "1972-02-29"):
        assert api.put(f"/v1/patients/g{good}", json=patient(f"g{good}", birthDate=good)).status_code == 201
