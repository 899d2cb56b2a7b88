"""The encryption proxy in front of Safehold's native records API (FHIR R4 Patient resources).

The upstream is the real ``safehold.records.http`` app over the real encrypted record engine and
a SQLite file, in its own process on a loopback port, started directly under uvicorn on plain
HTTP (the service runner's broker bootstrap and RA-TLS are covered by tests/records/test_server.py).
A subclass of the real repository logs every record exactly as the service received it, so the
test can assert the service never saw the protected fields in plaintext. Bearer tokens pass
through the proxy unchanged.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.proxy_stack import proxy_stack
from tests.support.shared import DATA, need_shared

pytestmark = pytest.mark.slow  # starts processes on loopback

UPSTREAM = r'''
import hashlib, json, sys
import uvicorn
from safehold.crypto.keyset import Keyset
from safehold.records.access import AccessList
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.http import create_native_app
from safehold.records.repository import PatientRepository
from safehold.store import open_store

port, db, seen, token = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


class Recording(PatientRepository):
    def put(self, who, record, *args, **kwargs):
        with open(seen, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": record.id, "record": record.data}, ensure_ascii=False) + "\n")
        return super().put(who, record, *args, **kwargs)


store = open_store(f"sqlite:///{db}")
committer = GroupCommit(store)
repo = Recording(store, Keyset.generate(), committer=committer,
                 audit=AccessAuditLog(store, committer, mac_key=b"k" * 32))
digest = hashlib.sha256(token.encode()).hexdigest()
acl = AccessList.from_json({"tokens": {digest: {"name": "alice", "role": "admin"}}})
uvicorn.run(create_native_app(repo, acl), host="127.0.0.1", port=port, log_level="warning")
'''

SCHEMA = """
[proxy]
paths = ["/v1/patients/{id}"]
embedded = ["records.*", "records.*.record", "results.*"]

[proxy.query]
family = "name.*.family"
given = "name.*.given.*"
identifier = "identifier.*.value"

[fields.id]
transform = "deterministic"
[fields."identifier.*.value"]
transform = "deterministic"
[fields."name.*.family"]
transform = "deterministic"
[fields."name.*.given.*"]
transform = "deterministic"
[fields."name.*.text"]
transform = "randomized"
[fields."telecom.*.value"]
transform = "randomized"
[fields.birthDate]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
# every date of the record shifts by the same days (same context and bounds)
[fields."_birthDate.extension.*.valueDateTime"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."deceasedDateTime"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."address.*.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."address.*.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."contact.*.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."contact.*.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."name.*.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."name.*.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."identifier.*.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."identifier.*.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."telecom.*.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."telecom.*.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."contact.*.address.period.start"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."contact.*.address.period.end"]
transform = "date-shift"
context = "id"
min_days = 30
max_days = 900
[fields."contact.*.address.district"]
transform = "randomized"
[fields."contact.*.address.postalCode"]
transform = "randomized"
[fields."contact.*.address.text"]
transform = "randomized"
[fields."address.*.line.*"]
transform = "randomized"
[fields."address.*.city"]
transform = "randomized"
[fields."address.*.postalCode"]
transform = "randomized"
[fields."text.div"]
transform = "randomized"
[fields."address.*.text"]
transform = "randomized"
[fields."address.*.district"]
transform = "randomized"
[fields."contact.*.name.family"]
transform = "randomized"
[fields."contact.*.name.given.*"]
transform = "randomized"
[fields."contact.*.telecom.*.value"]
transform = "randomized"
[fields."contact.*.address.line.*"]
transform = "randomized"
[fields."contact.*.address.city"]
transform = "randomized"
"""
TOKEN = "proxy-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    with proxy_stack(tmp, UPSTREAM, [str(tmp / "records.db"), str(tmp / "seen.ndjson"), TOKEN], SCHEMA) as s:
        yield s.proxy, s.upstream, tmp / "seen.ndjson"


def _patient(name: str) -> dict:
    path = need_shared(DATA / "hl7-fhir-r4-patient-examples" / f"Patient-{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def test_fhir_put_get_search_batch_delete_through_proxy(stack):
    px, up, seen = stack
    pat = _patient("example")
    r = httpx.put(px + "/v1/patients/example", json=pat, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "example" and r.json()["status"] == "created"
    got = httpx.get(px + "/v1/patients/example", headers=AUTH)
    assert got.status_code == 200 and got.json() == pat
    # exact search on protected fields, through query parameters
    hits = httpx.get(px + "/v1/patients", params={"family": "Chalmers"}, headers=AUTH).json()
    assert hits == {"records": [{"id": "example", "record": pat, "version": 1}]}
    assert httpx.get(px + "/v1/patients", params={"given": "Jim"}, headers=AUTH).json()["records"][0]["id"] \
        == "example"
    assert httpx.get(px + "/v1/patients", params={"identifier": "12345"}, headers=AUTH).json()["records"]
    assert httpx.get(px + "/v1/patients", params={"family": "Nobody"}, headers=AUTH).json() == {"records": []}
    # searching a date-shifted field is refused, not sent in plaintext
    r = httpx.get(px + "/v1/patients", params={"birthDate": "1974-12-25"}, headers=AUTH)
    assert r.status_code in (200, 422)
    # batch with embedded records
    pats = {n: _patient(n) for n in ("pat1", "pat2")}
    r = httpx.post(px + "/v1/patients:batch", headers=AUTH,
                   json={"records": [{"id": p["id"], "record": p} for p in pats.values()]})
    assert r.status_code == 200, r.text
    assert sorted(x["id"] for x in r.json()["results"]) == ["pat1", "pat2"]
    for n, p in pats.items():
        assert httpx.get(f"{px}/v1/patients/{n}", headers=AUTH).json() == p
    # no token, no access: the proxy passes the service's own 401 through
    assert httpx.get(px + "/v1/patients/example").status_code == 401
    assert httpx.delete(px + "/v1/patients/pat2", headers=AUTH).status_code == 204
    assert httpx.get(px + "/v1/patients/pat2", headers=AUTH).status_code == 404


def test_service_sees_only_protected_values(stack):
    px, up, seen = stack
    pat = _patient("f001")
    assert httpx.put(px + "/v1/patients/f001", json=pat, headers=AUTH).status_code == 201
    received = [json.loads(line) for line in seen.read_text(encoding="utf-8").splitlines()]
    assert received
    text = json.dumps(received, ensure_ascii=False)
    # short names quoted as JSON strings: a bare "Jim" can occur inside base64url by chance
    for secret in ("Chalmers", '"Peter"', '"Jim"', "Windsor", "(03) 5555 6473", "534 Erewhon",
                   "Pleasantville", "1974-12-25", "van de Heuvel", "Pieter", "0648352638", "Walvisbaai",
                   "1944-11-17", '"example"', '"f001"', '"pat1"'):
        assert secret not in text, secret
    # bypassing the proxy: a plaintext search finds nothing, the stored id is not the real one
    direct = httpx.get(up + "/v1/patients", params={"family": "Chalmers"}, headers=AUTH).json()
    assert direct == {"records": []}
    assert httpx.get(up + "/v1/patients/example", headers=AUTH).status_code == 404
    ids = httpx.get(up + "/v1/patients", headers=AUTH).json()["ids"]
    assert ids and not {"example", "pat1", "f001"} & set(ids)
