"""Workload side of key release for the services ``safehold up`` starts next to records (SVR,
contact discovery, the VAU with the E-Rezept routes): attest to the pinned broker, receive the
secrets the manifest grants this workload, in memory only.

This is what :mod:`safehold.records.server` does (its ``provision``), as one function the
services share until the generic workload runtime (``safehold.runtime``) replaces both.

.. code-block:: python

    prov = fetch_workload_keys(workload="svr-0", broker_url=url, broker_ca_file=ca_path,
                               broker_ca_sha256=cfg.broker_ca_sha256, tee_dir=data_dir,
                               config_files=[config_path],
                               resources=["default/keyset/svr-0-keyset", "default/access/svr-access"],
                               certificate="svr-0-anchor")
    secret = derive_secret(prov.keysets["svr-0-keyset"], "svr/server-secret")

The TEE key (``tee-pubkey`` of the KBS protocol) is generated in this process and never leaves
it; every resource arrives as a JWE only that key opens; the optional certificate is issued by
the broker's workload CA to that key with CN = the workload name (KBS ``/certificate``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from safehold.broker import protocol
from safehold.client.errors import BrokerRefusedError
from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.errors import BrokerError
from safehold.records.errors import BrokerIdentityError, NoKeysError

__all__ = ["WorkloadKeys", "access_by_token", "derive_secret", "fetch_workload_keys", "pinned_ca_pem"]


@dataclass(frozen=True)
class WorkloadKeys:
    """What the broker released (``repr`` shows names only).

    Attributes:
        keysets: keyset secret name → :class:`Keyset`.
        access: access secret name → parsed access document
            (``{"tokens": {sha256 hex: {name, role}}, "keys": {...}}``).
        values: value secret name → bytes.
        cert_pem / key_pem: the workload certificate (CN = workload) and its private key
            (PKCS#8 PEM, memory only); empty when no certificate was asked for.
        ca_pem: the broker's workload CA (PEM).
        measurement: hex measurement the workload attested with.
    """

    keysets: dict[str, Keyset] = field(repr=False)
    access: dict[str, dict[str, Any]] = field(repr=False)
    values: dict[str, bytes] = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    measurement: str = ""


def _ca_sha256(pem: bytes) -> str:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise BrokerIdentityError("broker CA is not a PEM certificate") from None
    if len(certs) != 1:
        raise BrokerIdentityError(f"broker CA must hold exactly one certificate, got {len(certs)}")
    return hashlib.sha256(certs[0].public_bytes(Encoding.DER)).hexdigest()


def pinned_ca_pem(path: str, pin: str) -> bytes:
    """Read the broker CA file (a run-time setting) and check it against the measured pin.

    Returns:
        the PEM bytes, whose DER SHA-256 is ``pin``.

    Raises:
        BrokerIdentityError: no pin, unreadable file, not one PEM certificate, or another CA.
    """
    if not pin:
        raise BrokerIdentityError("the measured configuration pins no broker (broker_ca_sha256 is empty)")
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise BrokerIdentityError(f"broker CA {path}: {e.strerror}") from None
    got = _ca_sha256(pem)
    if got != pin:
        raise BrokerIdentityError(f"broker CA {path} is not the broker pinned in the measured config: "
                                  f"SHA-256 expected {pin}, got {got}")
    return pem


def fetch_workload_keys(*, workload: str, broker_url: str, broker_ca_file: str, broker_ca_sha256: str,
                        tee_dir: str, config_files: Sequence[str], resources: Sequence[str] = (),
                        certificate: str | None = None, timeout: float = 30.0) -> WorkloadKeys:
    """Attest this process (simulated TEE over ``config_files``) to the broker and receive
    ``resources`` (``<repo>/<type>/<name>``, type ``keyset`` / ``access`` / ``value``) and,
    if named, a ``certificate`` secret issued to the in-memory TEE key.

    Follows the KBS protocol of the Confidential Containers Trustee (auth → attest →
    resource; :mod:`safehold.broker.protocol`); only the pinned CA authenticates the broker.

    Raises:
        NoKeysError: the broker refused this workload (401/403: its Evidence does not pass the
            manifest's policy for ``workload``); the message carries the broker's reason.
        BrokerIdentityError: the CA file is not the pinned broker, or the broker's TLS
            certificate does not chain to it.
        BrokerError: the broker is unreachable, a resource is missing or malformed.
    """
    import ssl

    from safehold.attestation.attesters.simulated import SimulatedAttester
    from safehold.client.broker import BrokerClient

    ca = pinned_ca_pem(broker_ca_file, broker_ca_sha256)
    attester = SimulatedAttester(Path(tee_dir), workload_files=[Path(p) for p in config_files])
    verify = ssl.create_default_context(cadata=ca.decode("ascii"))
    keysets: dict[str, Keyset] = {}
    access: dict[str, dict[str, Any]] = {}
    values: dict[str, bytes] = {}
    cert = key = ca_out = b""
    try:
        with BrokerClient(broker_url, attester, verify=verify, workload=workload, timeout=timeout) as kbs:
            kbs.attest()
            for path in resources:
                parts = path.strip("/").split("/")
                if len(parts) != 3:
                    raise BrokerError(f"resource path {path!r} is not <repository>/<type>/<name>")
                raw = kbs.get_resource(path)
                kind, name = parts[1], parts[2]
                if kind == "keyset":
                    keysets[name] = protocol.keyset_from_json(raw)
                elif kind == "access":
                    access[name] = _access_doc(raw, name)
                else:
                    values[name] = raw
            if certificate:
                c, a = kbs.get_certificate(certificate)
                cert, ca_out, key = c.encode("ascii"), a.encode("ascii"), kbs.private_key_pem()
    except BrokerRefusedError as e:
        if e.status in (401, 403):
            raise NoKeysError(f"the broker released no keys to workload {workload!r}: {e.detail}") from None
        raise BrokerError(f"the broker refused workload {workload!r}: HTTP {e.status} {e.detail}") from None
    except BrokerError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            raise BrokerIdentityError(f"the broker at {broker_url} is not the pinned broker ({e})") from None
        raise
    if ca_out and _ca_sha256(ca_out) != broker_ca_sha256:
        raise BrokerIdentityError("the broker issued the workload certificate from another CA")
    return WorkloadKeys(keysets, access, values, cert, key, ca, attester.measurement.hex())


def _access_doc(raw: bytes, name: str) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens", {}), dict):
        raise BrokerError(f"access secret {name!r} is not an access document")
    return doc


def access_by_token(doc: dict[str, Any], roles: dict[str, list[str]]) -> dict[str, Any]:
    """Turn a broker access document into the services' token access lists
    (``{sha256 hex: {"name", "roles": [...]}}``), mapping each manifest role to the service's
    roles with ``roles``; a principal whose role is not in ``roles`` gets nothing, and
    key-pinned principals are left out (these services authenticate bearer tokens only).
    """
    out: dict[str, Any] = {}
    for digest, ent in dict(doc.get("tokens", {})).items():
        mapped = roles.get(str(ent.get("role", "")))
        if mapped:
            out[str(digest)] = {"name": str(ent.get("name", "")), "roles": list(mapped)}
    return out


def derive_secret(keyset: Keyset, purpose: str) -> bytes:
    """A 32-byte service secret from a broker-made keyset: HKDF-SHA256 (RFC 5869) of the
    keyset's index key (stable across rotations of the value keys) under ``purpose``."""
    return derive_key(keyset.index_key, purpose=purpose)
