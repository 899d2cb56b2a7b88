"""The contact discovery process: load the registry, then listen on loopback.

Run as ``python -m safehold.discovery.server --config FILE`` with the 32-byte discovery secret
written to **standard input** as 64 hex digits (a pipe from the parent; never argv, environment
or a file). In this phase the caller supplies the secret; the key broker will release it to the
attested workload later, and RA-TLS will replace the plain loopback listener (both listed in
docs/discovery.md).

Configuration (TOML, measured with the workload): ``host`` (loopback only, until RA-TLS),
``port`` (0 = any free port), ``store_url`` (``sqlite:///…`` or ``postgresql://…``), ``limit``,
``period``, ``max_evaluations``, ``ready_file`` (JSON ``{"url", "port", "pid"}`` written once
the socket listens) and ``[access."<sha256 hex of a token>"]`` tables with ``name`` and
``roles`` (``query``, ``register``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import uvicorn

from safehold.discovery.core import DiscoveryService
from safehold.discovery.errors import DiscoveryConfigError
from safehold.discovery.http import create_app, parse_access
from safehold.discovery.keys import SECRET_SIZE, DiscoveryKeys
from safehold.errors import SafeholdError
from safehold.fsutil import write_atomic
from safehold.store import open_store

log = logging.getLogger("safehold.discovery")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """Discovery server settings (TOML keys = attribute names); see the module docstring."""

    store_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8720
    limit: int = 1000
    period: int = 86400
    max_evaluations: int | None = None
    ready_file: str = ""
    access: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read and check the TOML file.

        Raises:
            DiscoveryConfigError: unreadable, unknown keys, wrong types, no store, a
                non-loopback host, or a bad access list.
        """
        try:
            data = tomllib.loads(Path(path).read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DiscoveryConfigError(f"discovery config {path}: {e}") from None
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DiscoveryConfigError(f"discovery config: unknown keys {unknown}")
        cfg = cls(**data)
        for name in ("port", "limit", "period"):
            if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool):
                raise DiscoveryConfigError(f"{name} must be an integer")
        if not cfg.store_url:
            raise DiscoveryConfigError("store_url is required")
        if not _is_loopback(cfg.host):
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


def build(cfg: ServerConfig, secret: bytes) -> tuple[Any, DiscoveryService]:
    """Open the store, derive the keys, load the registry; returns ``(asgi app, service)``."""
    store = open_store(cfg.store_url)
    service = DiscoveryService(store, DiscoveryKeys.from_secret(secret), limit=cfg.limit,
                               period=cfg.period, max_evaluations=cfg.max_evaluations)
    count = service.load()
    log.info("discovery registry loaded: %d registrations", count)
    return create_app(service, parse_access(cfg.access)), service


def serve(cfg: ServerConfig, secret: bytes) -> None:
    """Build and serve until SIGINT/SIGTERM."""
    app, _ = build(cfg, secret)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    if cfg.ready_file:
        url = f"http://{cfg.host}:{port}"
        write_atomic(cfg.ready_file, json.dumps({"url": url, "port": port, "pid": os.getpid()}).encode())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    asyncio.run(server.serve(sockets=[sock]))


def main(argv: list[str] | None = None) -> int:
    """Process entry point; errors are one line on stderr and exit 1."""
    ap = argparse.ArgumentParser(prog="python -m safehold.discovery.server")
    ap.add_argument("--config", required=True, help="measured TOML configuration")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = ServerConfig.load(args.config)
        serve(cfg, read_secret(sys.stdin))
    except SafeholdError as e:
        print(f"discovery: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
