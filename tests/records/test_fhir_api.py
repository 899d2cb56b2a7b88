"""FHIR R4 REST at /fhir, in-process over a real SQLite file with real patient data (HL7 R4
examples, Synthea bundles): interactions, versions and history, search semantics under blind
indexes, paging, refusals as OperationOutcome, content negotiation, roles and audit. Every
resource and Bundle returned is validated with ``fhir.resources`` (R4B models).

The same endpoint driven by real FHIR client libraries over RA-TLS is in
test_fhir_clients.py.
"""

from __future__ import annotations

import json
from datetime import date

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from safehold.records.importers import ImportItem, ImportResource, iter_file
from tests.support.fhir_app import records_app
from tests.support.shared import SHARED
from tests.support.shared import need_shared as need

HL7 = SHARED / "data" / "hl7-fhir-r4-patient-examples"
BUNDLES = SHARED / "data" / "synthea-fhir-r4-bundles-google-fhir-data-pipes"
FJ = {"Content-Type": "application/fhir+json"}
MODELS = {"Patient": Patient, "Bundle": Bundle, "OperationOutcome": OperationOutcome,
          "CapabilityStatement": CapabilityStatement, "Observation": Observation}


def valid(obj: dict) -> dict:
    """``obj`` after validating it with the R4B model of its type (entries too)."""
    MODELS[obj["resourceType"]].model_validate(obj)
    for e in obj.get("entry", []):
        if "resource" in e and e["resource"]["resourceType"] in MODELS:
            MODELS[e["resource"]["resourceType"]].model_validate(e["resource"])
    return obj


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ra = records_app(tmp_path_factory.mktemp("fhir"))
    yield ra
    ra.store.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app.app, headers=app.headers("writer")) as c:
        yield c


@pytest.fixture(scope="module")
def loaded(client):
    """The 22 HL7 examples and 20 Synthea patients, PUT through /fhir; a few German names."""
    need(HL7)
    need(BUNDLES)
    pats = {}
    for f in sorted(HL7.glob("Patient-*.json")) + sorted(BUNDLES.glob("*.json")):
        for it in iter_file(f):
            if isinstance(it, ImportItem):
                pats[it.id] = it.record
    extra = {
        "de-1": {"name": [{"family": "Königsstein", "given": ["Jürgen"]}], "birthDate": "1961-02",
                 "gender": "male"},
        "de-2": {"name": [{"family": "Graf Freiherr von Schaumberg", "given": ["Ottilie"]}],
                 "birthDate": "1940", "gender": "female"},
        "de-3": {"name": [{"family": "Müller-Straße", "given": ["Björn"]}], "birthDate": "2000-02-29",
                 "gender": "male"},
    }
    for rid, body in extra.items():
        pats[rid] = {"resourceType": "Patient", "id": rid, **body}
    for rid, rec in pats.items():
        r = client.put(f"/fhir/Patient/{rid}", content=json.dumps(rec), headers=FJ)
        assert r.status_code == 201, (rid, r.text)
        valid(r.json())
    return pats


def search(client, query: str, **kw) -> dict:
    r = client.get(f"/fhir/Patient?{query}", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    return valid(r.json())


def ids(bundle: dict) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def all_ids(client, query: str) -> tuple[list[str], int]:
    """Follow next links to the end: (ids in order, the total the first page said)."""
    first = search(client, query)
    out, page = [], first
    while True:
        out += [e["resource"]["id"] for e in page.get("entry", [])]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            return out, first["total"]
        r = client.get(nxt[0])
        assert r.status_code == 200, r.text
        page = valid(r.json())


# --- capability, formats, errors ------------------------------------------------------------------


def test_metadata_says_what_is_served(client):
    r = client.get("/fhir/metadata", headers={"Authorization": ""})  # no authentication needed
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    cs = valid(r.json())
    assert cs["fhirVersion"] == "4.0.1" and cs["format"] == ["application/fhir+json", "json"]
    pat = next(x for x in cs["rest"][0]["resource"] if x["type"] == "Patient")
    assert {i["code"] for i in pat["interaction"]} == {"read", "vread", "update", "delete", "create",
                                                      "search-type"}
    assert {p["name"] for p in pat["searchParam"]} == {"family", "given", "name", "birthdate",
                                                      "identifier", "gender"}
    assert pat["conditionalCreate"] is True and pat["conditionalDelete"] == "not-supported"
    obs = next(x for x in cs["rest"][0]["resource"] if x["type"] == "Observation")
    assert {p["name"] for p in obs["searchParam"]} == {"patient", "subject"}


@pytest.mark.parametrize(("headers", "query", "status", "ctype"), [
    ({}, "", 200, "application/fhir+json"),
    ({"Accept": "application/json"}, "", 200, "application/json"),
    ({"Accept": "application/fhir+json;q=0.9, application/xml"}, "", 200, "application/fhir+json"),
    ({"Accept": "application/fhir+xml"}, "", 406, "application/fhir+json"),
    ({"Accept": "application/fhir+xml"}, "?_format=json", 200, "application/fhir+json"),
    ({}, "?_format=xml", 406, "application/fhir+json"),
    ({}, "?_format=application/fhir%2Bjson", 200, "application/fhir+json"),
    ({}, "?_format=text/html", 406, "application/fhir+json"),
])
def test_format_and_accept(client, headers, query, status, ctype):
    r = client.get(f"/fhir/metadata{query}", headers=headers)
    assert (r.status_code, r.headers["content-type"]) == (status, ctype)
    valid(r.json())


def test_errors_are_operation_outcomes_without_content(client, app, loaded):
    cases = [
        (client.get("/fhir/Patient/nope"), 404, "not-found"),
        (client.get("/fhir/Foo/1"), 404, "not-supported"),
        (client.get("/fhir/Patient/a_b"), 400, "invalid"),  # not a FHIR id
        (client.get("/fhir/Patient?birthdate=ap1970"), 400, "not-supported"),
        (client.get("/fhir/Patient?family:contains=ott"), 400, "not-supported"),
        (client.get("/fhir/Patient?address=Berlin"), 400, "not-supported"),
        (client.get("/fhir/Patient?_sort=family"), 400, "not-supported"),
        (client.get("/fhir/Patient?birthdate=1974-02-30"), 400, "invalid"),
        (client.get("/fhir/Patient?birthdate=1974-12-25T10:00:00Z"), 400, "invalid"),
        (client.post("/fhir/Patient", content="{}", headers={"Content-Type": "text/plain"}),
         415, "not-supported"),
        (client.post("/fhir/Patient", content="[1]", headers=FJ), 400, "invalid"),
        (client.post("/fhir/Patient", content='{"resourceType": "Observation"}', headers=FJ), 400, "invalid"),
        (client.post("/fhir/Patient?identifier=x", content='{"resourceType": "Patient"}', headers=FJ),
         400, "not-supported"),
        (client.put("/fhir/Patient/de-1", content=json.dumps({"resourceType": "Patient", "id": "other"}),
                    headers=FJ), 400, "invalid"),
        (client.put("/fhir/Patient/de-1", content=json.dumps({"resourceType": "Patient"}), headers=FJ),
         400, "invalid"),
        (client.post("/fhir/", content=json.dumps({"resourceType": "Bundle", "type": "transaction"}),
                     headers=FJ), 400, "not-supported"),
        (client.get("/fhir/Patient", headers={"Authorization": "Bearer wrong"}), 401, "login"),
        (client.post("/fhir/Patient", content='{"resourceType": "Patient"}',
                     headers={**FJ, **app.headers("reader")}), 403, "forbidden"),
        (client.patch("/fhir/Patient/de-1"), 405, "not-supported"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.request.url, r.text)
        oo = valid(r.json())
        assert oo["issue"][0]["code"] == code, (r.request.url, oo)
        for name in ("Königsstein", "Schaumberg", "Chalmers", "ott", "Berlin"):
            assert name not in r.text
    assert cases[-1][0].headers["allow"] == "DELETE, GET, PUT"
    assert cases[-3][0].headers["www-authenticate"] == "Bearer"


# --- interactions, versions, history -------------------------------------------------------------


def test_create_read_update_vread_delete(client, app):
    body = {"resourceType": "Patient", "id": "client-chosen", "name": [{"family": "Ünal", "given": ["Ada"]}],
            "birthDate": "1990-05-17", "gender": "female"}
    r = client.post("/fhir/Patient", content=json.dumps(body), headers=FJ)
    assert r.status_code == 201
    created = valid(r.json())
    pid = created["id"]
    assert pid != "client-chosen" and len(pid) == 36  # server-assigned (UUID), R4 §3.1.0.9
    assert r.headers["etag"] == 'W/"1"' and created["meta"]["versionId"] == "1"
    assert r.headers["location"] == f"http://testserver/fhir/Patient/{pid}/_history/1"
    assert "last-modified" in r.headers and created["meta"]["lastUpdated"].endswith("Z")
    # the same record on the native API, same version
    native = client.get(f"/v1/patients/{pid}")
    assert native.status_code == 200 and native.headers["etag"] == '"1"'
    assert native.json()["name"] == body["name"]

    got = valid(client.get(f"/fhir/Patient/{pid}").json())
    got["name"][0]["family"] = "Unal-Berg"
    r = client.put(f"/fhir/Patient/{pid}", content=json.dumps(got), headers={**FJ, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    stale = client.put(f"/fhir/Patient/{pid}", content=json.dumps(got), headers={**FJ, "If-Match": 'W/"1"'})
    assert stale.status_code == 412 and valid(stale.json())["issue"][0]["code"] == "conflict"
    # an update with the same content is a no-op: no new version
    same = client.put(f"/fhir/Patient/{pid}", content=json.dumps(got), headers=FJ)
    assert same.status_code == 200 and same.headers["etag"] == 'W/"2"'

    v1 = valid(client.get(f"/fhir/Patient/{pid}/_history/1").json())
    v2 = valid(client.get(f"/fhir/Patient/{pid}/_history/2").json())
    assert v1["name"][0]["family"] == "Ünal" and v1["meta"]["versionId"] == "1"
    assert v2["name"][0]["family"] == "Unal-Berg" and v2["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Patient/{pid}/_history/3").status_code == 404
    assert client.get(f"/fhir/Patient/{pid}/_history/0").status_code == 400

    # Prefer: return=minimal
    r = client.put(f"/fhir/Patient/{pid}", content=json.dumps({**got, "gender": "other"}),
                   headers={**FJ, "Prefer": "return=minimal"})
    assert r.status_code == 200 and r.content == b"" and r.headers["etag"] == 'W/"3"'

    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204
    assert client.get(f"/fhir/Patient/{pid}").status_code == 404
    assert client.get(f"/fhir/Patient/{pid}/_history/1").status_code == 404  # erased with it
    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204  # nothing there: still 204
    # update as create keeps the client's id
    r = client.put("/fhir/Patient/chosen-1", content=json.dumps({**body, "id": "chosen-1"}), headers=FJ)
    assert r.status_code == 201 and valid(r.json())["id"] == "chosen-1"
    # the access audit saw all of it and still verifies
    assert app.repo.audit.verify() > 10


def test_native_records_are_not_fhir_resources(client, app):
    flat = {"fname": "Jane", "lname": "Doe", "ssn": "999-11-2222", "dob": "1990-01-01"}
    assert client.put("/v1/patients/flat-1", json=flat).status_code == 201
    r = client.get("/fhir/Patient/flat-1")
    assert r.status_code == 404 and "not a FHIR Patient" in valid(r.json())["issue"][0]["diagnostics"]
    assert "flat-1" not in ids(search(client, "family=doe"))
    assert client.delete("/fhir/Patient/flat-1").status_code == 404  # not deleted through /fhir
    over = client.put("/fhir/Patient/flat-1", content=json.dumps({"resourceType": "Patient", "id": "flat-1"}),
                      headers=FJ)
    assert over.status_code == 409 and valid(over.json())["issue"][0]["code"] == "duplicate"
    assert client.get("/v1/patients/flat-1").status_code == 200


def test_conditional_create(client):
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "cc-77"}],
            "name": [{"family": "Conditional"}]}
    h = {**FJ, "If-None-Exist": "identifier=urn:oid:1.2.3|cc-77"}
    first = client.post("/fhir/Patient", content=json.dumps(body), headers=h)
    second = client.post("/fhir/Patient", content=json.dumps(body), headers=h)
    assert (first.status_code, second.status_code) == (201, 200)
    assert valid(second.json())["id"] == valid(first.json())["id"]
    client.put("/fhir/Patient/cc-dup", content=json.dumps({**body, "id": "cc-dup"}), headers=FJ)
    third = client.post("/fhir/Patient", content=json.dumps(body), headers=h)
    assert third.status_code == 412 and valid(third.json())["issue"][0]["code"] == "multiple-matches"
    bad = client.post("/fhir/Patient", content=json.dumps(body), headers={**FJ, "If-None-Exist": "family=x"})
    assert bad.status_code == 400


# --- search ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "expected"), [
    ("family=Konigsstein", {"de-1"}),            # accent-insensitive
    ("family=KÖNIGS", {"de-1"}),                 # case-insensitive prefix
    ("family=koenigsstein", {"de-1"}),           # German spelling without umlaut
    ("family=Schaumberg", {"de-2"}),             # prefix of a word inside the value
    ("family=graf%20freiherr", {"de-2"}),
    ("family=strasse", {"de-3"}),                # ß = ss, word after a hyphen
    ("family=mueller", {"de-3"}),
    ("given=bjorn", {"de-3"}),
    ("family:exact=Königsstein", {"de-1"}),
    ("family:exact=Konigsstein", set()),         # :exact is accent-sensitive
    ("family:exact=königsstein", set()),         # and case-sensitive
    ("family=chalm", {"example"}),
    ("given=pet", {"example"}),
    ("name=jim", {"example"}),
    ("name=张无", {"ch-example"}),                # HumanName.text only
    ("family=solo&given=jaina", {"infant-twin-1"}),
    ("family=solo,organa&given=leia", {"infant-mom"}),
    ("identifier=urn:oid:1.2.36.146.595.217.0.1|12345", {"example"}),
    ("identifier=12345", {"example", "xcda"}),     # any system
    ("identifier=urn:oid:0.0|12345", set()),
    ("birthdate=1974-12-25", {"example", "ch-example"}),
    ("birthdate=1961-02", {"de-1"}),
    ("birthdate=2000-02-29", {"de-3"}),
])
def test_string_token_date_search(client, loaded, query, expected):
    got = ids(search(client, query + "&_count=1000"))
    assert got == expected


def _range(value: str) -> tuple[int, int]:
    parts = [int(x) for x in value.split("-")]
    if len(parts) == 1:
        return date(parts[0], 1, 1).toordinal(), date(parts[0], 12, 31).toordinal()
    if len(parts) == 2:
        nxt = date(parts[0] + parts[1] // 12, parts[1] % 12 + 1, 1)
        return date(parts[0], parts[1], 1).toordinal(), nxt.toordinal() - 1
    d = date(*parts).toordinal()
    return d, d


@pytest.mark.parametrize("query", ["eq1974", "eq1961-02", "lt1940", "le1944-11-17", "gt2017-05",
                                   "ge2000", "ne1974", "sa1999-12-31", "eb1950", "ge1960&birthdate=lt1975",
                                   "lt1933,gt2016"])
def test_birthdate_prefixes_match_the_r4_rules(client, loaded, query):
    """Against a plain reading of R4 §3.1.1.4.4 over the loaded data (no index involved)."""
    def holds(t: tuple[int, int], clause: str) -> bool:
        p, v = (clause[:2], clause[2:])
        x0, x1 = _range(v)
        eq = x0 <= t[0] and t[1] <= x1
        return {"eq": eq, "ne": not eq, "lt": t[0] < x0, "gt": t[1] > x1, "le": t[0] < x0 or eq,
                "ge": t[1] > x1 or eq, "sa": t[0] > x1, "eb": t[1] < x0}[p]

    params = query.split("&birthdate=")
    everyone = {e["resource"]["id"]: e["resource"] for e in search(client, "_count=1000")["entry"]}
    assert set(everyone) >= set(loaded)  # a search without parameters lists every Patient
    expected = {rid for rid, rec in everyone.items() if isinstance(rec.get("birthDate"), str)
                and all(any(holds(_range(rec["birthDate"]), c) for c in p.split(",")) for p in params)}
    got = ids(search(client, f"birthdate={query}&_count=1000"))
    assert got == expected and expected


def test_gender_alone_and_paging_to_the_end(client, loaded):
    everyone = {e["resource"]["id"]: e["resource"] for e in search(client, "_count=1000")["entry"]}
    females = {rid for rid, rec in everyone.items() if rec.get("gender") == "female"}
    got, total = all_ids(client, "gender=female&_count=4")
    assert total == len(females) >= 10
    assert len(got) == len(set(got)) and set(got) == females
    assert got == sorted(got)
    # _total=none: no total, pages still end
    page = search(client, "gender=female&_count=4&_total=none")
    assert "total" not in page and len(page["entry"]) == 4
    # _summary=count / _count=0: the total only
    assert "entry" not in search(client, "gender=female&_summary=count")
    assert search(client, "gender=female&_count=0")["total"] == total
    # a cursor is a position; one taken from another search is only that
    assert search(client, "family=solo&_cursor=zzz")["total"] == 3


def test_clinical_resources_by_reference(client, loaded):
    need(BUNDLES)
    f = sorted(BUNDLES.glob("*.json"))[0]
    items = list(iter_file(f, resources=True))
    patient = next(it for it in items if isinstance(it, ImportItem))
    res = [it for it in items if isinstance(it, ImportResource)]
    assert len(res) > 100 and all(it.resource.get("subject", it.resource.get("patient", {})).get(
        "reference", "Patient/").startswith(("Patient/", "Practitioner", "Organization")) for it in res
        if it.type in ("Observation", "Encounter", "Immunization"))
    for i in range(0, len(res), 200):
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": it.resource, "request": {"method": "PUT", "url": f"{it.type}/{it.id}"}}
            for it in res[i:i + 200]]}
        r = client.post("/fhir/", content=json.dumps(bundle), headers=FJ)
        assert r.status_code == 200
        assert all(e["response"]["status"] == "201 Created" for e in valid(r.json())["entry"]), r.text
    obs = [it for it in res if it.type == "Observation"]
    r = client.get(f"/fhir/Observation?patient={patient.id}&_count=1000")
    assert r.status_code == 200 and valid(r.json())["total"] == len(obs)
    assert {e["resource"]["id"] for e in r.json()["entry"]} == {it.id for it in obs}
    r = client.get(f"/fhir/Observation?subject=Patient/{patient.id}&_summary=count")
    assert r.json()["total"] == len(obs)
    one = obs[0]
    r = client.get(f"/fhir/Observation/{one.id}")
    assert r.status_code == 200 and valid(r.json())["code"] == one.resource["code"]
    assert client.get("/fhir/Observation?patient=Patient/someone-else").json()["total"] == 0


def test_a_birthdate_that_is_not_a_fhir_date_is_an_invalid_resource(client):
    body = {"resourceType": "Patient", "name": [{"family": "Datum"}], "birthDate": "1970-13-45"}
    r = client.post("/fhir/Patient", content=json.dumps(body), headers=FJ)
    assert r.status_code == 400, r.text
    out = valid(r.json())
    assert out["resourceType"] == "OperationOutcome" and "1970-13-45" not in r.text
    assert "birthDate" in out["issue"][0]["diagnostics"]
    r = client.put("/fhir/Patient/datum", content=json.dumps(body | {"id": "datum"}), headers=FJ)
    assert r.status_code == 400
    assert client.get("/fhir/Patient/datum").status_code == 404
