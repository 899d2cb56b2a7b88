"""An anchor member process: attest, generate the TLS key in memory, catch up from peers, serve.

``python -m safehold.freshness.anchor.server --config member.toml --data-dir DIR --port P
[--client-ca ca.pem] [--ready-file F]``

Measured configuration (TOML; identical for every member, so all members share one Reference
Value and a member can check its peers against its own measurement):

.. code-block:: toml

    members = ["https://127.0.0.1:7601", "https://127.0.0.1:7602", "https://127.0.0.1:7603"]
    client_ca_sha256 = "<SHA-256 hex of the broker workload CA certificate (DER)>"
    owner_public_key = \"\"\"-----BEGIN PUBLIC KEY-----...\"\"\"
    host = "127.0.0.1"
    [peer_policy]            # appraisal policy for peers (AppraisalPolicy keys); without
    allow_simulated = true   # reference_values, the member's own measurement is the one accepted
    simulated_root = "/path/to/simulated-tee/root-ca.pem"

Run-time plumbing (argv, not measured): the data directory of the simulated TEE keys, the port,
the broker CA file (must match ``client_ca_sha256``), the ready file. Nothing is written to disk
but the ready file: ledger heads, the statement key and the TLS key live in memory only (the TLS
key passes through ``safehold.ratls.server.server_ssl_context``).

Start-up: Attester → RA-TLS identity (key generated here) → core (not ready) → listen → a thread
polls every peer's ``/v1/anchor/state`` over RA-TLS (peers verified against the peer policy)
until the core can become ready (``anchor/core.py``). Until then it answers 503 ``not-ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import ssl
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.errors import ConfigError
from safehold.freshness.anchor.client import MemberLink, memory_client_context
from safehold.freshness.anchor.core import MemberCore, PeerState
from safehold.freshness.anchor.http import create_app
from safehold.freshness.anchor.statements import load_owner_public_key
from safehold.freshness.anchor.wire import state_from

__all__ = ["MemberConfig", "main", "peer_states"]

log = logging.getLogger("safehold.freshness.anchor")


@dataclass
class MemberConfig:
    """The measured member configuration (module docstring)."""

    members: list[str]
    client_ca_sha256: str
    owner_public_key: str
    host: str = "127.0.0.1"
    peer_policy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MemberConfig:
        """Read and check the TOML file.

        Raises:
            ConfigError: unreadable, unknown keys, no members, a malformed pin or owner key.
        """
        try:
            data = tomllib.loads(Path(path).read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"anchor member config {path}: {e}") from None
        unknown = set(data) - {"members", "client_ca_sha256", "owner_public_key", "host", "peer_policy"}
        if unknown:
            raise ConfigError(f"anchor member config: unknown keys {sorted(unknown)}")
        try:
            cfg = cls(**data)
        except TypeError as e:
            raise ConfigError(f"anchor member config: {e}") from None
        if not cfg.members or not all(isinstance(m, str) and m.startswith("https://") for m in cfg.members):
            raise ConfigError("anchor member config: members must list the https:// URLs of all members")
        pin = str(cfg.client_ca_sha256).lower()
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise ConfigError("anchor member config: client_ca_sha256 must be 64 hex digits (SHA-256 of "
                              "the broker workload CA certificate, DER)")
        cfg.client_ca_sha256 = pin
        load_owner_public_key(cfg.owner_public_key)
        return cfg

    def policy(self, own_measurement: bytes) -> AppraisalPolicy:
        """The peers' appraisal policy; the member's own measurement unless pinned otherwise."""
        d = dict(self.peer_policy)
        rv = dict(d.get("reference_values", {}))
        if not rv.get("measurements") and not rv.get("signers"):
            rv["measurements"] = [own_measurement.hex()]
        d["reference_values"] = rv
        d.setdefault("name", "anchor-peers")
        return AppraisalPolicy.from_dict(d)


def client_ca(path: str, pin: str) -> str:
    """The broker CA PEM from ``path`` if its DER SHA-256 equals ``pin``. Raises ConfigError."""
    try:
        pem = Path(path).read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except (OSError, ValueError) as e:
        raise ConfigError(f"client CA {path}: {e}") from None
    got = hashlib.sha256(der).hexdigest()
    if got != pin:
        raise ConfigError(f"client CA {path}: SHA-256 {got} is not the pinned {pin}")
    return pem.decode("ascii")


def peer_states(links: list[MemberLink]) -> list[PeerState | None]:
    """Every peer's state over RA-TLS (None where unreachable or refused)."""
    out: list[PeerState | None] = []
    for link in links:
        try:
            link.send("GET", "/v1/anchor/state")
            _, obj = link.receive()
            out.append(state_from(obj))
        except Exception as e:  # noqa: BLE001 - an unreachable peer counts as no answer
            log.info("anchor peer %s: %s", link.url, e)
            link.close()
            out.append(None)
    return out


def _catch_up(core: MemberCore, links: list[MemberLink], stop: threading.Event) -> None:
    while not stop.is_set() and not core.catch_up(peer_states(links)):
        stop.wait(0.3)
    for link in links:
        link.close()
    log.info("anchor member %s ready (lost mode: %s)", core.member.hex(), core.lost_mode)


def _peer_cert_protocol() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class PeerCertProtocol(HttpToolsProtocol):
        """Exposes the verified client certificate (DER) as ``scope["state"]["tls_peer_cert"]``."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            obj = transport.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            self.app_state = {**self.app_state, "tls_peer_cert": der}

    return PeerCertProtocol


def main(argv: list[str] | None = None) -> int:
    """Run one anchor member until SIGTERM/SIGINT."""
    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.fsutil import write_atomic
    from safehold.procutil import EXIT_WITH_PARENT, exit_with_parent
    from safehold.ratls.cert import create_identity
    from safehold.ratls.server import server_ssl_context

    ap = argparse.ArgumentParser(prog="safehold-anchor-member", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="measured member configuration (TOML)")
    ap.add_argument("--data-dir", required=True, help="simulated TEE key directory")
    ap.add_argument("--port", type=int, required=True, help="listen port (0 = any free port)")
    ap.add_argument("--client-ca", required=True, help="broker workload CA (PEM), checked against the pin")
    ap.add_argument("--ready-file", help="write {port, pid, member, measurement} here once listening")
    ap.add_argument(EXIT_WITH_PARENT, type=int, metavar="PID",
                    help="stop (gracefully, as on SIGTERM) once the parent PID is gone (`safehold up`)")
    args = ap.parse_args(argv)
    exit_with_parent(args.exit_with_parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cfg = MemberConfig.load(args.config)
    attester = SimulatedAttester(args.data_dir, workload_files=[args.config])
    identity = create_identity(attester, common_name="safehold anchor member",
                               ip_addresses=(cfg.host,) if cfg.host[0].isdigit() else ())
    ctx = server_ssl_context(identity)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # client certificates never travel in clear
    ctx.load_verify_locations(cadata=client_ca(args.client_ca, cfg.client_ca_sha256))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # reads are open; writes check for a certificate
    core = MemberCore(len(cfg.members), load_owner_public_key(cfg.owner_public_key),
                      tls_key=identity.private_key)
    verifier = Verifier(cfg.policy(attester.measurement.digest))
    peer_ctx = memory_client_context(None, None)
    links = [MemberLink(u, verifier, peer_ctx, 2.0) for u in cfg.members]
    stop = threading.Event()
    uv = uvicorn.Config(create_app(core), host=cfg.host, port=args.port, http=_peer_cert_protocol(),
                        lifespan="off", log_level="warning", access_log=False, server_header=False,
                        timeout_keep_alive=60, ssl_context_factory=lambda _c, _d: ctx, ssl_certfile="unused")
    server = uvicorn.Server(uv)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                raise ConfigError("anchor member: listener failed to start (port in use?)")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        if args.ready_file:
            write_atomic(args.ready_file, json.dumps({
                "port": port, "pid": os.getpid(), "member": core.member.hex(),
                "measurement": attester.measurement.hex()}).encode(), mode=0o644)
        threading.Thread(target=_catch_up, args=(core, links, stop), daemon=True).start()
        await task

    try:
        import uvloop  # C event loop and TLS: a third less CPU per request than asyncio's

        uvloop.run(serve())
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
