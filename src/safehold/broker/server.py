"""Start the key broker: open the store, unseal (or recover), install the first manifest, serve
HTTPS on uvicorn. ``python -m safehold.broker.server --data-dir DIR [--host H] [--port P]`` is
the broker's own process entry point (the measured launch of the pods names this module;
``safehold broker serve`` is the same for people).

TLS: in ready mode the broker's server certificate is issued by its own workload CA (clients pin
``<data-dir>/ca.pem`` or ``GET /ca``); in recovery mode the CA key is sealed, so a self-signed
ephemeral certificate is used and the recovery client relies on the broker's Evidence instead.
The private key is handed to OpenSSL through an anonymous in-memory file (``memfd``), never
written to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safehold.broker.core import Broker, BrokerConfig
from safehold.broker.errors import PermissionDeniedError
from safehold.broker.manifest import load_manifest
from safehold.broker.state import BrokerState, SealingIdentity, simulated_sealing_identity
from safehold.errors import ConfigError, ManifestError
from safehold.ratls.memkey import load_chain_from_memory

log = logging.getLogger("safehold.broker")


def open_broker(data_dir: str | os.PathLike[str], store_url: str | None = None, *,
                manifest_path: str | os.PathLike[str] | None = None,
                config: BrokerConfig | None = None, measurement: bytes | None = None,
                repair: bool = True) -> Broker:
    """Open (or create) the broker's state and return the :class:`Broker`.

    Args:
        data_dir: broker data directory (simulated TEE keys, default SQLite store, ``ca.pem``).
        store_url: ``safehold.store.open_store`` URL; default ``<data_dir>/broker.db``.
        manifest_path: a manifest to install if none is set yet; if one is set and the file is
            neither it nor an earlier stored version, start-up fails (updates must be signed).
        config: run-time options.
        measurement: SIMULATED TEE only: unseal as a broker with this measurement instead of
            this process's closure (a test reading the state a broker process wrote; that
            process's value is ``broker_measurement`` in its ``/status``).
        repair: rewrite a missing/replaced recovery record (loudly); False refuses instead.

    Raises:
        ManifestError: invalid manifest, or it differs from the stored one.
        StateIntegrityError: a state row is missing, edited or rolled back (names the row).
        StoreError, SealingError, AttestationError: as raised underneath.
    """
    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.store import open_store

    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(store_url or str(d / "broker.db"))
    attester = SimulatedAttester(d)
    identity = simulated_sealing_identity(attester)
    if measurement is not None:
        identity = SealingIdentity(identity.secret, measurement)
    state = BrokerState.open(store, identity)
    cfg = config or BrokerConfig()
    cfg.data_dir = d
    try:
        broker = Broker(state, attester, cfg, repair=repair)
    except BaseException:
        store.close()
        raise
    if broker.mode == "recovery":
        log.error("RECOVERY MODE: %s", state.reason)
        return broker
    if state.created:  # the one moment the fingerprint comes from a freshly made key (docs/broker.md)
        log.warning("FIRST START: master-key fingerprint %s (broker id %s). Recovery-key holders: "
                    "write it down; `safehold broker recover --expect-fingerprint` needs it.",
                    state.master_fingerprint(), broker.broker_id)
    if manifest_path is not None:
        install_manifest_file(broker, manifest_path)
    return broker


def install_manifest_file(broker: Broker, manifest_path: str | os.PathLike[str]) -> None:
    """Install the manifest file if none is set yet; accept it if it is a stored version.

    Raises:
        ManifestError: unreadable, invalid, or it differs from the stored manifest.
    """
    p = Path(manifest_path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {p}: {e.strerror}") from None
    m = load_manifest(data, filename=str(p), base_dir=p.resolve().parent)
    try:
        broker.set_manifest(m.raw, source=f"file:{p.name}")
    except PermissionDeniedError:  # a manifest is already set
        older = broker.stored_version_of(m.digest)
        if older is not None:  # e.g. `safehold up`'s file after a signed update: nothing changes
            log.warning("%s is manifest version %d, superseded by the signed version %d: serving "
                        "version %d", p, older, broker.manifest_version, broker.manifest_version)
            return
        raise ManifestError(
            f"{p}: differs from the stored manifest version {broker.manifest_version}; "
            "use `safehold broker manifest update` (signed by an owner)"
        ) from None


# --- freshness (safehold.broker.fresh) ------------------------------------------------------


def open_fresh_broker(data_dir: str | os.PathLike[str], store_url: str | None, anchor_file: str, *,
                      manifest_path: str | os.PathLike[str] | None = None,
                      config: BrokerConfig | None = None) -> Any:
    """Open the broker with its state under freshness (:mod:`safehold.broker.fresh`): returns
    ``(FreshnessGate, workload CA)``. The gate holds the Broker once the state is fresh (the
    manifest file is installed then); until then the broker releases nothing.

    Raises:
        ConfigError: bad anchor settings. SealingError: the state is sealed (recover first,
            without ``--anchor``). StoreError: as the store.
    """
    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.broker.fresh import AnchorSettings, FreshnessGate, open_fresh_store
    from safehold.store import open_store

    settings = AnchorSettings.load(anchor_file)
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(store_url or str(d / "broker.db"))
    attester = SimulatedAttester(d)
    identity = simulated_sealing_identity(attester)
    cfg = config or BrokerConfig()
    cfg.data_dir = d
    try:
        fs, ca = open_fresh_store(store, identity, settings)
    except BaseException:
        store.close()
        raise

    def build() -> Broker:
        b = Broker(BrokerState.open(fs, identity), attester, cfg)
        if manifest_path is not None:
            install_manifest_file(b, manifest_path)
        return b

    gate = FreshnessGate(fs, build)
    gate.retry()
    return gate, ca


def _server_cert(broker: Broker, names: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    if broker.mode == "ready" and broker.ca is not None:
        dns = tuple(str(s.value) for s in sans if isinstance(s, x509.DNSName))
        ips = tuple(str(s.value) for s in sans if isinstance(s, x509.IPAddress))
        cert = broker.ca.issue(key.public_key(), common_name="safehold-broker", dns_names=dns,
                               ip_addresses=ips, validity_days=30)
    else:
        now = datetime.now(UTC) - timedelta(minutes=5)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "safehold-broker (recovery mode)")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


def ssl_context(broker: Broker, names: list[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context with a fresh key and a certificate for ``names``.

    After a recovery the context switches from the self-signed recovery certificate to one from
    the workload CA (new handshakes use it).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, broker, names)
    broker.on_ready.append(lambda: _load_chain(ctx, broker, names))
    return ctx


def _load_chain(ctx: ssl.SSLContext, broker: Broker, names: list[str]) -> None:
    if broker.mode == "ready" and broker.ca is not None:
        # Optional client certificates from the workload CA: admin users may authenticate with
        # one whose public key the manifest lists (see Admin.authorize).
        ctx.load_verify_locations(cadata=broker.ca.cert_pem())
        ctx.verify_mode = ssl.CERT_OPTIONAL
    key_pem, cert_pem = _server_cert(broker, names)
    load_chain_from_memory(ctx, cert_pem, key_pem)  # a memfd, never a file (no fallback)


def _client_cert_protocol() -> type:
    """uvicorn's h11 protocol plus the ASGI TLS extension ``client_cert_chain`` (PEM list)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ClientCertProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
            super().connection_made(transport)
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if der:
                pem = ssl.DER_cert_to_PEM_cert(der)
                inner = self.app

                async def app(scope: Any, receive: Any, send: Any) -> None:
                    scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
                    await inner(scope, receive, send)

                self.app = app

    return ClientCertProtocol


def serve(broker: Broker, *, host: str = "127.0.0.1", port: int = 8443, tls: bool = True,
          tls_names: list[str] | None = None, max_body: int | None = None,
          static_value: bytes | None = None) -> None:
    """Serve ``broker`` until interrupted (SIGINT/SIGTERM stop uvicorn cleanly)."""
    import uvicorn

    from safehold.broker.http import DEFAULT_MAX_BODY, create_app

    app = create_app(broker, max_body=max_body or DEFAULT_MAX_BODY, static_value=static_value)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=30, http=_client_cert_protocol() if tls else "auto")
    config.load()
    if tls:
        names = ["localhost", "127.0.0.1", host, *(tls_names or [])]
        config.ssl = ssl_context(broker, names)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


def serve_fresh(gate: Any, ca: Any, *, host: str = "127.0.0.1", port: int = 8443,
                tls_names: list[str] | None = None, max_body: int | None = None) -> None:
    """Serve a broker whose state is under freshness (TLS from its workload CA) until
    interrupted; :func:`safehold.broker.http.create_gated_app` routes requests."""
    import types

    import uvicorn

    from safehold.broker.http import DEFAULT_MAX_BODY, create_gated_app

    app = create_gated_app(gate, ca, max_body=max_body or DEFAULT_MAX_BODY)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=30, http=_client_cert_protocol())
    config.load()
    names = ["localhost", "127.0.0.1", host, *(tls_names or [])]
    # the CA is known before the state is fresh: the same certificate in both phases
    config.ssl = ssl_context(types.SimpleNamespace(mode="ready", ca=ca, on_ready=[]), names)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


def main(argv: list[str] | None = None) -> int:
    """Process entry point: ``--data-dir`` (required), ``--manifest``, ``--host``, ``--port``,
    ``--nonce-ttl``, ``--token-ttl``, ``--max-body``, ``--tls-name`` (repeatable), ``--no-tls``,
    ``--anchor`` (freshness anchor settings: the state is a freshness ledger, docs/freshness.md;
    without it freshness is off, loudly).
    The store URL comes from ``SAFEHOLD_BROKER_STORE_URL`` (default SQLite in the data
    directory) and extra TLS names from ``SAFEHOLD_BROKER_TLS_NAMES`` (space-separated): the
    pods' DSN is a Secret, never an argument (argv is visible on the host).

    Returns the exit status (0 after a clean stop). Raises as :func:`open_broker`.
    """
    ap = argparse.ArgumentParser(prog="safehold-broker", description="Safehold key broker (KBS)")
    ap.add_argument("--data-dir", required=True, help="broker data directory")
    ap.add_argument("--manifest", default=None, help="manifest (TOML/JSON) to install if none is set yet")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", default=8443, type=int)
    ap.add_argument("--nonce-ttl", default=300, type=int, help="challenge lifetime, s")
    ap.add_argument("--token-ttl", default=600, type=int, help="EAR token lifetime, s")
    ap.add_argument("--max-body", default=1024 * 1024, type=int, help="body limit, bytes")
    ap.add_argument("--tls-name", action="append", default=[], help="extra DNS name / IP (repeatable)")
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP (development only)")
    ap.add_argument("--anchor", default=None, help="freshness anchor settings (TOML)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [*args.tls_name, *os.environ.get("SAFEHOLD_BROKER_TLS_NAMES", "").split()]
    if args.anchor:
        if args.no_tls:
            raise ConfigError("--anchor serves TLS only (no --no-tls)")
        gate, ca = open_fresh_broker(args.data_dir, os.environ.get("SAFEHOLD_BROKER_STORE_URL") or None,
                                     args.anchor, manifest_path=args.manifest,
                                     config=BrokerConfig(nonce_ttl=args.nonce_ttl, token_ttl=args.token_ttl))
        print(json.dumps({"listening": f"https://{args.host}:{args.port}", "fresh": gate.broker is not None}),
              file=sys.stderr)
        serve_fresh(gate, ca, host=args.host, port=args.port, tls_names=names, max_body=args.max_body)
        return 0
    logging.getLogger("safehold.broker").warning(
        "FRESHNESS OFF (no --anchor): a restored or rolled-back broker state is not detected")
    b = open_broker(args.data_dir, os.environ.get("SAFEHOLD_BROKER_STORE_URL") or None,
                    manifest_path=args.manifest,
                    config=BrokerConfig(nonce_ttl=args.nonce_ttl, token_ttl=args.token_ttl))
    scheme = "http" if args.no_tls else "https"
    print(json.dumps({"listening": f"{scheme}://{args.host}:{args.port}", **b.status()}), file=sys.stderr)
    serve(b, host=args.host, port=args.port, tls=not args.no_tls, tls_names=names, max_body=args.max_body)
    return 0


__all__ = ["install_manifest_file", "main", "open_broker", "open_fresh_broker", "serve", "serve_fresh",
           "ssl_context"]


if __name__ == "__main__":
    sys.exit(main())
