"""The contact discovery process: receive the secret, load the registry, then listen.

Two ways to run it:

* **attested** (what ``safehold up`` does): ``python -m safehold.discovery.server --config FILE
  --data-dir TEE_DIR --broker-url URL --broker-ca CA.pem [--store-url U] [--port P]
  [--ready-file F]`` — the process attests to the pinned key broker as workload ``name`` and
  receives the keyset ``discovery-keyset`` (the 32-byte discovery secret is HKDF of it, purpose
  ``discovery/secret``) and the owner's access secret ``discovery-access`` (manifest roles
  ``register`` → register + query, ``query`` → query); it then serves RA-TLS (TLS 1.3, its key
  generated in memory, Evidence in the certificate);
* **development**: the 32-byte secret written to **standard input** as 64 hex digits (a pipe
  from the parent; never argv, environment or a file), plain HTTP on loopback only, the access
  list from the configuration.

Configuration (TOML, measured with the workload): ``name`` (the manifest workload, default
``discovery``), ``broker_ca_sha256`` (the pinned broker), ``host``, ``port`` (0 = any free
port), ``store_url`` (``sqlite:///…`` or ``postgresql://…``), ``limit``, ``period``,
``max_evaluations``, ``ready_file`` (JSON ``{"url", "port", "pid", "measurement"}`` written
once the socket listens) and ``[access."<sha256 hex of a token>"]`` tables with ``name`` and
``roles`` (``query``, ``register``). ``--store-url``, ``--port`` and ``--ready-file`` override
the file's values (run-time plumbing, not measured; the store is untrusted).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import uvicorn

from safehold.discovery.core import DiscoveryService
from safehold.discovery.errors import DiscoveryConfigError
from safehold.discovery.http import create_app, parse_access
from safehold.discovery.keys import SECRET_SIZE, DiscoveryKeys
from safehold.errors import SafeholdError
from safehold.fsutil import read_toml
from safehold.netaddr import is_loopback
from safehold.procutil import EXIT_WITH_PARENT, exit_with_parent
from safehold.runtime import exit_status, listen_socket, simulated_ratls_context, write_ready_file
from safehold.store import open_store

log = logging.getLogger("safehold.discovery")


@dataclass
class ServerConfig:
    """Discovery server settings (TOML keys = attribute names); see the module docstring."""

    store_url: str = ""
    name: str = "discovery"
    broker_ca_sha256: str = ""
    host: str = "127.0.0.1"
    port: int = 8720
    limit: int = 1000
    period: int = 86400
    max_evaluations: int | None = None
    ready_file: str = ""
    access: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, attested: bool = False,
             store_url: str | None = None) -> ServerConfig:
        """Read and check the TOML file.

        Args:
            attested: the process serves RA-TLS (any host allowed); otherwise plain HTTP on
                loopback only.
            store_url: run-time store URL, overriding the file's.

        Raises:
            DiscoveryConfigError: unreadable, unknown keys, wrong types, no store, a
                non-loopback host without RA-TLS, or a bad access list.
        """
        data = read_toml(path, known={f.name for f in fields(cls)}, error=DiscoveryConfigError,
                         what="discovery config")
        cfg = cls(**data)
        if store_url:
            cfg.store_url = store_url
        for name in ("port", "limit", "period"):
            if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool):
                raise DiscoveryConfigError(f"{name} must be an integer")
        if not cfg.store_url:
            raise DiscoveryConfigError("store_url is required")
        if not attested and not is_loopback(cfg.host):
            raise DiscoveryConfigError(
                f"host {cfg.host!r} is not loopback: until RA-TLS is wired in, discovery serves "
                "plain HTTP and only on loopback")
        parse_access(cfg.access)
        return cfg


def read_secret(stream: Any) -> bytes:
    """The discovery secret from a text stream: 64 hex digits on the first line.

    Raises:
        DiscoveryConfigError: anything else (the message never contains the input).
    """
    line = stream.readline(200).strip()
    try:
        secret = bytes.fromhex(line)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_SIZE:
        raise DiscoveryConfigError(f"standard input must carry the {SECRET_SIZE}-byte discovery "
                                   "secret as hex digits on one line")
    return secret


def secret_from_broker(cfg: ServerConfig, *, config_path: str, broker_url: str, broker_ca: str,
                       data_dir: str) -> tuple[bytes, dict[str, Any]]:
    """Attest to the pinned broker and receive ``(discovery secret, access list)`` (module
    docstring, "attested").

    Raises:
        NoKeysError: the broker refused this workload. BrokerIdentityError: not the pinned
            broker. BrokerError: unreachable or a resource missing.
    """
    from safehold.client.workload import access_by_token, derive_secret, fetch_workload_keys

    prov = fetch_workload_keys(
        workload=cfg.name, broker_url=broker_url, broker_ca_file=broker_ca,
        broker_ca_sha256=cfg.broker_ca_sha256, tee_dir=data_dir, config_files=[config_path],
        resources=["default/keyset/discovery-keyset", "default/access/discovery-access"])
    access = access_by_token(prov.access["discovery-access"],
                             {"register": ["register", "query"], "query": ["query"]})
    return derive_secret(prov.keysets["discovery-keyset"], "discovery/secret"), access


def build(cfg: ServerConfig, secret: bytes, access: dict[str, Any] | None = None
          ) -> tuple[Any, DiscoveryService]:
    """Open the store, derive the keys, load the registry; returns ``(asgi app, service)``.
    ``access`` (token access list) replaces the configuration's when given."""
    store = open_store(cfg.store_url)
    service = DiscoveryService(store, DiscoveryKeys.from_secret(secret), limit=cfg.limit,
                               period=cfg.period, max_evaluations=cfg.max_evaluations)
    count = service.load()
    log.info("discovery registry loaded: %d registrations", count)
    return create_app(service, parse_access(cfg.access if access is None else access)), service


def _ratls_context(cfg: ServerConfig, data_dir: str, config_path: str) -> tuple[Any, str]:
    ips = (cfg.host,) if cfg.host[:1].isdigit() or ":" in cfg.host else ()
    return simulated_ratls_context(data_dir, [config_path], common_name=f"safehold {cfg.name}",
                                   ip_addresses=ips)


def serve(cfg: ServerConfig, secret: bytes, *, access: dict[str, Any] | None = None,
          data_dir: str | None = None, config_path: str = "") -> None:
    """Build and serve until SIGINT/SIGTERM: RA-TLS with ``data_dir`` (the simulated TEE's key
    directory), plain HTTP on loopback without."""
    ctx, measurement = _ratls_context(cfg, data_dir, config_path) if data_dir else (None, "")
    if ctx is None:
        log.warning("discovery: PLAIN HTTP on loopback, NOT attested (development only)")
    app, _ = build(cfg, secret, access)
    sock = listen_socket(cfg.host, cfg.port, backlog=128)
    if cfg.ready_file:
        write_ready_file(cfg.ready_file, host=cfg.host, port=sock.getsockname()[1], tls=ctx is not None,
                         name=cfg.name, measurement=measurement)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False, lifespan="off",
        ssl_context_factory=(lambda _c, _d: ctx) if ctx is not None else None))
    asyncio.run(server.serve(sockets=[sock]))


def main(argv: list[str] | None = None) -> int:
    """Process entry point; errors are one line on stderr and exit 1."""
    ap = argparse.ArgumentParser(prog="python -m safehold.discovery.server")
    ap.add_argument("--config", required=True, help="measured TOML configuration")
    ap.add_argument("--data-dir", help="simulated TEE key directory: attest and serve RA-TLS")
    ap.add_argument("--broker-url", help="receive the secret and access list from this key broker "
                    "(needs --data-dir and --broker-ca) instead of standard input")
    ap.add_argument("--broker-ca", help="the broker's workload CA (PEM; checked against the measured pin)")
    ap.add_argument("--store-url", help="store URL (overrides the configuration's; untrusted)")
    ap.add_argument("--port", type=int, help="listen port (overrides the configuration's)")
    ap.add_argument("--ready-file", help="ready file (overrides the configuration's)")
    ap.add_argument(EXIT_WITH_PARENT, type=int, metavar="PID",
                    help="stop (gracefully, as on SIGTERM) once the parent PID is gone (`safehold up`)")
    args = ap.parse_args(argv)
    exit_with_parent(args.exit_with_parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = ServerConfig.load(args.config, attested=bool(args.data_dir), store_url=args.store_url)
        if args.port is not None:
            cfg.port = args.port
        if args.ready_file:
            cfg.ready_file = args.ready_file
        access = None
        if args.broker_url:
            if not args.data_dir or not args.broker_ca:
                raise DiscoveryConfigError("--broker-url needs --data-dir (the TEE) and --broker-ca")
            secret, access = secret_from_broker(cfg, config_path=args.config, broker_url=args.broker_url,
                                                broker_ca=args.broker_ca, data_dir=args.data_dir)
        else:
            secret = read_secret(sys.stdin)
        serve(cfg, secret, access=access, data_dir=args.data_dir, config_path=args.config)
    except SafeholdError as e:
        return exit_status("discovery", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
