"""The key broker's core, free of any web framework: the :class:`Broker` facade that wires its
parts (:mod:`safehold.broker.http` maps it to HTTP, :mod:`safehold.broker.server` runs it).

Parts, each in its own module (Trustee's KBS is cut the same way):

* :mod:`~safehold.broker.sessions` — KBS sessions, challenge nonces, attested keys;
* :mod:`~safehold.broker.kbs` — auth / attest / resource / certificate release;
* :mod:`~safehold.broker.admin` — users, values, client certificates, manifest install/update;
* :mod:`~safehold.broker.recovery` — recovery of the sealed master key;
* :mod:`~safehold.broker.installed` — the installed manifest, checked against the state head;
* :mod:`~safehold.broker.state` / :mod:`~safehold.broker.audit` / :mod:`~safehold.broker.ca` —
  sealed state, signed audit log, workload CA.

The facade loads the broker's own keys (EAR signing key, audit key, broker id, CA) from the
sealed state, checks the state against its authenticated head, and hands each part what it
needs. Refusals are the domain exceptions of :mod:`safehold.broker.errors`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from safehold.attestation.attesters.base import Attester
from safehold.broker.admin import Admin
from safehold.broker.audit import BrokerAuditLog, verify_manifest_history
from safehold.broker.ca import WorkloadCA
from safehold.broker.errors import NotFoundError, NotReadyError, StateIntegrityError
from safehold.broker.installed import InstalledManifest
from safehold.broker.kbs import KBS
from safehold.broker.manifest import Manifest
from safehold.broker.recovery import Recovery, check_recovery_record
from safehold.broker.sessions import DEFAULT_NONCE_TTL, DEFAULT_TOKEN_TTL, SessionTable, StoredSessionTable
from safehold.broker.state import AUDIT_NAMESPACE, BrokerState
from safehold.errors import AuditChainError, ConflictError, SafeholdError
from safehold.fsutil import write_atomic
from safehold.jsontypes import JSONObject

log = logging.getLogger("safehold.broker")


@dataclass
class BrokerConfig:
    """Broker run-time options.

    Attributes:
        nonce_ttl / token_ttl: seconds a challenge nonce / an EAR token stays valid.
        data_dir: the broker's data directory (the CA certificate is written there as ``ca.pem``).
    """

    nonce_ttl: int = DEFAULT_NONCE_TTL
    token_ttl: int = DEFAULT_TOKEN_TTL
    data_dir: Path | None = None


@dataclass(frozen=True)
class BrokerKeys:
    """The broker's own keys, kept in the sealed state: ``ear`` signs EAR tokens (ES256),
    ``audit`` signs audit entries (Ed25519), ``ca`` is the workload CA, ``broker_id`` 32 hex."""

    ear: ec.EllipticCurvePrivateKey
    audit: ed25519.Ed25519PrivateKey
    broker_id: str
    ca: WorkloadCA


def load_keys(state: BrokerState) -> tuple[BrokerKeys, JSONObject, int, bool]:
    """Load the broker keys and CA, checked against the authenticated state head (``m/head``);
    on a fresh state make them first (one transaction with the head).

    Returns:
        ``(keys, state head, head row version, created)``.

    Raises:
        StateIntegrityError: a row is missing, edited or rolled back (names the row).
    """
    st = state
    head, head_ver = st.read_head()
    created = False
    if not head["initialised"]:
        pem, pk8, none = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        new_keys = {"ear": ec.generate_private_key(ec.SECP256R1()).private_bytes(pem, pk8, none).decode(),
                    "audit": ed25519.Ed25519PrivateKey.generate().private_bytes(pem, pk8, none).decode(),
                    "broker_id": secrets.token_hex(16)}
        new_ca = WorkloadCA.generate(new_keys["broker_id"][:8])
        try:
            head = {**head, "initialised": True}
            head_ver = st.put_many([("keys", "broker", json.dumps(new_keys).encode(), 0),
                                    ("ca", "root", new_ca.to_pem(), 0)],
                                   head=(head, head_ver)) or 0
            created = True
        except ConflictError:  # another replica initialised it first: read theirs
            head, head_ver = st.read_head()
            if not head["initialised"]:
                raise StateIntegrityError(
                    "broker state row m/head says the broker keys were never made, but rows "
                    f"{st.row_name('keys', 'broker')} / {st.row_name('ca', 'root')} exist: m/head "
                    "was rolled back in the store"
                ) from None
    keys = st.require_json("keys", "broker", "the state head says the broker keys were made")
    try:
        ear_key = serialization.load_pem_private_key(keys["ear"].encode(), password=None)
        aud_key = serialization.load_pem_private_key(keys["audit"].encode(), password=None)
        broker_id = str(keys["broker_id"])
        if not isinstance(ear_key, ec.EllipticCurvePrivateKey) or not isinstance(
                aud_key, ed25519.Ed25519PrivateKey):
            raise TypeError("key types")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StateIntegrityError(f"broker state row {st.row_name('keys', 'broker')} is malformed") from None
    got = st.get("ca", "root")
    if got is None:
        raise StateIntegrityError(
            f"broker state row {st.row_name('ca', 'root')} is missing (the state head says the "
            "workload CA was made): deleted in the store; the broker refuses to serve"
        )
    try:
        ca = WorkloadCA.from_pem(got[0])
    except (ValueError, TypeError, SafeholdError):
        raise StateIntegrityError(f"broker state row {st.row_name('ca', 'root')} is malformed") from None
    return BrokerKeys(ear_key, aud_key, broker_id, ca), head, head_ver, created


class Broker:
    """The key broker service core.

    Args:
        state: opened :class:`BrokerState` (ready or recovery).
        attester: the broker's own Attester (binds its recovery key to Evidence).
        config: :class:`BrokerConfig`.
        repair: rewrite a missing/replaced recovery record at start (False: refuse instead, e.g.
            for an offline ``audit verify`` that must not write).

    Raises:
        StateIntegrityError: a state row is missing, edited or rolled back (names the row).
        ManifestError: the stored manifest's policies do not load.
    """

    def __init__(self, state: BrokerState, attester: Attester | None, config: BrokerConfig | None = None,
                 *, repair: bool = True):
        self.state = state
        self.repair = repair
        self.config = config or BrokerConfig()
        #: State problems found and repaired at start (shown in /status; also audited).
        self.warnings: list[str] = []
        self.broker_id = ""
        self.ca: WorkloadCA | None = None
        self.audit: BrokerAuditLog | None = None
        self.installed = InstalledManifest(state)
        self.sessions: SessionTable = SessionTable(self.config.nonce_ttl, self.config.token_ttl)
        self.recovery = Recovery(state, attester, self.record)
        self._keys: BrokerKeys | None = None
        self._kbs: KBS | None = None
        self._admin: Admin | None = None
        #: Callbacks run after a successful recovery (e.g. switch the TLS certificate).
        self.on_ready: list[Callable[[], None]] = []
        if state.mode == "ready":
            self._load()

    def _load(self) -> None:
        """Load the broker keys, CA and manifest (each checked against the state head), then
        wire the parts that need them. Raises as the class does."""
        st = self.state
        keys, head, head_ver, created = load_keys(st)
        self.broker_id, self.ca = keys.broker_id, keys.ca
        self.audit = BrokerAuditLog(st.store, AUDIT_NAMESPACE, st.seal_bytes, st.open_bytes, keys.audit)
        if created:  # what recovery-key holders write down (docs/broker.md → Recovery)
            self.record("init", {"broker_id": keys.broker_id, "master_fingerprint": st.master_fingerprint()})
        self.installed.load(head, head_ver)
        self.installed.check_secrets()
        warning = check_recovery_record(st, self.installed, repair=self.repair, record=self.record)
        if warning is not None:
            self.warnings.append(warning)
        # KBS sessions and nonces in the shared store: any replica finishes a handshake another
        # started, a nonce is claimed once across replicas (broker/sessions.py)
        self.sessions = StoredSessionTable(st.store, st.seal_bytes, st.open_bytes,
                                           self.config.nonce_ttl, self.config.token_ttl)
        self._kbs = KBS(st, self.installed, self.sessions, keys.ear, keys.ca, self.record)
        self._admin = Admin(st, self.installed, keys.ca, keys.broker_id, self.record)
        self._keys = keys  # last: a load that failed half-way leaves the broker not ready
        if self.config.data_dir is not None:
            # atomic: `safehold up` polls for this file and reads it as soon as it appears
            write_atomic(Path(self.config.data_dir) / "ca.pem", keys.ca.cert_pem(), mode=0o644)

    # --- state --------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``ready`` or ``recovery``."""
        return self.state.mode

    @property
    def manifest(self) -> Manifest | None:
        """The current manifest, or None before the first is set."""
        return self.installed.manifest

    @property
    def manifest_version(self) -> int:
        """The current manifest version (0 before the first is set)."""
        return self.installed.version

    def _ready(self) -> BrokerKeys:
        if self.state.mode != "ready":
            raise NotReadyError(f"broker is in recovery mode: {self.state.reason}")
        if self._keys is None:
            raise NotReadyError("broker state did not load (see the broker's log); restart the broker")
        return self._keys

    @property
    def kbs(self) -> KBS:
        """The KBS endpoints. Raises NotReadyError in recovery mode."""
        self._ready()
        assert self._kbs is not None
        return self._kbs

    @property
    def admin(self) -> Admin:
        """The admin operations. Raises NotReadyError in recovery mode."""
        self._ready()
        assert self._admin is not None
        return self._admin

    def record(self, event: str, detail: JSONObject) -> None:
        """Append an audit entry (never key material or secret values); a no-op while sealed."""
        if self.audit is not None:
            self.audit.append(event, detail)

    def status(self) -> JSONObject:
        """Public status: mode, broker measurement; when ready also the manifest version/digest
        (what the next signed update binds as ``previous_sha256``), the broker id and the
        master-key fingerprint (32 hex, :func:`~safehold.broker.shares.master_fingerprint`) that
        recovery-key holders record; in recovery mode the reason."""
        out: dict[str, Any] = {"mode": self.mode,
                               "broker_measurement": self.state.identity.measurement.hex()}
        if self.mode == "ready":
            m = self.installed.manifest
            out["manifest_version"] = self.installed.version
            out["manifest_digest"] = m.digest if m else None
            out["broker_id"] = self.broker_id
            out["master_fingerprint"] = self.state.master_fingerprint()
            if self.warnings:
                out["warnings"] = list(self.warnings)
        else:
            out["reason"] = self.state.reason
        return out

    # --- KBS (safehold.broker.kbs) --------------------------------------------------------------

    def auth(self, body: object) -> tuple[str, JSONObject]:
        """:meth:`KBS.auth <safehold.broker.kbs.KBS.auth>`."""
        return self.kbs.auth(body)

    def attest(self, sid: str | None, body: object) -> JSONObject:
        """:meth:`KBS.attest <safehold.broker.kbs.KBS.attest>`."""
        return self.kbs.attest(sid, body)

    def resource(self, sid: str | None, bearer: str | None, repository: str, rtype: str,
                 tag: str) -> JSONObject:
        """:meth:`KBS.resource <safehold.broker.kbs.KBS.resource>`."""
        return self.kbs.resource(sid, bearer, repository, rtype, tag)

    def certificate(self, sid: str | None, bearer: str | None, name: str, body: object) -> JSONObject:
        """:meth:`KBS.certificate <safehold.broker.kbs.KBS.certificate>`."""
        return self.kbs.certificate(sid, bearer, name, body)

    def ca_pem(self) -> str:
        """The workload CA certificate (PEM). Raises NotReadyError in recovery mode."""
        return self._ready().ca.cert_pem()

    def session_values(self, name: str) -> JSONObject:
        """SCONE-CAS-compatible ``/v1/values/session=<name>`` document.

        Raises:
            NotReadyError: recovery mode or no manifest.
            NotFoundError: ``name`` is neither the manifest name nor a workload.
        """
        self._ready()
        m = self.installed.require().manifest
        if name != m.name and name not in m.workloads:
            raise NotFoundError(f"session {name!r} is not known")
        return {"values": {"api_ca_cert": {"value": self.ca_pem()}}}

    # --- admin (safehold.broker.admin) ----------------------------------------------------------

    def authorize(self, bearer: str | None, *roles: str, client_cert: str | None = None) -> str:
        """:meth:`Admin.authorize <safehold.broker.admin.Admin.authorize>`."""
        return self.admin.authorize(bearer, *roles, client_cert=client_cert)

    def set_value(self, user: str, name: str, value: bytes) -> int:
        """:meth:`Admin.set_value <safehold.broker.admin.Admin.set_value>`."""
        return self.admin.set_value(user, name, value)

    def client_certificate(self, user: str, body: object) -> JSONObject:
        """:meth:`Admin.client_certificate <safehold.broker.admin.Admin.client_certificate>`."""
        return self.admin.client_certificate(user, body)

    def set_manifest(self, raw: object, *, source: str = "api") -> int:
        """:meth:`Admin.set_manifest <safehold.broker.admin.Admin.set_manifest>`."""
        return self.admin.set_manifest(raw, source=source)

    def update_manifest(self, raw: object, version: object, signer: object, signature: object) -> int:
        """:meth:`Admin.update_manifest <safehold.broker.admin.Admin.update_manifest>`."""
        return self.admin.update_manifest(raw, version, signer, signature)

    def manifest_entry(self, version: int | None = None) -> JSONObject:
        """:meth:`Admin.manifest_entry <safehold.broker.admin.Admin.manifest_entry>`."""
        return self.admin.manifest_entry(version)

    def stored_version_of(self, digest: str) -> int | None:
        """:meth:`Admin.stored_version_of <safehold.broker.admin.Admin.stored_version_of>`."""
        return self.admin.stored_version_of(digest)

    # --- audit ----------------------------------------------------------------------------------

    def audit_entries(self) -> list[JSONObject]:
        """All audit entries after verifying the chain.

        Raises:
            NotReadyError: recovery mode. AuditChainError: naming the first broken entry.
        """
        self._ready()
        assert self.audit is not None
        return [e.as_dict() for e in self.audit.entries()]

    def audit_verify(self) -> JSONObject:
        """``{"ok": true, "entries": n}`` or ``{"ok": false, "error": "<first broken entry>"}``:
        the chain and every signature, manifest versions only going up, and the last one being
        the version the state head records.

        Raises:
            NotReadyError: recovery mode.
        """
        keys = self._ready()
        assert self.audit is not None
        try:
            n, last = verify_manifest_history(self.audit, keys.audit.public_key())
            head, _ = self.state.read_head()
            if head["manifest_version"] != last:
                raise AuditChainError(
                    f"audit log: the last manifest entry is version {last}, the state head (m/head) "
                    f"records version {head['manifest_version']} (state or log rolled back in the store)"
                )
            return {"ok": True, "entries": n}
        except (AuditChainError, StateIntegrityError) as e:
            return {"ok": False, "error": str(e)}

    # --- recovery (safehold.broker.recovery) -----------------------------------------------------

    def recovery_info(self) -> JSONObject:
        """:meth:`Recovery.info <safehold.broker.recovery.Recovery.info>`."""
        return self.recovery.info()

    def recover(self, body: object) -> JSONObject:
        """Restore the master key (:meth:`Recovery.restore
        <safehold.broker.recovery.Recovery.restore>`), load the broker, run :attr:`on_ready` and
        audit the recovery. Returns :meth:`status`."""
        shares = self.recovery.restore(body)
        self._load()
        for hook in self.on_ready:
            hook()
        self.recovery.audit_restored(shares)
        return self.status()
