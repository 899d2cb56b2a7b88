"""Process rehearsal of the chart (issue 18 item 5): render ``kind-dev`` with Helm's engine, run
every container's command line with its environment as processes on loopback (the real
PostgreSQL, the simulated TEE), 2 broker and 2 records replicas behind round-robin fronts and 3
anchor members; import patients under load, SIGKILL one replica of each: requests keep
succeeding (client retries allowed) and no acknowledged write is lost. Adapted: interpreter,
sys.path, paths, ports, Service names (tests/support/rehearsal.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import tomli_w
from joserfc.jwk import ECKey

from tests.deploy import chart
from tests.support.rehearsal import (
    IMAGE_PYTHON,
    Proc,
    RoundRobinFront,
    adapt_command,
    env_policy,
    map_path,
    pod_launch,
    wait_https,
    wait_tcp,
)
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow


def _containers() -> dict[str, tuple[dict, dict]]:
    """workload → (controller, its one container) of the rendered kind-dev chart."""
    out = {}
    for ctl, tpl in chart.pod_specs(chart.objects("kind-dev")):
        name = ctl["metadata"]["labels"].get("app.kubernetes.io/component") or ctl["metadata"]["name"]
        (c,) = tpl["spec"]["containers"]
        out[name] = (ctl, c)
    return out


class Rehearsal:
    """The processes, fronts and directories of one rehearsal."""

    def __init__(self, root: Path, package: Path, dsn: str) -> None:
        self.root, self.package, self.dsn = root, package, dsn
        self.containers = _containers()
        self.procs: dict[str, Proc] = {}
        self.fronts: list[RoundRobinFront] = []
        # shared objects: the ConfigMaps and the Secret of the kind-dev preset
        self.secret = root / "secret-simulated-tee"
        self.cm_ca = root / "configmap-broker-ca"
        self.cm_records = root / "configmap-records-config"
        self.cm_anchor = root / "configmap-anchor-config"
        self.owner = root.parent / "owner-device"  # the owner's own machine (tokens, owner key)
        for d in (self.secret, self.cm_ca, self.cm_records, self.cm_anchor, self.owner):
            d.mkdir(parents=True)

    def replica_dirs(self, name: str, i: int, ctl: dict, c: dict) -> dict[str, Path]:
        """In-container path → directory, for replica ``i`` (module docstring)."""
        base = self.root / f"{name}-{i}"
        vols = {v["name"]: v for v in ctl["spec"]["template"]["spec"].get("volumes", [])}
        mapping: dict[str, Path] = {}
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"], {})
            if "configMap" in v:
                cm = v["configMap"]["name"]
                mapping[m["mountPath"]] = {"safehold-broker-ca": self.cm_ca,
                                           "safehold-records-config": self.cm_records,
                                           "safehold-anchor-config": self.cm_anchor}[cm]
            elif "secret" in v:
                mapping[m["mountPath"]] = self.secret
            else:  # emptyDir or the StatefulSet's volume claim: per replica
                d = base / m["mountPath"].strip("/").replace("/", "_")
                d.mkdir(parents=True, exist_ok=True)
                mapping[m["mountPath"]] = d
        # a Secret mounted inside an emptyDir: a symlink where the mount would be
        for path, target in list(mapping.items()):
            if target == self.secret:
                parent = max((p for p in mapping if path.startswith(p + "/")), key=len, default=None)
                if parent is not None:
                    link = Path(map_path(path, {parent: mapping[parent]}))
                    if not link.exists():
                        link.symlink_to(self.secret)
        return mapping

    def start(self, name: str, i: int, ports: dict[str, str], env_values: dict[str, str]) -> Proc:
        ctl, c = self.containers[name]
        paths = self.replica_dirs(name, i, ctl, c)
        argv = adapt_command(c["command"], self.package, paths, {"0.0.0.0": "127.0.0.1", **ports})
        pol = env_policy(c["command"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root / f"{name}-{i}"),
               "HOSTNAME": f"safehold-{name}-{i}", **pol["fixed"]}
        for e in c.get("env") or []:
            if "valueFrom" in e:
                env[e["name"]] = env_values[e["name"]]
            else:
                env[e["name"]] = env_values.get(e["name"], map_path(e["value"], paths))
        assert set(env) <= set(pol["fixed"]) | set(pol["passthrough"]), "outside the allow-list"
        p = Proc(f"{name}-{i}", argv, env, self.root)
        self.procs[f"{name}-{i}"] = p
        return p

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()
        for f in self.fronts:
            f.close()


@pytest.fixture
def rehearsal(tmp_path, postgres_dsn, pg_schema):
    warnings.simplefilter("ignore")
    pkg = snapshot_package(tmp_path / "pkg")
    r = Rehearsal(tmp_path / "run", pkg, f"{postgres_dsn}?schema={pg_schema}")
    yield r
    r.stop()


def _ctx(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _kbs_round_trip(front: int, ca: ssl.SSLContext, attester) -> bytes:  # noqa: ANN001
    """auth, attest and resource on three new connections: with the round-robin front the
    steps land on different broker replicas."""
    from safehold.broker import protocol

    key = ECKey.generate_key("P-256")
    jwk = protocol.public_jwk(key)
    url = f"https://127.0.0.1:{front}"
    with httpx.Client(base_url=url, verify=ca, timeout=20) as c:
        r = c.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "simulated",
                                         "extra-params": {"workload": "records"}})
        r.raise_for_status()
        sid, nonce = r.cookies["kbs-session-id"], r.json()["nonce"]
    ev = attester.attest(protocol.report_data(nonce, jwk))
    with httpx.Client(base_url=url, verify=ca, timeout=20, cookies={"kbs-session-id": sid}) as c:
        c.post("/kbs/v0/attest", json={"tee-pubkey": jwk, "tee-evidence": ev.to_cmw()}).raise_for_status()
    with httpx.Client(base_url=url, verify=ca, timeout=20, cookies={"kbs-session-id": sid}) as c:
        r = c.get("/kbs/v0/resource/default/keyset/records-keyset")
        r.raise_for_status()
        return protocol.decrypt_response(r.json(), key)


def test_chart_rehearsal_two_replicas_survive_sigkill(rehearsal: Rehearsal):
    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.devstack.datadir import RECORDS_ACCESS, owner_key, records_access, records_config, tokens

    r = rehearsal
    replicas = {n: ctl["spec"]["replicas"] for n, (ctl, _) in r.containers.items()}
    assert (replicas["broker"], replicas["records"], replicas["anchor"]) == (2, 2, 3)  # as run below
    assert r.containers["broker"][1]["command"][0] == IMAGE_PYTHON
    assert r.containers["broker"][1]["command"][r.containers["broker"][1]["command"].index("-c") + 2] \
        == "safehold.broker.server"  # the broker's own entry point
    # the kind-dev Secret: the simulated platform key (created as the preset's comment says)
    SimulatedAttester(r.root / "platform")
    (r.root / "platform" / "simulated-tee").rename(r.secret / "_tmp")
    for f in (r.secret / "_tmp").iterdir():
        f.rename(r.secret / f.name)
    (r.secret / "_tmp").rmdir()

    # 1. broker replica 0 alone (first deployment order): it creates the state in PostgreSQL
    bports = [free_port(), free_port()]
    dsn = {"SAFEHOLD_BROKER_STORE_URL": r.dsn, "SAFEHOLD_RECORDS_STORE_URL": r.dsn}
    b0 = r.start("broker", 0, {"8443": str(bports[0])}, dsn)
    broker_dir = r.root / "broker-0" / "var_lib_safehold_broker"
    for _ in range(600):
        if (broker_dir / "ca.pem").exists() or not b0.alive():
            break
        time.sleep(0.1)
    assert (broker_dir / "ca.pem").exists(), b0.log()[-3000:]
    (r.cm_ca / "ca.pem").write_bytes((broker_dir / "ca.pem").read_bytes())
    ca = _ctx(r.cm_ca / "ca.pem")
    wait_https("broker-0", bports[0], "/status", ca, b0)

    # 2. the owner's measured configs, pinning the broker CA; the manifest via the admin API
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate((r.cm_ca / "ca.pem").read_bytes()).public_bytes(Encoding.DER)
    pin = hashlib.sha256(der).hexdigest()
    tok = tokens(r.root, r.owner)  # in the owner's directory, never on the cluster
    owner_pub = owner_key(r.root, r.owner)
    cfg = {**records_config(tok, scone_auth="token", host="127.0.0.1"), "broker_ca_sha256": pin}
    (r.cm_records / "records.toml").write_text(tomli_w.dumps(cfg), "utf-8")
    # the records workload's Reference Value as the owner computes it: the closure of the pod's
    # launch (module, environment policy, sys.path as adapted here) with its measured config
    rclosure = pod_launch(r.containers["records"][1]["command"], r.package).closure(
        [r.cm_records / "records.toml"])
    reference = rclosure.hex()
    # the test's own KBS round trips claim that value with the pods' platform key (the simulated
    # platform key can sign any value: it is the kind-dev Secret)
    (r.root / "records-measure").mkdir()
    (r.root / "records-measure" / "simulated-tee").symlink_to(r.secret)
    records_att = SimulatedAttester(r.root / "records-measure", measurement=rclosure)
    policy = {"name": "records", "allow_simulated": True, "simulated_root": str(r.secret / "root-ca.pem"),
              "reference_values": {"measurements": [reference]}}
    manifest = {
        "name": "safehold", "repository": "default",
        "workloads": {"records": {"secrets": ["records-keyset", "records-tls", RECORDS_ACCESS],
                                  "policy": policy}},
        "secrets": {"records-keyset": {"type": "keyset"},
                    "records-tls": {"type": "certificate", "dns_names": ["localhost"],
                                    "ip_addresses": ["127.0.0.1"], "validity_days": 30},
                    RECORDS_ACCESS: records_access(tok, owner_pub)},
        "users": {"admin": {"roles": ["owner"], "public_key": owner_pub,
                            "token_sha256": hashlib.sha256(tok["admin"].encode()).hexdigest()}},
    }
    resp = httpx.post(f"https://127.0.0.1:{bports[0]}/admin/manifest", json=manifest, verify=ca, timeout=30)
    assert resp.status_code == 201, resp.text

    # 3. broker replica 1 (same sealing identity, same store); a round-robin front
    b1 = r.start("broker", 1, {"8443": str(bports[1])}, dsn)
    wait_https("broker-1", bports[1], "/status", ca, b1)
    bfront = RoundRobinFront(bports)
    r.fronts.append(bfront)

    # 4. three anchor members, as the StatefulSet defines them
    aports = [free_port() for _ in range(3)]
    (r.cm_anchor / "anchor.toml").write_text(
        f"members = {json.dumps([f'https://127.0.0.1:{p}' for p in aports])}\n"
        f'client_ca_sha256 = "{pin}"\n'
        f'owner_public_key = """{owner_pub.strip()}\n"""\nhost = "127.0.0.1"\n'
        "[peer_policy]\nallow_simulated = true\n"
        f"simulated_root = {json.dumps(str(r.secret / 'root-ca.pem'))}\n",
        "utf-8")
    members = [r.start("anchor", i, {"7600": str(p)}, {}) for i, p in enumerate(aports)]
    for i, (m, p) in enumerate(zip(members, aports, strict=True)):
        wait_tcp(f"anchor-{i}", p, m)
    # they find each other over RA-TLS and become ready (a status read: heads are public, and
    # the members' RA-TLS certificates are checked by QuorumAnchor, not by this probe)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            infos = [httpx.get(f"https://127.0.0.1:{p}/v1/anchor/info", verify=False, timeout=3).json()  # noqa: S501
                     for p in aports]
            if all(x["ready"] and x["members"] == 3 for x in infos):
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"anchor members not ready: {[m.log()[-1500:] for m in members]}")

    # 5. two records replicas behind a front; they fetch their keys through the broker front
    rports = [free_port(), free_port()]
    rec = []
    for i, p in enumerate(rports):
        env = {**dsn, "SAFEHOLD_RECORDS_BROKER_URL": f"https://127.0.0.1:{bfront.port}",
               "SAFEHOLD_RECORDS_PORT": str(p), "SAFEHOLD_RECORDS_SCONE_PORT": str(free_port())}
        rec.append(r.start("records", i, {}, env))
        wait_https(f"records-{i}", p, "/healthz", ca, rec[-1], timeout=120)
    rfront = RoundRobinFront(rports)
    r.fronts.append(rfront)

    # 6. load: patients imported with PUT (idempotent: a retry after a broken connection is
    #    safe), KBS round trips through the broker front; SIGKILL one replica of each meanwhile
    acked: dict[str, str] = {}
    failures: list[str] = []
    retries = [0]
    stop = threading.Event()
    lock = threading.Lock()
    hdr = {"Authorization": f"Bearer {tok['writer']}"}
    front = f"https://127.0.0.1:{rfront.port}"

    def importer(t: int) -> None:
        n = 0
        while not stop.is_set():
            pid = f"p{t}-{n:05d}"
            body = {"resourceType": "Patient", "id": pid, "birthDate": f"1980-01-{n % 28 + 1:02d}",
                    "name": [{"family": f"Family{n % 50}", "given": [f"Given{t}"]}]}
            for attempt in range(30):
                try:
                    with httpx.Client(base_url=front, verify=ca, timeout=20) as c:
                        resp = c.put(f"/v1/patients/{pid}", json=body, headers=hdr)
                    if resp.status_code in (200, 201):
                        with lock:
                            acked[pid] = body["birthDate"]
                        break
                    if resp.status_code < 500:
                        failures.append(f"{pid}: {resp.status_code} {resp.text[:200]}")
                        return
                except httpx.TransportError:
                    pass
                with lock:
                    retries[0] += 1
                time.sleep(0.05 * (attempt + 1))
            else:
                failures.append(f"{pid}: no answer after retries")
                return
            n += 1

    kbs_ok, kbs_errors = [0], []

    def kbs_loop() -> None:
        while not stop.is_set():
            for attempt in range(20):
                try:
                    assert _kbs_round_trip(bfront.port, ca, records_att)
                    kbs_ok[0] += 1
                    break
                except (httpx.TransportError, httpx.HTTPStatusError) as e:
                    if isinstance(e, httpx.HTTPStatusError) and e.response.status_code < 500:
                        kbs_errors.append(f"{e.response.status_code} {e.response.text[:200]}")
                        return
                    time.sleep(0.05 * (attempt + 1))
            else:
                kbs_errors.append("KBS: no answer after retries")
                return

    threads = [threading.Thread(target=importer, args=(t,)) for t in range(3)]
    threads.append(threading.Thread(target=kbs_loop))
    for t in threads:
        t.start()
    time.sleep(4)
    before_kill = len(acked)
    rec[0].kill()
    r.procs["broker-0"].kill()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert not kbs_errors, kbs_errors[:3]
    after_kill = len(acked) - before_kill
    assert before_kill > 0 and after_kill > 0, (before_kill, after_kill)
    assert kbs_ok[0] >= 2

    # 7. every acknowledged write is there, read through the front (the survivors)
    rd = {"Authorization": f"Bearer {tok['reader']}"}
    with httpx.Client(base_url=f"https://127.0.0.1:{rfront.port}", verify=ca, timeout=20) as c:
        for pid, birth in acked.items():
            resp = c.get(f"/v1/patients/{pid}", headers=rd)
            assert resp.status_code == 200, (pid, resp.status_code, resp.text[:200])
            assert resp.json()["birthDate"] == birth
    print(json.dumps({"rehearsal_acked": len(acked), "acked_after_kill": after_kill,
                      "client_retries": retries[0], "kbs_round_trips": kbs_ok[0],
                      "broker_front_connections": bfront.connections}))
