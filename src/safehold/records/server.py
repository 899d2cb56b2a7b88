"""The records service process: attest, receive keys, open the engine, then open the ports.

Start-up order (nothing listens before step 4, and no key exists here that did not arrive
through attestation):

1. The Attester (simulated by default) measures this workload: the package files plus the
   measured configuration file.
2. :class:`~safehold.client.broker.BrokerClient` runs the KBS protocol with the broker
   (``/kbs/v0/auth`` → ``/kbs/v0/attest`` → ``/kbs/v0/resource/...``) and receives the records
   **keyset** as a JWE wrapped to a TEE key generated here, then the **TLS identity**: a
   certificate issued by the broker's workload CA to that key (valid for the name ``api``)
   carrying this workload's RA-TLS Evidence, and the **access list** (who may call, with which
   role: the owner's ``access`` secret, every identity pinned). The broker refuses all of them
   if the measurement is not in the data owner's manifest.
3. The encrypted engine is opened on the store (SQLite file by default, PostgreSQL by URL).
4. Two HTTPS listeners open on one event loop: the native API (with FHIR R4 REST at
   ``/fhir``) and the SCONE-compatible API.
   The TLS private key stays in memory: it is handed to OpenSSL through an anonymous
   ``memfd`` (:mod:`safehold.ratls.memkey`), never a file, temporary or not.

Run as ``python -m safehold.records.server --config FILE`` (``safehold up`` does this).
Configuration is TOML (:class:`~safehold.records.config.ServiceConfig`). Only the config file
is measured, so the ``SAFEHOLD_RECORDS_*`` environment variables may set only the run-time
plumbing (ports, paths, URLs); a variable naming any security setting makes the service refuse
to start. The broker's identity is pinned in
the measured file (``broker_ca_sha256``): a broker whose workload CA differs is refused before
any Evidence or key is exchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError, ConfigError, SafeholdError
from safehold.fsutil import write_atomic
from safehold.ratls.memkey import ssl_context_from_memory
from safehold.records.access import AccessList
from safehold.records.access_audit import AUDIT_NAMESPACE, AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.config import ServiceConfig
from safehold.records.errors import BrokerIdentityError, NoKeysError
from safehold.records.fhir.core import FhirStore
from safehold.records.fhir.http import mount_fhir
from safehold.records.http import create_native_app
from safehold.records.reindex import ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.records.scone_http import create_scone_app
from safehold.store.base import Store

__all__ = [
    "Provisioned",
    "assemble_apps",
    "build_apps",
    "main",
    "open_repository",
    "pinned_broker_ca",
    "provision",
    "run",
    "serve_apps",
    "ssl_context_from_pem",
]

log = logging.getLogger("safehold.records")


# --- TLS: contexts from in-memory PEM, client-certificate capture ----------------------------


def ssl_context_from_pem(
    cert_chain_pem: bytes, key_pem: bytes, *, client_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+) for ``cert_chain_pem`` / ``key_pem``, loaded from memory
    (:func:`safehold.ratls.memkey.ssl_context_from_memory`: a ``memfd``, never a file).

    With ``client_ca_pem``, client certificates are requested and verified against it
    (``CERT_OPTIONAL``: callers without one authenticate with a bearer token instead).

    Raises:
        ConfigError: the certificate and key do not load or do not match, or no ``memfd_create``.
    """
    return ssl_context_from_memory(cert_chain_pem, key_pem, client_ca_pem=client_ca_pem)


def _with_peer_cert(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    class PeerCertProtocol(base):  # type: ignore[valid-type, misc]  # a base chosen at run time
        """uvicorn's HTTP protocol that exposes the verified client certificate (DER) to the
        app as ``request.state.tls_peer_cert`` (ASGI has no standard field for it)."""

        app_state: dict[str, object]  # uvicorn's per-connection state, copied into each request

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
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


_ContextFactory = Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]


def _fixed_context(ctx: ssl.SSLContext) -> _ContextFactory:
    """uvicorn's ``ssl_context_factory`` that answers with the context built in memory (no key file)."""
    return lambda _config, _default: ctx


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve_apps`."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


async def serve_apps(
    listeners: list[tuple[FastAPI, str, int, ssl.SSLContext | None]],
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
            ssl_context_factory=_fixed_context(ctx) if ctx is not None else None,
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


class _Resources(Protocol):
    """What :func:`_access_list` needs of a :class:`~safehold.client.broker.BrokerClient`."""

    def get_resource(self, path: str, *, use_token: bool = False) -> bytes: ...


@dataclass
class Provisioned:
    """What arrived through attestation: the keyset, the TLS identity (certificate chain and
    private key, PEM) and the broker's workload CA (PEM), the Attester that measured us, and
    the access list (the owner's ``access`` secret; empty: nobody is let in)."""

    keyset: Keyset
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    attester: SimulatedAttester
    access: AccessList = field(default_factory=AccessList)


def provision(cfg: ServiceConfig, config_path: str | None, *, package_root: str | None = None) -> Provisioned:
    """Attest to the broker and receive the keyset, the TLS identity and the access list (KBS
    protocol).

    The access list is the manifest's ``access`` secret at ``cfg.access_resource``: only the
    data owner's signed manifest says who holds which role (pinned tokens and client keys).

    The TLS certificate is issued by the broker's workload CA to the TEE key generated here,
    and carries this workload's RA-TLS Evidence (extension 2.23.133.5.4.9, claims binding the
    key's SubjectPublicKeyInfo), so clients can check it against a CA (``curl --cacert``) *and*
    appraise the Evidence (the Safehold SDK).

    Raises:
        NoKeysError: the broker answered 401/403 (appraisal failed): the message carries the
            broker's reason (which claim, expected vs. got).
        BrokerError: the broker is unreachable or answered otherwise.
    """
    from safehold.client.broker import BrokerClient
    from safehold.client.errors import BrokerRefusedError
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
            access = _access_list(kbs, cfg.access_resource)
            pub = kbs.private_key().public_key()
            claims = encode_claims(spki_der(pub))
            evidence = attester.attest(hashlib.sha256(claims).digest() + bytes(32))
            ext = encode_extension(evidence, claims)
            cert_pem, ca_pem = kbs.get_certificate(
                cfg.tls_resource.rsplit("/", 1)[-1],
                extensions=[(OID_TCG_DICE_TAGGED_EVIDENCE.dotted_string, ext)],
            )
        except BrokerRefusedError as e:
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
    return Provisioned(keyset, cert_pem.encode("ascii"), key_pem, ca_pem.encode("ascii"), attester,
                       access)


def _access_list(kbs: _Resources, resource: str) -> AccessList:
    """The manifest's ``access`` secret at ``resource``, parsed.

    Raises:
        ConfigError: the manifest has no such secret (404) or it is not a valid access list.
        BrokerRefusedError: any other refusal.
    """
    from safehold.client.errors import BrokerRefusedError

    try:
        doc = kbs.get_resource(resource)
    except BrokerRefusedError as e:
        if e.status == 404:
            raise ConfigError(
                f"the broker has no access list {resource} for this workload ({e.detail}): the data "
                "owner adds a secret of type 'access' to the manifest and lists it in the workload's "
                "secrets (docs/records.md)") from None
        raise
    return AccessList.from_json(doc)


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


def check_audit_at_start(audit: AccessAuditLog) -> bool:
    """Check the audit log's authenticated head at start-up (O(1)); True if it holds.

    A failed check (the log's tail was cut, the head row deleted or forged) does not stop the
    service, but it fails closed: every audited access is refused with 409
    ``audit-chain-broken`` until an admin reseals the log (``POST /v1/audit/reseal``), and the
    problem is logged as an error banner here. A corrupt store is a
    :class:`~safehold.store.errors.StoreCorruptError` (the service exits with status 1).
    """
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


def store_healthy(store: Store, audit: AccessAuditLog | None) -> bool:
    """For ``/healthz``: the store answers a read and the audit head holds (no details)."""
    try:
        if audit is not None:
            audit.check_head()
        else:
            store.scan(AUDIT_NAMESPACE, limit=1)
    except SafeholdError:
        return False
    return True


def open_repository(store: Store, keyset: Keyset, *, encryption: bool = True,
                    audit: bool = True) -> PatientRepository:
    """The service's repository on ``store``: one group committer for every write, the access
    audit (MAC key derived from the attested keyset: HKDF purpose ``records/audit-mac``).

    Args:
        encryption: False only for the benchmark's baseline (a pass-through codec), and only
            when the measured file says so: announced loudly here.
        audit: False leaves accesses unrecorded (announced).
    """
    codec = None
    if not encryption:
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
    committer = GroupCommit(store)
    access_log = None
    if not audit:
        log.warning("AUDIT OFF (measured config audit = false): accesses are not recorded")
    else:
        from safehold.crypto.kdf import derive_key

        access_log = AccessAuditLog(store, committer,
                                    mac_key=derive_key(keyset.index_key, purpose="records/audit-mac"))
        check_audit_at_start(access_log)
    return PatientRepository(store, keyset, committer=committer, audit=access_log, codec=codec)


def build_apps(cfg: ServiceConfig, prov: Provisioned) -> tuple[FastAPI, FastAPI | None, Store]:
    """Open the store and the repository and build ``(native_app, scone_app_or_None, store)``.

    A SQLite store is checked with ``PRAGMA quick_check`` first (reads every page once: about
    a second per few hundred MB), the audit log's authenticated head is checked
    (:func:`check_audit_at_start`) and search postings written by older code are rebuilt
    (:func:`~safehold.records.reindex.ensure_search_index`). The native app mounts FHIR R4 REST
    at ``/fhir`` over the same repository plus one for the other resource types.

    Raises:
        StoreCorruptError: the SQLite file is corrupt (the service then exits with status 1).
    """
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
    native, scone, _ = assemble_apps(
        store, prov.keyset, prov.access, encryption=cfg.encryption,
        audit=cfg.audit, scone_auth=cfg.scone_auth if cfg.scone_port is not None else None)
    return native, scone, store


def assemble_apps(store: Store, keyset: Keyset, access: AccessList, *, encryption: bool = True,
                  audit: bool = True, scone_auth: str | None = "token",
                  ) -> tuple[FastAPI, FastAPI | None, PatientRepository]:
    """The service's apps over an open store and the keyset: the repository
    (:func:`open_repository`), the native API app with its health check, and the SCONE app.

    No network and no TLS (:func:`run` adds those after attestation), so the apps can also be
    driven in-process, e.g. through ``httpx.ASGITransport``.

    Args:
        access: who may call (the broker's ``records-access`` secret, parsed).
        scone_auth: ``"token"`` (default) or ``"none"`` (see :mod:`safehold.records.scone_http`);
            None builds no SCONE app (the SCONE port is off).

    Returns:
        ``(native_app, scone_app_or_None, repository)``.

    Raises:
        ValueError: ``scone_auth`` is not one of the modes above.
    """
    repo = open_repository(store, keyset, encryption=encryption, audit=audit)
    fhir = FhirStore.beside(repo)
    for r in (repo, fhir.resources):  # postings of older code are rebuilt before serving
        ensure_search_index(r)
    native = create_native_app(repo, access, health=lambda: store_healthy(store, repo.audit))
    native = mount_fhir(native, fhir)
    scone = create_scone_app(repo, access, auth=scone_auth) if scone_auth is not None else None
    return native, scone, repo


def run(cfg: ServiceConfig, config_path: str | None = None) -> int:
    """Provision, open, serve until SIGINT/SIGTERM; returns the exit status (0 = clean stop)."""
    import json

    prov = provision(cfg, config_path)
    native, scone, store = build_apps(cfg, prov)
    ctx = ssl_context_from_pem(prov.cert_pem, prov.key_pem, client_ca_pem=prov.ca_pem)
    listeners: list[tuple[FastAPI, str, int, ssl.SSLContext | None]] = [(native, cfg.host, cfg.port, ctx)]
    if scone is not None and cfg.scone_port is not None:
        listeners.append((scone, cfg.host, cfg.scone_port, ctx))
        if cfg.scone_auth == "none":  # an explicit opt-in (issue 11, finding 5): say so loudly
            log.warning("WARNING: scone_auth = 'none': the SCONE-compatible port serves every record "
                        "WITHOUT AUTHENTICATION to any process on this machine (loopback only)")

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
    """``python -m safehold.records.server --config FILE``; exit 0 on a clean stop, 2 when the
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
