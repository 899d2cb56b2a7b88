"""The broker's administration: manifest users and their roles, operator-supplied values,
client certificates, and installing the manifest (the first one, then owner-signed updates).

A manifest install writes the new version, ``manifest/current``, every new keyset secret and,
if the recovery keys changed, fresh recovery shares in one transaction together with the
authenticated state head (compare-and-set), so nothing is half-written and two replicas
installing at once cannot both win. Attestations made under an older version stop working at
the swap (:meth:`safehold.broker.kbs.KBS.resource` checks the version).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from safehold.broker import protocol
from safehold.broker.audit import Recorder
from safehold.broker.ca import WorkloadCA
from safehold.broker.errors import (
    MalformedRequestError,
    NotAuthenticatedError,
    NotFoundError,
    PermissionDeniedError,
    StateConflictError,
)
from safehold.broker.fresh import LEDGER as FRESHNESS_LEDGER
from safehold.broker.installed import Active, InstalledManifest, build_verifiers
from safehold.broker.manifest import Manifest, manifest_from_dict, verify_update
from safehold.broker.state import BrokerState
from safehold.crypto.keyset import Keyset
from safehold.errors import ConflictError, ManifestError
from safehold.freshness.anchor.core import ATTESTED_WORKLOAD_EKU
from safehold.jsontypes import JSONObject

#: A client certificate's subject CN: a manifest-style user name.
_CN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
#: Longest client certificate lifetime, days.
MAX_CLIENT_CERT_DAYS = 825


def _public_key(pem: str) -> PublicKeyTypes:
    """A manifest user's key: a PEM public key or the key of a PEM certificate."""
    data = pem.encode("ascii", "replace")
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Admin:
    """Admin operations of one ready broker.

    Args:
        state: the unsealed broker state.
        installed: the installed manifest.
        ca: the workload CA (client certificates).
        broker_id: this broker's id (manifest updates are signed for it).
        record: appends an audit entry.
    """

    def __init__(self, state: BrokerState, installed: InstalledManifest, ca: WorkloadCA, broker_id: str,
                 record: Recorder):
        self._state = state
        self._installed = installed
        self._ca = ca
        self._broker_id = broker_id
        self._record = record

    # --- users --------------------------------------------------------------------------------

    def authorize(self, bearer: str | None, *roles: str, client_cert: str | None = None) -> str:
        """Return the manifest user who holds one of ``roles``, identified by the bearer token
        (SHA-256 equals ``token_sha256``) or else by a TLS client certificate (PEM, already
        verified by the TLS layer against the workload CA) whose public key is the user's
        ``public_key`` / ``certificate`` key.

        Raises:
            NotReadyError: recovery mode or no manifest.
            NotAuthenticatedError: no or unknown credentials. PermissionDeniedError: role missing.
        """
        m = self._installed.require().manifest
        user = None
        if bearer:
            digest = hashlib.sha256(bearer.encode("utf-8", "replace")).digest()
            user = next((u for u in m.users.values() if u.token_sha256 is not None
                         and hmac.compare_digest(u.token_sha256, digest)), None)
            if user is None:
                raise NotAuthenticatedError("admin endpoint: unknown user token")
        elif client_cert:
            spki = _spki(x509.load_pem_x509_certificate(client_cert.encode()).public_key())
            for u in m.users.values():
                if u.public_key_pem and _spki(_public_key(u.public_key_pem)) == spki:
                    user = u
                    break
            if user is None:
                raise NotAuthenticatedError(
                    "admin endpoint: client certificate key is not a manifest user's key"
                )
        else:
            raise NotAuthenticatedError(
                "admin endpoint: send Authorization: Bearer <user token> or a client certificate"
            )
        if not set(user.roles) & set(roles):
            raise PermissionDeniedError(
                f"user {user.name!r} has roles {list(user.roles)}; needs one of {list(roles)}"
            )
        return user.name

    def set_value(self, user: str, name: str, value: bytes) -> int:
        """Store an operator-supplied ``value`` secret. Returns its version.

        Raises:
            NotFoundError: no such secret. MalformedRequestError: not a value secret or too large.
        """
        m = self._installed.require().manifest
        spec = m.secrets.get(name)
        if spec is None:
            raise NotFoundError(f"secret {name!r} is not in the manifest")
        if spec.type != "value":
            raise MalformedRequestError(
                f"secret {name!r} has type {spec.type!r}; only 'value' secrets are supplied"
            )
        if len(value) > spec.max_bytes:
            raise MalformedRequestError(
                f"secret {name!r}: {len(value)} bytes exceeds max_bytes {spec.max_bytes}"
            )
        cur = self._state.get("secret", name)
        ver = self._state.put("secret", name, value, expected_version=cur[1] if cur else 0)
        self._record("value-set", {"secret": name, "user": user, "version": ver})
        return ver

    def client_certificate(self, user: str, body: object) -> JSONObject:
        """Issue a client certificate (EKU clientAuth only) for a CSR (PKCS#10, RFC 2986).

        ``body``: ``{"csr": PEM, "validity_days": 1..825 (default 30)}``. The CSR's signature
        proves possession of the key; its subject CN (a manifest-style name) becomes the
        certificate's CN, a label only. Operators may call this, so a CN grants nothing
        anywhere: the broker's admin endpoints know users by their manifest public key, a
        workload's roles come from the owner's ``access`` secret, which pins keys
        (:class:`safehold.broker.manifest.Principal`), and the anchor members let only
        certificates with the attested-workload key purpose write a ledger (this one never has
        it; only the CSR's key and CN are used). Defence in depth: a CN that names a manifest
        workload or the broker's ledger is refused. The audit entry records the key's
        SHA-256 (``public_key_sha256``). Returns ``{"certificate": PEM, "ca": PEM}``.

        Raises:
            MalformedRequestError: malformed CSR or request, bad signature, bad name or validity
            (CertificateRequestError: a key type the CA does not sign).
            PermissionDeniedError: the CN names a workload or ledger, or the CSR asks for the
            attested-workload key purpose.
        """
        m = self._installed.require().manifest
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise MalformedRequestError("client certificate: expected {\"csr\": PEM}")
        days = body.get("validity_days", 30)
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_CLIENT_CERT_DAYS:
            raise MalformedRequestError(
                f"client certificate: validity_days must be 1..{MAX_CLIENT_CERT_DAYS}, got {days!r:.20}")
        try:
            csr = x509.load_pem_x509_csr(body["csr"].encode("ascii", "replace"))
        except ValueError as e:
            raise MalformedRequestError(f"client certificate: not a PEM CSR ({e})") from None
        if not csr.is_signature_valid:
            raise MalformedRequestError(
                "client certificate: CSR signature does not verify (proof of possession)"
            )
        cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if len(cns) == 1 else ""
        if not _CN_RE.fullmatch(cn):
            raise MalformedRequestError(
                f"client certificate: CSR needs one subject CN of 1..63 chars, got {cn!r:.70}"
            )
        if cn in m.workloads or cn == FRESHNESS_LEDGER:
            raise PermissionDeniedError(
                f"client certificate: CN {cn!r} is the name of a workload or freshness ledger; "
                "admin client certificates may not carry it (choose a user name)")
        try:
            eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and ATTESTED_WORKLOAD_EKU in eku:
            raise PermissionDeniedError(
                "client certificate: the CSR asks for the attested-workload key purpose, which only "
                "attestation (KBS) issuance sets; admin client certificates never carry it")
        # only the CSR's key and CN are used: its extensions are never copied
        cert = self._ca.issue(csr.public_key(), common_name=cn, validity_days=days, client_only=True)
        spki_sha256 = hashlib.sha256(_spki(csr.public_key())).hexdigest()
        self._record("client-certificate", {"cn": cn, "by": user, "serial": format(cert.serial_number, "x"),
                                            "validity_days": days, "public_key_sha256": spki_sha256})
        return {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                "ca": self._ca.cert_pem()}

    # --- manifest -----------------------------------------------------------------------------

    def set_manifest(self, raw: object, *, source: str = "api") -> int:
        """Install the first manifest (once). Returns its version (1); the same manifest again
        returns the current version.

        Raises:
            ManifestError: invalid. PermissionDeniedError: another manifest was ever set.
            StateIntegrityError: the state head or manifest rows were tampered with.
        """
        m = manifest_from_dict(raw)
        inst = self._installed
        inst.refresh()  # a manifest ever set (per the authenticated head) is never "unset"
        with inst.lock:
            cur = inst.manifest
            if cur is not None or inst.head.get("manifest_version", 0) > 0:
                if cur is not None and m.digest == cur.digest:
                    return inst.version
                raise PermissionDeniedError(
                    f"a manifest (version {inst.version}) is already set; updates must be "
                    "signed by an owner (`safehold broker manifest update`)"
                )
            self._install(m, 1, signer=None, source=source)
            return 1

    def update_manifest(self, raw: object, version: object, signer: object, signature: object) -> int:
        """Install a signed update as ``version`` = current + 1 (signature: see
        :func:`safehold.broker.manifest.verify_update`).

        Raises:
            MalformedRequestError: version/signer/signature of the wrong type.
            ManifestError: invalid manifest. PermissionDeniedError: bad or missing signature,
            signer not an owner. StateConflictError: ``version`` is not current + 1.
        """
        inst = self._installed
        inst.require()
        inst.refresh()
        if not isinstance(version, int) or not isinstance(signer, str) or not isinstance(signature, str):
            raise MalformedRequestError(
                "manifest update: expected version (int), signer and signature (strings)"
            )
        m = manifest_from_dict(raw)
        with inst.lock:
            act = inst.require()
            if version != act.version + 1:
                raise StateConflictError(
                    f"manifest update: version expected {act.version + 1}, got {version}"
                )
            try:
                verify_update(act.manifest, m, version, signer, signature, broker_id=self._broker_id)
            except ManifestError as e:
                self._record("manifest-denied", {"version": version, "signer": signer, "reason": str(e)})
                raise PermissionDeniedError(str(e)) from None
            self._install(m, version, signer=signer, source="update", signature=signature)
            return version

    def _install(self, m: Manifest, version: int, *, signer: str | None, source: str,
                 signature: str | None = None) -> None:
        inst = self._installed
        old = inst.manifest
        verifiers = build_verifiers(m)  # validates policies before anything is written
        try:
            items: list[tuple[str, str, bytes, int]] = []
            for s in m.secrets.values():
                if s.type == "keyset" and self._state.get("secret", s.name) is None:
                    items.append(("secret", s.name, protocol.keyset_to_json(Keyset.generate()), 0))
            entry = {"version": version, "manifest": m.raw, "signer": signer, "signature": signature,
                     "digest": m.digest, "time": int(time.time()), "source": source}
            items.append(("manifest", str(version), json.dumps(entry).encode(), 0))
            cur = self._state.get("manifest", "current")
            items.append(("manifest", "current", json.dumps({"version": version}).encode(),
                          cur[1] if cur else 0))
            rec = None
            if m.recovery_keys and (old is None or old.recovery_keys != m.recovery_keys
                                    or old.recovery_threshold != m.recovery_threshold):
                rec = self._state.recovery_row(m.recovery_keys, m.recovery_threshold)
            head = {**inst.head, "manifest_version": version, "manifest_digest": m.digest}
            # one transaction with the authenticated head: nothing half-written, and a CAS on
            # the head refuses an install racing another replica's
            head_ver = self._state.put_many(items, recovery_row=rec, head=(head, inst.head_ver)) or 0
        except ConflictError:
            raise StateConflictError("manifest changed concurrently; retry") from None
        if rec is not None:
            head["recovery_sha256"] = hashlib.sha256(rec).hexdigest()
        # One swap: attestations made under the old version stop working.
        inst.swap(Active(m, version, verifiers), head, head_ver)
        self._record("manifest", {"version": version, "digest": m.digest, "signer": signer,
                                  "source": source})

    def stored_version_of(self, digest: str) -> int | None:
        """The stored manifest version whose digest is ``digest`` (newest first), or None."""
        for v in range(self._installed.version, 0, -1):
            entry = self._state.get_json("manifest", str(v))
            if entry is not None and entry.get("digest") == digest:
                return v
        return None

    def manifest_entry(self, version: int | None = None) -> JSONObject:
        """A stored manifest version (default current) with its signer and time:
        ``{"version", "manifest", "signer", "signature", "digest", "time", "source"}``.

        Raises:
            NotFoundError: no such version. StateIntegrityError: the state head was tampered with.
        """
        inst = self._installed
        inst.require()
        inst.refresh()
        v = inst.version if version is None else version
        got: dict[str, Any] | None = self._state.get_json("manifest", str(v))
        if got is None:
            raise NotFoundError(f"manifest version {v} does not exist (current is {inst.version})")
        return got
