"""E-Rezept Task workflow over the encrypted records engine: create → activate → accept → close with
KBV-style bundles, refusals, and no plaintext in the raw SQLite / PostgreSQL bytes."""

from __future__ import annotations

import json

import psycopg
import pytest

from safehold.crypto.keyset import Keyset
from safehold.erezept.errors import (
    AccessCodeError,
    AccessTokenError,
    BundleInvalidError,
    RoleError,
    SignatureFormatError,
    TaskGoneError,
    TaskNotFoundError,
    TaskStateError,
)
from safehold.erezept.kbv import valid_fhir_date
from safehold.erezept.tasks import TaskService, prescription_id_valid
from safehold.records.engine import RecordEngine
from safehold.store.postgres import PostgresStore
from tests.support.idp import TestIdp
from tests.support.kbv import DOCTOR, DRUGS, PATIENTS, PRACTICE, build_bundle, dispense

PRAXIS_ID = "1-883110000092414"
APOTHEKE_ID = "3-SMC-B-Testkarte-883110000116873"


def _ids(task):
    return {i["system"].rsplit("_", 1)[-1]: i["value"] for i in task["identifier"]}


def _who(verifier, idp, kind, idn):
    return verifier.principal(idp.token(kind, idn))


def _run_all(tasks: TaskService, verifier, idp, signer):
    """Full flow for every test patient; returns the strings that must not reach the database."""
    doc = _who(verifier, idp, "praxis", PRAXIS_ID)
    pharm = _who(verifier, idp, "apotheke", APOTHEKE_ID)
    forbidden = [DOCTOR.family, PRACTICE.split(",")[0]]
    for pat, drug in zip(PATIENTS, DRUGS, strict=True):
        t = tasks.create(doc)
        tid, ac = t["id"], _ids(t)["AccessCode"]
        assert t["status"] == "draft" and prescription_id_valid(tid)
        t = tasks.activate(doc, tid, ac, signer.sign_bundle(build_bundle(tid, pat, drug)))
        assert t["status"] == "ready" and t["for"]["identifier"]["value"] == pat.kvnr
        b = tasks.accept(pharm, tid, ac)
        task = b["entry"][0]["resource"]
        secret = _ids(task)["Secret"]
        assert task["status"] == "in-progress" and "AccessCode" not in _ids(task)
        receipt = tasks.close(pharm, tid, secret, dispense(tid, pat, APOTHEKE_ID))
        assert receipt["identifier"]["value"] == tid
        insured = _who(verifier, idp, "versicherter", pat.kvnr)
        listed = tasks.list_for_insured(insured)
        assert [(e["resource"]["id"], e["resource"]["status"]) for e in listed["entry"]] == [
            (tid, "completed")
        ]
        forbidden += pat.secrets() + drug.secrets() + [ac, secret]
    return forbidden


def _variants(s: str) -> list[bytes]:
    return [s.encode("utf-8"), json.dumps(s).strip('"').encode("ascii")]


def _assert_absent(blob: bytes, forbidden: list[str], where: str):
    for s in forbidden:
        for v in _variants(s):
            assert v not in blob, f"plaintext {s[:3]}… found in {where}"


def test_patient_data_is_german_and_tricky():
    assert any(p.birth_date == "1952" for p in PATIENTS)  # year only
    assert any(p.birth_date.endswith("-02-29") for p in PATIENTS)
    assert any(p.own_prefix and p.namenszusatz for p in PATIENTS)  # "Freiherr von und zu"
    assert any(any(c in p.family for c in "äöüßÄÖÜ") for p in PATIENTS)
    assert valid_fhir_date("2004-02-29") and not valid_fhir_date("2001-02-29") and valid_fhir_date("1952")


def test_workflow_on_sqlite_leaves_no_plaintext(tasks, verifier, idp, signer, sqlite_path):
    forbidden = _run_all(tasks, verifier, idp, signer)
    tasks.engine.store.close()
    blob = b"".join(
        p.read_bytes() for p in sqlite_path.parent.iterdir() if p.name.startswith(sqlite_path.name)
    )
    assert len(blob) > 4096
    _assert_absent(blob, forbidden, "the SQLite files")
    assert b"Task" not in blob and b"kvid" not in blob  # no FHIR structure either


@pytest.mark.postgres
def test_workflow_on_postgres_leaves_no_plaintext(postgres_dsn, pg_schema, verifier, idp, signer):
    store = PostgresStore(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        svc = TaskService(RecordEngine(store, Keyset.generate(), namespace_prefix="erezept:"))
        forbidden = _run_all(svc, verifier, idp, signer)
    finally:
        store.close()
    with psycopg.connect(postgres_dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg_schema,)
            )
        ]
        blob = b""
        for t in tables:
            for row in conn.execute(f'SELECT * FROM "{pg_schema}"."{t}"'):
                blob += b"|".join(
                    bytes(c) if isinstance(c, bytes | memoryview) else str(c).encode() for c in row
                )
    assert len(blob) > 4096
    _assert_absent(blob, forbidden, f"PostgreSQL schema {pg_schema}")


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture
def ready_task(tasks, verifier, idp, signer):
    doc = _who(verifier, idp, "praxis", PRAXIS_ID)
    t = tasks.create(doc)
    tid, ac = t["id"], _ids(t)["AccessCode"]
    tasks.activate(doc, tid, ac, signer.sign_bundle(build_bundle(tid, PATIENTS[2], DRUGS[0])))
    return tid, ac, doc


def test_wrong_role_is_refused(tasks, verifier, idp, ready_task):
    tid, ac, doc = ready_task
    pharm = _who(verifier, idp, "apotheke", APOTHEKE_ID)
    insured = _who(verifier, idp, "versicherter", PATIENTS[2].kvnr)
    with pytest.raises(RoleError):
        tasks.create(pharm)
    with pytest.raises(RoleError):
        tasks.create(insured)
    with pytest.raises(RoleError):
        tasks.accept(doc, tid, ac)
    with pytest.raises(RoleError):
        tasks.accept(insured, tid, ac)
    with pytest.raises(RoleError):
        tasks.list_for_insured(pharm)
    with pytest.raises(AccessTokenError, match="grants no E-Rezept role"):
        verifier.principal(idp.token("psychotherapeut", "1-123"))


def test_wrong_access_code_or_secret_is_refused(tasks, verifier, idp, ready_task):
    tid, ac, _ = ready_task
    pharm = _who(verifier, idp, "apotheke", APOTHEKE_ID)
    other_pharm = _who(verifier, idp, "apotheke", "3-other-pharmacy")
    with pytest.raises(AccessCodeError):
        tasks.accept(pharm, tid, "0" * 64)
    with pytest.raises(AccessCodeError):
        tasks.accept(pharm, tid, "")
    secret = _ids(tasks.accept(pharm, tid, ac)["entry"][0]["resource"])["Secret"]
    with pytest.raises(TaskStateError, match="in-progress"):
        tasks.accept(other_pharm, tid, ac)  # a second pharmacy cannot take it
    with pytest.raises(AccessCodeError):
        tasks.close(pharm, tid, "f" * 64, dispense(tid, PATIENTS[2], APOTHEKE_ID))
    with pytest.raises(AccessCodeError):
        tasks.close(other_pharm, tid, secret, dispense(tid, PATIENTS[2], "3-other-pharmacy"))
    with pytest.raises(BundleInvalidError, match="insured person"):
        tasks.close(pharm, tid, secret, dispense(tid, PATIENTS[0], APOTHEKE_ID))
    tasks.close(pharm, tid, secret, dispense(tid, PATIENTS[2], APOTHEKE_ID))
    with pytest.raises(TaskStateError, match="completed"):
        tasks.close(pharm, tid, secret, dispense(tid, PATIENTS[2], APOTHEKE_ID))


def test_reject_abort_and_visibility(tasks, verifier, idp, ready_task):
    tid, ac, doc = ready_task
    pharm = _who(verifier, idp, "apotheke", APOTHEKE_ID)
    insured = _who(verifier, idp, "versicherter", PATIENTS[2].kvnr)
    stranger = _who(verifier, idp, "versicherter", PATIENTS[0].kvnr)
    assert tasks.get(insured, tid)["status"] == "ready"
    with pytest.raises(TaskNotFoundError):
        tasks.get(stranger, tid)
    with pytest.raises(TaskNotFoundError):
        tasks.abort(stranger, tid)
    secret = _ids(tasks.accept(pharm, tid, ac)["entry"][0]["resource"])["Secret"]
    tasks.reject(pharm, tid, secret)
    with pytest.raises(AccessCodeError):
        tasks.reject(pharm, tid, secret)  # the Secret died with the reject
    tasks.abort(insured, tid)
    with pytest.raises(TaskGoneError):
        tasks.accept(pharm, tid, ac)
    assert tasks.list_for_insured(insured)["entry"][0]["resource"]["status"] == "cancelled"
    with pytest.raises(TaskNotFoundError):
        tasks.get(insured, "160.000.000.000.000.00")


def test_activate_refuses_bad_bundles_and_envelopes(tasks, verifier, idp, signer):
    doc = _who(verifier, idp, "praxis", PRAXIS_ID)
    t = tasks.create(doc)
    tid, ac = t["id"], _ids(t)["AccessCode"]
    good = build_bundle(tid, PATIENTS[0], DRUGS[0])

    def refused(bundle, match, *, exc=BundleInvalidError, signed=None):
        with pytest.raises(exc, match=match):
            tasks.activate(doc, tid, ac, signed if signed is not None else signer.sign_bundle(bundle))

    with pytest.raises(AccessCodeError):
        tasks.activate(doc, tid, "1" * 64, signer.sign_bundle(good))
    b = json.loads(json.dumps(good))
    b["entry"][3]["resource"]["birthDate"] = "2001-02-29"
    refused(b, "birthDate")
    b = json.loads(json.dumps(good))
    b["entry"][1]["resource"]["medicationReference"]["reference"] = "urn:uuid:nowhere"
    refused(b, "does not resolve")
    b = json.loads(json.dumps(good))
    kv = b["entry"][3]["resource"]["identifier"][0]
    kv["value"] = kv["value"][:-1] + str((int(kv["value"][-1]) + 1) % 10)
    refused(b, "check digit")
    b = json.loads(json.dumps(good))
    b["identifier"]["value"] = "160.000.000.000.001.33"
    refused(b, "PrescriptionID differs")
    b = json.loads(json.dumps(good))
    del b["entry"][6]  # Coverage
    refused(b, "no Coverage")
    b = json.loads(json.dumps(good))
    b["entry"][0], b["entry"][1] = b["entry"][1], b["entry"][0]
    refused(b, "first entry")
    raw = json.dumps(good).encode()
    refused(None, "detached", exc=SignatureFormatError, signed=signer.sign(raw, detached=True))
    refused(None, "not valid DER CMS", exc=SignatureFormatError, signed=b"\x30\x03garbage")
    refused(None, "XML", signed=signer.sign(b"<Bundle xmlns='http://hl7.org/fhir'/>"))
    cms = signer.sign(raw)
    i = cms.find(b'"birthDate"')
    tampered = cms[:i] + b'"birthdate"' + cms[i + 11 :]
    refused(None, "message-digest", exc=SignatureFormatError, signed=tampered)
    assert tasks.activate(doc, tid, ac, cms)["status"] == "ready"
    with pytest.raises(TaskStateError, match="draft"):
        tasks.activate(doc, tid, ac, cms)


def test_tokens_refused(idp, verifier):
    other = TestIdp("BP256R1")
    with pytest.raises(AccessTokenError, match="does not verify"):
        verifier.principal(other.token("praxis", PRAXIS_ID))
    with pytest.raises(AccessTokenError, match="expired"):
        verifier.principal(idp.token("praxis", PRAXIS_ID, now=1_600_000_000))
    wrong_iss = TestIdp("BP256R1", issuer="https://evil.example")
    wrong_iss.private_key, wrong_iss._jwk = idp.private_key, idp._jwk
    with pytest.raises(AccessTokenError, match="another issuer"):
        verifier.principal(wrong_iss.token("praxis", PRAXIS_ID))
    with pytest.raises(AccessTokenError, match="not a KVNR"):
        verifier.principal(idp.token("versicherter", "12345"))
    header, payload, _ = idp.token("praxis", PRAXIS_ID).split(".")
    import base64

    none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    with pytest.raises(AccessTokenError):
        verifier.principal(f"{none_header}.{payload}.")


def test_cached_token_still_expires(idp):
    from safehold.erezept.tokens import AccessTokenVerifier

    now = [1_700_000_000.0]
    v = AccessTokenVerifier([idp.public_key], issuer=idp.issuer, clock=lambda: now[0])
    tok = idp.token("praxis", PRAXIS_ID, now=now[0], lifetime=300)
    assert v.principal(tok).role == "prescriber"
    assert v.principal(tok).role == "prescriber"  # served from the cache
    now[0] += 301 + v.leeway
    with pytest.raises(AccessTokenError, match="expired"):
        v.principal(tok)
