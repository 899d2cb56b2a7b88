"""The services ``safehold up`` starts next to the records service, once the broker is ready:
Secure Value Recovery (three servers ``svr-0..2`` over their own three freshness-anchor members),
contact discovery, and the E-Rezept VAU with the Fachdienst routes behind it (and the ePA 3 VAU in
front of the records API).

Each is its own workload with its own Reference Value in the dev manifest (the closure of its
:class:`safehold.attestation.workload.LaunchSpec` launch with its configuration), launched
isolated with an allow-listed environment (nothing but the fixed ``LC_ALL``/``TZ``), and
receives its secrets from the broker after attestation (:mod:`safehold.client.workload`):
nothing secret goes through argv, the environment, standard input or a file. What each gets:

* ``svr-<i>``: ``svr-<i>-keyset`` (server secret = HKDF of it), ``svr-<i>-anchor`` (a
  certificate with CN ``svr-<i>`` for its in-memory key: its anchor client identity),
  ``svr-access`` (owner-pinned tokens → roles admin / backup);
* ``discovery``: ``discovery-keyset`` (OPRF key etc. = HKDF of it), ``discovery-access``
  (tokens → register + query / query);
* ``vau``: ``erezept-keyset`` (records engine of the Tasks), ``vau-erp-identity`` (the
  brainpoolP256r1 E-Rezept VAU key = HKDF of it), ``vau-epa-identity`` (the ePA 3 VAU's
  AUT-VAU key, P-256).

Data directory files (all public or measured): ``svr-<i>.toml``, ``discovery.toml``,
``vau.toml`` (measured), ``svr-policy.toml`` / ``discovery-policy.toml`` / ``vau-policy.toml``
(the clients' Reference Values), ``svr-anchor/`` (the anchor members' configuration and ready
files), ``erezept-idp.key`` in the owner directory (the development identity provider's
signing key: it stands for the gematik IdP, an outside party, and is not a workload key; in the
data directory an operator could mint access tokens with it), stores ``svr-<i>.db``,
``discovery.db``, ``erezept.db``, logs ``<name>.log`` (``svr-anchor-<i>.log`` for the members).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets as _secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from safehold.client.owner_pins import CLIENT_POLICIES
from safehold.devstack.errors import StackError
from safehold.errors import ConfigError
from safehold.procutil import clean_exit_code, terminate

__all__ = ["ALL_SERVICES", "IDP_ISSUER", "Pending", "ServicePorts", "check_service_ports", "finish_services",
           "idp_key", "launch_services", "manifest_entries", "parse_services", "restart_service",
           "service_spec", "services_status", "stop_services", "summary", "write_configs"]

#: Every service ``safehold up`` can start, in start order.
ALL_SERVICES = ("svr", "discovery", "erezept")
#: The development identity provider's issuer (``iss`` of the E-Rezept access tokens).
IDP_ISSUER = "https://idp.safehold.dev"
SVR_N = 3
SVR_MODULE = "safehold.svr.server"
DISCOVERY_MODULE = "safehold.discovery.server"
VAU_MODULE = "safehold.vau.server"
ANCHOR_MODULE = "safehold.freshness.anchor.server"


@dataclass
class ServicePorts:
    """Loopback ports of the services (defaults: docs/svr.md, docs/discovery.md, docs/vau.md).

    The SVR anchor members' URLs are measured (in ``svr-<i>.toml`` and the members' own
    configuration): changing ``anchor`` changes those Reference Values (the manifest update
    path of ``safehold up`` then applies)."""

    svr: list[int] = field(default_factory=lambda: [8730, 8731, 8732])
    anchor: list[int] = field(default_factory=lambda: [8735, 8736, 8737])
    discovery: int = 8720
    vau: int = 8740


def parse_services(value: str | None) -> tuple[str, ...]:
    """``"svr,discovery"`` → ``("svr", "discovery")``; None or ``"all"`` → every service,
    ``"none"`` → none.

    Raises:
        ConfigError: an unknown service name.
    """
    if value is None or value.strip() == "all":
        return ALL_SERVICES
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in ALL_SERVICES]
    if bad:
        raise ConfigError(f"--services: unknown service(s) {bad}; choose from {', '.join(ALL_SERVICES)}, "
                          "all or none")
    return tuple(n for n in ALL_SERVICES if n in names)


def idp_key(owner: Path) -> Any:
    """The development IdP's ES256 (P-256) signing key, created once (``erezept-idp.key``,
    PKCS#8 PEM, 0600). It stands for the gematik IdP (an outside party): whoever holds it can
    mint E-Rezept access tokens for this stack, as the owner's key can sign its manifest."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from safehold.devstack.datadir import write_private

    p = owner / "erezept-idp.key"
    if p.exists():
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StackError(f"{p} is not an EC private key (remove it to make a new one)")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(p, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def _group_id(d: Path) -> int:
    """The SVR group id: kept from an existing ``svr-0.toml``, else a random u64 (made once)."""
    import tomllib

    with contextlib.suppress(OSError, ValueError, KeyError):
        gid = tomllib.loads((d / "svr-0.toml").read_text("utf-8"))["group_id"]
        if isinstance(gid, int) and 0 <= gid < 2**64:
            return gid
    return _secrets.randbits(64)


def _policy(root: str, measurements: list[str], name: str) -> dict[str, Any]:
    return {"name": name, "allow_simulated": True, "simulated_root": root,
            "reference_values": {"measurements": measurements}}


def write_configs(d: Path, *, pin: str, owner_pub: str, ports: ServicePorts, measure: Any,
                  records_policy: dict[str, Any] | None = None, owner: Path | None = None) -> dict[str, Any]:
    """Write every service's measured configuration and the SVR anchor members' configuration;
    return ``{"workloads": {name: measurement}, "root": simulated root CA path, "anchor": …,
    "policies": {service: the client policy's TOML text as written}}``.

    Args:
        pin: the broker CA pin (hex SHA-256 of its DER). owner_pub: the owner's SPKI PEM (the
            anchor members pin it for initialise / re-anchor statements).
        records_policy: the records workload's appraisal policy: measured into ``vau.toml``, the
            ePA 3 VAU forwards only to a records service that passes it.
        owner: the owner directory, where the development IdP key lives (default: ``d``, for
            tests of the configuration alone). Never the data directory of a real stack: whoever
            reads the IdP key mints E-Rezept access tokens.
        measure: ``measure(module, config_path) -> (hex measurement, root CA path)``: the
            closure of the workload's launch (:func:`service_spec`) with its configuration — what
            its simulated TEE reports at start.
    """
    from cryptography.hazmat.primitives import serialization

    anchor_dir = d / "svr-anchor"
    anchor_dir.mkdir(exist_ok=True, mode=0o700)
    anchor_cfg = _anchor_config(d, anchor_dir, ports.anchor, owner_pub)
    anchor_m, root = measure(ANCHOR_MODULE, anchor_cfg)
    out: dict[str, Any] = {"workloads": {}, "root": str(root), "anchor_measurement": anchor_m}
    gid = _group_id(d)
    urls = [f"https://127.0.0.1:{p}" for p in ports.anchor]
    for i in range(SVR_N):
        cfg = {"name": f"svr-{i}", "group_id": gid, "host": "127.0.0.1", "anchor_members": urls,
               "wait_timeout": 5.0, "broker_ca_sha256": pin,
               "anchor_policy": _policy(str(root), [anchor_m], "anchor")}
        p = d / f"svr-{i}.toml"
        p.write_text(tomli_w.dumps(cfg), "utf-8")
        out["workloads"][f"svr-{i}"] = measure(SVR_MODULE, p)[0]
    p = d / "discovery.toml"
    p.write_text(tomli_w.dumps({"name": "discovery", "broker_ca_sha256": pin, "host": "127.0.0.1",
                                "port": 0, "limit": 1000, "period": 86400}), "utf-8")
    out["workloads"]["discovery"] = measure(DISCOVERY_MODULE, p)[0]
    pub = idp_key(owner or d).public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    p = d / "vau.toml"
    vau: dict[str, Any] = {"name": "vau", "broker_ca_sha256": pin, "host": "127.0.0.1",
                           "idp_issuer": IDP_ISSUER, "idp_keys": [pub]}
    if records_policy is not None:
        vau["records_policy"] = records_policy
    p.write_text(tomli_w.dumps(vau), "utf-8")
    out["workloads"]["vau"] = measure(VAU_MODULE, p)[0]
    ms = out["workloads"]
    out["policies"] = {}  # service → the text written: the owner pins these bytes (pins.json)
    for service, names in (("svr", [f"svr-{i}" for i in range(SVR_N)]), ("discovery", ["discovery"]),
                           ("erezept", ["vau"])):
        fname = CLIENT_POLICIES[service]
        text = tomli_w.dumps(_policy(str(root), [ms[n] for n in names], fname.removesuffix(".toml")))
        (d / fname).write_text(text, "utf-8")
        out["policies"][service] = text
    # the owner's checkpoint keeper appraises the SVR anchor members under this pinned copy, not
    # under svr-0.toml's table (the data directory is the operator's)
    text = tomli_w.dumps(_policy(str(root), [anchor_m], "anchor"))
    (d / CLIENT_POLICIES["svr-anchor"]).write_text(text, "utf-8")
    out["policies"]["svr-anchor"] = text
    return out


def _anchor_config(d: Path, anchor_dir: Path, ports: list[int], owner_pub: str) -> Path:
    """The SVR anchor members' measured configuration, as :class:`LocalAnchor` writes it."""
    from safehold.freshness.anchor.launch import LocalAnchor

    la = LocalAnchor(anchor_dir, data_dir=d / "tee", client_ca_file=d / "broker" / "ca.pem",
                     owner_public_key=owner_pub, n=len(ports), ports=ports)
    return la.config


def manifest_entries(tok: dict[str, str], written: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dev manifest's ``(workloads, secrets)`` for the services: one workload per server,
    each pinned to its own measurement; broker-made keysets, the anchor client certificates and
    the owner-written access secrets (tokens pinned by SHA-256, never a CN)."""
    import hashlib

    def sha(t: str) -> str:
        return hashlib.sha256(t.encode("utf-8")).hexdigest()

    root = written["root"]
    workloads: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    for name, m in written["workloads"].items():
        workloads[name] = {"secrets": [], "policy": _policy(root, [m], f"safehold-{name}")}
    for i in range(SVR_N):
        n = f"svr-{i}"
        workloads[n]["secrets"] = [f"{n}-keyset", f"{n}-anchor", "svr-access"]
        secrets[f"{n}-keyset"] = {"type": "keyset"}
        secrets[f"{n}-anchor"] = {"type": "certificate", "ip_addresses": ["127.0.0.1"], "validity_days": 30}
    secrets["svr-access"] = {"type": "access", "principals": {
        "admin": {"role": "admin", "token_sha256": sha(tok["admin"])},
        "user": {"role": "backup", "token_sha256": sha(tok["writer"])}}}
    workloads["discovery"]["secrets"] = ["discovery-keyset", "discovery-access"]
    secrets["discovery-keyset"] = {"type": "keyset"}
    secrets["discovery-access"] = {"type": "access", "principals": {
        "registrar": {"role": "register", "token_sha256": sha(tok["admin"])},
        "user": {"role": "query", "token_sha256": sha(tok["reader"])}}}
    workloads["vau"]["secrets"] = ["erezept-keyset", "vau-erp-identity", "vau-epa-identity"]
    secrets["erezept-keyset"] = {"type": "keyset"}
    secrets["vau-erp-identity"] = {"type": "keyset"}
    secrets["vau-epa-identity"] = {"type": "keyset"}
    return workloads, secrets


# --- processes ----------------------------------------------------------------------------------


def service_spec(package_root: str | None, module: str) -> Any:
    """The :class:`~safehold.attestation.workload.LaunchSpec` of a service workload (and of the
    SVR anchor members): isolated, the stack's app directory, no passthrough variable at all.
    Its closure with the workload's configuration is the Reference Value the manifest pins."""
    from safehold.attestation.workload import LaunchSpec
    from safehold.devstack.stack import app_dir

    return LaunchSpec(module=module, app_dir=app_dir(package_root))


def _launch(s: Any, name: str, module: str, args: list[str]) -> subprocess.Popen[bytes]:
    """Start service process ``name`` (own session, log ``<name>.log``); it stops by itself once
    this process (``safehold up``) is gone (``--exit-with-parent``)."""
    from safehold.devstack.processes import lifeline

    spec = service_spec(s.package_root, module)
    log = s.path(f"{name}.log").open("ab")
    try:
        return subprocess.Popen(spec.argv(*args, *lifeline(os.getpid())), env=spec.env({}), stdout=log,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=s.data_dir, start_new_session=True)
    finally:
        log.close()


def _common(s: Any, name: str) -> list[str]:
    return ["--data-dir", str(s.path("tee")), "--broker-url", s.broker_url,
            "--broker-ca", str(s.path("ca.pem")), "--ready-file", str(s.path(f"{name}-ready.json"))]


def _wait_ready(s: Any, name: str, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    from safehold.devstack.processes import ready_info

    log = s.path(f"{name}.log")
    info = ready_info(proc, s.path(f"{name}-ready.json"), deadline, name, log, interval=0.05)
    if info is None:
        raise StackError(f"{name} did not become ready (see {log})")
    return info


def _wanted_ports(services: tuple[str, ...], ports: ServicePorts) -> list[tuple[int, str]]:
    wanted: list[tuple[int, str]] = []
    if "svr" in services:
        wanted += [(p, f"--svr-ports (svr-{i})") for i, p in enumerate(ports.svr)]
        wanted += [(p, f"--svr-anchor-ports (member {i})") for i, p in enumerate(ports.anchor)]
    if "discovery" in services:
        wanted.append((ports.discovery, "--discovery-port"))
    if "erezept" in services:
        wanted.append((ports.vau, "--vau-port"))
    return wanted


def check_service_ports(services: tuple[str, ...], ports: ServicePorts, taken: dict[int, str]) -> None:
    """Check, before anything starts, that the services' ports are distinct (from each other
    and from ``taken``: port → option) and free.

    Raises:
        ConfigError: names the option(s) and the port.
    """
    from safehold.devstack.processes import check_port

    seen = dict(taken)
    for port, what in _wanted_ports(services, ports):
        if port in seen:
            raise ConfigError(f"{seen[port]} and {what} are both {port}")
        seen[port] = what
        check_port(port, what)


@dataclass
class Pending:
    """Service processes launched by :func:`launch_services`, not yet ready."""

    services: tuple[str, ...]
    ports: ServicePorts
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    anchor: Any = None


def _service_args(s: Any, name: str, ports: ServicePorts) -> tuple[str, list[str]]:
    """``(module, run-time args)`` of service process ``name`` (``svr-<i>``, ``discovery``,
    ``vau``, ``svr-anchor-<i>``): the same for its first start and every restart."""
    if name.startswith("svr-anchor-"):
        i = int(name.rsplit("-", 1)[1])
        anchor_dir = s.path("svr-anchor")
        return ANCHOR_MODULE, ["--config", str(anchor_dir / "anchor-member.toml"),
                               "--data-dir", str(s.path("tee")), "--port", str(ports.anchor[i]),
                               "--client-ca", str(s.path("broker") / "ca.pem"),
                               "--ready-file", str(anchor_dir / f"member{i}.json")]
    if name.startswith("svr-"):
        i = int(name.rsplit("-", 1)[1])
        return SVR_MODULE, ["--config", str(s.path(f"{name}.toml")),
                            "--store-url", f"sqlite:///{s.path(f'{name}.db')}",
                            "--port", str(ports.svr[i]), *_common(s, name)]
    if name == "discovery":
        return DISCOVERY_MODULE, ["--config", str(s.path("discovery.toml")),
                                  "--store-url", f"sqlite:///{s.path('discovery.db')}",
                                  "--port", str(ports.discovery), *_common(s, "discovery")]
    if name == "vau":
        return VAU_MODULE, ["--config", str(s.path("vau.toml")),
                            "--store-url", f"sqlite:///{s.path('erezept.db')}",
                            "--port", str(ports.vau), "--records-url", s.records_url, *_common(s, "vau")]
    raise StackError(f"no service process named {name!r}")


def restart_service(s: Any, name: str, *, timeout: float = 60.0) -> None:
    """Start service process ``name`` again (the supervisor of ``safehold up``: it exited) and
    wait until it serves. An SVR server finds its ledger on the running anchor members (no
    owner step); an anchor member catches up from its peers; discovery and the VAU attest to
    the broker again.

    Raises:
        StackError: it exited again or did not become ready within ``timeout`` (names why).
    """
    ports = s.service_ports or ServicePorts()
    module, args = _service_args(s, name, ports)
    ready = Path(args[args.index("--ready-file") + 1])
    ready.unlink(missing_ok=True)
    s.procs[name] = proc = _launch(s, name, module, args)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready.exists():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(ready.read_text("utf-8")).get("pid") in (proc.pid, None):
                    return
        if proc.poll() is not None:
            raise StackError(f"{name} exited again with status {proc.returncode}")
        time.sleep(0.05)
    raise StackError(f"{name} did not become ready within {timeout:.0f} s")


def launch_services(s: Any, services: tuple[str, ...], ports: ServicePorts) -> Pending:
    """Launch every process of ``services`` at once (the broker must be ready; records need
    not be): the SVR anchor members, the SVR servers (they wait for the anchor themselves),
    discovery and the VAU. Processes go into ``s.procs`` at once, so :func:`stop_services`
    stops them whatever happens next."""
    for f in s.data_dir.glob("*-ready.json"):
        if f.name != "records-ready.json":
            f.unlink(missing_ok=True)
    p = Pending(services, ports)
    names: list[str] = []
    if "svr" in services:
        p.anchor = _start_anchor(s, ports)
        names += [f"svr-{i}" for i in range(SVR_N)]
    names += [n for n, svc in (("discovery", "discovery"), ("vau", "erezept")) if svc in services]
    for n in names:
        module, args = _service_args(s, n, ports)
        p.procs[n] = _launch(s, n, module, args)
    s.procs.update(p.procs)
    return p


def finish_services(s: Any, p: Pending, *, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until every launched service serves, initialise (or re-anchor) the SVR ledgers with
    the dev owner key; return what ``up.json`` records about the services.

    Raises:
        StackError: a process exited or did not become ready (names which, why — status 2: the
            broker released no keys — and the last line of its log), or the SVR ledgers could not
            be initialised.
    """
    deadline = time.monotonic() + timeout
    if p.anchor is not None:
        for i in range(p.anchor.n):
            p.anchor.wait_listening(i, max(1.0, deadline - time.monotonic()))
    ready = {name: _wait_ready(s, name, proc, deadline) for name, proc in p.procs.items()}
    info: dict[str, Any] = {"services": list(p.services)}
    if "svr" in p.services:
        urls = [str(ready[f"svr-{i}"]["url"]) for i in range(SVR_N)]
        info["svr"] = {"urls": urls, "policy": str(s.path("svr-policy.toml")),
                       "anchor": [f"https://127.0.0.1:{port}" for port in p.ports.anchor],
                       "ledgers": _initialise_svr(s, urls, deadline)}
        s.svr_keeper = _svr_keeper(s, info["svr"]["anchor"])
    if "discovery" in p.services:
        info["discovery"] = {"url": ready["discovery"]["url"], "policy": str(s.path("discovery-policy.toml"))}
    if "erezept" in p.services:
        info["erezept"] = {"url": ready["vau"]["url"], "policy": str(s.path("vau-policy.toml")),
                           "idp_issuer": IDP_ISSUER, "idp_key": str(s.owner_path("erezept-idp.key")),
                           "epa": bool(ready["vau"].get("epa"))}
    return info


class _AnchorProcs:
    """The SVR anchor members as entries of ``s.procs`` (``svr-anchor-<i>``)."""

    def __init__(self, la: Any) -> None:
        self.la, self.n = la, la.n

    def wait_listening(self, i: int, timeout: float) -> None:
        try:
            self.la.wait_listening(i, timeout)
        except ConfigError as e:
            raise StackError(f"SVR anchor member {i}: {str(e)[-400:]}") from None


def _start_anchor(s: Any, ports: ServicePorts) -> _AnchorProcs:
    """Start the SVR group's anchor members through their LaunchSpec (the configuration was
    written and measured by :func:`write_configs`; the owner's key and the broker CA are pinned
    in it). :class:`LocalAnchor` lays out the files; the launch is the stack's."""
    from safehold.freshness.anchor.launch import LocalAnchor

    owner_pub = s.owner_path("owner.pub").read_text("ascii")
    la = LocalAnchor(s.path("svr-anchor"), data_dir=s.path("tee"),
                     client_ca_file=s.path("broker") / "ca.pem", owner_public_key=owner_pub,
                     n=len(ports.anchor), ports=ports.anchor)
    for i in range(la.n):
        (la.workdir / f"member{i}.json").unlink(missing_ok=True)
        module, args = _service_args(s, f"svr-anchor-{i}", ports)
        la.procs[i] = proc = _launch(s, f"svr-anchor-{i}", module, args)
        s.procs[f"svr-anchor-{i}"] = proc
    return _AnchorProcs(la)


def _initialise_svr(s: Any, urls: list[str], deadline: float) -> list[str]:
    """Sign every SVR server's pending ledger statement (``initialise`` at the first start,
    ``reanchor`` after the anchor members restarted: their heads live in memory) with the dev
    owner key — loudly, in ``up``'s summary: a real owner reviews each proposal first.

    A ``reanchor`` is signed only if the server's head is not older than, and does not fork
    from, the owner's checkpoint of that ledger (``<owner dir>/anchor-checkpoint.json``, kept
    fresh while the stack runs and at stop): an SVR database copy restored while the stack was
    stopped would otherwise bring its guess budget back. Such a server stays not fresh (503)
    and the entry says ``refused: ...``; the owner decides.

    A server that started before its anchor members listened picks them up within a second
    (``SvrService.retry_anchor``): until ``deadline`` an unreachable anchor is retried."""
    from safehold.client.owner_pins import pinned_policy
    from safehold.client.svr import Svr3Client, sign_statement
    from safehold.devstack.anchor import checkpoint_path, load_checkpoints
    from safehold.devstack.datadir import tokens
    from safehold.freshness.anchor.base import AnchorHead
    from safehold.freshness.anchor.statements import SignedOwnerStatement, check_against_checkpoint
    from safehold.freshness.errors import FreshnessError

    key = s.owner_path("owner.key")
    if not key.exists():
        raise StackError(f"no owner key {key}: the SVR ledgers need the owner's signed statement")
    # the owner's admin token and signatures go only to servers passing the policy the owner
    # pinned when `up` wrote it (the data directory's file alone is the operator's)
    policy = pinned_policy(s.data_dir, "svr", s.owner_dir)
    cps = load_checkpoints(checkpoint_path(s))
    while True:
        try:
            with Svr3Client(urls, token=tokens(s.data_dir, s.owner_dir)["admin"], policy=policy) as c:
                done = []
                for i in range(len(urls)):
                    st = c.freshness_statement(i)
                    statement = SignedOwnerStatement.from_json({"payload": st["payload"],
                                                                "signature": "AA"}).statement
                    if st["action"] == "reanchor":
                        try:
                            check_against_checkpoint(statement.ledger,
                                                     AnchorHead(statement.epoch, statement.digest),
                                                     cps.get(statement.ledger))
                        except FreshnessError as e:
                            done.append(f"refused: {e}")
                            continue
                    c.apply_statement(i, sign_statement(st["payload"], key.read_bytes()))
                    done.append(str(st["action"]))
                return done
        except Exception as e:  # noqa: BLE001 - any failure here means SVR does not serve: say which
            if "anchor" in str(e).lower() and time.monotonic() < deadline:
                time.sleep(0.5)  # the server has not reached its anchor members yet
                continue
            raise StackError(f"initialising the SVR ledgers with the owner key failed: "
                             f"{type(e).__name__}: {e}") from None


def _svr_keeper(s: Any, anchor_urls: list[str]) -> Any:
    """A checkpoint keeper for the SVR ledgers over the SVR group's anchor members (read-only
    client appraising them under ``svr-anchor-policy.toml`` as the owner pinned it when ``up``
    wrote it: the checkpoints it keeps decide which re-anchoring the owner signs next time)."""
    from safehold.client.owner_pins import pinned_policy
    from safehold.devstack.anchor import CheckpointKeeper
    from safehold.freshness.anchor.client import QuorumAnchor

    client = QuorumAnchor(anchor_urls, pinned_policy(s.data_dir, "svr-anchor", s.owner_dir))
    return CheckpointKeeper(s, client=client, ledgers=tuple(f"svr-{i}" for i in range(SVR_N))).start()


def stop_services(s: Any, timeout: float = 10.0) -> dict[str, int | None]:
    """SIGTERM the service processes (SVR servers before their anchor members); returns exit codes."""
    codes: dict[str, int | None] = {}
    if getattr(s, "svr_keeper", None) is not None:
        with contextlib.suppress(Exception):
            s.svr_keeper.stop()  # the last SVR checkpoint, while the SVR anchor members still run
        s.svr_keeper = None
    order = [n for n in s.procs if n.startswith("svr-") and not n.startswith("svr-anchor")]
    order += [n for n in ("discovery", "vau") if n in s.procs]
    order += [n for n in s.procs if n.startswith("svr-anchor")]
    for name in order:
        codes[name] = clean_exit_code(terminate(s.procs.pop(name), timeout))
    return codes


def summary(info: dict[str, Any]) -> list[tuple[str, bool]]:
    """Lines of ``up``'s summary for the services (``(line, is_warning)``)."""
    out: list[tuple[str, bool]] = []
    if "svr" in info:
        svr = info["svr"]
        out.append((f"SVR             {', '.join(svr['urls'])}  (policy {svr['policy']})", False))
        signed = [x for x in svr["ledgers"] if not x.startswith("refused")]
        if signed:
            out.append((f"  SVR ledgers: {', '.join(signed)} signed with the DEV OWNER KEY "
                        "(owner.key) — a real owner reviews each statement", True))
        for i, x in enumerate(svr["ledgers"]):
            if x.startswith("refused"):
                out.append((f"  SVR ledger svr-{i} NOT re-anchored, the server does not serve: {x}", True))
    if "discovery" in info:
        d = info["discovery"]
        out.append((f"discovery       {d['url']}  (policy {d['policy']})", False))
    if "erezept" in info:
        e = info["erezept"]
        out.append((f"E-Rezept VAU    {e['url']}  (policy {e['policy']}; dev IdP key {e['idp_key']})", False))
        if e.get("epa"):
            out.append((f"ePA 3 VAU       {e['url']}/VAU  (in front of the records API)", False))
    return out


def services_status(info: dict[str, Any], data_dir: str | os.PathLike[str] = ".",
                    owner: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``safehold status`` for the services in ``up.json``'s ``info``: each server attested
    under its client policy as the owner pinned it (``pinned_policy`` of ``data_dir`` and
    ``owner``; never the path ``up.json`` names) and asked ``/healthz`` (the VAU:
    ``/VAUCertificate``).

    Returns:
        ``{name: {"url", "ok", "status"}}`` for ``svr-<i>``, ``discovery``, ``vau``; ``ok`` is
        true only when the server attested and answered 200.
    """
    import warnings

    import httpx

    from safehold.client.connection import transport_reason
    from safehold.client.owner_pins import pinned_policy
    from safehold.client.records import attesting_transport
    from safehold.errors import SafeholdError

    targets: list[tuple[str, str, str, str]] = []
    if "svr" in info:
        targets += [(f"svr-{i}", u, "svr", "/healthz") for i, u in enumerate(info["svr"]["urls"])]
    if "discovery" in info:
        targets.append(("discovery", info["discovery"]["url"], "discovery", "/healthz"))
    if "erezept" in info:
        targets.append(("vau", info["erezept"]["url"], "erezept", "/VAUCertificate"))
    out: dict[str, Any] = {}
    for name, url, service, path in targets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                policy = pinned_policy(data_dir, service, owner)
                with httpx.Client(transport=attesting_transport(policy), timeout=5) as c:
                    r = c.get(url.rstrip("/") + path)
            ok = r.status_code == 200
            detail = "attested, serving" if ok else f"attested, HTTP {r.status_code}: {r.text[:160]}"
        except (httpx.HTTPError, OSError) as e:
            ok, detail = False, f"NOT attested or unreachable: {transport_reason(e)}"
        except SafeholdError as e:
            ok, detail = False, f"NOT attested: {e}"
        out[name] = {"url": url, "ok": ok, "status": detail}
    return out
