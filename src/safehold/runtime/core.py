"""The framework-free core of the workload runtime (package docstring): attest, fetch, build
TLS contexts from memory. No web framework here (``safehold.runtime.server`` serves)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import ssl
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.attesters.base import Attester
from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.crypto.keyset import Keyset
from safehold.errors import ConfigError
from safehold.runtime.errors import BrokerIdentityError, NoKeysError

__all__ = ["Provisioned", "attest_and_fetch", "ca_sha256", "memory_server_context", "pinned_ca",
           "simulated_attester"]

log = logging.getLogger("safehold.runtime")


def simulated_attester(data_dir: str | os.PathLike[str],
                       config_files: Iterable[str | os.PathLike[str]] = ()) -> SimulatedAttester:
    """The SIMULATED TEE of this process (development / CI): its keys live in
    ``<data_dir>/simulated-tee``; it reports the measured closure of the running process plus
    ``config_files`` (``safehold.attestation.workload.current_closure``).

    Raises:
        AttestationError: the simulated TEE's key directory is unusable.
        ConfigError: a config file is missing or unreadable.
    """
    return SimulatedAttester(Path(data_dir), workload_files=list(config_files))


def ca_sha256(pem: bytes) -> str:
    """SHA-256 (hex) of the DER of the single certificate in ``pem`` (the broker pin).

    Raises:
        BrokerIdentityError: not exactly one PEM certificate.
    """
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise BrokerIdentityError("broker CA is not a PEM certificate") from None
    if len(certs) != 1:
        raise BrokerIdentityError(f"broker CA must hold exactly one certificate, got {len(certs)}")
    return hashlib.sha256(certs[0].public_bytes(serialization.Encoding.DER)).hexdigest()


def pinned_ca(path: str | os.PathLike[str] | None, sha256: str, *, what: str = "broker CA") -> bytes:
    """Read the run-time CA file at ``path`` and check it against the measured pin ``sha256``
    (hex SHA-256 of the certificate's DER).

    Returns:
        the PEM bytes (one certificate).

    Raises:
        BrokerIdentityError: no file given, unreadable, not one certificate, or another CA
            (message: expected vs. got SHA-256).
    """
    if not path:
        raise BrokerIdentityError(f"no {what} file: the broker is authenticated only by its "
                                  "pinned workload CA")
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise BrokerIdentityError(f"{what} {path}: {e.strerror}") from None
    got = ca_sha256(pem)
    if got != sha256.lower():
        raise BrokerIdentityError(f"{what} {path} is not the broker pinned in the measured config: "
                                  f"SHA-256 expected {sha256.lower()}, got {got}")
    return pem


def memory_server_context(cert_chain_pem: bytes, key_pem: bytes, *,
                          client_ca_pem: bytes | None = None,
                          client_cert: ssl.VerifyMode = ssl.CERT_OPTIONAL) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+) for ``cert_chain_pem`` / ``key_pem`` loaded from memory.

    The key reaches OpenSSL through anonymous memory (:func:`safehold.ratls.memkey.
    load_chain_from_memory`: Linux ``memfd_create``, close-on-exec): no file system path ever
    holds it. There is no fallback to a file: without ``memfd_create`` this fails closed.

    Args:
        client_ca_pem: request client certificates and verify them against this CA.
        client_cert: ``CERT_OPTIONAL`` (callers without one use a bearer token) or
            ``CERT_REQUIRED``.

    Raises:
        ConfigError: no ``memfd_create`` here, or the certificate and key do not load / match.
    """
    from safehold.ratls.memkey import load_chain_from_memory

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain_from_memory(ctx, cert_chain_pem, key_pem)
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        ctx.verify_mode = client_cert
    return ctx


def simulated_ratls_context(data_dir: str | os.PathLike[str], config_files: Iterable[str | os.PathLike[str]],
                            *, common_name: str,
                            ip_addresses: Iterable[str] = ()) -> tuple[ssl.SSLContext, str]:
    """An RA-TLS server context from this process's SIMULATED TEE (development / CI, the
    services' ``--data-dir`` mode without a broker certificate): a TLS key generated in memory,
    a self-signed certificate (``common_name``, IP SANs ``ip_addresses``) whose extension carries
    the Evidence over that key (``safehold.ratls.cert.create_identity``), loaded from memory
    (:func:`memory_server_context`), TLS 1.3 only.

    Returns:
        ``(context, measurement)``: the measurement (hex SHA-384 of the closure plus
        ``config_files``) the ready files report.

    Raises:
        AttestationError: the simulated TEE's key directory is unusable.
        ConfigError: a config file is unreadable, or no ``memfd_create`` here.
    """
    from safehold.ratls.cert import create_identity

    attester = simulated_attester(data_dir, config_files)
    identity = create_identity(attester, common_name=common_name, ip_addresses=tuple(ip_addresses))
    ctx = memory_server_context(identity.cert_pem(), identity.key_pem())  # the key never touches a file
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx, attester.measurement.hex()


def listen_socket(host: str, port: int, *, backlog: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (IPv6 if ``host`` has a colon; port 0: a free
    one) and listening with ``backlog``, for ``uvicorn.Server.serve(sockets=[...])``.
    ``SO_REUSEADDR`` (a restart does not wait for TIME_WAIT) and ``TCP_NODELAY``, which accepted
    sockets inherit: asyncio sets it only on sockets it creates with proto ``IPPROTO_TCP``, and
    without it an answer's header and body records wait for the client's delayed ACK (Nagle,
    ~40 ms per request on loopback).

    Raises:
        OSError: the address is unusable or in use.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def write_ready_file(path: str | os.PathLike[str], *, host: str, port: int, tls: bool, name: str,
                     measurement: str, mode: int = 0o600) -> None:
    """Write a service's ready file atomically (``safehold.fsutil.write_atomic``, ``mode``): JSON
    ``{"url": "http[s]://host:port" (IPv6 in brackets), "port", "pid", "name", "measurement"}``
    (``measurement``: hex, ``""`` when not attested)."""
    from safehold.fsutil import write_atomic

    where = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{where}:{port}"
    write_atomic(path, json.dumps({"url": url, "port": port, "pid": os.getpid(), "name": name,
                                   "measurement": measurement}).encode(), mode=mode)


def exit_status(prog: str, exc: BaseException) -> int:
    """Report a service process's fatal ``exc`` as one line ``prog: exc`` on stderr and return
    its exit status: 2 when the broker refused this workload its keys (:class:`NoKeysError`:
    a supervisor should not restart it unchanged), else 1."""
    print(f"{prog}: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, NoKeysError) else 1


@dataclass
class Provisioned:
    """What arrived through attestation, in this process's memory only.

    Attributes:
        keysets: local name -> :class:`~safehold.crypto.keyset.Keyset` (``keyset`` secrets).
        secrets: local name -> the secret's bytes as released (``value``: the bytes; ``access``
            and other JSON types: UTF-8 JSON).
        cert_pem: the workload certificate (leaf, PEM) issued by the broker's workload CA to
            :attr:`key`, with this workload's RA-TLS Evidence; None if none was requested.
        ca_pem: the broker's workload CA (PEM), pinned.
        key: the TLS private key (ECDSA, generated here; the KBS ``tee-pubkey``).
        attester: the TEE that measured this workload.
        measurement: the attested measurement (hex).
    """

    keysets: dict[str, Keyset]
    secrets: dict[str, bytes]
    cert_pem: bytes | None
    ca_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    attester: Attester = field(repr=False)
    measurement: str = ""

    def key_pem(self) -> bytes:
        """The TLS private key as PKCS#8 PEM bytes (memory only: hand it to
        :func:`memory_server_context` or a memfd-based client context, never to a file)."""
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def server_context(self, *, client_ca: bool = True,
                       client_cert: ssl.VerifyMode = ssl.CERT_OPTIONAL) -> ssl.SSLContext:
        """A TLS server context presenting the workload certificate, from memory
        (:func:`memory_server_context`); with ``client_ca`` it verifies client certificates
        against the broker's workload CA.

        Raises:
            ConfigError: no certificate was fetched, or it does not load.
        """
        if self.cert_pem is None:
            raise ConfigError("no workload certificate was fetched (attest_and_fetch(certificate=...))")
        return memory_server_context(self.cert_pem, self.key_pem(),
                                     client_ca_pem=self.ca_pem if client_ca else None,
                                     client_cert=client_cert)


def attest_and_fetch(broker_url: str, broker_ca_pem: bytes, *, workload: str, attester: Attester,
                     keysets: Mapping[str, str] | None = None, secrets: Mapping[str, str] | None = None,
                     certificate: str | None = None, ratls_evidence: bool = True,
                     broker_ca_sha256: str | None = None, timeout: float = 30.0,
                     wait: float = 0.0) -> Provisioned:
    """Attest to the broker (KBS protocol: ``/kbs/v0/auth`` → ``/kbs/v0/attest``) as
    ``workload`` and fetch, into memory, the resources the owner's manifest releases to it.

    Standards: the Trustee KBS attestation protocol (RCAR, ``docs/kbs_attestation_protocol.md``
    of confidential-containers/trustee; wire shapes in :mod:`safehold.broker.protocol`), the
    workload certificate per RFC 5280 with the TCG DICE tagged-evidence extension (TCG DICE
    Attestation Architecture, OID 2.23.133.5.4.9) as Gramine's RA-TLS carries it.

    Args:
        broker_url: ``https://host:port`` of the broker.
        broker_ca_pem: the broker's workload CA (from :func:`pinned_ca`): the only trust anchor
            for the broker's TLS certificate (no system trust store).
        workload: the manifest's workload name (``extra-params.workload``).
        attester: this workload's TEE (:func:`simulated_attester`).
        keysets: local name -> resource path ``<repository>/keyset/<tag>``.
        secrets: local name -> resource path ``<repository>/<type>/<tag>`` (any other type).
        certificate: resource path ``<repository>/certificate/<tag>`` of the workload's TLS
            identity, or None. The certificate is issued to the TEE key generated here.
        ratls_evidence: put this workload's RA-TLS Evidence (TCG DICE tagged-evidence extension
            2.23.133.5.4.9, claims binding the key's SubjectPublicKeyInfo) into the leaf, so
            clients can appraise it (the Safehold SDK) as well as chain it to the CA.
        broker_ca_sha256: if given, the CA that issued the certificate must have this pin.
        timeout: per HTTP request, seconds.
        wait: seconds to wait for the broker's port to accept connections (a broker still
            starting, or restarting after a crash); 0 tries once.

    Returns:
        :class:`Provisioned`.

    Raises:
        NoKeysError: the broker answered 401/403 (appraisal failed): the message carries the
            broker's reason (which claim, expected vs. got).
        BrokerIdentityError: the broker's TLS certificate does not chain to ``broker_ca_pem``,
            or the certificate came from another CA than ``broker_ca_sha256``.
        ConfigError: a resource the workload asks for is not in the manifest (404).
        BrokerError: the broker is unreachable or answered otherwise.
    """
    from safehold.client.broker import BrokerClient
    from safehold.client.errors import BrokerRefusedError
    from safehold.errors import BrokerError
    from safehold.ratls.cert import OID_TCG_DICE_TAGGED_EVIDENCE, encode_claims, encode_extension, spki_der

    verify = ssl.create_default_context(cadata=broker_ca_pem.decode("ascii"))
    measurement = getattr(getattr(attester, "measurement", None), "hex", lambda: "")()
    if wait > 0:
        _wait_for_port(broker_url, wait)
    log.info("workload %s measurement %s", workload, measurement)
    out_keysets: dict[str, Keyset] = {}
    out_secrets: dict[str, bytes] = {}
    cert_pem: bytes | None = None
    ca_pem = broker_ca_pem
    with BrokerClient(broker_url, attester, verify=verify, workload=workload, timeout=timeout) as kbs:
        current = ""
        try:
            current = "attestation"
            kbs.attest()
            for name, path in (keysets or {}).items():
                current = path
                repo, kind, tag = _split(path)
                if kind != "keyset":
                    raise ConfigError(f"keyset {name!r}: {path} is not a keyset resource")
                out_keysets[name] = kbs.get_keyset(tag, repository=repo)
            for name, path in (secrets or {}).items():
                current = path
                _split(path)
                out_secrets[name] = kbs.get_resource(path)
            if certificate is not None:
                current = certificate
                _, kind, tag = _split(certificate)
                if kind != "certificate":
                    raise ConfigError(f"{certificate} is not a certificate resource")
                ext: list[tuple[str, bytes]] = []
                if ratls_evidence:
                    claims = encode_claims(spki_der(kbs.private_key().public_key()))
                    evidence = attester.attest(hashlib.sha256(claims).digest() + bytes(32))
                    ext = [(OID_TCG_DICE_TAGGED_EVIDENCE.dotted_string, encode_extension(evidence, claims))]
                leaf, ca = kbs.get_certificate(tag, extensions=ext)
                cert_pem, ca_pem = leaf.encode("ascii"), ca.encode("ascii")
        except BrokerRefusedError as e:
            if e.status in (401, 403):
                raise NoKeysError(f"the broker released no keys to workload {workload!r}: {e.detail}"
                                  ) from None
            if e.status == 404:
                raise ConfigError(f"the broker has no resource {current} for workload {workload!r} "
                                  f"({e.detail}): the data owner adds it to the manifest and lists "
                                  "it in the workload's secrets") from None
            raise
        except BrokerError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise BrokerIdentityError(
                    f"the broker at {broker_url} is not the pinned broker: its TLS certificate "
                    f"does not chain to the pinned workload CA ({e})") from None
            raise
        key = kbs.private_key()
    if cert_pem is not None and broker_ca_sha256 is not None:
        got = ca_sha256(ca_pem)
        if got != broker_ca_sha256.lower():  # the TLS identity must come from the pinned CA too
            raise BrokerIdentityError(f"the broker issued the TLS certificate from another CA: "
                                      f"SHA-256 expected {broker_ca_sha256.lower()}, got {got}")
    return Provisioned(out_keysets, out_secrets, cert_pem, ca_pem, key, attester, measurement)


def _wait_for_port(url: str, wait: float) -> None:
    """Until ``url``'s host:port accepts a TCP connection or ``wait`` seconds pass (then the
    KBS request itself reports the broker unreachable)."""
    import socket
    import time
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
    deadline, delay = time.monotonic() + wait, 0.05
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() + delay > deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _split(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"resource path {path!r} is not <repository>/<type>/<tag>")
    return parts[0], parts[1], parts[2]
