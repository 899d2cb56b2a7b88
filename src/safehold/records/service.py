"""The records service process: attest, receive keys, open the engine, then open the ports.

Start-up order (nothing listens before step 4, and no key exists here that did not arrive
through attestation):

1. The Attester (simulated by default) measures this workload: the package files plus the
   measured configuration file, which also holds the access list (who may call, which role).
2. :class:`~safehold.client.broker.BrokerClient` runs the KBS protocol with the broker
   (``/kbs/v0/auth`` → ``/kbs/v0/attest`` → ``/kbs/v0/resource/...``) and receives the records
   **keyset** as a JWE wrapped to a TEE key generated here, then the **TLS identity**: a
   certificate issued by the broker's workload CA to that key (valid for the name ``api``)
   carrying this workload's RA-TLS Evidence. The broker refuses both if the measurement is not
   in the data owner's manifest.
3. The encrypted engine is opened on the store (SQLite file by default, PostgreSQL by URL).
4. Two HTTPS listeners open on one event loop: the native API and the SCONE-compatible API.
   The TLS private key stays in memory (an :class:`ssl.SSLContext` built from bytes held only
   in this process; the temporary file the ``ssl`` module needs lives in a private directory
   and is removed at once).

Run as ``python -m safehold.records.service --config FILE`` (``safehold up`` does this).
Configuration is TOML (see :class:`ServiceConfig`). Only the config file is measured, so the
``SAFEHOLD_RECORDS_*`` environment variables may set only the run-time plumbing in
:data:`RUNTIME_SETTINGS` (ports, paths, URLs); a variable naming any security setting
(:data:`MEASURED_SETTINGS`) makes the service refuse to start. The broker's identity is pinned in
the measured file (``broker_ca_sha256``): a broker whose workload CA differs is refused before
any Evidence or key is exchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import logging
import os
import signal
import ssl
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from safehold.errors import ConfigError, SafeholdError
from safehold.fsutil import write_atomic

log = logging.getLogger("safehold.records")

#: Settings the environment may set (``SAFEHOLD_RECORDS_<NAME>``): plumbing whose value cannot
#: weaken confidentiality or access control (the database is untrusted by design; the broker
#: URL only says where to look, its identity is pinned by the measured ``broker_ca_sha256``).
RUNTIME_SETTINGS = frozenset({"data_dir", "broker_url", "broker_ca", "store_url", "port",
                              "scone_port", "ready_file"})
#: Settings only the measured configuration file may set.
MEASURED_SETTINGS = frozenset({"workload", "keyset_resource", "tls_resource", "host",
                               "scone_auth", "encryption", "audit", "access", "broker_ca_sha256"})
ENV_PREFIX = "SAFEHOLD_RECORDS_"


class BrokerIdentityError(ConfigError):
    """The broker's workload CA is not the one pinned in the measured configuration (or the
    broker's TLS certificate does not chain to it): the service talks to no other broker."""


def is_loopback(host: str) -> bool:
    """True if ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServiceConfig:
    """Records service configuration (TOML keys = attribute names).

    Settings in :data:`MEASURED_SETTINGS` come only from the measured file; those in
    :data:`RUNTIME_SETTINGS` may also come from ``SAFEHOLD_RECORDS_<NAME>`` variables.

    Attributes:
        data_dir: directory for the simulated TEE keys and the default SQLite file.
        broker_url: the broker's base URL (``https://127.0.0.1:8443``).
        broker_ca: PEM file of the broker's workload CA (run-time); it must be the certificate
            pinned by ``broker_ca_sha256`` and the broker's TLS certificate must chain to it.
        broker_ca_sha256: measured pin of the broker's identity: SHA-256 (64 hex digits) of the
            DER encoding of the broker's workload CA certificate. Required.
        store_url: ``sqlite:///path`` or ``postgresql://…``; default ``<data_dir>/records.db``.
        workload: the manifest's workload name for this service.
        keyset_resource / tls_resource: KBS resource paths ``<repository>/<type>/<tag>`` of
            the keyset and of the certificate secret.
        host: listen address (loopback by default; measured).
        port: native API port (0 = pick a free one and report it in ``ready_file``).
        scone_port: SCONE-compatible port (default 4996; None disables it).
        scone_auth: ``none`` (as the SCONE demo; only with a loopback ``host``) or ``token``.
        encryption: True; False only for the benchmark's baseline (a pass-through codec),
            and only through the measured file (the service then warns loudly at start).
        ready_file: if set, a JSON file written once both ports listen (URLs, ports, pid).
        audit: keep the access audit (True by default).
        access: the access list (``[access.tokens."<sha256 hex>"]`` name/role tables and
            ``[access.certificates]`` CN = role), see :class:`safehold.records.api.AccessList`.
            It is part of the measured configuration: changing who may call the service changes
            its measurement, so the data owner's manifest must approve it.
    """

    data_dir: str = "./safehold-data"
    broker_url: str = "https://127.0.0.1:8443"
    broker_ca: str = ""
    broker_ca_sha256: str = ""
    store_url: str = ""
    workload: str = "records"
    keyset_resource: str = "default/keyset/records-keyset"
    tls_resource: str = "default/certificate/records-tls"
    host: str = "127.0.0.1"
    port: int = 8700
    scone_port: int | None = 4996
    scone_auth: str = "none"
    encryption: bool = True
    ready_file: str = ""
    audit: bool = True
    access: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> ServiceConfig:
        """Read the measured TOML file (``path`` may be None) and apply the run-time
        ``SAFEHOLD_RECORDS_<NAME>`` variables of ``env`` (default ``os.environ``).

        Raises:
            ConfigError: unreadable TOML, unknown keys, values of the wrong type; an environment
                variable for a measured setting (or an unknown one); no broker pin; or
                ``scone_auth = "none"`` with a SCONE port on a non-loopback ``host``.
        """
        data: dict[str, Any] = {}
        if path:
            try:
                data = tomllib.loads(Path(path).read_text("utf-8"))
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"records service config {path}: {e}") from None
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"records service config: unknown keys {unknown}")
        env = dict(os.environ) if env is None else env
        for var in sorted(k for k in env if k.startswith(ENV_PREFIX)):
            name = var[len(ENV_PREFIX):].lower()
            if name in MEASURED_SETTINGS:
                # refuse rather than ignore: the unmeasured host must not change security settings
                raise ConfigError(f"{var} is set, but {name!r} is a measured setting: only the "
                                  "measured config file may set it (unset the variable)")
            if name not in RUNTIME_SETTINGS:
                raise ConfigError(f"{var}: unknown setting; the environment may set only "
                                  f"{sorted(n.upper() for n in RUNTIME_SETTINGS)}")
            data[name] = env[var]
        cfg = cls(**data)
        for name in ("port", "scone_port"):
            v = getattr(cfg, name)
            if isinstance(v, str):
                try:
                    setattr(cfg, name, None if v.lower() in ("", "none", "off") else int(v))
                except ValueError:
                    raise ConfigError(f"{name} must be a port number or 'none', got {v!r}") from None
        for name in ("encryption", "audit"):
            if not isinstance(getattr(cfg, name), bool):  # only TOML booleans, never "0"/"off"
                raise ConfigError(f"{name} must be a TOML boolean, got {getattr(cfg, name)!r}")
        if cfg.scone_auth not in ("none", "token"):
            raise ConfigError(f"scone_auth must be 'none' or 'token', got {cfg.scone_auth!r}")
        if cfg.scone_auth == "none" and cfg.scone_port is not None and not is_loopback(cfg.host):
            raise ConfigError(
                f"scone_auth = 'none' serves records without authentication; it is allowed only "
                f"on a loopback host, got host {cfg.host!r} (set scone_auth = 'token')"
            )
        pin = cfg.broker_ca_sha256.lower()
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise ConfigError("broker_ca_sha256 must pin the broker's workload CA in the measured "
                              f"config (64 hex digits of SHA-256 over its DER), got {pin[:70]!r}")
        cfg.broker_ca_sha256 = pin
        if not cfg.store_url:
            cfg.store_url = f"sqlite:///{Path(cfg.data_dir).resolve() / 'records.db'}"
        return cfg


# --- TLS: contexts from in-memory PEM, client-certificate capture ----------------------------


def ssl_context_from_pem(
    cert_chain_pem: bytes, key_pem: bytes, *, client_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+) for ``cert_chain_pem`` / ``key_pem``.

    With ``client_ca_pem``, client certificates are requested and verified against it
    (``CERT_OPTIONAL``: callers without one authenticate with a bearer token instead).

    Raises:
        ConfigError: the certificate and key do not load or do not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl can only load a chain from a file: write it to a private directory and delete at once
    with tempfile.TemporaryDirectory(prefix="safehold-tls-") as d:
        os.chmod(d, 0o700)
        cp, kp = Path(d) / "cert.pem", Path(d) / "key.pem"
        cp.write_bytes(cert_chain_pem)
        fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(str(cp), str(kp))
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"TLS identity does not load: {e}") from None
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _with_peer_cert(base: type) -> type:
    class PeerCertProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's HTTP protocol that exposes the verified client certificate (DER) to the
        app as ``request.state.tls_peer_cert`` (ASGI has no standard field for it)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            self.app_state = {**self.app_state, "tls_peer_cert": der}

    PeerCertProtocol.__name__ = f"PeerCert{base.__name__}"
    return PeerCertProtocol


PeerCertH11Protocol = _with_peer_cert(H11Protocol)
try:  # httptools (C parser) when installed: several times less CPU per request than h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    PeerCertHTTPProtocol = _with_peer_cert(HttpToolsProtocol)
except ImportError:  # pragma: no cover - httptools is a dependency
    PeerCertHTTPProtocol = PeerCertH11Protocol


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve_apps`."""

    def capture_signals(self):  # type: ignore[no-untyped-def, override]
        import contextlib

        return contextlib.nullcontext()


async def serve_apps(
    listeners: list[tuple[Any, str, int, ssl.SSLContext | None]],
    *,
    on_ready: Callable[[list[int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve several ASGI apps on one loop until SIGINT/SIGTERM (or ``stop`` is set).

    Args:
        listeners: ``(app, host, port, ssl_context)``; port 0 picks a free port.
        on_ready: called with the bound ports once every listener is open.
    """
    servers = []
    for app, host, port, ctx in listeners:
        cfg = uvicorn.Config(
            app, host=host, port=port, http=PeerCertHTTPProtocol, lifespan="off",
            log_level="warning", access_log=False, server_header=False, timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
            ssl_context_factory=(lambda _c, _d, ctx=ctx: ctx) if ctx is not None else None,
            ssl_certfile="unused" if ctx is not None else None,
        )
        servers.append(_Server(cfg))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            raise ConfigError("a records service listener failed to start (port in use?)")
        await asyncio.sleep(0.02)
    ports = [s.servers[0].sockets[0].getsockname()[1] for s in servers]
    if on_ready:
        on_ready(ports)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for s in servers:
        s.should_exit = True
    # graceful: in-flight requests finish; then idle keep-alive TLS connections are dropped
    # without waiting for each peer's close_notify
    _, pending = await asyncio.wait(tasks, timeout=2.0)
    if pending:
        for s in servers:
            s.force_exit = True
        _, pending = await asyncio.wait(pending, timeout=3.0)
        for t in pending:
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- bootstrap ------------------------------------------------------------------------------


class NoKeysError(SafeholdError):
    """The broker refused this workload (its Evidence did not pass the manifest's policy), so
    the service has no keys and must not serve."""

    no_keys = True


@dataclass
class Provisioned:
    """What arrived through attestation: the keyset, the TLS identity and the CA."""

    keyset: Any
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    attester: Any


def provision(cfg: ServiceConfig, config_path: str | None, *, package_root: str | None = None) -> Provisioned:
    """Attest to the broker and receive the keyset and the TLS identity (KBS protocol).

    The TLS certificate is issued by the broker's workload CA to the TEE key generated here,
    and carries this workload's RA-TLS Evidence (extension 2.23.133.5.4.9, claims binding the
    key's SubjectPublicKeyInfo), so clients can check it against a CA (``curl --cacert``) *and*
    appraise the Evidence (the Safehold SDK).

    Raises:
        NoKeysError: the broker answered 401/403 (appraisal failed): the message carries the
            broker's reason (which claim, expected vs. got).
        BrokerError: the broker is unreachable or answered otherwise.
    """
    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.client.broker import BrokerClient, BrokerRefused
    from safehold.errors import BrokerError
    from safehold.ratls.cert import OID_TCG_DICE_TAGGED_EVIDENCE, encode_claims, encode_extension, spki_der

    pinned_ca = pinned_broker_ca(cfg)
    files = [config_path] if config_path else []
    attester = SimulatedAttester(Path(cfg.data_dir), workload_files=files, package_root=package_root)
    log.info("records workload measurement %s", attester.measurement.hex())
    # only the pinned CA authenticates the broker (no system trust store)
    verify = ssl.create_default_context(cadata=pinned_ca.decode("ascii"))
    with BrokerClient(cfg.broker_url, attester, verify=verify, workload=cfg.workload) as kbs:
        try:
            kbs.attest()
            keyset = kbs.get_keyset(cfg.keyset_resource.rsplit("/", 1)[-1],
                                    repository=cfg.keyset_resource.split("/", 1)[0])
            pub = kbs.private_key().public_key()
            claims = encode_claims(spki_der(pub))
            evidence = attester.attest(hashlib.sha256(claims).digest() + bytes(32))
            ext = encode_extension(evidence, claims)
            cert_pem, ca_pem = kbs.get_certificate(
                cfg.tls_resource.rsplit("/", 1)[-1],
                extensions=[(OID_TCG_DICE_TAGGED_EVIDENCE.dotted_string, ext)],
            )
        except BrokerRefused as e:
            if e.status in (401, 403):
                raise NoKeysError(f"the broker released no keys to this workload: {e.detail}") from None
            raise
        except BrokerError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise BrokerIdentityError(
                    f"the broker at {cfg.broker_url} is not the pinned broker: its TLS certificate "
                    f"does not chain to the workload CA with SHA-256 {cfg.broker_ca_sha256} ({e})"
                ) from None
            raise
        key_pem = kbs.private_key_pem()
    got = _ca_sha256(ca_pem.encode("ascii"))
    if got != cfg.broker_ca_sha256:  # the TLS identity must come from the pinned CA too
        raise BrokerIdentityError(f"the broker issued the TLS certificate from another CA: SHA-256 "
                                  f"expected {cfg.broker_ca_sha256}, got {got}")
    return Provisioned(keyset, cert_pem.encode("ascii"), key_pem, ca_pem.encode("ascii"), attester)


def _ca_sha256(pem: bytes) -> str:
    """SHA-256 (hex) of the DER of the single certificate in ``pem``.

    Raises:
        BrokerIdentityError: not exactly one PEM certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise BrokerIdentityError("broker CA is not a PEM certificate") from None
    if len(certs) != 1:
        raise BrokerIdentityError(f"broker CA must hold exactly one certificate, got {len(certs)}")
    return hashlib.sha256(certs[0].public_bytes(Encoding.DER)).hexdigest()


def pinned_broker_ca(cfg: ServiceConfig) -> bytes:
    """Read the run-time ``broker_ca`` PEM file and check it against the measured pin.

    Returns:
        the PEM bytes (one certificate) whose DER SHA-256 equals ``cfg.broker_ca_sha256``.

    Raises:
        BrokerIdentityError: no file given, unreadable, not one certificate, or another CA
            (message: expected vs. got SHA-256).
    """
    if not cfg.broker_ca:
        raise BrokerIdentityError("no broker CA file (set SAFEHOLD_RECORDS_BROKER_CA): the broker "
                                  "is authenticated only by its pinned workload CA")
    try:
        pem = Path(cfg.broker_ca).read_bytes()
    except OSError as e:
        raise BrokerIdentityError(f"broker CA {cfg.broker_ca}: {e.strerror}") from None
    got = _ca_sha256(pem)
    if got != cfg.broker_ca_sha256:
        raise BrokerIdentityError(
            f"broker CA {cfg.broker_ca} is not the broker pinned in the measured config: "
            f"SHA-256 expected {cfg.broker_ca_sha256}, got {got}"
        )
    return pem


def check_audit_at_start(audit: Any) -> bool:
    """Check the audit log's authenticated head at start-up (O(1)); True if it holds.

    A failed check (the log's tail was cut, the head row deleted or forged) does not stop the
    service, but it fails closed: every audited access is refused with 409
    ``audit-chain-broken`` until an admin reseals the log (``POST /v1/audit/reseal``), and the
    problem is logged as an error banner here. A corrupt store is a
    :class:`~safehold.store.errors.StoreCorruptError` (the service exits with status 1).
    """
    from safehold.errors import AuditChainError

    try:
        n = audit.check_head()
    except AuditChainError as e:
        banner = "!" * 78
        log.error(banner)
        log.error("AUDIT LOG BROKEN: %s", e)
        log.error("every audited access is refused (409 audit-chain-broken) until an admin "
                  "reseals the log: POST /v1/audit/reseal (the reseal entry records this)")
        log.error(banner)
        return False
    log.info("audit log: %d entries, authenticated head checked", n)
    return True


def store_healthy(store: Any, audit: Any) -> bool:
    """For ``/healthz``: the store answers a read and the audit head holds (no details)."""
    try:
        if audit is not None:
            audit.check_head()
        else:
            store.scan("records.audit", limit=1)
    except SafeholdError:
        return False
    return True


def build_apps(cfg: ServiceConfig, prov: Provisioned) -> tuple[Any, Any, Any]:
    """Open the store and engine and build ``(native_app, scone_app_or_None, store)``.

    A SQLite store is checked with ``PRAGMA quick_check`` first (reads every page once: about
    a second per few hundred MB) and the audit log's authenticated head is checked
    (:func:`check_audit_at_start`).

    Raises:
        StoreCorruptError: the SQLite file is corrupt (the service then exits with status 1).
    """
    from safehold.records.api import AccessList, create_native_app
    from safehold.records.app import EngineKV, PatientRepository
    from safehold.records.audit import AuditLog
    from safehold.records.engine import RecordEngine
    from safehold.records.scone import create_scone_app
    from safehold.store import open_store

    store = open_store(cfg.store_url)
    check = getattr(store, "quick_check", None)  # SQLite: a corrupt page must not reach requests
    if check is not None:
        import time

        t0 = time.monotonic()
        try:
            check()
        except BaseException:
            store.close()
            raise
        log.info("store quick_check ok (%.2f s)", time.monotonic() - t0)
    codec = None
    if not cfg.encryption:
        import warnings

        from safehold.records.codec import UnsafePlainCodec

        # the measured file asked for it (the environment cannot): still say so loudly
        banner = "!" * 78
        log.warning(banner)
        log.warning("ENCRYPTION OFF (measured config encryption = false): records are stored IN "
                    "PLAINTEXT. Benchmark baseline only, never patient data.")
        log.warning(banner)
        print(f"{banner}\nsafehold records: ENCRYPTION OFF - records are stored in plaintext "
              f"(benchmark baseline only)\n{banner}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codec = UnsafePlainCodec()
    engine = RecordEngine(store, prov.keyset, codec=codec)
    import threading

    wlock = threading.RLock() if cfg.store_url.startswith("sqlite") else None
    audit = None
    if not cfg.audit:
        log.warning("AUDIT OFF (measured config audit = false): accesses are not recorded")
    if cfg.audit:
        from safehold.crypto.kdf import derive_key

        audit = AuditLog(store, mac_key=derive_key(prov.keyset.index_key, purpose="records/audit-mac"),
                         write_lock=wlock)
        check_audit_at_start(audit)
    repo = PatientRepository(EngineKV(engine, write_lock=wlock), audit)
    acl = AccessList.from_json(cfg.access)
    native = create_native_app(repo, acl, health=lambda: store_healthy(store, audit))
    scone = create_scone_app(repo, acl, auth=cfg.scone_auth) if cfg.scone_port is not None else None
    return native, scone, store


def run(cfg: ServiceConfig, config_path: str | None = None) -> int:
    """Provision, open, serve until SIGINT/SIGTERM; returns the exit status (0 = clean stop)."""
    import json

    prov = provision(cfg, config_path)
    native, scone, store = build_apps(cfg, prov)
    ctx = ssl_context_from_pem(prov.cert_pem, prov.key_pem, client_ca_pem=prov.ca_pem)
    listeners = [(native, cfg.host, cfg.port, ctx)]
    if scone is not None:
        listeners.append((scone, cfg.host, cfg.scone_port, ctx))

    def ready(ports: list[int]) -> None:
        info = {"pid": os.getpid(), "records_url": f"https://{cfg.host}:{ports[0]}",
                "port": ports[0], "scone_port": ports[1] if len(ports) > 1 else None,
                "measurement": prov.attester.measurement.hex(),
                "encryption": cfg.encryption, "audit": cfg.audit, "scone_auth": cfg.scone_auth}
        log.info("records service listening: %s", info)
        if cfg.ready_file:
            write_atomic(cfg.ready_file, json.dumps(info), mode=0o644)

    try:
        asyncio.run(serve_apps(listeners, on_ready=ready))
    finally:
        store.close()
    return 0


# --- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m safehold.records.service --config FILE``; exit 0 on a clean stop, 2 when the
    broker refuses this workload (no keys: it never serves), 1 on other errors."""
    ap = argparse.ArgumentParser(prog="safehold-records", description="Safehold records service")
    ap.add_argument("--config", help="TOML configuration file (measured as part of the workload)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = ServiceConfig.load(args.config)
        return run(cfg, args.config)
    except NoKeysError as e:
        log.error("records service refused to start: %s", e)
        return 2
    except SafeholdError as e:
        log.error("records service stopped: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
