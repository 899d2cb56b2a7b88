"""The VAU process: the E-Rezept VAU (with the E-Rezept Fachdienst routes behind it) and the ePA 3
VAU, served by uvicorn on loopback.

Keys come from the caller's memory, never from a file, argv or the environment: in-process via
:func:`build_app`, or for a separate process through :func:`main`, which reads one CBOR map from
standard input (a pipe from the parent) and prints ``{"port": N}`` once it listens. In a
deployment the parent is the workload launcher that received the VAU private key from the key
broker after attestation (wired in a later phase).

Stdin CBOR map (``python -m safehold.vau.server``):

* ``erp_vau_key`` (PKCS#8 DER, brainpoolP256r1), ``erp_vau_certificate`` (DER), optional
  ``erp_ocsp`` (DER);
* ``idp_keys`` (list of SubjectPublicKeyInfo DER), ``idp_issuer``, optional ``idp_audience``;
* ``store`` (store URL, see :func:`safehold.store.open_store`), ``keyset``
  (``{"keys": {id: 32 bytes}, "primary": id, "index_key": 32 bytes}``);
* optional ePA 3: ``epa_keys`` (lib-vau key-file CBOR), ``epa_signing_key`` (PKCS#8 DER),
  ``epa_certificate`` (DER), ``epa_iat``, ``epa_exp``, ``pu`` (bool);
* optional ``host`` (must be a loopback address) and ``port`` (0 = any).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any

import cbor2
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from safehold.erezept.http import ErezeptState
from safehold.erezept.http import router as erezept_router
from safehold.erezept.tasks import TaskService
from safehold.erezept.tokens import AccessTokenVerifier
from safehold.errors import ConfigError
from safehold.vau.epa_keys import SignedPublicVauKeys, VauServerKeys
from safehold.vau.epa_server import EpaVauServer
from safehold.vau.erp import load_vau_private_key
from safehold.vau.erp_server import ErpVau
from safehold.vau.http import VauState, cert_data
from safehold.vau.http import router as vau_router

__all__ = ["ServerThread", "build_app", "build_erezept_app", "main"]


def build_erezept_app(tasks: TaskService, verifier: AccessTokenVerifier) -> FastAPI:
    """The E-Rezept Fachdienst FHIR routes as an ASGI app. It is meant to sit *behind* the VAU
    (``VauState.erp_inner``); exposing it on a socket of its own bypasses the VAU."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.erezept = ErezeptState(tasks, verifier)
    app.include_router(erezept_router)
    return app


def build_app(state: VauState) -> FastAPI:
    """The outer VAU app (E-Rezept VAU routes and ePA 3 VAU routes) over ``state``."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.vau = state
    app.include_router(vau_router)
    return app


def _loopback(host: str) -> str:
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ConfigError(f"VAU server binds loopback only in this phase, not {host}")
    except ValueError:
        raise ConfigError(f"VAU server host must be a loopback IP address, got {host!r}") from None
    return host


def _config(app: FastAPI, host: str, port: int, ssl_context: ssl.SSLContext | None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=_loopback(host),
        port=port,
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=2,
        ssl_context_factory=(lambda _c, _d: ssl_context) if ssl_context is not None else None,
        ssl_certfile="unused" if ssl_context is not None else None,
    )


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class ServerThread:
    """Serve an ASGI app with uvicorn on a loopback port from a background thread (tests, bench).

    Args:
        app: the ASGI app. host: loopback address. port: 0 picks a free one.
        ssl_context: serve HTTPS with this context.
    """

    def __init__(
        self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._server = _Server(_config(app, host, port, ssl_context))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="vau-server")
        self.port = 0

    def start(self, timeout: float = 10.0) -> int:
        """Start and return the bound port.

        Raises:
            ConfigError: the server did not come up within ``timeout``.
        """
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > timeout:
                raise ConfigError("VAU server did not start (port in use?)")
            threading.Event().wait(0.02)
            waited += 0.02
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Stop and join."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


def state_from_config(cfg: dict[str, Any]) -> tuple[VauState, Callable[[], None]]:
    """Build the :class:`VauState` from the stdin config map (module docstring); also returns a
    close function for the store.

    Raises:
        ConfigError: a missing or malformed entry.
        VauFormatError / VauKeyVerificationError: keys that do not load or do not match.
    """
    from safehold.crypto.keyset import Keyset
    from safehold.records.engine import RecordEngine
    from safehold.store import open_store

    try:
        vau_key = load_vau_private_key(cfg["erp_vau_key"])
        loaded = [serialization.load_der_public_key(k) for k in cfg["idp_keys"]]
        idp_keys = [k for k in loaded if isinstance(k, ec.EllipticCurvePublicKey)]
        if len(idp_keys) != len(loaded):
            raise ValueError("idp_keys: only EC public keys sign IdP access tokens")
        ks = cfg["keyset"]
        keyset = Keyset(
            {int(k): bytes(v) for k, v in ks["keys"].items()}, int(ks["primary"]), bytes(ks["index_key"])
        )
        store_url = cfg["store"]
        issuer = cfg["idp_issuer"]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"VAU server config is incomplete or malformed: {type(e).__name__}") from None
    store = open_store(store_url)
    engine = RecordEngine(store, keyset, namespace_prefix="erezept:")
    verifier = AccessTokenVerifier(idp_keys, issuer=issuer, audience=cfg.get("idp_audience"))
    inner = build_erezept_app(TaskService(engine), verifier)
    state = VauState(
        erp=ErpVau([vau_key], token_verifier=verifier.claims),
        erp_certificate=bytes(cfg["erp_vau_certificate"]),
        erp_ocsp=cfg.get("erp_ocsp"),
        erp_inner=inner,
    )
    if cfg.get("epa_keys"):
        keys = VauServerKeys.from_cbor(cfg["epa_keys"])
        signer = serialization.load_der_private_key(cfg["epa_signing_key"], None)
        if not isinstance(signer, ec.EllipticCurvePrivateKey):
            raise ConfigError("epa_signing_key must be an EC key")
        cert = bytes(cfg["epa_certificate"])
        signed = SignedPublicVauKeys.sign(
            keys.public(iat=int(cfg["epa_iat"]), exp=int(cfg["epa_exp"])), signer, cert
        )
        state.epa = EpaVauServer(keys, signed, pu=bool(cfg.get("pu", False)))
        state.epa_inner = inner  # until the records service is wired behind the ePA VAU
        h, data = cert_data(cert)
        state.epa_cert_data = {h: (signed.cdv, data)}
    return state, store.close


def main(argv: list[str] | None = None) -> int:
    """Run the VAU process with the CBOR config read from standard input (module docstring)."""
    raw = sys.stdin.buffer.read()
    try:
        cfg = cbor2.loads(raw)
    except Exception:  # noqa: BLE001
        print("VAU server: standard input is not a CBOR map", file=sys.stderr)
        return 2
    if not isinstance(cfg, dict):
        print("VAU server: standard input is not a CBOR map", file=sys.stderr)
        return 2
    state, close = state_from_config(cfg)
    host, port = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 0))
    del raw, cfg
    server = _Server(_config(build_app(state), host, port, None))

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                return
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await task

    import signal

    def stop(*_: Any) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        asyncio.run(run())
    finally:
        close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
