"""Broker state: the sealed master key, the state keyset, encrypted objects, recovery shares.

Key hierarchy (DESIGN.md → Keys)::

    sealing key   = HKDF(platform secret, purpose="seal", context=broker measurement)  (TEE-bound)
    master key    = 32 random bytes, stored only sealed:  envelope(sealing key, master)
    state KEK     = HKDF(master, purpose="broker-state-kek")
    state keyset  = Keyset (AES-256-GCM), stored wrapped under the state KEK
    objects       = envelope(state keyset, value, aad = namespace || row key)

Rows in the store namespace :data:`NAMESPACE`:

* ``m/sealed``   — JSON ``{"v": 1, "measurement": hex, "blob": base64url(envelope)}``;
* ``m/keyset``   — the wrapped state keyset (safehold.crypto.keyset wrap format);
* ``m/head``     — the authenticated state head: envelope(state keyset, JSON
  ``{"v": 1, "initialised": bool, "manifest_version": int, "manifest_digest": hex | null,
  "recovery_sha256": hex | null}``, aad = namespace || ``m/head``), written in the same
  transaction as the keyset at first start and with every manifest install, so that a manifest
  row deleted or rolled back in the store (or a missing recovery record) is noticed
  (:class:`StateIntegrityError`) instead of looking like a broker with no manifest;
* ``m/recovery`` — JSON ``{"threshold": k, "shares": {key name: JWE compact}}``, each JWE
  (RFC 7516, ``RSA-OAEP-256`` + ``A256GCM``) encrypting one Shamir share (pyshamir, GF(256))
  of the master key to one recovery public key (:mod:`safehold.broker.shares`);
* ``o/<24-byte HMAC blind index of kind/name>`` — encrypted objects (manifest versions, secrets,
  CA key, signing keys), so the database sees neither names nor values.

If ``m/sealed`` does not open with this TEE's sealing key (the broker's measurement changed, or
the database moved to another host), :meth:`BrokerState.open` reports recovery mode; k shares
restore the master key (:meth:`BrokerState.recover`), which is then re-sealed to the new identity.

The recovery record is *not* authenticated (it lives in the untrusted store, encrypted to public
keys): a database operator could write a whole fresh state under a master key of their own with
shares to the same recovery keys. The anchor is the master-key fingerprint
(:func:`~safehold.broker.shares.master_fingerprint`), shown at the broker's first start and by
``/status`` while unsealed, which recovery-key holders write down; a recovery whose combined key has another
fingerprint is refused, by the CLI before it sends anything and by :meth:`BrokerState.recover`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safehold.broker.errors import RecoveryError, StateIntegrityError
from safehold.broker.protocol import b64url, unb64url
from safehold.broker.shares import (
    MASTER_KEY_LEN,
    combine_shares,
    master_fingerprint,
    normalize_fingerprint,
    recovery_record,
)
from safehold.crypto.envelope import open_envelope, seal
from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.errors import ConflictError, CryptoError, SealingError
from safehold.store.base import Store

if TYPE_CHECKING:
    from safehold.attestation.attesters.simulated import SimulatedAttester

NAMESPACE = "safehold.broker"
AUDIT_NAMESPACE = "safehold.broker.audit"
_SEALED = b"m/sealed"
_KEYSET = b"m/keyset"
_RECOVERY = b"m/recovery"
_HEAD = b"m/head"
_SEAL_AAD = b"safehold-broker-master-key-v1"


def initial_head() -> dict[str, Any]:
    """The state head of a fresh state: broker keys not yet made, no manifest ever set."""
    return {"v": 1, "initialised": False, "manifest_version": 0, "manifest_digest": None,
            "recovery_sha256": None}


def _unseal_reason(sealed_to: str, current: str) -> str:
    """Why ``m/sealed`` does not open, saying what differs (and showing both values)."""
    if sealed_to == current:
        return (
            "the sealed master key does not open on this TEE identity: the broker measurement is "
            f"unchanged ({current}), so the host identity differs (platform secret: the state moved "
            "to another host or the simulated TEE's platform key changed) or row m/sealed was edited"
        )
    return (
        "the sealed master key does not open on this TEE identity: the broker measurement changed "
        f"(sealed to {sealed_to}, this broker is {current}: its code changed)"
    )


def _single_key_keyset(key: bytes) -> Keyset:
    # key id 1, a fixed index key: only used for one envelope, never for blind indexes.
    return Keyset({1: key}, 1, b"\x00" * 32)


@dataclass(frozen=True)
class SealingIdentity:
    """What the master key is sealed to.

    Attributes:
        secret: the TEE's sealing secret (simulated: the platform key material; hardware: an
            SGX/SNP derived key). Never logged.
        measurement: the broker's own measurement (48 bytes for the simulated TEE).
    """

    secret: bytes
    measurement: bytes

    def sealing_key(self) -> bytes:
        """``HKDF(secret, purpose="seal", context=measurement)``, 32 bytes (RFC 5869)."""
        return derive_key(self.secret, purpose="seal", context=self.measurement)


def simulated_sealing_identity(attester: SimulatedAttester) -> SealingIdentity:
    """The sealing identity of a :class:`~safehold.attestation.attesters.simulated.SimulatedAttester`.

    The simulated platform secret is the simulated platform's private key file in its data
    directory (what fused keys are on hardware: present on this host only). An attester that
    offers ``sealing_secret()`` is asked instead.

    Raises:
        SealingError: the platform secret cannot be read.
    """
    getter = getattr(attester, "sealing_secret", None)
    if callable(getter):
        secret = getter()
    else:
        try:
            secret = (attester.dir / "platform.key").read_bytes()
        except OSError as e:
            raise SealingError(f"simulated platform secret unreadable: {e.strerror}") from None
    return SealingIdentity(secret=bytes(secret), measurement=attester.measurement.digest)


class BrokerState:
    """Encrypted broker state in a store. Create with :meth:`open`.

    Attributes:
        mode: ``"ready"`` (master key unsealed) or ``"recovery"`` (sealed blob does not open).
        created: True if this call created fresh state (first start).
    """

    def __init__(self, store: Store, identity: SealingIdentity):
        self.store = store
        self.identity = identity
        self.mode = "recovery"
        self.created = False
        self.reason = ""
        self._keyset: Keyset | None = None
        self._master: bytes | None = None
        self._lock = threading.Lock()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, store: Store, identity: SealingIdentity) -> BrokerState:
        """Unseal existing state, create it on first start, or enter recovery mode.

        Raises:
            StoreError: the store failed.
            StateIntegrityError: ``m/keyset`` or ``m/head`` is missing or does not open (names the row).
        """
        st = cls(store, identity)
        sealed = store.get(NAMESPACE, _SEALED)
        if sealed is None:
            if store.get(NAMESPACE, _KEYSET) is not None:
                st.reason = ("broker state row m/sealed (the sealed master key) is missing but the "
                             "state exists: deleted in the store; recover with the recovery keys")
                return st
            st._create()
            return st
        try:
            meta = json.loads(sealed.value)
            blob = unb64url(meta["blob"])
        except (ValueError, KeyError, TypeError):
            # the recovery shares can restore a sealed key edited in the store
            st.reason = "broker state row m/sealed is malformed (edited in the store)"
            return st
        try:
            master = open_envelope(_single_key_keyset(identity.sealing_key()), blob, _SEAL_AAD)
        except CryptoError:
            st.reason = _unseal_reason(str(meta.get("measurement", "?")), identity.measurement.hex())
            return st
        st._activate(master)
        return st

    def _create(self) -> None:
        master = os.urandom(MASTER_KEY_LEN)
        ks = Keyset.generate()
        wrapped = ks.wrap(self._kek(master))
        sealed = self._sealed_row(master)
        head = seal(ks, json.dumps(initial_head()).encode(), self._aad(_HEAD))
        try:
            with self.store.transaction() as tx:
                tx.put(NAMESPACE, _KEYSET, wrapped, expected_version=0)
                tx.put(NAMESPACE, _SEALED, sealed, expected_version=0)
                tx.put(NAMESPACE, _HEAD, head, expected_version=0)
        except ConflictError:
            # Another replica initialised the same store first: open theirs.
            other = BrokerState.open(self.store, self.identity)
            self.__dict__.update(other.__dict__)
            return
        self.created = True
        self._activate(master)

    def _sealed_row(self, master: bytes) -> bytes:
        blob = seal(_single_key_keyset(self.identity.sealing_key()), master, _SEAL_AAD)
        meta = {"v": 1, "measurement": self.identity.measurement.hex(), "blob": b64url(blob)}
        return json.dumps(meta).encode()

    @staticmethod
    def _kek(master: bytes) -> bytes:
        return derive_key(master, purpose="broker-state-kek")

    def _activate(self, master: bytes) -> None:
        row = self.store.get(NAMESPACE, _KEYSET)
        if row is None:
            raise StateIntegrityError("broker state row m/keyset is missing (deleted in the store?)")
        try:
            self._keyset = Keyset.unwrap(row.value, self._kek(master))
        except CryptoError:
            raise StateIntegrityError(
                "broker state row m/keyset does not open under the master key (edited in the store)"
            ) from None
        self._master = master
        self.mode = "ready"
        self.reason = ""

    def master_fingerprint(self) -> str:
        """:func:`~safehold.broker.shares.master_fingerprint` of this state's master key (32 hex).

        Raises:
            SealingError: in recovery mode.
        """
        self._need_ready()
        assert self._master is not None
        return master_fingerprint(self._master)

    def master_key(self) -> bytes:
        """The unsealed master key (32 bytes), only for deriving keys inside the broker (the
        freshness MAC key, :mod:`safehold.broker.fresh`); never exported or logged.

        Raises:
            SealingError: in recovery mode.
        """
        self._need_ready()
        assert self._master is not None
        return self._master

    def _need_ready(self) -> Keyset:
        if self._keyset is None:
            raise SealingError("broker is in recovery mode: state is sealed")
        return self._keyset

    # --- objects ------------------------------------------------------------------------------

    def row_key(self, kind: str, name: str) -> bytes:
        """The store key of object ``(kind, name)``: ``b"o/"`` + 24 bytes HMAC-SHA256 (RFC 2104)."""
        ks = self._need_ready()
        mac = hmac.new(ks.index_key, f"{kind}\x00{name}".encode(), hashlib.sha256).digest()[:24]
        return b"o/" + mac

    def _aad(self, key: bytes) -> bytes:
        return NAMESPACE.encode() + b"\x00" + key

    def seal_bytes(self, plaintext: bytes, aad: bytes) -> bytes:
        """Envelope ``plaintext`` under the state keyset (for other namespaces, e.g. the audit log)."""
        return seal(self._need_ready(), plaintext, aad)

    def open_bytes(self, blob: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`seal_bytes`. Raises DecryptionError / EnvelopeFormatError."""
        return open_envelope(self._need_ready(), blob, aad)

    def row_name(self, kind: str, name: str) -> str:
        """How errors name an object row: ``kind/name (o/<first 8 hex of the blind index>…)``."""
        return f"{kind}/{name} (o/{self.row_key(kind, name)[2:6].hex()}…)"

    def get(self, kind: str, name: str) -> tuple[bytes, int] | None:
        """Return ``(plaintext, row version)`` of an object, or None.

        Raises:
            StateIntegrityError: the row was edited or moved in the database (names the row).
        """
        key = self.row_key(kind, name)
        row = self.store.get(NAMESPACE, key)
        if row is None:
            return None
        try:
            return open_envelope(self._need_ready(), row.value, self._aad(key)), row.version
        except CryptoError:
            raise StateIntegrityError(
                f"broker state row {self.row_name(kind, name)} fails authentication "
                "(edited or moved in the store)"
            ) from None

    def get_json(self, kind: str, name: str) -> dict[str, Any] | None:
        """:meth:`get` decoded as a JSON object, or None.

        Raises:
            StateIntegrityError: the row fails authentication or is not a JSON object.
        """
        got = self.get(kind, name)
        if got is None:
            return None
        try:
            obj = json.loads(got[0])
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise StateIntegrityError(f"broker state row {self.row_name(kind, name)} is malformed")
        return obj

    def require_json(self, kind: str, name: str, why: str) -> dict[str, Any]:
        """:meth:`get_json` of a row that must exist.

        Raises:
            StateIntegrityError: missing (``why`` says why it must exist), edited or malformed.
        """
        obj = self.get_json(kind, name)
        if obj is None:
            raise StateIntegrityError(
                f"broker state row {self.row_name(kind, name)} is missing ({why}): deleted or rolled "
                "back in the store; the broker refuses to serve"
            )
        return obj

    # --- state head ---------------------------------------------------------------------------

    def read_head(self) -> tuple[dict[str, Any], int]:
        """The authenticated state head (see the module docstring) and its row version.

        Raises:
            StateIntegrityError: ``m/head`` missing (deleted, or state made by a Safehold
                version without it), failing authentication, or malformed.
        """
        ks = self._need_ready()
        row = self.store.get(NAMESPACE, _HEAD)
        if row is None:
            raise StateIntegrityError(
                "broker state row m/head is missing (deleted in the store, or state made before "
                "state heads existed); the broker refuses to serve"
            )
        try:
            head = json.loads(open_envelope(ks, row.value, self._aad(_HEAD)))
        except CryptoError:
            raise StateIntegrityError(
                "broker state row m/head fails authentication (edited in the store)") from None
        except ValueError:
            head = None
        if (not isinstance(head, dict) or head.get("v") != 1 or not isinstance(head.get("initialised"), bool)
                or not isinstance(head.get("manifest_version"), int)):
            raise StateIntegrityError("broker state row m/head is malformed")
        return head, row.version

    def recovery_sha256(self) -> str | None:
        """Hex SHA-256 of the stored ``m/recovery`` row, or None if there is none."""
        row = self.store.get(NAMESPACE, _RECOVERY)
        return None if row is None else hashlib.sha256(row.value).hexdigest()

    def put(self, kind: str, name: str, value: bytes, *, expected_version: int) -> int:
        """Compare-and-set an object (0 = must not exist). Returns the new version.

        Raises:
            ConflictError: someone else wrote it first.
        """
        key = self.row_key(kind, name)
        return self.store.put(NAMESPACE, key, seal(self._need_ready(), value, self._aad(key)),
                              expected_version=expected_version)

    def put_many(self, items: list[tuple[str, str, bytes, int]], *,
                 recovery_row: bytes | None = None,
                 head: tuple[dict[str, Any], int] | None = None) -> int | None:
        """Write several objects ``(kind, name, value, expected_version)`` atomically, and
        optionally a new recovery record (:meth:`recovery_row`) and a new state head
        ``(head, expected row version)`` in the same transaction. With a recovery record the
        head's ``recovery_sha256`` is set to its digest.

        Returns:
            The new head row version (None if no head was written).

        Raises:
            ConflictError: a version differed; nothing was written.
        """
        ks = self._need_ready()
        head_ver = None
        with self.store.transaction() as tx:
            for kind, name, value, ver in items:
                key = self.row_key(kind, name)
                tx.put(NAMESPACE, key, seal(ks, value, self._aad(key)), expected_version=ver)
            if recovery_row is not None:
                cur = tx.get(NAMESPACE, _RECOVERY)
                tx.put(NAMESPACE, _RECOVERY, recovery_row, expected_version=cur.version if cur else 0)
            if head is not None:
                h = dict(head[0])
                if recovery_row is not None:
                    h["recovery_sha256"] = hashlib.sha256(recovery_row).hexdigest()
                head_ver = tx.put(NAMESPACE, _HEAD, seal(ks, json.dumps(h).encode(), self._aad(_HEAD)),
                                  expected_version=head[1])
        return head_ver

    # --- recovery -----------------------------------------------------------------------------

    def write_recovery_shares(self, keys: dict[str, str], threshold: int) -> None:
        """Split the master key k-of-n and store each share encrypted to one recovery key.

        Args:
            keys: recovery key name → RSA public key PEM (>= 3072 bits).
            threshold: k, 1..len(keys). With k = 1 every key receives the whole master key.

        Raises:
            SealingError: in recovery mode (StateIntegrityError: the state head is bad).
            StoreError: the store failed.
        """
        if not keys:
            return
        self.put_many([], recovery_row=self.recovery_row(keys, threshold), head=self.read_head())

    def recovery_row(self, keys: dict[str, str], threshold: int) -> bytes:
        """The recovery record for ``keys`` and ``threshold`` (fresh shares), not yet stored.

        Raises:
            SealingError: in recovery mode. ValueError: no keys.
        """
        self._need_ready()
        assert self._master is not None
        return recovery_record(self._master, keys, threshold)

    def recovery_data(self) -> dict[str, Any]:
        """The stored recovery record ``{"threshold": k, "shares": {name: JWE}}``.

        Raises:
            RecoveryError: no recovery keys were ever configured, or the record is malformed.
        """
        row = self.store.get(NAMESPACE, _RECOVERY)
        if row is None:
            raise RecoveryError("no recovery shares are stored (the manifest named no recovery keys)")
        try:
            data = json.loads(row.value)
            ok = isinstance(data["threshold"], int) and isinstance(data["shares"], dict)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise RecoveryError("the stored recovery record is malformed")
        return data

    def recover(self, shares: list[bytes], *, expect_fingerprint: str) -> None:
        """Restore the master key from decrypted shares, check it, and re-seal it here.

        Args:
            shares: share bytes as decrypted from the recovery JWEs (``"share"`` field).
            expect_fingerprint: the :func:`~safehold.broker.shares.master_fingerprint` recorded
                at first start (32 hex).

        Raises:
            RecoveryError: fewer than k shares, malformed shares, a combined key whose
                fingerprint is not ``expect_fingerprint`` (forged recovery record), or one that
                does not open the state (wrong or too few shares). Nothing is written then.
        """
        expect = normalize_fingerprint(expect_fingerprint)
        with self._lock:
            if self.mode == "ready":
                return
            master = combine_shares(shares, int(self.recovery_data()["threshold"]))
            got = master_fingerprint(master)
            if not hmac.compare_digest(got, expect):
                raise RecoveryError(
                    f"the shares combine to a master key with fingerprint {got}, expected {expect}: "
                    "the recovery record is not the one made for this broker (forged or replaced in "
                    "the store?); nothing was changed"
                )
            row = self.store.get(NAMESPACE, _KEYSET)
            if row is None:
                raise RecoveryError("broker state keyset is missing; nothing to recover")
            try:
                Keyset.unwrap(row.value, self._kek(master))
            except CryptoError:
                raise RecoveryError(
                    "the recovered master key does not open the broker state (wrong or too few shares)"
                ) from None
            cur = self.store.get(NAMESPACE, _SEALED)
            self.store.put(NAMESPACE, _SEALED, self._sealed_row(master),
                           expected_version=cur.version if cur else 0)
            self._activate(master)

