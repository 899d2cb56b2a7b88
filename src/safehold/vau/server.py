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

**Attested mode** (what ``safehold up`` runs): ``python -m safehold.vau.server --config vau.toml
--data-dir TEE_DIR --broker-url URL --broker-ca CA.pem --store-url U [--port P] [--ready-file F]``.
The measured TOML (:class:`AttestedConfig`) names the workload, the pinned broker, the host and
the identity provider's public keys. The process attests to the broker as that workload and
receives two broker-made keysets: ``erezept-keyset`` (the records engine the Tasks are sealed
with) and ``vau-erp-identity`` (the brainpoolP256r1 VAU key is derived from it:
:func:`derive_vau_key`); it makes its VAU certificate (self-signed by that key; a TI
Fachdienst's comes from a komp-CA, which clients check against the TSL — here clients fetch it
over the attested channel and pin it) and serves the E-Rezept VAU and the Fachdienst routes
behind it over RA-TLS (TLS 1.3, key generated in memory). With ``--records-url`` and a
``records_policy`` in the configuration it also serves the ePA 3 VAU, whose decrypted requests go
on to the records service over RA-TLS (:func:`records_forwarder`); its AUT-VAU key comes from a
third keyset, ``vau-epa-identity``.
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
from fastapi import FastAPI, Request, Response

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

__all__ = ["AttestedConfig", "ServerThread", "attested_state", "build_app", "build_erezept_app",
           "derive_epa_signing_key", "derive_vau_key", "epa_state", "main", "records_forwarder",
           "vau_certificate"]

#: Order n of brainpoolP256r1 (RFC 5639 §3.4).
_BP256_N = 0xA9FB57DBA1EEA9BC3E660A909D838D718C397AA3B561A6F7901E0E82974856A7
#: Order n of P-256 (FIPS 186-5 / SP 800-186 §3.2.1.3).
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: ePA 3 VAU keys are signed for this long (A_24624-01 allows at most 30 days); a restart
#: makes new ones.
EPA_KEY_LIFETIME = 29 * 86400


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


def _derive_ec_key(seed: bytes, purpose: str, curve: ec.EllipticCurve,
                   order: int) -> ec.EllipticCurvePrivateKey:
    from safehold.crypto.kdf import derive_key

    if len(seed) != 32:
        raise ValueError("a VAU identity seed must be 32 bytes")
    x = int.from_bytes(derive_key(seed, purpose=purpose, length=48), "big")
    return ec.derive_private_key(1 + x % (order - 1), curve)


def derive_vau_key(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """The E-Rezept VAU's brainpoolP256r1 key from a 32-byte seed: HKDF-SHA256 (RFC 5869,
    purpose ``vau/erp-identity``) to 48 bytes, reduced to ``1 + (x mod (n − 1))`` — the
    "extra random bits" method of FIPS 186-5 A.2.1 (bias below 2^-64).

    Raises:
        ValueError: ``seed`` is not 32 bytes.
    """
    return _derive_ec_key(seed, "vau/erp-identity", ec.BrainpoolP256R1(), _BP256_N)


def derive_epa_signing_key(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """The ePA 3 VAU's AUT-VAU signing key (P-256, ES256: gemSpec_Krypt A_24624-01) from a
    32-byte seed, as :func:`derive_vau_key` (purpose ``vau/epa-aut``).

    Raises:
        ValueError: ``seed`` is not 32 bytes.
    """
    return _derive_ec_key(seed, "vau/epa-aut", ec.SECP256R1(), _P256_N)


def vau_certificate(key: ec.EllipticCurvePrivateKey, *, name: str = "safehold E-Rezept VAU",
                    days: int = 365, signing: bool = False) -> bytes:
    """A self-signed X.509 certificate (DER, ECDSA-SHA256) for a VAU key: the E-Rezept VAU's
    encryption certificate (``GET /VAUCertificate``; key agreement) or, with ``signing``, the
    ePA VAU's AUT-VAU certificate (digital signature). Clients pin its SHA-256 after fetching
    it over RA-TLS from the attested workload; it carries no authority beyond that."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.KeyUsage(digital_signature=signing, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=not signing,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


class AttestedConfig:
    """The measured TOML of the attested mode (unknown keys refused)::

        name = "vau"                       # the manifest workload
        broker_ca_sha256 = "<hex>"         # the pinned broker (SHA-256 of its CA's DER)
        host = "127.0.0.1"
        idp_issuer = "https://idp.example"
        idp_audience = ""                  # optional
        idp_keys = ["-----BEGIN PUBLIC KEY-----..."]   # the IdP's EC signing keys (SPKI PEM)
        [records_policy]                   # optional: the ePA 3 VAU in front of the records
        allow_simulated = true             # service, which must pass this appraisal policy
        ...                                # (AppraisalPolicy keys)

    Raises:
        ConfigError: unreadable file, unknown or missing keys, wrong types, keys that do not load.
    """

    KEYS = ("name", "broker_ca_sha256", "host", "idp_issuer", "idp_audience", "idp_keys", "records_policy")

    def __init__(self, path: str) -> None:
        import tomllib

        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"VAU config {path}: {e}") from None
        unknown = sorted(set(d) - set(self.KEYS))
        missing = sorted({"name", "broker_ca_sha256", "idp_issuer", "idp_keys"} - set(d))
        if unknown or missing:
            raise ConfigError(f"VAU config {path}: unknown keys {unknown}, missing keys {missing}")
        self.name, self.pin = str(d["name"]), str(d["broker_ca_sha256"])
        self.host = _loopback(str(d.get("host", "127.0.0.1")))
        self.issuer, self.audience = str(d["idp_issuer"]), (str(d.get("idp_audience", "")) or None)
        keys = d["idp_keys"]
        if not isinstance(keys, list) or not keys:
            raise ConfigError("VAU config: idp_keys must list at least one PEM public key")
        self.idp_keys: list[ec.EllipticCurvePublicKey] = []
        for k in keys:
            try:
                pub = serialization.load_pem_public_key(str(k).encode("ascii"))
            except (ValueError, UnicodeEncodeError):
                raise ConfigError("VAU config: an idp_keys entry is not a PEM public key") from None
            if not isinstance(pub, ec.EllipticCurvePublicKey):
                raise ConfigError("VAU config: idp_keys must be EC keys (ES256 / BP256R1)")
            self.idp_keys.append(pub)
        self.records_policy: Any = None
        if d.get("records_policy") is not None:
            from safehold.attestation.policy import AppraisalPolicy
            from safehold.errors import SafeholdError

            try:
                self.records_policy = AppraisalPolicy.from_dict(dict(d["records_policy"]))
            except (SafeholdError, TypeError, ValueError) as e:
                raise ConfigError(f"VAU config: records_policy: {e}") from None


def records_forwarder(records_url: str, policy: Any) -> FastAPI:
    """The ePA 3 VAU's inner app: every decrypted request goes on to the records service at
    ``records_url`` over RA-TLS, appraised under ``policy`` (the records workload's Reference
    Value, measured in the VAU's configuration), with the caller's own ``Authorization``: the
    plaintext leaves one attested workload only into another. Transport failures answer 502."""
    import httpx

    from safehold.client.records import attesting_transport

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    client = httpx.AsyncClient(base_url=records_url.rstrip("/"), timeout=30.0,
                               transport=attesting_transport(policy, asynchronous=True))
    forward_in = ("authorization", "content-type", "accept", "if-match", "if-none-match", "prefer")
    forward_out = ("content-type", "etag", "location", "last-modified")

    @app.api_route("/{path:path}", methods=["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"])
    async def forward(path: str, request: Request) -> Response:
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in forward_in]
        try:
            r = await client.request(request.method, target, content=await request.body(), headers=headers)
        except httpx.HTTPError as e:
            return Response(f"records service unreachable or not attested: {type(e).__name__}",
                            status_code=502, media_type="text/plain")
        return Response(r.content, status_code=r.status_code,
                        headers={k: v for k, v in r.headers.items() if k.lower() in forward_out})

    return app


def epa_state(state: VauState, seed: bytes, inner: Any) -> None:
    """Add the ePA 3 VAU to ``state``: fresh hybrid KEM keys (ECDH P-256 + Kyber768 round 3,
    gemSpec_Krypt A_24608) signed for :data:`EPA_KEY_LIFETIME` by the AUT-VAU key derived from
    ``seed`` (:func:`derive_epa_signing_key`), whose self-signed certificate is served as
    CertData (A_24957); decrypted user data goes to ``inner``."""
    import time

    signer = derive_epa_signing_key(seed)
    cert = vau_certificate(signer, name="safehold ePA VAU (AUT-VAU)", signing=True)
    keys = VauServerKeys.generate()
    now = int(time.time())
    signed = SignedPublicVauKeys.sign(keys.public(iat=now - 60, exp=now + EPA_KEY_LIFETIME), signer, cert)
    state.epa = EpaVauServer(keys, signed, pu=False)
    state.epa_inner = inner
    h, data = cert_data(cert)
    state.epa_cert_data = {h: (signed.cdv, data)}


def attested_state(cfg: AttestedConfig, *, config_path: str, broker_url: str, broker_ca: str, tee_dir: str,
                   store_url: str, records_url: str | None = None) -> tuple[VauState, Callable[[], None]]:
    """Attest to the broker, receive the keysets, build the E-Rezept VAU state (module
    docstring); with ``records_url`` and a ``records_policy`` in the configuration also the
    ePA 3 VAU in front of the records service (:func:`epa_state`, :func:`records_forwarder`).

    Raises:
        NoKeysError: the broker refused this workload. BrokerIdentityError: not the pinned
            broker. BrokerError: unreachable or a resource missing.
    """
    from safehold.client.workload import derive_secret, fetch_workload_keys
    from safehold.records.engine import RecordEngine
    from safehold.store import open_store

    prov = fetch_workload_keys(
        workload=cfg.name, broker_url=broker_url, broker_ca_file=broker_ca, broker_ca_sha256=cfg.pin,
        tee_dir=tee_dir, config_files=[config_path],
        resources=["default/keyset/erezept-keyset", "default/keyset/vau-erp-identity",
                   *(["default/keyset/vau-epa-identity"] if records_url and cfg.records_policy else [])])
    vau_key = derive_vau_key(derive_secret(prov.keysets["vau-erp-identity"], "vau/erp-identity-seed"))
    store = open_store(store_url)
    engine = RecordEngine(store, prov.keysets["erezept-keyset"], namespace_prefix="erezept:")
    verifier = AccessTokenVerifier(cfg.idp_keys, issuer=cfg.issuer, audience=cfg.audience)
    inner = build_erezept_app(TaskService(engine), verifier)
    state = VauState(erp=ErpVau([vau_key], token_verifier=verifier.claims),
                     erp_certificate=vau_certificate(vau_key), erp_inner=inner)
    if records_url and cfg.records_policy is not None:
        epa_state(state, derive_secret(prov.keysets["vau-epa-identity"], "vau/epa-identity-seed"),
                  records_forwarder(records_url, cfg.records_policy))
    return state, store.close


def _serve_until_signal(server: _Server, on_listening: Callable[[int], None],
                        close: Callable[[], None]) -> None:
    """Run ``server`` on a new event loop until SIGTERM or SIGINT (both set ``should_exit``:
    in-flight requests finish); ``on_listening(port)`` once the socket listens (not called if
    the server fails to start); ``close()`` always at the end (the store)."""

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                return
            await asyncio.sleep(0.02)
        on_listening(server.servers[0].sockets[0].getsockname()[1])
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


def _main_attested(argv: list[str]) -> int:
    import argparse
    import os

    from safehold.errors import SafeholdError
    from safehold.fsutil import write_atomic
    from safehold.procutil import EXIT_WITH_PARENT, exit_with_parent
    from safehold.runtime import exit_status, simulated_ratls_context

    ap = argparse.ArgumentParser(prog="python -m safehold.vau.server")
    ap.add_argument("--config", required=True, help="measured TOML configuration (AttestedConfig)")
    ap.add_argument("--data-dir", required=True, help="simulated TEE key directory")
    ap.add_argument("--broker-url", required=True)
    ap.add_argument("--broker-ca", required=True, help="the broker's workload CA (checked against the pin)")
    ap.add_argument("--store-url", required=True, help="store URL (untrusted)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", help="write {url, port, pid, name, measurement} here once listening")
    ap.add_argument("--records-url", help="serve the ePA 3 VAU in front of this records service (needs "
                    "records_policy in the configuration)")
    ap.add_argument(EXIT_WITH_PARENT, type=int, metavar="PID",
                    help="stop (gracefully, as on SIGTERM) once the parent PID is gone (`safehold up`)")
    args = ap.parse_args(argv)
    exit_with_parent(args.exit_with_parent)
    try:
        cfg = AttestedConfig(args.config)
        state, close = attested_state(cfg, config_path=args.config, broker_url=args.broker_url,
                                      broker_ca=args.broker_ca, tee_dir=args.data_dir,
                                      store_url=args.store_url, records_url=args.records_url)
        ctx, measurement = simulated_ratls_context(
            args.data_dir, [args.config], common_name=f"safehold {cfg.name}", ip_addresses=(cfg.host,))
    except SafeholdError as e:
        return exit_status("vau", e)

    def ready(port: int) -> None:
        if args.ready_file:
            write_atomic(args.ready_file, json.dumps({
                "url": f"https://{cfg.host}:{port}", "port": port, "pid": os.getpid(), "name": cfg.name,
                "measurement": measurement, "epa": state.epa is not None}).encode(),
                mode=0o644)

    _serve_until_signal(_Server(_config(build_app(state), cfg.host, args.port, ctx)), ready, close)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the VAU process: attested mode with ``--config`` (keys from the broker), else with
    the CBOR config read from standard input (module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        return _main_attested(args)
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
    _serve_until_signal(_Server(_config(build_app(state), host, port, None)),
                        lambda bound: print(json.dumps({"port": bound}), flush=True), close)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
