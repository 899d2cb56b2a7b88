"""The encryption proxy in front of Safehold's own records service, SCONE demo API.

The upstream is the real ``safehold.records.scone_http`` app over the real encrypted record engine
and a SQLite file, started as its own process on a loopback port — but directly under uvicorn
on plain HTTP, without the broker bootstrap and RA-TLS that the service runner adds (those are
covered by tests/records/test_server.py). The SCONE app keeps only its 13 form fields, so the proxy's
key-id tag is dropped upstream and the schema uses ``untagged = "primary"``.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.support.proxy_stack import proxy_stack

pytestmark = pytest.mark.slow  # starts processes on loopback

UPSTREAM = r'''
import json
import sys
import uvicorn
from safehold.crypto.keyset import Keyset
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.repository import PatientRepository
from safehold.records.scone_http import create_scone_app
from safehold.store import open_store

port, db, seen = int(sys.argv[1]), sys.argv[2], sys.argv[3]


class Recording(PatientRepository):
    """The real repository, plus a log of every record exactly as the service received it."""

    def put(self, who, record, *args, **kwargs):
        with open(seen, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": record.id, "record": dict(record.data)}, ensure_ascii=False) + "\n")
        return super().put(who, record, *args, **kwargs)


store = open_store(f"sqlite:///{db}")
committer = GroupCommit(store)
repo = Recording(store, Keyset.generate(), committer=committer,
                 audit=AccessAuditLog(store, committer, mac_key=b"k" * 32))
uvicorn.run(create_scone_app(repo), host="127.0.0.1", port=port, log_level="warning")
'''

SCHEMA = """
[proxy]
untagged = "primary"
paths = ["/patient/{id}", "/score/{id}"]

[fields.id]
transform = "deterministic"
[fields.fname]
transform = "randomized"    # first names are often < 5 letters: below FF1's minimum domain
[fields.lname]
transform = "token"
kind = "name"
[fields.address]
transform = "randomized"
[fields.city]
transform = "randomized"
[fields.state]
transform = "keep"
[fields.ssn]
transform = "fpe"
alphabet = "digits"
[fields.email]
transform = "token"
kind = "email"
[fields.dob]
transform = "date-shift"
context = "id"
[fields.contactphone]
transform = "fpe"
alphabet = "digits"
[fields.drugallergies]
transform = "randomized"
[fields.preexistingconditions]
transform = "randomized"
[fields.dateadmitted]
transform = "date-shift"
context = "id"
[fields.insurancedetails]
transform = "randomized"
"""

FORM = {"fname": "Max", "lname": "Müller", "address": "Hauptstraße 5", "city": "Dresden", "state": "SN",
        "ssn": "123-45-6789", "email": "max.mueller@example.de", "dob": "1980-06-15",
        "contactphone": "+49 351 1234567", "drugallergies": "Penicillin", "preexistingconditions": "Asthma",
        "dateadmitted": "2024-02-29", "insurancedetails": "AOK Plus 1223123"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scone")
    with proxy_stack(tmp, UPSTREAM, [str(tmp / "records.db"), str(tmp / "seen.ndjson")], SCHEMA) as s:
        yield s.proxy, s.upstream, tmp / "seen.ndjson"


def test_scone_demo_flow_through_proxy(stack):
    px, up, seen = stack
    r = httpx.post(px + "/patient/patient-0042", data=FORM)
    assert r.status_code == 200, r.text
    assert r.json() == {**FORM, "id": "patient-0042"}
    assert httpx.post(px + "/patient/patient-0042", data=FORM).status_code == 403
    got = httpx.get(px + "/patient/patient-0042")
    assert got.status_code == 200
    body = got.json()
    score = body.pop("score")
    assert body == {**FORM, "id": "patient-0042"} and isinstance(score, float)
    assert httpx.get(px + "/score/patient-0042").json() == {"id": "patient-0042", "score": score}
    assert httpx.get(px + "/patient/patient-0043").status_code == 404
    # the plaintext id is unknown to the service: the proxy sent a protected one
    assert httpx.get(up + "/patient/patient-0042").status_code == 404


def test_service_never_sees_plaintext(stack):
    px, up, seen = stack
    r = httpx.post(px + "/patient/patient-0077", data=dict(FORM, fname="Erika", lname="Mustermann"))
    assert r.status_code == 200, r.text
    received = [json.loads(line) for line in seen.read_text(encoding="utf-8").splitlines()]
    assert len(received) >= 1
    for entry in received:
        rec = entry["record"]
        assert entry["id"] not in ("patient-0042", "patient-0077")
        assert rec["state"] == "SN"  # keep
        assert len(rec["ssn"]) == 11 and rec["ssn"][3] == "-" and rec["ssn"] != FORM["ssn"]
        assert rec["contactphone"].startswith("+") and len(rec["contactphone"]) == len(FORM["contactphone"])
        assert rec["email"].endswith(".de") and "@" in rec["email"]
        text = json.dumps(entry, ensure_ascii=False)
        for secret in ("Max", "Müller", "Erika", "Mustermann", "Hauptstraße", "Dresden", "123-45-6789",
                       "max.mueller", "1980-06-15", "2024-02-29", "351 1234567", "Penicillin", "Asthma",
                       "AOK", "1223123", "patient-00"):
            if len(secret) < 5:
                # a three-letter name turns up now and then by chance inside base64url
                # ciphertext: look for it as a word, not inside a run of base64url characters
                assert not re.search(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", text), secret
            else:
                assert secret not in text, secret
    # the service's own JSON (bypassing the proxy) holds the protected record
    direct = httpx.get(up + "/patient/" + received[-1]["id"]).json()
    assert direct["lname"] != "Mustermann" and direct["dob"] != "1980-06-15"
    back = httpx.get(px + "/patient/patient-0077").json()
    assert back["lname"] == "Mustermann" and back["dob"] == "1980-06-15"
