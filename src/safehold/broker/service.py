"""The key broker's logic, free of any web framework (``safehold.broker.app`` maps it to HTTP).

The broker is a Relying Party (RFC 9334): it sends Evidence to the Verifier
(``safehold.attestation.verifier``) under the manifest workload's appraisal policy, signs the
outcome as an EAR token, and releases a secret only to a key whose Evidence was affirmed.

Refusals are the domain exceptions of :mod:`safehold.broker.errors`; the HTTP layer maps them
to status codes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc.jwk import ECKey, RSAKey

from safehold.attestation.evidence import Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.result import issue_ear, verify_ear
from safehold.attestation.verifier import Verifier
from safehold.broker import protocol
from safehold.broker.audit import BrokerAuditLog, verify_chain
from safehold.broker.ca import WorkloadCA
from safehold.broker.errors import (
    MalformedRequestError,
    NonceReplayedError,
    NotAuthenticatedError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    RecoveryError,
    StateConflictError,
    StateIntegrityError,
)
from safehold.broker.manifest import Manifest, manifest_from_dict, verify_update
from safehold.broker.shares import normalize_fingerprint
from safehold.broker.state import AUDIT_NAMESPACE, BrokerState
from safehold.errors import (
    AttestationError,
    AttestationResultError,
    AuditChainError,
    BrokerError,
    ConfigError,
    ConflictError,
    EvidenceFormatError,
    ManifestError,
    SafeholdError,
)
from safehold.fsutil import write_atomic

log = logging.getLogger("safehold.broker")

DEFAULT_NONCE_TTL = 300
DEFAULT_TOKEN_TTL = 600
MAX_SESSIONS = 10_000


@dataclass
class Attested:
    """A successfully attested TEE key.

    ``manifest_version`` is the manifest version whose appraisal policy affirmed the Evidence;
    the attestation is honoured only while that version is current (an update may revoke the
    measurement or remove the workload).
    """

    workload: str
    key: ECKey | RSAKey
    thumbprint: bytes
    expires: float
    measurement: str
    manifest_version: int = 0


@dataclass(frozen=True)
class _Active:
    """The installed manifest, its version and its workloads' Verifiers, swapped as one value so
    a request never sees a manifest with another version's policies."""

    manifest: Manifest
    version: int
    verifiers: dict[str, Verifier]


@dataclass
class Session:
    """One ``kbs-session-id`` session: the challenge and, after attestation, its result."""

    nonce: str
    created: float
    tee: str
    workload: str | None
    used: bool = False
    attested: Attested | None = None
    token: str = ""


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
    extra: dict[str, Any] = field(default_factory=dict)


class Broker:
    """The key broker service core.

    Args:
        state: opened :class:`BrokerState` (ready or recovery).
        attester: the broker's own Attester (binds its recovery key to Evidence).
        config: :class:`BrokerConfig`.
    """

    def __init__(self, state: BrokerState, attester: Any, config: BrokerConfig | None = None, *,
                 repair: bool = True):
        self.state = state
        #: Rewrite a missing/replaced recovery record at start (False: refuse instead, e.g. for
        #: an offline ``audit verify`` that must not write).
        self.repair = repair
        self.attester = attester
        self.config = config or BrokerConfig()
        self._active: _Active | None = None
        self._head: dict[str, Any] = {}
        self._head_ver = 0
        #: State problems found and repaired at start (shown in /status; also audited).
        self.warnings: list[str] = []
        #: Failed recovery attempts while sealed (audited once the broker is ready again).
        self._failed_recoveries: list[dict[str, Any]] = []
        self.broker_id = ""
        self.ca: WorkloadCA | None = None
        self.audit: BrokerAuditLog | None = None
        self._ear_key: ec.EllipticCurvePrivateKey | None = None
        self._audit_key: ed25519.Ed25519PrivateKey | None = None
        self._sessions: dict[str, Session] = {}
        self._tokens: dict[bytes, Attested] = {}
        self._lock = threading.RLock()
        self._recovery_key = ECKey.generate_key("P-256")
        #: Callbacks run after a successful recovery (e.g. switch the TLS certificate).
        self.on_ready: list[Any] = []
        if state.mode == "ready":
            self._load()

    # --- start-up -----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``ready`` or ``recovery``."""
        return self.state.mode

    @property
    def manifest(self) -> Manifest | None:
        """The current manifest, or None before the first is set."""
        act = self._active
        return act.manifest if act else None

    @property
    def manifest_version(self) -> int:
        """The current manifest version (0 before the first is set)."""
        act = self._active
        return act.version if act else 0

    def _load(self) -> None:
        """Load the broker keys, CA and manifest, each checked against the authenticated state
        head (``m/head``); on a fresh state make the keys and CA (one transaction with the head).

        Raises:
            StateIntegrityError: a row is missing, edited or rolled back (names the row).
            ManifestError: the stored manifest's policies do not load.
        """
        st = self.state
        head, head_ver = st.read_head()
        created = False
        if not head["initialised"]:
            ear = ec.generate_private_key(ec.SECP256R1())
            aud = ed25519.Ed25519PrivateKey.generate()
            pem = serialization.Encoding.PEM
            pk8 = serialization.PrivateFormat.PKCS8
            none = serialization.NoEncryption()
            new_keys = {"ear": ear.private_bytes(pem, pk8, none).decode(),
                        "audit": aud.private_bytes(pem, pk8, none).decode(),
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
            raise StateIntegrityError(
                f"broker state row {st.row_name('keys', 'broker')} is malformed") from None
        self._ear_key, self._audit_key = ear_key, aud_key
        self.broker_id = broker_id
        got = st.get("ca", "root")
        if got is None:
            raise StateIntegrityError(
                f"broker state row {st.row_name('ca', 'root')} is missing (the state head says the "
                "workload CA was made): deleted in the store; the broker refuses to serve"
            )
        try:
            self.ca = WorkloadCA.from_pem(got[0])
        except (ValueError, TypeError, SafeholdError):
            raise StateIntegrityError(f"broker state row {st.row_name('ca', 'root')} is malformed") from None
        self.audit = BrokerAuditLog(st.store, AUDIT_NAMESPACE, st.seal_bytes, st.open_bytes, aud_key)
        if created:  # what recovery-key holders write down (docs/broker.md → Recovery)
            self.record("init", {"broker_id": self.broker_id,
                                 "master_fingerprint": st.master_fingerprint()})
        act = self._active_from_head(head)
        self._head, self._head_ver = head, head_ver
        self._active = act
        self._check_secrets()
        self._check_recovery_record()
        if self.config.data_dir is not None:
            # atomic: `safehold up` polls for this file and reads it as soon as it appears
            write_atomic(Path(self.config.data_dir) / "ca.pem", self.ca.cert_pem(), mode=0o644)

    def _active_from_head(self, head: dict[str, Any]) -> _Active | None:
        """The manifest the state head names, after checking its rows agree with the head.

        Raises:
            StateIntegrityError: ``manifest/current`` or ``manifest/<v>`` missing, edited, or
                disagreeing with the head (version or digest), or a version beyond the head exists.
        """
        st = self.state
        v = head["manifest_version"]
        cur = st.get_json("manifest", "current")
        if v == 0:
            if cur is not None:
                raise StateIntegrityError(
                    f"broker state row {st.row_name('manifest', 'current')} exists but the state head "
                    "(m/head) records no manifest ever set: m/head was rolled back in the store"
                )
            return None
        why = f"the state head records manifest version {v}"
        if cur is None:
            cur = st.require_json("manifest", "current", why)
        if cur.get("version") != v:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', 'current')} says version "
                f"{cur.get('version')!r:.20}, {why}: rolled back or replaced in the store"
            )
        for older in range(1, v):  # every version stays readable (GET /admin/manifest?version=N)
            st.require_json("manifest", str(older), why)
        entry = st.require_json("manifest", str(v), why)
        try:
            m = manifest_from_dict(entry["manifest"])
        except (KeyError, ManifestError):
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v))} is malformed") from None
        if m.digest != head.get("manifest_digest") or entry.get("digest") != m.digest:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v))} has digest {m.digest[:16]}…, the "
                f"state head records {str(head.get('manifest_digest'))[:16]}…: replaced in the store"
            )
        if st.get("manifest", str(v + 1)) is not None:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v + 1))} exists beyond the state "
                f"head's manifest version {v}: m/head and manifest/current were rolled back in the store"
            )
        return _Active(m, v, self._build_verifiers(m))

    def _check_secrets(self) -> None:
        """Every keyset secret of the manifest exists (they are made at install) and every
        stored secret authenticates. Raises StateIntegrityError naming the row."""
        act = self._active
        if act is None:
            return
        for spec in act.manifest.secrets.values():
            if spec.type == "keyset":
                self.state.require_json("secret", spec.name, "keyset secrets are made when the manifest "
                                        "is installed")
            elif spec.type == "value":
                self.state.get("secret", spec.name)

    def _check_recovery_record(self) -> None:
        """Compare ``m/recovery`` with the digest the state head records; if it is missing or
        was replaced, say so loudly (log, audit, ``/status`` warnings) and write fresh shares
        for the current manifest's recovery keys (the master key is at hand)."""
        st = self.state
        want, got = self._head.get("recovery_sha256"), st.recovery_sha256()
        if want == got:
            return
        what = "is missing" if got is None else "differs from the one the state head records"
        msg = f"broker state row m/recovery {what} (deleted or replaced in the store)"
        act = self._active
        if not self.repair:
            raise StateIntegrityError(msg)
        if act is not None and act.manifest.recovery_keys:
            m = act.manifest
            try:
                self._head_ver = st.put_many(
                    [], recovery_row=st.recovery_row(m.recovery_keys, m.recovery_threshold),
                    head=(self._head, self._head_ver)) or self._head_ver
            except ConflictError:
                raise StateIntegrityError(f"{msg}; rewriting it conflicted: restart the broker") from None
            self._head, _ = st.read_head()
            msg += "; fresh recovery shares were written for the manifest's recovery keys"
        else:
            msg += "; the current manifest names no recovery keys, so nothing was rewritten"
        log.error("STATE TAMPERING: %s", msg)
        self.warnings.append(msg)
        self.record("state-repaired", {"row": "m/recovery", "detail": msg})

    def _check_head(self) -> None:
        """Re-read the state head before a manifest operation: refuse if the store's manifest
        went backwards or was replaced; follow a newer version another replica installed.

        Raises:
            StateIntegrityError: as :meth:`_active_from_head`, or the head's version is older
                than the one this broker holds.
        """
        head, ver = self.state.read_head()
        if ver == self._head_ver and head == self._head:
            return
        held = self.manifest_version
        if head["manifest_version"] < held:
            raise StateIntegrityError(
                f"broker state row m/head records manifest version {head['manifest_version']}, this "
                f"broker holds version {held}: rolled back in the store"
            )
        act = self._active_from_head(head)
        with self._lock:
            self._head, self._head_ver = head, ver
            self._active = act

    @staticmethod
    def _build_verifiers(m: Manifest) -> dict[str, Verifier]:
        """One Verifier per workload policy (reads each ``simulated_root`` file).

        Raises:
            ManifestError: a policy does not load (``workloads.<name>.policy: …``), or its
                ``simulated_root`` is relative (the CLI makes it absolute against the manifest
                file's directory; a relative path reaching the broker would depend on its cwd).
        """
        verifiers = {}
        for name, w in m.workloads.items():
            root = w.policy.get("simulated_root")
            if isinstance(root, str) and not Path(root).is_absolute():
                raise ManifestError(
                    f"workloads.{name}.policy.simulated_root: {root!r:.80} is relative; give an absolute "
                    "path (the safehold CLI resolves it against the manifest file's directory)"
                )
            try:
                verifiers[name] = Verifier(AppraisalPolicy.from_dict({"name": name, **w.policy}))
            except ConfigError as e:
                raise ManifestError(f"workloads.{name}.policy: {e}") from None
        return verifiers

    def _ready(self) -> None:
        if self.state.mode != "ready":
            raise NotReadyError(f"broker is in recovery mode: {self.state.reason}")

    def _need_manifest(self) -> Manifest:
        return self._need_active().manifest

    def _need_active(self) -> _Active:
        self._ready()
        act = self._active
        if act is None:
            raise NotReadyError("no manifest is set yet: `safehold broker manifest set`")
        return act

    def record(self, event: str, detail: dict[str, Any]) -> None:
        """Append an audit entry (never key material or secret values)."""
        if self.audit is not None:
            self.audit.append(event, detail)

    # --- manifest -----------------------------------------------------------------------------

    def set_manifest(self, raw: Any, *, source: str = "api") -> int:
        """Install the first manifest (once). Returns its version (1).

        Raises:
            ManifestError: invalid. PermissionDeniedError: a manifest is already set.
        """
        self._ready()
        m = manifest_from_dict(raw)
        self._check_head()  # a manifest ever set (per the authenticated head) is never "unset"
        with self._lock:
            if self.manifest is not None or self._head.get("manifest_version", 0) > 0:
                if m.digest == self.manifest.digest:
                    return self.manifest_version
                raise PermissionDeniedError(
                    f"a manifest (version {self.manifest_version}) is already set; updates must be "
                    "signed by an owner (`safehold broker manifest update`)"
                )
            self._install(m, 1, signer=None, source=source)
            return 1

    def update_manifest(self, raw: Any, version: Any, signer: Any, signature: Any) -> int:
        """Install a signed update as ``version`` = current + 1.

        Raises:
            ManifestError: invalid manifest. PermissionDeniedError: bad or missing signature,
            signer not an owner. StateConflictError: ``version`` is not current + 1.
        """
        self._need_manifest()
        self._check_head()
        if not isinstance(version, int) or not isinstance(signer, str) or not isinstance(signature, str):
            raise MalformedRequestError(
                "manifest update: expected version (int), signer and signature (strings)"
            )
        m = manifest_from_dict(raw)
        with self._lock:
            if version != self.manifest_version + 1:
                raise StateConflictError(
                    f"manifest update: version expected {self.manifest_version + 1}, got {version}"
                )
            assert self._active is not None
            try:
                verify_update(self._active.manifest, m, version, signer, signature,
                              broker_id=self.broker_id)
            except ManifestError as e:
                self.record("manifest-denied", {"version": version, "signer": signer, "reason": str(e)})
                raise PermissionDeniedError(str(e)) from None
            self._install(m, version, signer=signer, source="update", signature=signature)
            return version

    def _install(self, m: Manifest, version: int, *, signer: str | None, source: str,
                 signature: str | None = None) -> None:
        old = self.manifest
        verifiers = self._build_verifiers(m)  # validates policies before anything is written
        try:
            items: list[tuple[str, str, bytes, int]] = []
            for s in m.secrets.values():
                if s.type == "keyset" and self.state.get("secret", s.name) is None:
                    from safehold.crypto.keyset import Keyset

                    items.append(("secret", s.name, protocol.keyset_to_json(Keyset.generate()), 0))
            entry = {"version": version, "manifest": m.raw, "signer": signer, "signature": signature,
                     "digest": m.digest, "time": int(time.time()), "source": source}
            items.append(("manifest", str(version), json.dumps(entry).encode(), 0))
            cur = self.state.get("manifest", "current")
            items.append(("manifest", "current", json.dumps({"version": version}).encode(),
                          cur[1] if cur else 0))
            rec = None
            if m.recovery_keys and (old is None or old.recovery_keys != m.recovery_keys
                                    or old.recovery_threshold != m.recovery_threshold):
                rec = self.state.recovery_row(m.recovery_keys, m.recovery_threshold)
            head = {**self._head, "manifest_version": version, "manifest_digest": m.digest}
            # one transaction with the authenticated head: nothing half-written, and a CAS on
            # the head refuses an install racing another replica's
            head_ver = self.state.put_many(items, recovery_row=rec, head=(head, self._head_ver)) or 0
        except ConflictError:
            raise StateConflictError("manifest changed concurrently; retry") from None
        if rec is not None:
            head["recovery_sha256"] = hashlib.sha256(rec).hexdigest()
        # One swap: attestations made under the old version stop working (see _attested).
        self._head, self._head_ver = head, head_ver
        self._active = _Active(m, version, verifiers)
        self.record("manifest", {"version": version, "digest": m.digest, "signer": signer,
                                 "source": source})

    def stored_version_of(self, digest: str) -> int | None:
        """The stored manifest version whose digest is ``digest`` (newest first), or None."""
        for v in range(self.manifest_version, 0, -1):
            entry = self.state.get_json("manifest", str(v))
            if entry is not None and entry.get("digest") == digest:
                return v
        return None

    def manifest_entry(self, version: int | None = None) -> dict[str, Any]:
        """A stored manifest version (default current) with its signer and time.

        Raises:
            NotFoundError: no such version.
        """
        self._need_manifest()
        self._check_head()
        v = self.manifest_version if version is None else version
        got = self.state.get_json("manifest", str(v))
        if got is None:
            raise NotFoundError(f"manifest version {v} does not exist (current is {self.manifest_version})")
        return got

    # --- users --------------------------------------------------------------------------------

    def authorize(self, bearer: str | None, *roles: str, client_cert: str | None = None) -> str:
        """Return the manifest user who holds one of ``roles``, identified by the bearer token
        (SHA-256 equals ``token_sha256``) or else by a TLS client certificate (already verified
        by the TLS layer against the workload CA) whose public key is the user's
        ``public_key`` / ``certificate`` key.

        Raises:
            NotAuthenticatedError: no or unknown credentials. PermissionDeniedError: role missing.
        """
        m = self._need_manifest()
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
        m = self._need_manifest()
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
        cur = self.state.get("secret", name)
        ver = self.state.put("secret", name, value, expected_version=cur[1] if cur else 0)
        self.record("value-set", {"secret": name, "user": user, "version": ver})
        return ver

    # --- KBS protocol -------------------------------------------------------------------------

    def auth(self, body: Any) -> tuple[str, dict[str, Any]]:
        """Handle a KBS *Request*; returns ``(session id, Challenge)``.

        Raises:
            MalformedRequestError: malformed Request or unknown TEE / workload.
        """
        m = self._need_manifest()
        if not isinstance(body, dict):
            raise MalformedRequestError("KBS Request: expected a JSON object")
        version, tee = body.get("version"), body.get("tee")
        if not isinstance(version, str) or version.split(".")[0] != PROTOCOL_MAJOR:
            raise MalformedRequestError(
                f"KBS Request version: expected {protocol.PROTOCOL_VERSION}, got {version!r:.20}"
            )
        if tee not in protocol.TEE_NAMES:
            raise MalformedRequestError(
                f"KBS Request tee: unknown TEE {tee!r:.30}; known: {sorted(protocol.TEE_NAMES)}"
            )
        extra = body.get("extra-params", {})
        if extra in ("", None):
            extra = {}
        if not isinstance(extra, dict):
            raise MalformedRequestError("KBS Request extra-params: expected an object")
        workload = extra.get("workload")
        if workload is not None and workload not in m.workloads:
            raise MalformedRequestError(
                f"KBS Request extra-params.workload: {workload!r:.40} is not in the manifest"
            )
        sid = secrets.token_urlsafe(24)
        nonce = protocol.b64url(os.urandom(32))
        now = time.time()
        with self._lock:
            self._gc(now)
            self._sessions[sid] = Session(nonce, now, protocol.TEE_NAMES[tee], workload)
        return sid, {"nonce": nonce, "extra-params": {}}

    def _gc(self, now: float) -> None:
        ttl = max(self.config.nonce_ttl, self.config.token_ttl)
        if len(self._sessions) > MAX_SESSIONS // 2:
            for k in [k for k, s in self._sessions.items() if now - s.created > ttl]:
                del self._sessions[k]
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]
        for k in [k for k, a in self._tokens.items() if a.expires < now]:
            del self._tokens[k]

    def attest(self, sid: str | None, body: Any) -> dict[str, Any]:
        """Handle a KBS *Attestation*; returns ``{"token": EAR}``.

        Raises:
            NotAuthenticatedError: no/unknown session, nonce used or expired, Evidence not
                authentic or bound to another nonce/key.
            MalformedRequestError: malformed body, JWK or Evidence.
            PermissionDeniedError: the appraisal policy refuses the claims (names each failed claim).
        """
        act = self._need_active()
        m = act.manifest
        now = time.time()
        with self._lock:
            sess = self._sessions.get(sid or "")
            if sess is None:
                raise NotAuthenticatedError("KBS attest: no session; POST /kbs/v0/auth first")
            if sess.used:
                self.record("attest", {"verdict": "denied", "reason": "nonce replayed"})
                raise NonceReplayedError("KBS attest: the challenge nonce was already used (replay)")
            sess.used = True  # single use, whatever the outcome
        if now - sess.created > self.config.nonce_ttl:
            raise NotAuthenticatedError(
                f"KBS attest: the challenge nonce expired ({self.config.nonce_ttl} s)"
            )
        if not isinstance(body, dict):
            raise MalformedRequestError("KBS Attestation: expected a JSON object")
        jwk_obj = body.get("tee-pubkey")
        key = protocol.import_tee_pubkey(jwk_obj)
        ev = body.get("tee-evidence")
        if isinstance(ev, dict | list):
            ev = json.dumps(ev)
        if not isinstance(ev, str):
            raise MalformedRequestError("KBS Attestation tee-evidence: expected a CMW (JSON text or value)")
        evidence = Evidence.from_cmw(ev)  # EvidenceFormatError → 400
        if evidence.tee_type != sess.tee:
            raise MalformedRequestError(
                f"KBS attest: Request said tee {sess.tee!r}, Evidence is {evidence.tee_type!r}"
            )
        rd = protocol.report_data(sess.nonce, jwk_obj)
        if sess.workload is not None and sess.workload not in m.workloads:
            raise NotAuthenticatedError(
                f"KBS attest: workload {sess.workload!r} is no longer in the manifest "
                f"(version {act.version}); POST /kbs/v0/auth again")
        candidates = [sess.workload] if sess.workload else sorted(m.workloads)
        failures: dict[str, list[tuple[str, str, str]]] = {}
        only_binding = True
        chosen = None
        for name in candidates:
            try:
                appraisal = act.verifiers[name].evaluate(evidence, expected_report_data=rd)
            except EvidenceFormatError as e:
                raise MalformedRequestError(f"KBS attest: {e}") from None
            except AttestationError as e:
                self.record("attest", {"verdict": "denied", "reason": str(e)})
                raise NotAuthenticatedError(f"KBS attest: Evidence is not authentic: {e}") from None
            if appraisal.ok:
                chosen = (name, appraisal)
                break
            bad = appraisal.failures
            failures[name] = [v.as_tuple() for v in bad]
            only_binding = only_binding and all(v.claim == "report_data" for v in bad)
        if chosen is None:
            detail = {"verdict": "denied",
                      "workloads": {k: [list(f) for f in v] for k, v in failures.items()}}
            self.record("attest", detail)
            text = "; ".join(f"{w}: " + ", ".join(f"{c}: expected {e}, got {g}" for c, e, g in fs)
                             for w, fs in failures.items())
            if only_binding:
                raise NotAuthenticatedError(
                    "KBS attest: Evidence report_data does not bind this session's nonce and tee-pubkey "
                    f"(stale, replayed or relayed Evidence): {text}"
                )
            raise PermissionDeniedError(f"KBS attest: appraisal policy refuses the Evidence: {text}")
        name, appraisal = chosen
        tp = protocol.thumbprint(key)
        assert self._ear_key is not None
        token = issue_ear(appraisal, self._ear_key, submod=name, nonce=tp, ttl=self.config.token_ttl)
        att = Attested(name, key, tp, now + self.config.token_ttl, appraisal.claims.measurement.hex(),
                       act.version)
        with self._lock:
            sess.attested, sess.token = att, token
            self._tokens[tp] = att
        self.record("attest", {"verdict": "affirmed", "workload": name, "tee": evidence.tee_type,
                               "measurement": att.measurement, "key": protocol.b64url(tp),
                               "manifest_version": act.version})
        return {"token": token}

    def _attested(self, sid: str | None, bearer: str | None, act: _Active) -> Attested:
        """The attestation behind a cookie or EAR bearer token, valid under manifest ``act``.

        Raises:
            NotAuthenticatedError: none, expired, forged, or made under another manifest version
                or for a workload ``act`` no longer has.
        """
        now = time.time()
        if bearer:
            assert self._ear_key is not None
            try:
                claims = verify_ear(bearer, self._ear_key.public_key(), accept_warning=True)
            except AttestationResultError as e:
                raise NotAuthenticatedError(f"EAR token refused: {e}") from None
            tp = protocol.unb64url(str(claims.get("eat_nonce", "")))
            with self._lock:
                att = self._tokens.get(tp)
            if att is None or att.workload not in claims.get("submods", {}):
                raise NotAuthenticatedError(
                    "EAR token is not bound to a key attested at this broker; attest again"
                )
        else:
            with self._lock:
                sess = self._sessions.get(sid or "")
            if sess is None or sess.attested is None:
                raise NotAuthenticatedError("not attested: POST /kbs/v0/auth and /kbs/v0/attest first")
            att = sess.attested
        if att.expires < now:
            raise NotAuthenticatedError("attestation expired: attest again")
        if att.manifest_version != act.version:
            raise NotAuthenticatedError(f"attested under manifest version {att.manifest_version}, current is "
                               f"{act.version}: attest again")
        if att.workload not in act.manifest.workloads:  # cannot happen with equal versions; fail closed
            raise NotAuthenticatedError(
                f"workload {att.workload!r} is not in manifest version {act.version}: attest again")
        return att

    def resource(self, sid: str | None, bearer: str | None, repository: str, rtype: str,
                 tag: str) -> dict[str, Any]:
        """Release ``<repository>/<type>/<tag>`` as a JWE to the attested ``tee-pubkey``.

        Raises:
            NotAuthenticatedError, NotFoundError, PermissionDeniedError as in the KBS protocol.
        """
        act = self._need_active()
        m = act.manifest
        att = self._attested(sid, bearer, act)
        path = f"{repository}/{rtype}/{tag}"
        spec = m.secrets.get(tag)
        if repository != m.repository or spec is None or spec.type != rtype:
            self.record("deny", {"resource": path, "workload": att.workload, "reason": "unknown"})
            raise NotFoundError(f"resource {path} does not exist")
        if tag not in m.workloads[att.workload].secrets:
            self.record("deny", {"resource": path, "workload": att.workload, "reason": "not allowed"})
            raise PermissionDeniedError(f"workload {att.workload!r} may not read {path} (manifest)")
        if spec.type == "certificate":
            plaintext = self._issue(m, att, spec.name, [])
        else:
            got = self.state.get("secret", spec.name)
            if got is None:
                self.record("deny", {"resource": path, "workload": att.workload, "reason": "no value"})
                raise NotFoundError(f"resource {path} has no value yet (an operator must supply it)")
            plaintext = got[0]
        self.record("release", {"resource": path, "workload": att.workload})
        return protocol.encrypt_response(plaintext, att.key)

    def certificate(self, sid: str | None, bearer: str | None, name: str, body: Any) -> dict[str, Any]:
        """Issue the certificate secret ``name`` to the attested key, with requested extensions.

        ``body``: ``{"extensions": [{"oid": "2.23.133.5.4.9", "value": "<base64url DER>"}]}``.

        Raises:
            NotAuthenticatedError / NotFoundError / PermissionDeniedError as :meth:`resource`;
            MalformedRequestError for a bad body.
        """
        act = self._need_active()
        m = act.manifest
        att = self._attested(sid, bearer, act)
        spec = m.secrets.get(name)
        if spec is None or spec.type != "certificate":
            raise NotFoundError(f"certificate {name!r} is not in the manifest")
        if name not in m.workloads[att.workload].secrets:
            self.record("deny", {"certificate": name, "workload": att.workload, "reason": "not allowed"})
            raise PermissionDeniedError(
                f"workload {att.workload!r} may not obtain certificate {name!r} (manifest)"
            )
        exts: list[tuple[str, bytes]] = []
        if body is not None:
            if not isinstance(body, dict) or not isinstance(body.get("extensions", []), list):
                raise MalformedRequestError("certificate request: expected {\"extensions\": [...]}")
            for e in body.get("extensions", []):
                try:
                    exts.append((str(e["oid"]), protocol.unb64url(e["value"])))
                except (KeyError, TypeError, ValueError):
                    raise MalformedRequestError(
                        "certificate request: each extension needs oid and base64url value"
                    ) from None
        out = json.loads(self._issue(m, att, name, exts))
        return out

    def _issue(self, m: Manifest, att: Attested, name: str, exts: list[tuple[str, bytes]]) -> bytes:
        assert self.ca is not None
        spec = m.secrets[name]
        cert = self.ca.issue(att.key.raw_value, common_name=att.workload,  # CertificateRequestError
                             dns_names=spec.dns_names, ip_addresses=spec.ip_addresses,
                             validity_days=spec.validity_days, extensions=exts)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.record("certificate", {"certificate": name, "workload": att.workload,
                                    "serial": format(cert.serial_number, "x")})
        return json.dumps({"certificate": pem, "ca": self.ca.cert_pem()}).encode()

    def client_certificate(self, user: str, body: Any) -> dict[str, Any]:
        """Issue a client certificate (EKU clientAuth only) for a CSR (PKCS#10, RFC 2986).

        ``body``: ``{"csr": PEM, "validity_days": 1..825 (default 30)}``. The CSR's signature
        proves possession of the key; its subject CN (a manifest-style name) becomes the
        certificate's CN, which services such as the records API map to a role.

        Raises:
            MalformedRequestError: malformed CSR or request, bad signature, bad name or validity.
        """
        self._need_manifest()
        assert self.ca is not None
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise MalformedRequestError("client certificate: expected {\"csr\": PEM}")
        days = body.get("validity_days", 30)
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 825:
            raise MalformedRequestError(f"client certificate: validity_days must be 1..825, got {days!r:.20}")
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
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}", cn):
            raise MalformedRequestError(
                f"client certificate: CSR needs one subject CN of 1..63 chars, got {cn!r:.70}"
            )
        cert = self.ca.issue(csr.public_key(), common_name=cn, validity_days=days,  # CertificateRequestError
                             client_only=True)
        self.record("client-certificate", {"cn": cn, "by": user, "serial": format(cert.serial_number, "x"),
                                           "validity_days": days})
        return {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                "ca": self.ca.cert_pem()}

    # --- CA -----------------------------------------------------------------------------------

    def ca_pem(self) -> str:
        """The workload CA certificate (PEM)."""
        self._ready()
        assert self.ca is not None
        return self.ca.cert_pem()

    def session_values(self, name: str) -> dict[str, Any]:
        """SCONE-CAS-compatible ``/v1/values/session=<name>`` document.

        Raises:
            NotFoundError: ``name`` is neither the manifest name nor a workload.
        """
        m = self._need_manifest()
        if name != m.name and name not in m.workloads:
            raise NotFoundError(f"session {name!r} is not known")
        return {"values": {"api_ca_cert": {"value": self.ca_pem()}}}

    # --- status, audit, recovery --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Public status: mode, broker measurement; when ready also the manifest version/digest
        (what the next signed update binds as ``previous_sha256``), the broker id and the
        master-key fingerprint (32 hex, :func:`~safehold.broker.state.master_fingerprint`) that
        recovery-key holders record."""
        out: dict[str, Any] = {"mode": self.mode,
                               "broker_measurement": self.state.identity.measurement.hex()}
        if self.mode == "ready":
            act = self._active
            out["manifest_version"] = act.version if act else 0
            out["manifest_digest"] = act.manifest.digest if act else None
            out["broker_id"] = self.broker_id
            out["master_fingerprint"] = self.state.master_fingerprint()
            if self.warnings:
                out["warnings"] = list(self.warnings)
        else:
            out["reason"] = self.state.reason
        return out

    def audit_entries(self) -> list[dict[str, Any]]:
        """All audit entries after verifying the chain.

        Raises:
            AuditChainError: naming the first broken entry.
        """
        self._ready()
        assert self.audit is not None
        return [e.as_dict() for e in self.audit.entries()]

    def audit_verify(self) -> dict[str, Any]:
        """``{"ok": bool, "entries": n}`` or ``{"ok": false, "error": "<first broken entry>"}``."""
        self._ready()
        assert self.audit is not None and self._audit_key is not None
        try:
            n = 0
            last = 0
            for e in verify_chain(self.audit, self._audit_key.public_key()):
                n += 1
                if e.event == "manifest":
                    v = e.detail.get("version")
                    if not isinstance(v, int) or v <= last:
                        raise AuditChainError(
                            f"audit entry #{e.seq}: manifest version {v!r:.20} after version {last}: "
                            "the manifest went backwards (manifest rows rolled back or replaced in the store)"
                        )
                    last = v
            head, _ = self.state.read_head()
            if head["manifest_version"] != last:
                raise AuditChainError(
                    f"audit log: the last manifest entry is version {last}, the state head (m/head) "
                    f"records version {head['manifest_version']} (state or log rolled back in the store)"
                )
            return {"ok": True, "entries": n}
        except AuditChainError as e:
            return {"ok": False, "error": str(e)}
        except StateIntegrityError as e:
            return {"ok": False, "error": str(e)}

    def audit_public_key(self) -> ed25519.Ed25519PublicKey:
        """The broker's Ed25519 audit key (public half)."""
        self._ready()
        assert self._audit_key is not None
        return self._audit_key.public_key()

    def recovery_info(self) -> dict[str, Any]:
        """What a recovery client needs: encrypted shares, threshold, a fresh broker key for the
        decrypted shares and Evidence binding that key (report_data = SHA-256 of its canonical
        JWK, zero-padded).

        Raises:
            StateConflictError: not in recovery mode. RecoveryError: nothing to recover with.
        """
        if self.mode != "recovery":
            raise StateConflictError("broker is not in recovery mode")
        data = self.state.recovery_data()
        jwk = protocol.public_jwk(self._recovery_key)
        evidence = self.attester.attest(protocol.recovery_report_data(jwk)).to_cmw()
        return {"threshold": data["threshold"], "shares": data["shares"], "broker_key": jwk,
                "evidence": evidence, "reason": self.state.reason}

    def recover(self, body: Any) -> dict[str, Any]:
        """Accept decrypted shares (each a JWE to ``broker_key``), restore and re-seal.

        ``body``: ``{"shares": [<JWE>, ...], "expect_fingerprint": "<32 hex>"}`` — the master-key
        fingerprint the recovery-key holders recorded at the broker's first start; a combined
        key with another fingerprint (a recovery record forged in the store) is refused.

        Raises:
            StateConflictError: not in recovery mode. MalformedRequestError: malformed body.
            RecoveryError: too few or wrong shares, or the fingerprint differs.
        """
        if self.mode != "recovery":
            self.record("recovery-denied", {"reason": "broker is not in recovery mode"})
            raise StateConflictError("broker is not in recovery mode")
        try:
            shares = self._recovery_shares(body)
            expect = normalize_fingerprint(body.get("expect_fingerprint"))
            self.state.recover(shares, expect_fingerprint=expect)
        except (MalformedRequestError, RecoveryError) as e:
            # The audit key is sealed until recovery succeeds: keep the attempt (time, reason)
            # in memory and write it to the audit log then (attempts before a restart are in
            # the broker's log only).
            log.warning("recovery attempt failed: %s", e)
            with self._lock:
                if len(self._failed_recoveries) < 1000:
                    self._failed_recoveries.append({"time": int(time.time()), "reason": str(e)[:300]})
            if isinstance(e, RecoveryError) and str(e).startswith("expect_fingerprint"):
                raise MalformedRequestError(f"recovery: {e}") from None
            raise
        self._recovery_key = ECKey.generate_key("P-256")
        self._load()
        for hook in self.on_ready:
            hook()
        with self._lock:
            failed, self._failed_recoveries = self._failed_recoveries, []
        for f in failed:
            self.record("recovery-denied", {**f, "while": "sealed (kept in memory until this recovery)"})
        self.record("recovery", {"shares": len(shares), "failed_attempts_before": len(failed),
                                 "broker_measurement": self.state.identity.measurement.hex()})
        return self.status()

    def _recovery_shares(self, body: Any) -> list[bytes]:
        shares_in = body.get("shares") if isinstance(body, dict) else None
        if not isinstance(shares_in, list) or len(shares_in) > 255:
            raise MalformedRequestError(
                "recovery: expected {\"shares\": [<JWE>, ...], \"expect_fingerprint\": hex}"
            )
        shares = []
        for s in shares_in:
            try:
                shares.append(protocol.decrypt_response(s, self._recovery_key))
            except BrokerError:
                raise MalformedRequestError(
                    "recovery: a share is not a JWE to this broker's recovery key"
                ) from None
        return shares


PROTOCOL_MAJOR = protocol.PROTOCOL_VERSION.split(".")[0]


def _public_key(pem: str) -> Any:
    data = pem.encode("ascii", "replace")
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
