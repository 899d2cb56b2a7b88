"""The SVR server process: attest, open the verified store, serve RA-TLS.

``python -m safehold.svr.server --config svr.toml --store-url URL --port P
[--data-dir DIR | --insecure-plain-http] [--ready-file F]``

**Secrets on standard input** (a pipe from the parent; never argv, environment or a file): one
JSON object, then EOF::

    {"secret": "<64 hex digits>",                 # the server's 32-byte secret (keys.py)
     "access": {"<sha256 hex of a token>": {"name": "...", "roles": ["backup"]}, ...},
     "anchor_client_cert": "<PEM>", "anchor_client_key": "<PEM>"}   # mutual TLS to the anchor

That is how ``LocalSvr`` (tests, benchmark) runs it. With ``--broker-url URL --broker-ca
CA.pem`` (what ``safehold up`` runs, needs ``--data-dir``) the process instead attests to the
key broker pinned by ``broker_ca_sha256`` and receives them from it
(:func:`secrets_from_broker`).

Measured configuration (TOML, every key below; unknown keys refused):

.. code-block:: toml

    name = "svr-0"             # ledger of the anchor = CN of the anchor client certificate
    group_id = 1234            # the SVR group's u64 id (clients salt PIN hashes with it)
    host = "127.0.0.1"
    anchor_members = ["https://127.0.0.1:7601", "https://127.0.0.1:7602", "https://127.0.0.1:7603"]
    wait_timeout = 5.0         # seconds a commit waits for the anchor
    broker_ca_sha256 = "…"     # the pinned broker (broker mode only; SHA-256 of its CA's DER)
    audit_interval = 300.0     # seconds between background freshness audits of every row (0 = off)
    [anchor_policy]            # appraisal policy of the anchor members (AppraisalPolicy keys)
    allow_simulated = true
    ...

Run-time plumbing (argv, not measured): the store URL (the database is untrusted: the
FreshStore and the engine's AEAD judge what it returns), the port, the simulated TEE's data
directory, the ready file (JSON ``{url, port, pid, name, measurement}``).

With ``--data-dir`` the server attests (simulated TEE), generates its TLS key in memory and
serves RA-TLS; ``--insecure-plain-http`` serves plain HTTP on loopback instead — for
development only, loudly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

import uvicorn
from cryptography import x509
from cryptography.x509.oid import NameOID

from safehold.errors import SafeholdError
from safehold.fsutil import read_toml
from safehold.netaddr import is_loopback
from safehold.procutil import EXIT_WITH_PARENT, exit_with_parent
from safehold.runtime import exit_status, listen_socket, simulated_ratls_context, write_ready_file
from safehold.svr.core import SvrService
from safehold.svr.errors import SvrConfigError
from safehold.svr.http import Principal, create_app, parse_access
from safehold.svr.keys import SECRET_SIZE, SvrKeys

__all__ = ["ServerConfig", "Secrets", "build", "main", "read_secrets", "secrets_from_broker"]

log = logging.getLogger("safehold.svr")
#: Largest standard-input document accepted (the access list dominates).
MAX_STDIN = 1 << 20


@dataclass
class ServerConfig:
    """The measured configuration (module docstring)."""

    name: str
    group_id: int
    anchor_members: list[str]
    anchor_policy: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    wait_timeout: float = 5.0
    broker_ca_sha256: str = ""
    audit_interval: float = 300.0

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read and check the TOML file.

        Raises:
            SvrConfigError: unreadable, unknown or missing keys, wrong types, no anchor members,
                an invalid anchor policy.
        """
        data = read_toml(path, known={f.name for f in fields(cls)}, error=SvrConfigError, what="svr config")
        try:
            cfg = cls(**data)
        except TypeError as e:
            raise SvrConfigError(f"svr config: {e}") from None
        gid = cfg.group_id
        if isinstance(gid, bool) or not isinstance(gid, int) or not 0 <= gid < 2**64:
            raise SvrConfigError("svr config: group_id must be an unsigned 64-bit integer")
        if not cfg.anchor_members or not all(isinstance(m, str) and m.startswith("https://")
                                             for m in cfg.anchor_members):
            raise SvrConfigError("svr config: anchor_members must list the anchor members' https:// URLs")
        if not isinstance(cfg.wait_timeout, int | float) or cfg.wait_timeout <= 0:
            raise SvrConfigError("svr config: wait_timeout must be a positive number of seconds")
        if not isinstance(cfg.audit_interval, int | float) or isinstance(cfg.audit_interval, bool) \
                or cfg.audit_interval < 0:
            raise SvrConfigError("svr config: audit_interval must be seconds ≥ 0 (0 = no background audit)")
        cfg.policy()
        return cfg

    def policy(self) -> Any:
        """The anchor members' appraisal policy.

        Raises:
            SvrConfigError: the policy table is invalid.
        """
        from safehold.attestation.policy import AppraisalPolicy

        d = dict(self.anchor_policy)
        d.setdefault("name", "anchor")
        try:
            return AppraisalPolicy.from_dict(d)
        except SafeholdError as e:
            raise SvrConfigError(f"svr config: anchor_policy: {e}") from None


@dataclass(frozen=True)
class Secrets:
    """What the process receives on standard input (``repr`` shows nothing secret)."""

    secret: bytes = field(repr=False)
    access: dict[bytes, Principal] = field(repr=False)
    anchor_cert_pem: bytes = field(repr=False)
    anchor_key_pem: bytes = field(repr=False)


def read_secrets(stream: TextIO) -> Secrets:
    """Parse the standard-input document (module docstring).

    Raises:
        SvrConfigError: not one JSON object with exactly those fields, a secret that is not 64
            hex digits, a bad access list, a certificate or key that is not PEM. Messages never
            quote the input.
    """
    text = stream.read(MAX_STDIN + 1)
    if len(text) > MAX_STDIN:
        raise SvrConfigError("standard input is over 1 MiB")
    try:
        doc = json.loads(text)
    except ValueError:
        raise SvrConfigError("standard input must be one JSON object (secret, access, anchor "
                             "client certificate and key)") from None
    want = {"secret", "access", "anchor_client_cert", "anchor_client_key"}
    if not isinstance(doc, dict) or set(doc) != want:
        raise SvrConfigError(f"standard input must hold exactly the fields {sorted(want)}")
    try:
        secret = bytes.fromhex(doc["secret"]) if isinstance(doc["secret"], str) else b""
    except ValueError:
        secret = b""
    if len(secret) != SECRET_SIZE:
        raise SvrConfigError(f"secret must be {SECRET_SIZE} bytes as hex digits")
    cert, key = doc["anchor_client_cert"], doc["anchor_client_key"]
    if not (isinstance(cert, str) and "BEGIN CERTIFICATE" in cert and isinstance(key, str)
            and "PRIVATE KEY" in key):
        raise SvrConfigError("anchor_client_cert / anchor_client_key must be PEM text")
    return Secrets(secret, parse_access(doc["access"]), cert.encode(), key.encode())


def secrets_from_broker(cfg: ServerConfig, *, config_path: str, broker_url: str, broker_ca: str,
                        data_dir: str) -> Secrets:
    """Receive the secrets from the key broker instead of standard input: attest as workload
    ``cfg.name`` (simulated TEE over the measured configuration), receive the keyset
    ``<name>-keyset`` (the 32-byte server secret is HKDF of it, purpose ``svr/server-secret``),
    the owner's access secret ``svr-access`` (manifest roles ``admin`` → admin, ``backup`` →
    backup) and the anchor client certificate ``<name>-anchor`` (CN = ``<name>``, issued by the
    broker's workload CA to the in-memory TEE key).

    Raises:
        NoKeysError: the broker refused this workload. BrokerIdentityError: not the pinned
            broker. BrokerError: unreachable or a resource missing. SvrConfigError: bad access list.
    """
    from safehold.client.workload import access_by_token, derive_secret, fetch_workload_keys

    prov = fetch_workload_keys(
        workload=cfg.name, broker_url=broker_url, broker_ca_file=broker_ca,
        broker_ca_sha256=cfg.broker_ca_sha256, tee_dir=data_dir, config_files=[config_path],
        resources=[f"default/keyset/{cfg.name}-keyset", "default/access/svr-access"],
        certificate=f"{cfg.name}-anchor")
    access = access_by_token(prov.access["svr-access"], {"admin": ["admin"], "backup": ["backup"]})
    return Secrets(derive_secret(prov.keysets[f"{cfg.name}-keyset"], "svr/server-secret"),
                   parse_access(access), prov.cert_pem, prov.key_pem)


def _certificate_cn(pem: bytes) -> str:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as e:
        raise SvrConfigError(f"anchor client certificate does not load ({e})") from None
    return str(names[0].value) if names else ""


def build(cfg: ServerConfig, secrets: Secrets, store_url: str) -> tuple[Any, SvrService]:
    """Open the anchor client, the store and the service; returns ``(asgi app, service)``.

    Raises:
        SvrConfigError: the anchor certificate's CN is not the server's name (the members would
            refuse every advance).
        StoreError, ConfigError: the store or the anchor client could not be opened.
    """
    from safehold.attestation.verifier import Verifier
    from safehold.freshness.anchor.client import QuorumAnchor
    from safehold.store import open_store

    cn = _certificate_cn(secrets.anchor_cert_pem)
    if cn != cfg.name:
        raise SvrConfigError(f"the anchor client certificate names {cn!r}; the anchor lets it write "
                             f"only its own ledger, so it must name this server {cfg.name!r}")
    anchor = QuorumAnchor(cfg.anchor_members, Verifier(cfg.policy()), client_cert_pem=secrets.anchor_cert_pem,
                          client_key_pem=secrets.anchor_key_pem)
    store = open_store(store_url)
    service = SvrService(store, SvrKeys.from_secret(secrets.secret), name=cfg.name, group_id=cfg.group_id,
                         anchor=anchor, wait_timeout=cfg.wait_timeout)
    service.retry_anchor()
    if cfg.audit_interval > 0:
        service.start_audit(cfg.audit_interval)
    return create_app(service, secrets.access), service


def _ratls_context(cfg: ServerConfig, data_dir: str, config_path: str) -> tuple[ssl.SSLContext, str]:
    ips = (cfg.host,) if cfg.host[:1].isdigit() or ":" in cfg.host else ()
    return simulated_ratls_context(data_dir, [config_path], common_name=f"safehold svr {cfg.name}",
                                   ip_addresses=ips)


def serve(cfg: ServerConfig, secrets: Secrets, *, config_path: str, store_url: str, port: int,
          data_dir: str | None, ready_file: str | None) -> None:
    """Build and serve until SIGINT/SIGTERM."""
    if data_dir is None and not is_loopback(cfg.host):
        raise SvrConfigError(f"host {cfg.host!r} is not loopback: plain HTTP only on loopback")
    ctx, measurement = _ratls_context(cfg, data_dir, config_path) if data_dir else (None, "")
    if ctx is None:
        log.warning("SVR %s: PLAIN HTTP on loopback, NOT attested (development only)", cfg.name)
    app, service = build(cfg, secrets, store_url)
    sock = listen_socket(cfg.host, port, backlog=256)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False, lifespan="off",
        timeout_keep_alive=30, ssl_context_factory=(lambda _c, _d: ctx) if ctx is not None else None))
    if ready_file:
        write_ready_file(ready_file, host=cfg.host, port=sock.getsockname()[1], tls=ctx is not None,
                         name=cfg.name, measurement=measurement, mode=0o644)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    """Process entry point; errors are one line on stderr and exit 1."""
    ap = argparse.ArgumentParser(prog="python -m safehold.svr.server")
    ap.add_argument("--config", required=True, help="measured TOML configuration")
    ap.add_argument("--store-url", required=True, help="sqlite:///… or postgresql://… (untrusted)")
    ap.add_argument("--port", type=int, default=0, help="listen port (0 = any free port)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data-dir", help="simulated TEE key directory: attest and serve RA-TLS")
    mode.add_argument("--insecure-plain-http", action="store_true",
                      help="serve plain HTTP on loopback, not attested (development only)")
    ap.add_argument("--ready-file", help="write {url, port, pid, name, measurement} here once listening")
    ap.add_argument("--broker-url", help="receive the secrets from this key broker (needs --data-dir and "
                    "--broker-ca) instead of standard input")
    ap.add_argument("--broker-ca", help="the broker's workload CA (PEM; checked against the measured pin)")
    ap.add_argument(EXIT_WITH_PARENT, type=int, metavar="PID",
                    help="stop (gracefully, as on SIGTERM) once the parent PID is gone (`safehold up`)")
    args = ap.parse_args(argv)
    exit_with_parent(args.exit_with_parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = ServerConfig.load(args.config)
        if args.broker_url:
            if not args.data_dir or not args.broker_ca:
                raise SvrConfigError("--broker-url needs --data-dir (the TEE) and --broker-ca")
            secrets = secrets_from_broker(cfg, config_path=args.config, broker_url=args.broker_url,
                                          broker_ca=args.broker_ca, data_dir=args.data_dir)
        else:
            secrets = read_secrets(sys.stdin)
        serve(cfg, secrets, config_path=args.config, store_url=args.store_url, port=args.port,
              data_dir=args.data_dir, ready_file=args.ready_file)
    except SafeholdError as e:
        return exit_status("svr", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
