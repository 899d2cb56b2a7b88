"""The records service process: attest, receive keys, open the engine, then open the ports.

Start-up order (nothing listens before step 4, and no key exists here that did not arrive
through attestation):

1. The Attester (simulated by default) measures this workload: the closure of the running
   process (interpreter, standard library, every installed distribution, the package, the
   launch) plus the measured configuration file (``safehold.attestation.workload``).
2. :func:`safehold.runtime.attest_and_fetch` runs the KBS protocol with the broker
   (``/kbs/v0/auth`` → ``/kbs/v0/attest`` → ``/kbs/v0/resource/...``) and receives the records
   **keyset** as a JWE wrapped to a TEE key generated here, then the **TLS identity**: a
   certificate issued by the broker's workload CA to that key (valid for the name ``api``)
   carrying this workload's RA-TLS Evidence, and the **access list** (who may call, with which
   role: the owner's ``access`` secret, every identity pinned). The broker refuses all of them
   if the measurement is not in the data owner's manifest.
3. The encrypted engine is opened on the store (SQLite file by default, PostgreSQL by URL).
4. Two HTTPS listeners open on one event loop: the native API (with FHIR R4 REST at
   ``/fhir``) and the SCONE-compatible API.
   The TLS private key stays in memory (an :class:`ssl.SSLContext` loaded through
   ``memfd_create``: :mod:`safehold.ratls.memkey`), served by
   :func:`safehold.runtime.server.serve`.

``safehold up`` starts it through ``safehold.attestation.workload.LaunchSpec`` (isolated
interpreter, environment allow-list); ``python -m safehold.records.server --config FILE`` also
runs, but measures as an unrecognised launch and gets no keys from a manifest that pins the
launch.

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
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.crypto.keyset import Keyset
from safehold.errors import AuditChainError, SafeholdError
from safehold.fsutil import write_atomic
from safehold.procutil import EXIT_WITH_PARENT, exit_with_parent
from safehold.ratls.memkey import ssl_context_from_memory
from safehold.records.access import AccessList
from safehold.records.access_audit import AUDIT_NAMESPACE, FLUSH_SECONDS, FRESH_FLUSH_SECONDS, AccessAuditLog
from safehold.records.commit import Committer, GroupCommit
from safehold.records.config import ServiceConfig
from safehold.records.errors import BrokerIdentityError, NoKeysError
from safehold.records.fhir.core import FhirStore
from safehold.records.fhir.http import mount_fhir
from safehold.records.fresh import Freshness
from safehold.records.http import create_native_app
from safehold.records.reindex import ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.records.scone_http import create_scone_app
from safehold.runtime import attest_and_fetch, pinned_ca, simulated_attester
from safehold.runtime.server import Listener, serve, tune_gc
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

#: Seconds to wait at start for the broker's port (``safehold up`` starts both together).
BROKER_WAIT = 30.0


# --- TLS and serving: the workload runtime ----------------------------------------------------


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


async def serve_apps(
    listeners: list[tuple[FastAPI, str, int, ssl.SSLContext | None]],
    *,
    on_ready: Callable[[list[int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve several ASGI apps on one loop until SIGINT/SIGTERM (or ``stop`` is set):
    :func:`safehold.runtime.server.serve` over ``(app, host, port, ssl_context)`` tuples.

    Raises:
        ConfigError: a listener failed to start (port in use?).
    """
    await serve([Listener(app, host, port, ctx) for app, host, port, ctx in listeners],
                on_ready=on_ready, stop=stop)


# --- bootstrap ------------------------------------------------------------------------------


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


def provision(cfg: ServiceConfig, config_path: str | None) -> Provisioned:
    """Attest to the broker and receive the keyset, the TLS identity and the access list (KBS
    protocol, through :func:`safehold.runtime.attest_and_fetch`).

    The access list is the manifest's ``access`` secret at ``cfg.access_resource``: only the
    data owner's signed manifest says who holds which role (pinned tokens and client keys).

    The TLS certificate is issued by the broker's workload CA to the TEE key generated here,
    and carries this workload's RA-TLS Evidence (extension 2.23.133.5.4.9, claims binding the
    key's SubjectPublicKeyInfo), so clients can check it against a CA (``curl --cacert``) *and*
    appraise the Evidence (the Safehold SDK).

    Raises:
        NoKeysError: the broker answered 401/403 (appraisal failed): the message carries the
            broker's reason (which claim, expected vs. got).
        ConfigError: the manifest has no access list for this workload.
        BrokerError: the broker is unreachable or answered otherwise.
    """
    pinned_ca = pinned_broker_ca(cfg)
    files = [config_path] if config_path else []
    attester = simulated_attester(Path(cfg.data_dir), files)
    log.info("records workload measurement %s", attester.measurement.hex())
    p = attest_and_fetch(cfg.broker_url, pinned_ca, workload=cfg.workload, attester=attester,
                         keysets={"records": cfg.keyset_resource},
                         secrets={"access": cfg.access_resource}, certificate=cfg.tls_resource,
                         broker_ca_sha256=cfg.broker_ca_sha256, wait=BROKER_WAIT)
    assert p.cert_pem is not None
    return Provisioned(p.keysets["records"], p.cert_pem, p.key_pem(), p.ca_pem, attester,
                       _access_list(p.secrets["access"]))


def _access_list(doc: bytes) -> AccessList:
    """The manifest's ``access`` secret, parsed.

    Raises:
        ConfigError: it is not a valid access list.
    """
    return AccessList.from_json(doc)


def pinned_broker_ca(cfg: ServiceConfig) -> bytes:
    """Read the run-time ``broker_ca`` PEM file and check it against the measured pin.

    Returns:
        the PEM bytes (one certificate) whose DER SHA-256 equals ``cfg.broker_ca_sha256``.

    Raises:
        BrokerIdentityError: no file given (set ``SAFEHOLD_RECORDS_BROKER_CA``), unreadable,
            not one certificate, or another CA (message: expected vs. got SHA-256).
    """
    if not cfg.broker_ca:
        raise BrokerIdentityError("no broker CA file (set SAFEHOLD_RECORDS_BROKER_CA): the broker "
                                  "is authenticated only by its pinned workload CA")
    return pinned_ca(cfg.broker_ca, cfg.broker_ca_sha256)


def check_audit_at_start(audit: AccessAuditLog) -> bool:
    """Check the audit log's authenticated head at start-up (O(1)); True if it holds.

    A failed check (the log's tail was cut, the head row deleted or forged) does not stop the
    service, but it fails closed: every audited access is refused with 409
    ``audit-chain-broken`` until an admin reseals the log (``POST /v1/audit/reseal``), and the
    problem is logged as an error banner here. A corrupt store is a
    :class:`~safehold.store.errors.StoreCorruptError` (the service exits with status 1).
    """
    from safehold.freshness.errors import RowFreshnessError

    try:
        n = audit.check_head()
    except (AuditChainError, RowFreshnessError) as e:  # freshness: a row the ledger holds is gone
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
                    audit: bool = True, check_audit: bool = True,
                    compress: bool = True) -> PatientRepository:
    """The service's repository on ``store``: one group committer for every write, the access
    audit (MAC key derived from the attested keyset: HKDF purpose ``records/audit-mac``).

    Over a :class:`~safehold.freshness.store.FreshStore` the committer is the pipelined
    :class:`~safehold.freshness.group.FreshGroupCommit` (a write returns once anchored).

    Args:
        encryption: False only for the benchmark's baseline (a pass-through codec), and only
            when the measured file says so: announced loudly here.
        audit: False leaves accesses unrecorded (announced).
        check_audit: check the audit head now (False: the caller does it later, e.g. once a
            store that is not fresh yet has been re-anchored).
        compress: the measured ``compress``: records written compressed and padded to 256 bytes
            inside the AEAD (default), or at their exact length (``False``: logged at start).
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
    committer = _committer(store)
    access_log = None
    if not audit:
        log.warning("AUDIT OFF (measured config audit = false): accesses are not recorded")
    else:
        from safehold.crypto.kdf import derive_key
        from safehold.freshness.store import FreshStore

        fresh = isinstance(store, FreshStore)
        # over a FreshStore every read-audit flush is also an anchor advance (a round trip to
        # every member): flush half as often; the durability rule (max_lag) is unchanged
        access_log = AccessAuditLog(store, committer,
                                    mac_key=derive_key(keyset.index_key, purpose="records/audit-mac"),
                                    checkpointed=fresh,
                                    flush_seconds=FRESH_FLUSH_SECONDS if fresh else FLUSH_SECONDS)
        if check_audit:
            check_audit_at_start(access_log)
    if not compress:
        log.warning("compression off (measured config compress = false): records are stored at "
                    "their exact length, uncompressed")
    return PatientRepository(store, keyset, committer=committer, audit=access_log, codec=codec,
                             compress=compress)


def _committer(store: Store) -> Committer:
    """:class:`FreshGroupCommit` over a FreshStore, else :class:`GroupCommit`."""
    from safehold.freshness.store import FreshStore

    if isinstance(store, FreshStore):
        from safehold.freshness.group import FreshGroupCommit

        return FreshGroupCommit(store)
    return GroupCommit(store)


def build_apps(cfg: ServiceConfig, prov: Provisioned, *, integrity: bool = True,
               ) -> tuple[FastAPI, FastAPI | None, Store]:
    """Open the store and the repository and build ``(native_app, scone_app_or_None, store)``.

    A SQLite store is checked with ``PRAGMA quick_check`` first (reads every page once: about
    a second per few hundred MB), the store is wrapped in a FreshStore (``freshness = true``,
    the default: :func:`safehold.records.fresh.open_fresh_store`; the workload's TLS identity
    is the client certificate towards the anchor members), the audit log's authenticated head
    is checked (:func:`check_audit_at_start`) and search postings written by older code are
    rebuilt (:func:`~safehold.records.reindex.ensure_search_index`) — the last two once the
    store is fresh. The native app mounts FHIR R4 REST at ``/fhir`` over the same repository
    plus one for the other resource types.

    Raises:
        StoreCorruptError: the SQLite file is corrupt (the service then exits with status 1).
    """
    from safehold.store import open_store

    store = open_store(cfg.store_url)
    # SQLite: a corrupt page must not reach requests (with several workers, worker 0 checks)
    check = getattr(store, "quick_check", None) if integrity else None
    if check is not None and cfg.integrity_check == "start":
        import time

        t0 = time.monotonic()
        try:
            check()
        except BaseException:
            store.close()
            raise
        log.info("store quick_check ok (%.2f s)", time.monotonic() - t0)
    elif check is not None:
        start_integrity_check(store)
    fresh = None
    if cfg.freshness:
        from safehold.records.fresh import Freshness, open_fresh_store

        try:
            fs = open_fresh_store(store, prov.keyset, ledger=cfg.workload,
                                  anchor_members=cfg.anchor_members,
                                  anchor_policy=cfg.anchor_appraisal(), cert_pem=prov.cert_pem,
                                  key_pem=prov.key_pem, wait_timeout=cfg.freshness_wait)
        except BaseException:
            store.close()
            raise
        store, fresh = fs, Freshness(fs)
    else:
        _freshness_off_banner()
    native, scone, _ = assemble_apps(
        store, prov.keyset, prov.access, encryption=cfg.encryption,
        audit=cfg.audit, scone_auth=cfg.scone_auth if cfg.scone_port is not None else None,
        freshness=fresh, compress=cfg.compress)
    if fresh is not None:
        fresh.start_background(cfg.freshness_audit_seconds)
    return native, scone, store


def start_integrity_check(store: Store) -> threading.Thread:
    """Run the SQLite store's ``PRAGMA quick_check`` on a background thread (issue 17: start-up
    is not O(database size)). Serving starts meanwhile: every row is authenticated on read
    (AES-GCM, freshness), so a damaged page yields an error, never wrong data. A failure is
    logged with a banner and poisons the store: every further operation raises the
    ``StoreCorruptError`` (500 ``store-corrupt``) and ``/healthz`` answers 503.

    Returns:
        the started thread (daemon).
    """
    import time

    from safehold.store.errors import StoreClosedError, StoreCorruptError

    def run() -> None:
        t0 = time.monotonic()
        log.info("store quick_check running in the background (serving meanwhile)")
        try:
            store.quick_check()  # type: ignore[attr-defined]
        except StoreCorruptError as e:
            banner = "!" * 78
            log.error(banner)
            log.error("STORE CORRUPT, REFUSING EVERY OPERATION: %s", e)
            log.error(banner)
            store.poison(e)  # type: ignore[attr-defined]
            return
        except StoreClosedError:
            return
        except SafeholdError as e:
            log.error("store quick_check could not run: %s (the check did not complete)", e)
            return
        log.info("store quick_check ok (%.2f s, in the background)", time.monotonic() - t0)

    t = threading.Thread(target=run, name="safehold-records-quick-check", daemon=True)
    t.start()
    return t


def _freshness_off_banner() -> None:
    banner = "!" * 78
    msg = ("FRESHNESS OFF (measured config freshness = false): the database can roll back, omit, "
           "restore and fork records UNDETECTED")
    log.warning(banner)
    log.warning(msg)
    log.warning(banner)
    print(f"{banner}\nsafehold records: {msg}\n{banner}", file=sys.stderr, flush=True)


def assemble_apps(store: Store, keyset: Keyset, access: AccessList, *, encryption: bool = True,
                  audit: bool = True, scone_auth: str | None = "token",
                  freshness: Freshness | None = None, compress: bool = True,
                  ) -> tuple[FastAPI, FastAPI | None, PatientRepository]:
    """The service's apps over an open store and the keyset: the repository
    (:func:`open_repository`), the native API app with its health check, and the SCONE app.

    No network and no TLS (:func:`run` adds those after attestation), so the apps can also be
    driven in-process, e.g. through ``httpx.ASGITransport``.

    Args:
        access: who may call (the broker's ``records-access`` secret, parsed).
        scone_auth: ``"token"`` (default) or ``"none"`` (see :mod:`safehold.records.scone_http`);
            None builds no SCONE app (the SCONE port is off).
        freshness: the wiring of ``store`` when it is a FreshStore
            (:class:`~safehold.records.fresh.Freshness`): ``/healthz`` reports it, the owner's
            ``/v1/freshness/*`` routes use it; while the store is not fresh the audit head check
            and the index rebuild wait until it is.
        compress: the measured ``compress`` (:func:`open_repository`).

    Returns:
        ``(native_app, scone_app_or_None, repository)``.

    Raises:
        ValueError: ``scone_auth`` is not one of the modes above.
    """
    ready = freshness is None or freshness.fs.problem is None
    repo = open_repository(store, keyset, encryption=encryption, audit=audit, check_audit=ready,
                           compress=compress)
    fhir = FhirStore.beside(repo)

    def start_up() -> None:
        if not ready and repo.audit is not None:
            check_audit_at_start(repo.audit)
        for r in (repo, fhir.resources):  # postings of older code are rebuilt before serving
            ensure_search_index(r)

    if ready:
        start_up()
    elif freshness is not None:
        freshness.on_fresh(start_up)

    def health() -> bool:
        return store_healthy(store, repo.audit) and (freshness is None or freshness.health()[0])

    native = create_native_app(repo, access, health=health, freshness=freshness)
    native = mount_fhir(native, fhir)
    scone = create_scone_app(repo, access, auth=scone_auth) if scone_auth is not None else None
    return native, scone, repo


def run(cfg: ServiceConfig, config_path: str | None = None, *, parent: int | None = None) -> int:
    """Provision, open, serve until SIGINT/SIGTERM; returns the exit status (0 = clean stop).

    With ``workers > 1`` this process attests once, binds the listening sockets and forks the
    worker processes (:func:`safehold.records.workers.run_workers`); it opens no store itself.

    Args:
        parent: ``--exit-with-parent``: stop (as on SIGTERM) once the process with this pid is no
            longer this process's parent (:func:`safehold.procutil.exit_with_parent`; with
            workers, the supervisor loop looks instead of a thread: it must not fork with one).
    """
    # a single process watches from a thread; a forking one only checks now (see run_workers)
    exit_with_parent(parent, watch=cfg.workers <= 1)
    prov = provision(cfg, config_path)
    if cfg.workers > 1:
        from safehold.records.workers import bind_listeners, run_workers

        want = [cfg.port] + ([cfg.scone_port] if cfg.scone_port is not None else [])
        socks = bind_listeners(cfg.host, [p or 0 for p in want])
        ports = [sk.getsockname()[1] for sk in socks]

        def write(extra: dict[str, object]) -> None:
            _write_ready(cfg, prov, ports, extra)

        return run_workers(cfg.workers, lambda i, notify: serve_worker(cfg, prov, socks, i, notify),
                           on_change=write, watch_parent=parent)
    return serve_worker(cfg, prov, None, 0, None)


def _write_ready(cfg: ServiceConfig, prov: Provisioned, ports: list[int], extra: dict[str, object]) -> None:
    import json

    info = {"pid": os.getpid(), "records_url": f"https://{cfg.host}:{ports[0]}",
            "port": ports[0], "scone_port": ports[1] if len(ports) > 1 else None,
            "measurement": prov.attester.measurement.hex(),
            "encryption": cfg.encryption, "audit": cfg.audit, "scone_auth": cfg.scone_auth,
            "freshness": cfg.freshness, "compress": cfg.compress, **extra}
    log.info("records service listening: %s", info)
    if cfg.ready_file:
        write_atomic(cfg.ready_file, json.dumps(info), mode=0o644)


def serve_worker(cfg: ServiceConfig, prov: Provisioned, socks: list[socket.socket] | None, index: int,
                 notify: Callable[[str], None] | None) -> int:
    """Open the store and serve one process's listeners until SIGINT/SIGTERM (exit status).

    Args:
        socks: the ports the parent reserved (``workers > 1``: native, then SCONE; this worker
            listens on them with ``SO_REUSEPORT``),
            or None to bind ``cfg.port`` / ``cfg.scone_port`` here.
        index: the worker's number (0 runs the background ``quick_check``).
        notify: None for a single process (this process writes the ready file); else called
            with ``"ready"`` once listening and ``"fresh"`` once the store is fresh.
    """
    native, scone, store = build_apps(cfg, prov, integrity=index == 0)
    ctx = ssl_context_from_pem(prov.cert_pem, prov.key_pem, client_ca_pem=prov.ca_pem)
    listeners: list[tuple[FastAPI, str, int, ssl.SSLContext | None]] = [(native, cfg.host, cfg.port, ctx)]
    if scone is not None and cfg.scone_port is not None:
        listeners.append((scone, cfg.host, cfg.scone_port, ctx))
        if cfg.scone_auth == "none" and index == 0:  # an explicit opt-in (issue 11, finding 5)
            log.warning("WARNING: scone_auth = 'none': the SCONE-compatible port serves every record "
                        "WITHOUT AUTHENTICATION to any process on this machine (loopback only)")
    fresh: Freshness | None = native.state.records.freshness

    def ready(ports: list[int]) -> None:
        if notify is None:
            _write_ready(cfg, prov, ports, {})
            return
        notify("ready")
        if fresh is None:
            notify("fresh")
        else:
            fresh.on_fresh(lambda: notify("fresh"))

    tune_gc()  # start-up is over
    try:
        if socks is None:
            asyncio.run(serve_apps(listeners, on_ready=ready))
        else:
            from safehold.records.workers import worker_listeners

            own = worker_listeners(cfg.host, socks)
            lst = [Listener(app, host, port, c, sock=sk)
                   for (app, host, port, c), sk in zip(listeners, own, strict=True)]
            asyncio.run(serve(lst, on_ready=ready))
    finally:
        audit = native.state.records.repo.audit
        if audit is not None:  # a clean stop loses no read entry
            try:
                audit.flush()
            except SafeholdError as e:
                log.error("read audit: the last buffered entries could not be written: %s", e)
        store.close()
    return 0


# --- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m safehold.records.server --config FILE``; exit 0 on a clean stop, 2 when the
    broker refuses this workload (no keys: it never serves), 1 on other errors."""
    ap = argparse.ArgumentParser(prog="safehold-records", description="Safehold records service")
    ap.add_argument("--config", help="TOML configuration file (measured as part of the workload)")
    ap.add_argument(EXIT_WITH_PARENT, type=int, metavar="PID",
                    help="stop (gracefully, as on SIGTERM) once the parent PID is gone (`safehold up`)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = ServiceConfig.load(args.config)
        return run(cfg, args.config, parent=args.exit_with_parent)
    except NoKeysError as e:
        log.error("records service refused to start: %s", e)
        return 2
    except SafeholdError as e:
        log.error("records service stopped: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
