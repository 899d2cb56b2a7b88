"""Real FHIR client libraries (``fhirclient``, ``fhirpy`` from PyPI) against the records service
as a process, over TLS checked against the broker's workload CA (``safehold up``'s ``ca.pem``),
with bearer tokens; then the import of the shared data with its clinical resources, conflicts
between import files, and the database scan for plaintext (SQLite file bytes; a PostgreSQL
table with the same data) with the prefix tokens in place. (Import conflicts between files: tests/client/.)

Every resource and Bundle the clients receive is validated with ``fhir.resources`` (R4B).
The processes run from a snapshot of the package (docs/developing.md, the measurement trap).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.patient import Patient as R4BPatient
from fhirclient import client as fhirclient_client
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.patient import Patient as FCPatient
from fhirclient.server import FHIRNotFoundException
from fhirpy import SyncFHIRClient

from safehold.client.importer import import_files
from safehold.client.records import RecordsClient
from safehold.devstack import tokens
from safehold.devstack.demo import scan_files, sensitive_strings
from safehold.records.importers import ImportItem, ImportResource, iter_file
from safehold.records.tokens import MAX_PREFIX, fold
from safehold.store.migrations import ROWS_TABLE
from tests.support.fhir_app import records_app
from tests.support.records_stack import running_stack
from tests.support.shared import SHARED
from tests.support.shared import need_shared as need

pytestmark = pytest.mark.slow

DATA = SHARED / "data"
CSV = DATA / "synthea-csv-27-ohdsi-dbt-synthea" / "patients.csv"
BUNDLES = DATA / "synthea-fhir-r4-bundles-google-fhir-data-pipes"
HL7 = DATA / "hl7-fhir-r4-patient-examples"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("pkg"), tmp_path_factory.mktemp("safehold-data")) as s:
        yield s


def fhir_base(stack) -> str:
    return f"{stack.records_url}/fhir"


def token(stack, role: str = "writer") -> str:
    return tokens(stack.data_dir)[role]


def r4b(obj: dict) -> dict:
    {"Patient": R4BPatient, "Bundle": Bundle, "CapabilityStatement": CapabilityStatement}[
        obj["resourceType"]].model_validate(obj)
    for e in obj.get("entry", []):
        if e.get("resource", {}).get("resourceType") == "Patient":
            R4BPatient.model_validate(e["resource"])
    return obj


@pytest.fixture
def fc(stack):
    """fhirclient (SMART on FHIR Python client) on the service, TLS against ca.pem."""
    smart = fhirclient_client.FHIRClient(settings={"app_id": "safehold-test",
                                                   "api_base": fhir_base(stack) + "/"})
    smart.server.session.verify = str(stack.path("ca.pem"))
    smart.server.session.trust_env = False  # else REQUESTS_CA_BUNDLE would replace ca.pem
    smart.server.session.headers["Authorization"] = f"Bearer {token(stack)}"
    return smart


@pytest.fixture
def fp(stack):
    """fhirpy's synchronous client on the service, TLS against ca.pem. Its ``count()`` adds
    Aidbox's ``_totalMethod`` parameter, which the server refuses unless told to ignore unknown
    parameters (FHIR's ``Prefer: handling=lenient``)."""
    return SyncFHIRClient(fhir_base(stack), authorization=f"Bearer {token(stack)}",
                          requests_config={"verify": str(stack.path("ca.pem"))},
                          extra_headers={"Prefer": "handling=lenient"})


def test_tls_is_checked_against_the_workload_ca(stack):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{fhir_base(stack)}/metadata", timeout=30)  # the system CAs do not know it
    r = requests.get(f"{fhir_base(stack)}/metadata", verify=str(stack.path("ca.pem")), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    r4b(r.json())


def test_fhirclient_create_read_update_search_delete(fc, stack):
    server = fc.server
    p = FCPatient({"resourceType": "Patient", "gender": "female", "birthDate": "1961-02-13",
                   "name": [{"family": "Königsstein", "given": ["Ärzte-Jürgen"]}],
                   "identifier": [{"system": "urn:oid:1.2.276.0.76.4.8", "value": "A123456789"}]})
    created = p.create(server)
    r4b(created)
    pid = created["id"]
    got = FCPatient.read(pid, server)
    r4b(got.as_json())
    assert got.name[0].family == "Königsstein" and got.meta.versionId == "1"
    got.name[0].family = "Königsstein-Berg"
    updated = got.update(server)
    assert r4b(updated)["meta"]["versionId"] == "2"
    # search by a name prefix without the accent, case-folded, through the blind index
    bundles = list(FHIRSearch(FCPatient, {"family": "konigsst"}).perform_iter(server))
    for b in bundles:
        r4b(b.as_json())
    found = [e.resource for b in bundles for e in b.entry or []]
    assert [x.id for x in found] == [pid]
    assert list(FHIRSearch(FCPatient, {"given": "arzte"}).perform_resources_iter(server))[0].id == pid
    # vread of the first version
    v1 = server.request_json(f"Patient/{pid}/_history/1")
    assert r4b(v1)["name"][0]["family"] == "Königsstein"
    got.delete(server)
    with pytest.raises(FHIRNotFoundException) as e:
        FCPatient.read(pid, server)
    assert e.value.response.status_code == 404


def test_fhirclient_pages_to_the_end(fc):
    server = fc.server
    made = []
    for i in range(23):
        p = FCPatient({"resourceType": "Patient", "name": [{"family": f"Pagé{i:02d}", "given": ["Ann"]}],
                       "gender": "other"})
        made.append(p.create(server)["id"])
    bundles = list(FHIRSearch(FCPatient, {"family": "page", "_count": "5"}).perform_iter(server))
    assert len(bundles) == 5 and all(b.total == 23 for b in bundles)
    for b in bundles:
        r4b(b.as_json())
    seen = [e.resource.id for b in bundles for e in b.entry]
    assert sorted(seen) == sorted(made) and len(set(seen)) == 23


def test_fhirpy_create_update_with_version_conditional_create_search_delete(fp, stack):
    pat = fp.resource("Patient", name=[{"family": "Müller", "given": ["Zoë"]}], birthDate="1985-07",
                      identifier=[{"system": "urn:example:mrn", "value": "MRN-42"}])
    pat.save()
    r4b(pat.serialize())
    assert pat["meta"]["versionId"] == "1"
    pat["gender"] = "female"
    pat.save()
    assert pat["meta"]["versionId"] == "2"
    # update with If-Match on a stale version → 412
    stale = SyncFHIRClient(fhir_base(stack), authorization=f"Bearer {token(stack)}",
                           requests_config={"verify": str(stack.path("ca.pem"))},
                           extra_headers={"If-Match": 'W/"1"'})
    from fhirpy.base.exceptions import MultipleResourcesFound  # fhirpy's name for any 412

    with pytest.raises(MultipleResourcesFound) as e:
        stale.resource("Patient", **{**pat.serialize(), "gender": "male"}).save()
    assert "If-Match names version 1, the current version is 2" in str(e.value)
    # search: "mueller" and "muller" both find Müller; birthdate at month precision
    for q in ("mueller", "MULLER", "müll"):
        res = fp.resources("Patient").search(family=q).fetch_all()
        assert [r.id for r in res] == [pat.id], q
        for r in res:
            r4b(r.serialize())
    raw = fp.execute("Patient", method="get", params={"family": "mu"})
    assert r4b(raw)["total"] == 1 and raw["type"] == "searchset"
    assert fp.resources("Patient").search(birthdate="1985-07", family="mu").count() == 1
    assert fp.resources("Patient").search(birthdate="ge1985-07-02", family="mu").count() == 1  # overlaps
    assert fp.resources("Patient").search(birthdate="eq1985-07-02", family="mu").count() == 0
    # conditional create (If-None-Exist): the existing one is returned, nothing new is made
    cond = SyncFHIRClient(fhir_base(stack), authorization=f"Bearer {token(stack)}",
                          requests_config={"verify": str(stack.path("ca.pem"))},
                          extra_headers={"If-None-Exist": "identifier=urn:example:mrn|MRN-42"})
    again = cond.resource("Patient", name=[{"family": "Someone Else"}])
    again.save()
    assert again.id == pat.id
    fresh = SyncFHIRClient(fhir_base(stack), authorization=f"Bearer {token(stack)}",
                           requests_config={"verify": str(stack.path("ca.pem"))},
                           extra_headers={"If-None-Exist": "identifier=urn:example:mrn|MRN-43"})
    new = fresh.resource("Patient", identifier=[{"system": "urn:example:mrn", "value": "MRN-43"}])
    new.save()
    assert new.id != pat.id
    # paging to the end with fhirpy
    every = fp.resources("Patient").search(family="mu").limit(1).fetch_all()
    assert {r.id for r in every} == {pat.id}
    pat.delete()
    new.delete()
    assert fp.resources("Patient").search(identifier="MRN-42").count() == 0


def test_reader_role_cannot_write_and_no_token_is_refused(stack):
    base = fhir_base(stack)
    ca = str(stack.path("ca.pem"))
    r = requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, verify=ca, timeout=30,
                      headers={"Authorization": f"Bearer {token(stack, 'reader')}"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    r = requests.get(f"{base}/Patient?family=xx", verify=ca, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def _all_inputs():
    need(CSV)
    return [CSV, *sorted(BUNDLES.glob("*.json")), *sorted(HL7.glob("Patient-*.json"))]


def test_import_with_clinical_resources_then_no_plaintext_in_sqlite(stack, tmp_path):
    files = _all_inputs()
    resources = [it for f in files for it in iter_file(f, resources=True) if isinstance(it, ImportResource)]
    assert len(resources) == 5661  # the clinical data the shared sample holds
    with RecordsClient(stack.records_url, token=tokens(stack.data_dir)["admin"],
                       policy=stack.path("policy.toml")) as c:
        counts = import_files(c, files, tmp_path / "state.json")
        assert (counts.imported, counts.resources_imported, counts.failed) == (69, 5661, 0)
        again = import_files(c, files, tmp_path / "state.json")
        assert (again.imported, again.resources_imported) == (0, 0)
        assert (again.skipped, again.resources_skipped) == (69, 5661)
        one = next(it for it in resources if it.type == "Observation")
        assert c.fhir_read("Observation", one.id).data["code"] == one.resource["code"]
        assert c.fhir_read("Observation", one.id).data["subject"]["reference"].startswith("Patient/")
    # clinical data by patient through the FHIR endpoint
    pid = one.resource["subject"]["reference"].split("/")[1]
    r = requests.get(f"{fhir_base(stack)}/Observation?patient={pid}&_summary=count", timeout=30,
                     verify=str(stack.path("ca.pem")), headers={"Authorization": f"Bearer {token(stack)}"})
    assert r.json()["total"] == sum(1 for it in resources if it.type == "Observation"
                                    and it.resource["subject"]["reference"] == f"Patient/{pid}")
    db = stack.path("records.db")
    paths = [db, db.with_name("records.db-wal")]
    needles = sensitive_strings(files) | _prefix_needles(files) | _clinical_needles(resources)
    assert len(needles) > 400
    assert sum(scan_files(paths, needles).values()) == 0


def _prefix_needles(files) -> set[bytes]:
    """The folded prefixes (6..8 characters) and the term strings the blind index is keyed on:
    none may reach the database as such."""
    out = set()
    for f in files:
        for it in iter_file(f):
            if isinstance(it, ImportItem) and it.record.get("resourceType") == "Patient":
                for n in it.record.get("name") or []:
                    fam = fold(str(n.get("family") or ""))
                    for k in range(6, min(len(fam), MAX_PREFIX) + 1):
                        out.add(fam[:k].encode())
                    if fam:
                        out.add(f"family^{fam[:MAX_PREFIX]}".encode())
                        out.add(f"family={fam}".encode())
    return {n for n in out if len(n) >= 6}


def _clinical_needles(resources) -> set[bytes]:
    out = {b"Body Height", b"Body Weight", b"urn:uuid:"}
    out |= {it.id.encode() for it in resources[:300]}
    return out


def _url(it) -> str:
    return f"Patient/{it.id}" if isinstance(it, ImportItem) else f"{it.type}/{it.id}"


@pytest.mark.postgres
def test_no_plaintext_in_a_postgresql_table(postgres_dsn, pg_schema, tmp_path):
    """The same data through /fhir into PostgreSQL (in-process app): the rows table holds no
    name, SSN, id, folded prefix or clinical text."""
    from fastapi.testclient import TestClient

    files = [*sorted(BUNDLES.glob("*.json"))[:8], *sorted(HL7.glob("Patient-*.json"))]
    ra = records_app(tmp_path, store_url=f"{postgres_dsn}?schema={pg_schema}")
    try:
        items = [it for f in files for it in iter_file(f, resources=True)
                 if isinstance(it, ImportItem | ImportResource)]
        with TestClient(ra.app, headers=ra.headers()) as cl:
            for i in range(0, len(items), 300):
                entries = [{"resource": it.record if isinstance(it, ImportItem) else it.resource,
                            "request": {"method": "PUT", "url": _url(it)}} for it in items[i:i + 300]]
                r = cl.post("/fhir/", json={"resourceType": "Bundle", "type": "batch", "entry": entries},
                            headers={"Content-Type": "application/fhir+json"})
                assert r.status_code == 200
                assert all(e["response"]["status"].startswith("201") for e in r.json()["entry"])
            assert cl.get("/fhir/Patient?family=chalm").json()["total"] == 1
    finally:
        ra.store.close()
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f'SELECT n.name, r.key, r.value FROM "{pg_schema}".{ROWS_TABLE} r '
                            f'JOIN "{pg_schema}".safehold_namespaces n ON n.id = r.ns').fetchall()
    assert len(rows) > 2000
    dump = Path(tmp_path / "pg-dump.bin")
    dump.write_bytes(b"\n".join(bytes(k) + bytes(v) + ns.encode() for ns, k, v in rows))
    resources = [it for it in items if isinstance(it, ImportResource)]
    needles = sensitive_strings(files) | _prefix_needles(files) | _clinical_needles(resources)
    assert sum(scan_files([dump], needles).values()) == 0


def test_readme_fhir_snippet_runs_against_the_stack(stack, tmp_path):
    """The README's FHIR client block, run as a user would: in a directory whose
    ``safehold-data`` is the running stack's data directory (and ``safehold-data.owner`` its
    owner directory)."""
    import subprocess
    import sys

    from tests.support.shared import ROOT

    readme = (ROOT / "README.md").read_text("utf-8")
    block = readme.split("<!-- fhir-readme-snippet -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "safehold-data").symlink_to(stack.data_dir)
    (tmp_path / "safehold-data.owner").symlink_to(stack.owner_path(""))
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    pid, version, found = r.stdout.split(" ", 2)
    assert version == "1" and pid in found


def test_client_certificate_on_fhir(stack, tmp_path):
    """Mutual TLS works on /fhir as on the native API: a client certificate from the broker's
    workload CA to a key the owner pinned in the manifest (``safehold up`` pins the owner key as
    the records admin); a certificate to any other key gets 401 on /fhir too, whatever its CN."""
    import os
    import subprocess
    import sys

    from tests.support.shared import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def client_cert(name: str, key: str | None = None) -> tuple[str, str]:
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "safehold.cli.main", "broker", "client-cert",
                            "--name", name, "--out", str(out), "--url", stack.broker_url,
                            "--cacert", str(stack.path("ca.pem")), "--token", tokens(stack.data_dir)["admin"],
                            *(["--key", key] if key else [])], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return (str(out) + ".pem", key or str(out) + ".key")

    ca = str(stack.path("ca.pem"))
    pinned = client_cert("reader", str(stack.owner_path("owner.key")))
    got = requests.get(f"{fhir_base(stack)}/Patient?_summary=count", cert=pinned, verify=ca, timeout=30)
    assert got.status_code == 200 and r4b(got.json())["type"] == "searchset"
    stranger = client_cert("admin")
    denied = requests.post(f"{fhir_base(stack)}/Patient", json={"resourceType": "Patient"}, cert=stranger,
                           verify=ca, timeout=30, headers={"Content-Type": "application/fhir+json"})
    assert denied.status_code == 401 and denied.json()["issue"][0]["code"] in ("login", "security")
