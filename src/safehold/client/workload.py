"""Workload side of key release for the services ``safehold up`` starts next to records (SVR,
contact discovery, the VAU with the E-Rezept routes): attest to the pinned broker, receive the
secrets the manifest grants this workload, in memory only.

A thin layer over the workload runtime (:func:`safehold.runtime.attest_and_fetch`): resources
by path, access documents parsed, and the two conversions these services share
(:func:`access_by_token`, :func:`derive_secret`).

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.errors import BrokerError

__all__ = ["WorkloadKeys", "access_by_token", "derive_secret", "fetch_workload_keys"]


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


def fetch_workload_keys(*, workload: str, broker_url: str, broker_ca_file: str, broker_ca_sha256: str,
                        tee_dir: str, config_files: Sequence[str], resources: Sequence[str] = (),
                        certificate: str | None = None, timeout: float = 30.0) -> WorkloadKeys:
    """Attest this process (simulated TEE over its closure and ``config_files``) to the pinned
    broker through :func:`safehold.runtime.attest_and_fetch` and receive ``resources``
    (``<repo>/<type>/<name>``, type ``keyset`` / ``access`` / ``value``) and, if named, the
    ``certificate`` secret issued to the in-memory TEE key (CN = the workload).

    Follows the KBS protocol of the Confidential Containers Trustee (auth → attest →
    resource; :mod:`safehold.broker.protocol`); only the pinned CA authenticates the broker.

    Raises:
        NoKeysError: the broker refused this workload (401/403: its Evidence does not pass the
            manifest's policy for ``workload``); the message carries the broker's reason.
        BrokerIdentityError: the CA file is not the pinned broker, or the broker's TLS
            certificate does not chain to it.
        ConfigError: a resource is not in the manifest. BrokerError: unreachable, malformed.
    """
    from safehold.runtime import attest_and_fetch, pinned_ca, simulated_attester

    ca = pinned_ca(broker_ca_file, broker_ca_sha256)
    keysets: dict[str, str] = {}
    others: dict[str, str] = {}
    for path in resources:
        parts = path.strip("/").split("/")
        if len(parts) != 3:
            raise BrokerError(f"resource path {path!r} is not <repository>/<type>/<name>")
        (keysets if parts[1] == "keyset" else others)[parts[2]] = path
    cert_path = f"default/certificate/{certificate}" if certificate else None
    prov = attest_and_fetch(broker_url, ca, workload=workload,
                            attester=simulated_attester(tee_dir, list(config_files)), keysets=keysets,
                            secrets=others, certificate=cert_path, ratls_evidence=False,
                            broker_ca_sha256=broker_ca_sha256, timeout=timeout)
    access = {n: _access_doc(prov.secrets[n], n) for n, p in others.items() if p.split("/")[-2] == "access"}
    values = {n: v for n, v in prov.secrets.items() if n not in access}
    return WorkloadKeys(prov.keysets, access, values, prov.cert_pem or b"",
                        prov.key_pem() if certificate else b"", prov.ca_pem, prov.measurement)


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
