"""End to end: the key broker and the records service as real processes on loopback ports.

The processes run from a snapshot of the package (copied once per module), so that edits to
the working tree during the run cannot change the workload measurement under the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests
from requests.adapters import HTTPAdapter

from safehold.client.errors import AccessDeniedError, PreconditionFailedError, RecordsClientError
from safehold.client.importer import import_files
from safehold.client.records import AsyncRecordsClient, RecordsClient
from safehold.devstack import (
    Stack,
    base_env,
    broker_cmd,
    prepare,
    records_cmd,
    records_config,
    records_env,
    start,
    stop,
    tokens,
    wait_broker,
    wait_records,
)
from safehold.devstack.demo import scan_files, sensitive_strings
from safehold.errors import AttestationError, RecordNotFoundError
from safehold.records.importers import ImportItem, iter_file
from safehold.records.scone import FIELDS
from safehold.store.migrations import ROWS_TABLE
from tests.support.shared import DATA, free_port, need_shared, snapshot_package
from tests.support.sqlite_damage import duplicate_leaf_page

pytestmark = pytest.mark.slow  # starts processes on loopback

CSV = DATA / "synthea-csv-27-ohdsi-dbt-synthea" / "patients.csv"
BUNDLES = DATA / "synthea-fhir-r4-bundles-google-fhir-data-pipes"
HL7 = DATA / "hl7-fhir-r4-patient-examples"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return snapshot_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def stack(pkg, tmp_path_factory):
    d = tmp_path_factory.mktemp("safehold-data")
    # the manifest also approves an encryption-off config (as the benchmark's baseline does)
    plain = records_config(tokens(d), encryption=False)
    # and one with freshness off, for a second service on another database (one ledger = one
    # store: a second store under the stack's ledger would be a fork)
    nofresh = records_config(tokens(d))
    # the unchanged SCONE demo clients below need the explicit opt-in scone_auth = "none"
    s = prepare(d, broker_port=free_port(), records_port=free_port(), scone_port=free_port(),
                extra_configs={"records-plain.toml": plain, "records-nofresh.toml": nofresh},
                package_root=str(pkg), scone_auth="none")
    start(s)
    yield s
    stop(s)


def client(stack, role="admin", **kw):
    return RecordsClient(stack.records_url, token=tokens(stack.data_dir)[role],
                         policy=stack.path("policy.toml"), **kw)


def cactx(stack):
    return ssl.create_default_context(cafile=str(stack.path("ca.pem")))


def all_inputs():
    need_shared(CSV)
    return [CSV, *sorted(BUNDLES.glob("*.json")), *sorted(HL7.glob("Patient-*.json"))]


def test_import_real_data_read_back_identical_db_holds_no_plaintext(stack, tmp_path):
    files = all_inputs()
    expected = {it.id: it.record for f in files for it in iter_file(f) if isinstance(it, ImportItem)}
    assert len(expected) == 27 + 20 + 22
    with client(stack) as c:
        counts = import_files(c, files, tmp_path / "state.json")
        assert (counts.imported, counts.failed) == (69, 0)
        for rid, rec in expected.items():
            assert c.get(rid).data == rec
        assert set(c.list_ids(page=7)) >= set(expected)
        hits = c.search(family="Mosciski958")
        assert [h.id for h in hits] == ["3edac2e3-d223-6fae-d515-daf96ef6bc76"]
        bundle_pat = next(r for r in expected.values() if r.get("resourceType") == "Patient"
                          and r.get("meta", {}).get("profile"))
        fam = bundle_pat["name"][0]["family"]
        hits = c.search(family=fam.upper(), birthDate=bundle_pat["birthDate"])
        assert bundle_pat["id"] in [h.id for h in hits]
        # resume: a second run imports nothing again
        again = import_files(c, files, tmp_path / "state.json")
        assert again.imported == 0 and again.skipped == 69
        fresh = import_files(c, files[:3], None)
        assert fresh.imported == 0 and fresh.skipped == 27 + 2 and fresh.failed == 0
    db = stack.path("records.db")
    needles = sensitive_strings(files)
    assert len(needles) > 150
    found = scan_files([db, db.with_name("records.db-wal")], needles)
    assert sum(found.values()) == 0, found
    raw = db.read_bytes() + (db.with_name("records.db-wal").read_bytes()
                             if db.with_name("records.db-wal").exists() else b"")
    for s in (b"Mosciski958", b"999-17-5017", b"3edac2e3-d223-6fae-d515-daf96ef6bc76", b"Chalmers"):
        assert s not in raw


def _scone_ca(stack) -> str:
    r = httpx.get(f"{stack.broker_url}/v1/values/session=safehold", verify=cactx(stack))
    r.raise_for_status()
    return r.json()["values"]["api_ca_cert"]["value"]


FORM = {f: f"v-{f}" for f in FIELDS} | {"fname": "Jane", "lname": "Doe", "ssn": "999-11-2222",
                                        "dob": "1990-01-01"}


def test_scone_demo_flow_with_curl(stack, tmp_path):
    ca = tmp_path / "cas-ca.pem"
    ca.write_text(_scone_ca(stack))
    port = stack.scone_port
    base = ["curl", "-sS", "--cacert", str(ca), "--resolve", f"api:{port}:127.0.0.1", "-w", "\n%{http_code}"]
    form = []
    for k, v in FORM.items():
        form += ["--data-urlencode", f"{k}={v}"]

    def curl(*args):
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30, check=True).stdout
        body, _, code = out.rpartition("\n")
        return int(code), json.loads(body) if body else None

    code, body = curl("-X", "POST", f"https://api:{port}/patient/patient_3", *form)
    assert code == 200 and body["fname"] == "Jane" and body["id"] == "patient_3"
    code, body = curl("-X", "POST", f"https://api:{port}/patient/patient_3", *form)
    assert code == 403
    code, body = curl(f"https://api:{port}/patient/patient_3")
    assert code == 200 and body["lname"] == "Doe" and body["id"] == "patient_3"
    assert isinstance(body["score"], float) and 0 <= body["score"] < 1
    code, sc = curl(f"https://api:{port}/score/patient_3")
    assert code == 200 and sc == {"id": "patient_3", "score": body["score"]}
    assert curl(f"https://api:{port}/patient/nobody")[0] == 404
    assert curl(f"https://api:{port}/score/nobody")[0] == 404
    assert curl("-X", "POST", f"https://api:{port}/patient/p4", "-d", "fname=x")[0] == 400
    code, health = curl(f"https://api:{port}/healthz")
    assert code == 200 and health == {"status": "ok"}
    code, spec = curl(f"https://api:{port}/openapi.json")
    assert code == 200 and "/patient/{patient_id}" in spec["paths"]
    # without the CA, curl refuses the server (TLS is really checked against the workload CA)
    r = subprocess.run(["curl", "-sS", "--resolve", f"api:{port}:127.0.0.1", f"https://api:{port}/healthz"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    # the same record is a normal record on the native API, found by its SSN
    with client(stack, "reader") as c:
        assert c.get("patient_3").data == FORM
        assert [h.id for h in c.search(identifier="999-11-2222")] == ["patient_3"]


class _SNIAdapter(HTTPAdapter):
    """Connect to 127.0.0.1 but verify (and send SNI for) the name ``api``, like --resolve."""

    def init_poolmanager(self, *a, **kw):
        kw["server_hostname"] = "api"
        kw["assert_hostname"] = "api"
        super().init_poolmanager(*a, **kw)


def test_scone_demo_flow_with_requests(stack, tmp_path):
    ca = tmp_path / "cas-ca.pem"
    ca.write_text(_scone_ca(stack))
    sess = requests.Session()
    sess.mount("https://", _SNIAdapter())
    url = f"https://127.0.0.1:{stack.scone_port}"
    r = sess.post(f"{url}/patient/req_1", data=FORM, verify=str(ca), timeout=30)
    assert r.status_code == 200, r.text
    assert sess.post(f"{url}/patient/req_1", data=FORM, verify=str(ca), timeout=30).status_code == 403
    r = sess.get(f"{url}/patient/req_1", verify=str(ca), timeout=30)
    assert r.status_code == 200 and r.json()["ssn"] == "999-11-2222" and "score" in r.json()
    assert sess.get(f"{url}/score/req_1", verify=str(ca), timeout=30).json()["id"] == "req_1"
    assert sess.get(f"{url}/patient/none", verify=str(ca), timeout=30).status_code == 404


def test_roles_and_tokens(stack):
    with client(stack, "writer") as w:
        w.put("role-test", {"resourceType": "Patient", "id": "role-test"})
    with client(stack, "reader") as r:
        assert r.get("role-test").version == 1
        with pytest.raises(AccessDeniedError, match="403"):
            r.put("role-test", {"x": 1})
        with pytest.raises(AccessDeniedError, match="403"):
            r.audit_verify()
    with RecordsClient(stack.records_url, token="not-a-token", policy=stack.path("policy.toml")) as bad:
        with pytest.raises(AccessDeniedError, match="401"):
            bad.get("role-test")
    with RecordsClient(stack.records_url, policy=stack.path("policy.toml")) as none:
        with pytest.raises(AccessDeniedError, match="401"):
            none.get("role-test")
    with client(stack) as a:
        assert a.audit_verify() > 3
        with pytest.raises(RecordNotFoundError):
            a.get("never-written")
        with pytest.raises(PreconditionFailedError):
            a.put("role-test", {"x": 2}, if_version=7)


def _client_cert(stack, pkg, name, tmp_path, key=None):
    out = tmp_path / name
    env = {**__import__("os").environ, "PYTHONPATH": str(pkg.parent)}
    r = subprocess.run([sys.executable, "-m", "safehold.cli.main", "broker", "client-cert", "--name", name,
                        "--out", str(out), "--url", stack.broker_url, "--cacert", str(stack.path("ca.pem")),
                        "--token", tokens(stack.data_dir)["admin"], *(["--key", str(key)] if key else [])],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return (str(out) + ".pem", str(key or str(out) + ".key"))


def test_client_certificates_from_the_broker(stack, pkg, tmp_path):
    """Mutual TLS: a client certificate issued by the broker's workload CA to a key the owner
    pinned (the owner key is the records admin); any other key gets 401, whatever its CN."""
    pinned = _client_cert(stack, pkg, "writer", tmp_path, key=stack.owner_path("owner.key"))
    with RecordsClient(stack.records_url, policy=stack.path("policy.toml"), client_cert=pinned) as c:
        assert c.put("mtls-1", {"resourceType": "Patient", "id": "mtls-1"}) == 1
        assert c.get("mtls-1").data["id"] == "mtls-1"
        assert c.audit_verify() > 0
    stranger = _client_cert(stack, pkg, "stranger", tmp_path)
    with RecordsClient(stack.records_url, policy=stack.path("policy.toml"), client_cert=stranger) as c:
        with pytest.raises(AccessDeniedError, match="401"):
            c.get("mtls-1")
    # a self-made certificate with the CN "writer" (not from the workload CA): TLS refuses it
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    nm = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "writer")])
    now = datetime.now(UTC)
    forged = (x509.CertificateBuilder().subject_name(nm).issuer_name(nm).public_key(k.public_key())
              .serial_number(1).not_valid_before(now - timedelta(hours=1))
              .not_valid_after(now + timedelta(hours=1)).sign(k, hashes.SHA256()))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged.key").write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    with RecordsClient(stack.records_url, policy=stack.path("policy.toml"),
                       client_cert=(str(tmp_path / "forged.pem"), str(tmp_path / "forged.key"))) as c:
        with pytest.raises((httpx.HTTPError, ssl.SSLError, AccessDeniedError)):
            c.put("mtls-forged", {"x": 1})
    with client(stack) as a, pytest.raises(RecordNotFoundError):
        a.get("mtls-forged")
    from safehold.errors import ConfigError

    with pytest.raises(ConfigError, match="does not load"):
        RecordsClient(stack.records_url, policy=stack.path("policy.toml"),
                      client_cert=(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key")))
    with client(stack) as a:
        entries = a.audit_verify()
    assert entries > 0


def test_client_refuses_unapproved_service_before_sending(stack, tmp_path):
    """A policy that does not approve this measurement: the client raises, and the service
    receives nothing (its audit chain does not grow)."""
    import tomllib

    import tomli_w

    pol = tomllib.loads(stack.path("policy.toml").read_text())
    pol["reference_values"]["measurements"] = ["ab" * 48]
    wrong = tmp_path / "wrong-policy.toml"
    wrong.write_text(tomli_w.dumps(pol))
    with client(stack) as a:
        before = a.audit_verify()
    with RecordsClient(stack.records_url, token=tokens(stack.data_dir)["admin"], policy=wrong) as c:
        with pytest.raises(AttestationError, match="measurement"):
            c.put("should-not-arrive", {"secret": "x"})
    with client(stack) as a:
        after = a.audit_verify()
        with pytest.raises(RecordNotFoundError):
            a.get("should-not-arrive")
    assert after == before  # not one request of the refused connection reached the service


def test_modified_service_gets_no_keys_and_never_serves(stack, pkg, tmp_path):
    mod = tmp_path / "modified"
    shutil.copytree(pkg, mod / "safehold")
    f = mod / "safehold" / "records" / "scone.py"
    f.write_bytes(f.read_bytes() + b"\n# one changed line\n")
    port, sport = free_port(), free_port()
    env = records_env(stack, port=port, scone_port=sport, ready="modified-ready.json",
                      store_url=f"sqlite:///{tmp_path / 'm.db'}")
    modified = dataclasses.replace(stack, package_root=str(mod / "safehold"), procs={}, lock=None)
    log = tmp_path / "modified.log"
    with log.open("wb") as lf:  # the same launch, from the modified copy of the package
        p = subprocess.Popen(records_cmd(modified), env=env, stdout=lf, stderr=subprocess.STDOUT)
        try:
            assert p.wait(60) == 2
        finally:
            if p.poll() is None:
                p.kill()
    text = log.read_text()
    assert "released no keys" in text and "measurement" in text
    for pt in (port, sport):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", pt)) != 0
    assert not (tmp_path / "m.db").exists()


def test_tampered_row_fails_alone(stack):
    """A flipped bit in one record's row: that record is refused by name (with freshness, the
    verifier map sees the row's value changed at the same version before the AEAD does: 409
    ``stale-data`` ``RowRolledBackError``), the others are served; the DBA's putting the row
    back makes it readable again."""
    with client(stack) as c:
        for i in range(3):
            c.put(f"tamper-{i}", {"resourceType": "Patient", "id": f"tamper-{i}", "gender": "other"})
        victim = next(k for k in ("tamper-0", "tamper-1", "tamper-2"))
    conn = sqlite3.connect(stack.path("records.db"), timeout=10)
    # find the victim's row: the one whose ciphertext changes when the record is rewritten
    rows = dict(conn.execute(f"SELECT key, value FROM {ROWS_TABLE} WHERE ns = (SELECT id "
                             f"FROM safehold_namespaces WHERE name = 'records:patients')"))
    with client(stack) as c:
        c.put(victim, {"resourceType": "Patient", "id": victim, "gender": "unknown"})
    rows2 = dict(conn.execute(f"SELECT key, value FROM {ROWS_TABLE} WHERE ns = (SELECT id "
                              f"FROM safehold_namespaces WHERE name = 'records:patients')"))
    (key,) = [k for k in rows2 if rows.get(k) != rows2[k]]
    val = bytearray(rows2[key])
    val[-5] ^= 0x40
    conn.execute(f"UPDATE {ROWS_TABLE} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records:patients') AND key = ?",
                 (bytes(val), key))
    conn.commit()
    with client(stack) as c:
        with pytest.raises(RecordsClientError, match=f"409 stale-data: RowRolledBackError.*{key.hex()}"):
            c.get(victim)
        assert c.get("tamper-1").data["gender"] == "other"
        assert c.get("tamper-2").data["gender"] == "other"
    conn.execute(f"UPDATE {ROWS_TABLE} SET value = ? WHERE ns = (SELECT id FROM safehold_namespaces "
                 f"WHERE name = 'records:patients') AND key = ?",
                 (rows2[key], key))
    conn.commit()
    conn.close()
    with client(stack) as c:
        assert c.get(victim).data["gender"] == "unknown"
        assert {"tamper-0", "tamper-1", "tamper-2"} <= set(c.list_ids())
        c.delete(victim)


def test_twenty_concurrent_writers_lose_no_update(stack):
    with client(stack) as c:
        c.put("counter", {"resourceType": "Patient", "id": "counter", "writers": []})
    errors: list[str] = []

    def writer(n: int) -> None:
        try:
            with client(stack, "writer") as c:
                c.put(f"crowd-{n}", {"resourceType": "Patient", "id": f"crowd-{n}",
                                     "name": [{"family": "Crowdson"}]})
                for _ in range(300):
                    rec = c.get("counter")
                    rec.data["writers"].append(n)
                    try:
                        c.put("counter", rec.data, if_version=rec.version)
                        return
                    except PreconditionFailedError:
                        time.sleep(0.001 * (n % 5))
                errors.append(f"writer {n} gave up")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert errors == []
    with client(stack) as c:
        rec = c.get("counter")
        assert sorted(rec.data["writers"]) == list(range(20)) and rec.version == 21
        crowd = sorted(f"crowd-{n}" for n in range(20))
        assert sorted(h.id for h in c.search(family="crowdson")) == crowd
        assert [h.id for h in c.search(family="crowdson", limit=5)] == crowd[:5]
        c.audit_verify()


def test_async_client(stack):
    async def go():
        async with AsyncRecordsClient(stack.records_url, token=tokens(stack.data_dir)["writer"],
                                      policy=stack.path("policy.toml")) as c:
            v = await c.put("async-1", {"resourceType": "Patient", "id": "async-1", "gender": "female"})
            got = await c.get("async-1")
            res = await c.batch([("async-2", {"a": 1}), ("bad id", {"a": 2})])
            ids = [i async for i in c.list_ids(page=5)]
            page, cursor = await c.list_page(limit=1)
            await c.delete("async-2")
            fhir = await c.fhir_batch([("Patient", "async-3", {"resourceType": "Patient", "id": "async-3"})])
            read = await c.fhir_read("Patient", "async-3")
            return v, got, res, ids, (page, cursor), fhir, read

    async def audit():
        async with AsyncRecordsClient(stack.records_url, token=tokens(stack.data_dir)["admin"],
                                      policy=stack.path("policy.toml")) as c:
            n, n_full = await c.audit_verify(), await c.audit_verify_full()
            seg = await c.audit_segment(0)  # export only: sealing would change the shared stack
            return n, n_full, seg

    v, got, res, ids, (page, cursor), fhir, read = asyncio.run(go())
    assert v == 1 and got.data["gender"] == "female"
    assert [r["status"] for r in res] == ["created", "failed"]
    assert "async-1" in ids and "async-2" in ids
    assert len(page) == 1 and cursor
    assert [r["status"] for r in fhir] == ["created"] and read.data["id"] == "async-3" and read.version == 1
    n, n_full, seg = asyncio.run(audit())
    assert n == n_full > 0 and seg.first == 0
    with RecordsClient(stack.records_url, token=tokens(stack.data_dir)["admin"],
                       policy=stack.path("policy.toml")) as c:
        assert c.audit_segment(seg.last) == seg  # the same export through the sync client


def test_restart_keeps_all_data(stack):
    with client(stack) as c:
        before = {rid: c.get(rid).data for rid in c.list_ids()}
    assert len(before) > 60
    codes = stop(stack)
    assert codes == {"records": 0, "broker": 0}
    start(stack)
    with client(stack) as c:
        after = {rid: c.get(rid).data for rid in c.list_ids()}
        assert c.audit_verify() > 100
    assert after == before


@pytest.mark.postgres
def test_postgres_table_holds_no_plaintext(stack, pkg, postgres_dsn, pg_schema, tmp_path):
    import psycopg

    port = free_port()
    sep = "&" if "?" in postgres_dsn else "?"
    url = f"{postgres_dsn}{sep}schema={pg_schema}"
    env = records_env(stack, port=port, scone_port=None, store_url=url, ready="pg-ready.json")
    log = tmp_path / "pg.log"
    ready = stack.path("pg-ready.json")
    ready.unlink(missing_ok=True)
    with log.open("wb") as lf:
        p = subprocess.Popen(records_cmd(stack, "records-nofresh.toml"), env=env, stdout=lf,
                             stderr=subprocess.STDOUT)
    try:
        info = wait_records(stack, p, ready, 60, log)
        files = [CSV, *sorted(BUNDLES.glob("*.json"))[:5]]
        expected = {it.id: it.record for f in files for it in iter_file(f) if isinstance(it, ImportItem)}
        with RecordsClient(info["records_url"], token=tokens(stack.data_dir)["admin"],
                           policy=stack.path("policy.toml")) as c:
            counts = import_files(c, files, None)
            assert counts.imported == len(expected) == 32
            for rid, rec in expected.items():
                assert c.get(rid).data == rec
    finally:
        p.terminate()
        assert p.wait(30) in (0, -15)
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f'SELECT n.name, r.key, r.value FROM "{pg_schema}".{ROWS_TABLE} r '
                            f'JOIN "{pg_schema}".safehold_namespaces n ON n.id = r.ns').fetchall()
    assert len(rows) > 32
    dump = tmp_path / "pg-dump.bin"
    dump.write_bytes(b"".join(bytes(ns.encode()) + bytes(k) + bytes(v) for ns, k, v in rows))
    assert sum(scan_files([dump], sensitive_strings(files)).values()) == 0
    assert b"Mosciski958" not in dump.read_bytes()


# --- the unmeasured environment cannot change a measured security setting ---------------------


def _pin(pem_path: Path) -> str:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _start_expect_refusal(stack, tmp_path, name, env_extra, config=None):
    """Start a records process with ``env_extra`` on top of the normal run-time environment and
    watch it from the outside: it must exit without ever accepting a connection on either port,
    writing its ready file or creating its database. Returns ``(exit status, log text)``."""
    port, sport = free_port(), free_port()
    db = tmp_path / f"{name}.db"
    ready = stack.path(f"{name}-ready.json")
    env = records_env(stack, port=port, scone_port=sport, ready=ready.name, store_url=f"sqlite:///{db}")
    env.update(env_extra)
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "safehold.records.server",
           "--config", str(config or stack.path("records.toml"))]
    opened = []
    with log.open("wb") as lf:
        p = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline and not opened:
                for pt in (port, sport):
                    with socket.socket() as so:
                        if so.connect_ex(("127.0.0.1", pt)) == 0:
                            opened.append(pt)
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = log.read_text()
    assert not opened, f"the service opened port(s) {opened}:\n{text}"
    assert not ready.exists() and not db.exists(), text
    return p.returncode, text


@pytest.mark.parametrize("env_extra, setting", [
    ({"SAFEHOLD_RECORDS_ENCRYPTION": "0"}, "encryption"),
    ({"SAFEHOLD_RECORDS_AUDIT": "off"}, "audit"),
    ({"SAFEHOLD_RECORDS_SCONE_AUTH": "none", "SAFEHOLD_RECORDS_HOST": "0.0.0.0"}, "host"),
    ({"SAFEHOLD_RECORDS_BROKER_CA_SHA256": "00" * 32}, "broker_ca_sha256"),
])
def test_env_cannot_override_a_measured_setting(stack, tmp_path, env_extra, setting):
    code, text = _start_expect_refusal(stack, tmp_path, f"env-{setting}", env_extra)
    assert code == 1
    assert f"{setting!r} is a measured setting: only the measured config file may set it" in text


def test_scone_without_auth_only_on_loopback(stack, tmp_path):
    """Even the measured file cannot put the unauthenticated SCONE port on a public address."""
    import tomllib

    import tomli_w

    cfg = tomllib.loads(stack.path("records.toml").read_text())
    cfg["host"] = "0.0.0.0"
    bad = stack.path("records-public.toml")
    bad.write_text(tomli_w.dumps(cfg))
    code, text = _start_expect_refusal(stack, tmp_path, "public-scone", {}, config=bad)
    assert code == 1 and "scone_auth = 'none'" in text and "'0.0.0.0'" in text


def test_broker_with_another_ca_is_refused(stack, pkg, tmp_path):
    """A rogue broker (own CA, same manifest: it WOULD release an attacker-known keyset) is
    refused whether the host points only the URL at it or the CA file too."""
    rogue = Stack(tmp_path / "rogue", free_port(), 0, None, package_root=str(pkg))
    rogue.data_dir.mkdir()
    shutil.copy(stack.path("manifest.toml"), rogue.path("manifest.toml"))
    with rogue.path("broker.log").open("wb") as lf:
        proc = subprocess.Popen(broker_cmd(rogue), env=base_env(rogue), stdout=lf, stderr=subprocess.STDOUT)
    try:
        wait_broker(rogue, proc, 60)
        pin, rogue_pin = _pin(stack.path("ca.pem")), _pin(rogue.path("ca.pem"))
        assert pin != rogue_pin
        code, text = _start_expect_refusal(stack, tmp_path, "rogue-url",
                                           {"SAFEHOLD_RECORDS_BROKER_URL": rogue.broker_url})
        assert code == 1 and f"the broker at {rogue.broker_url} is not the pinned broker" in text
        code, text = _start_expect_refusal(stack, tmp_path, "rogue-ca", {
            "SAFEHOLD_RECORDS_BROKER_URL": rogue.broker_url,
            "SAFEHOLD_RECORDS_BROKER_CA": str(rogue.path("ca.pem"))})
        assert code == 1 and "is not the broker pinned in the measured config" in text
        assert f"expected {pin}, got {rogue_pin}" in text
        garbled = tmp_path / "garbled.pem"
        garbled.write_text(stack.path("ca.pem").read_text()[:200])
        code, text = _start_expect_refusal(stack, tmp_path, "garbled-ca",
                                           {"SAFEHOLD_RECORDS_BROKER_CA": str(garbled)})
        assert code == 1 and "broker CA" in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_encryption_off_only_through_the_measured_file_and_loud(stack, tmp_path):
    main = json.loads(stack.path("records-ready.json").read_text())
    assert (main["encryption"], main["audit"], main["scone_auth"]) == (True, True, "none")
    port, db = free_port(), tmp_path / "plain.db"
    env = records_env(stack, port=port, scone_port=None, ready="plain-ready.json",
                      store_url=f"sqlite:///{db}")
    log = tmp_path / "plain.log"
    stack.path("plain-ready.json").unlink(missing_ok=True)
    with log.open("wb") as lf:
        p = subprocess.Popen(records_cmd(stack, "records-plain.toml"), env=env, stdout=lf,
                             stderr=subprocess.STDOUT)
    try:
        info = wait_records(stack, p, stack.path("plain-ready.json"), 60, log)
        assert info["encryption"] is False and info["measurement"] != main["measurement"]
        with RecordsClient(info["records_url"], token=tokens(stack.data_dir)["writer"],
                           policy=stack.path("policy.toml")) as c:
            c.put("plain-1", {"resourceType": "Patient", "name": [{"family": "Plaintextova"}]})
    finally:
        p.terminate()
        p.wait(30)
    assert "ENCRYPTION OFF" in log.read_text() and "stored in plaintext" in log.read_text()
    wal = tmp_path / "plain.db-wal"
    raw = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert b"Plaintextova" in raw  # really off: the switch is the measured file's


# --- body limits over TLS, SDK batch shapes, corrupt store files, a cut audit log ---------------


def _api(stack, role="admin"):
    return httpx.Client(base_url=f"https://localhost:{stack.records_port}", verify=cactx(stack),
                        headers={"Authorization": f"Bearer {tokens(stack.data_dir)[role]}"},
                        timeout=httpx.Timeout(30.0))


def _err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    return body["detail"]


def test_oversized_bodies_over_tls_get_the_413_not_a_reset(stack):
    """The service reads and drops an over-limit body (up to a bound), so a client sending one
    over a real TLS connection reads the 413 instead of a reset connection; nothing is stored.
    (The error shapes are tested in-process in tests/records/test_http.py.)"""
    big = b'{"x": "' + b"a" * (5 << 20) + b'"}'

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    with _api(stack) as h:
        for rid, body in (("big1", big), ("big2", chunks())):
            d = _err(h.put(f"/v1/patients/{rid}", content=body, headers={"Content-Type": "application/json"}),
                     413, "too-large")
            assert "1048576 bytes" in d
        for rid in ("big1", "big2"):
            _err(h.get(f"/v1/patients/{rid}"), 404, "not-found")


def test_sdk_batch_takes_tuples_and_dicts_and_search_has_versions(stack):
    """The SDK's ``batch()`` took only ``(id, record)`` tuples although the wire shape is
    ``{"id", "record"}``, and ``search()`` hits had no version to pass to ``if_version``: both
    item shapes work (a dict with other keys is refused naming the item), and each hit carries
    the version a ``get`` returns."""
    rec = {"resourceType": "Patient", "name": [{"family": "Batchshape"}]}
    with client(stack) as c:
        res = c.batch([("shape-1", rec), {"id": "shape-2", "record": rec}])
        assert [r["status"] for r in res] == ["created", "created"]
        c.put("shape-2", {**rec, "gender": "other"})
        hits = c.search(family="batchshape")
        assert [(h.id, h.version) for h in hits] == [("shape-1", 1), ("shape-2", 2)]
        assert hits[1].version == c.get("shape-2").version
        with pytest.raises(ValueError, match='batch item 0: a dict item must have exactly the keys "id" and'):
            c.batch([{"id": "shape-3", "rec": rec}])

    async def go():
        async with AsyncRecordsClient(stack.records_url, token=tokens(stack.data_dir)["writer"],
                                      policy=stack.path("policy.toml")) as ac:
            await ac.batch([{"id": "shape-4", "record": rec}])
            return await ac.search(family="batchshape")

    assert [(h.id, h.version) for h in asyncio.run(go())][-1] == ("shape-4", 1)


def _sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a live WAL database (SQLite online backup API)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _start_records_on(stack, tmp_path, name, db):
    """A second records process of the running stack on store ``db``; returns (proc, url|None, log).

    It runs the freshness-off configuration: a copy of the store under the stack's own ledger
    would be a second writer of that ledger (a fork, which freshness refuses: docs/freshness.md),
    and these tests are about the SQLite file, not about freshness."""
    port = free_port()
    ready = stack.path(f"{name}-ready.json")
    ready.unlink(missing_ok=True)
    env = records_env(stack, port=port, scone_port=None, ready=ready.name, store_url=f"sqlite:///{db}")
    env["SAFEHOLD_RECORDS_SCONE_PORT"] = "none"
    log = tmp_path / f"{name}.log"
    lf = log.open("wb")
    # freshness off: a second store under the stack's ledger would be a fork (one ledger = one store)
    p = subprocess.Popen(records_cmd(stack, "records-nofresh.toml"), env=env, stdout=lf,
                         stderr=subprocess.STDOUT)
    lf.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and not ready.exists():
        time.sleep(0.05)
    return p, (f"https://localhost:{port}" if ready.exists() else None), log


def test_corrupt_store_fails_fast_with_a_clear_error(stack, tmp_path):
    """A corrupted SQLite file must not make the service hang or answer with tracebacks (real
    corrupted files, real processes): (a) 200 bytes flipped in the
    middle → PRAGMA quick_check, in the background after serving starts (issue 17), refuses
    every operation (500 ``store-corrupt``, ``/healthz`` 503, the log names it), or the start-up
    itself meets the damage and exits 1;
    (b) damaged index pages quick_check cannot see → requests fail fast with 500
    ``store-corrupt`` naming the store, never a hang."""
    import random

    # (a) 200 bytes flipped in the middle of the file
    db = tmp_path / "flipped.db"
    _sqlite_copy(stack.path("records.db"), db)
    data = bytearray(db.read_bytes())
    ps = int.from_bytes(data[16:18], "big") or 65536  # the header's page size (1 means 65536)
    mid = (len(data) // ps // 2) * ps  # the start of a page in the middle: its B-tree header
    rnd = random.Random(5)
    for j in range(200):
        data[mid + j] ^= rnd.randrange(1, 256)
    db.write_bytes(bytes(data))
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError:
        pass
    conn.close()
    p, url, log = _start_records_on(stack, tmp_path, "flipped", db)
    started = url is not None
    try:
        if not started:  # the start-up itself met a damaged page (schema, freshness journal)
            assert p.wait(60) == 1
        else:  # quick_check runs after serving starts; its finding refuses everything after
            deadline = time.monotonic() + 60
            while "PRAGMA quick_check:" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            with httpx.Client(base_url=url, verify=cactx(stack), timeout=httpx.Timeout(15.0),
                              headers={"Authorization": f"Bearer {tokens(stack.data_dir)['admin']}"}) as h:
                d = _err(h.get("/v1/patients/3edac2e3-d223-6fae-d515-daf96ef6bc76"), 500, "store-corrupt")
                assert "PRAGMA quick_check" in d
                assert h.get("/healthz").status_code == 503
    finally:
        if p.poll() is None:
            p.kill()
    text = log.read_text()
    if started:
        assert f"SQLite store {db} is corrupt (PRAGMA quick_check:" in text, text
    else:  # named, and said to be corrupt
        assert f"SQLite store {db}" in text and "corrupt" in text, text
    # (b) a leaf page of the audit log copied over another: quick_check passes, scans would not.
    # The audit needs a few 16 KiB leaves: 600 audited reads (one entry each), then their flush
    with client(stack, "reader") as c:
        for i in range(600):
            with pytest.raises(RecordNotFoundError):
                c.get(f"no-such-{i}")
    time.sleep(1.0)
    db2 = tmp_path / "dup.db"
    _sqlite_copy(stack.path("records.db"), db2)
    duplicate_leaf_page(db2, b"records.audit")
    p, url, log = _start_records_on(stack, tmp_path, "dup", db2)
    try:
        if url is None:  # the background quick_check saw this damage before start-up ended
            assert p.wait(60) == 1
            assert f"SQLite store {db2} is corrupt" in log.read_text(), log.read_text()
            return
        with httpx.Client(base_url=url, verify=cactx(stack), timeout=httpx.Timeout(15.0),
                          headers={"Authorization": f"Bearer {tokens(stack.data_dir)['admin']}"}) as h:
            t0 = time.monotonic()
            d = _err(h.get("/v1/audit/verify"), 500, "store-corrupt")
            assert time.monotonic() - t0 < 10
            # the scan's order check, or the background quick_check's finding (16 KiB pages
            # make some duplicated leaves visible to it), whichever came first
            assert f"SQLite store {db2}" in d and ("keys out of order" in d or "quick_check" in d)
            assert h.get("/v1/patients/3edac2e3-d223-6fae-d515-daf96ef6bc76").status_code in (200, 404, 500)
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(15)


def test_audit_tail_cut_while_stopped_is_refused_after_restart(stack):
    """The database operator cuts the audit log's tail, which the hash chain alone cannot show:
    delete the last audit rows from the SQLite file while the service is stopped; after the
    restart the freshness ledger (whose verifier map holds those rows) names the first missing
    row, every audited access is refused (fail closed) and /healthz says unavailable."""
    with client(stack) as c:
        c.put("cut-1", {"resourceType": "Patient", "gender": "other"})
        c.audit_verify()
    assert stop(stack) == {"records": 0, "broker": 0}
    conn = sqlite3.connect(stack.path("records.db"))
    keys = conn.execute(f"SELECT key FROM {ROWS_TABLE} WHERE ns = (SELECT id FROM safehold_namespaces "
                        f"WHERE name = 'records.audit') "
                        "ORDER BY key DESC LIMIT 6").fetchall()
    conn.executemany(f"DELETE FROM {ROWS_TABLE} WHERE ns = (SELECT id FROM safehold_namespaces "
                     f"WHERE name = 'records.audit') AND key = ?", keys)
    conn.commit()
    conn.close()
    start(stack)
    assert "AUDIT LOG BROKEN" in stack.path("records.log").read_text()
    with _api(stack) as h:
        d = _err(h.get("/v1/audit/verify"), 409, "stale-data")
        assert d.startswith(("RowDeletedError", "RowsOmittedError")), d
        _err(h.get("/v1/patients/cut-1"), 409, "stale-data")
        _err(h.put("/v1/patients/cut-2", json={"a": 1}), 409, "stale-data")
        r = httpx.get(f"https://localhost:{stack.records_port}/healthz", verify=cactx(stack))
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
