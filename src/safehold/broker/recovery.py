"""Recovery of the sealed master key, broker side.

When ``m/sealed`` does not open on this TEE identity (the broker's measurement changed, or the
state moved to another host) the broker starts in recovery mode. ``GET /recovery`` hands out
the encrypted shares, a fresh broker key (P-256, in memory only) and Evidence binding that key
(:func:`safehold.broker.protocol.recovery_report_data`); recovery-key holders decrypt their
shares, check the combined key's fingerprint against the one they recorded, and send the shares
back as JWEs to the broker key. The broker combines them, checks the fingerprint again and
re-seals the master key to its own identity (:meth:`safehold.broker.state.BrokerState.recover`).

While sealed the audit key is unavailable: failed attempts are kept in memory (at most
:data:`MAX_FAILED_KEPT`) and written to the audit log by the recovery that succeeds.

:func:`check_recovery_record` runs at every start: a recovery record that is missing or differs
from the digest the state head records is rewritten from the master key, loudly.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from joserfc.jwk import ECKey

from safehold.attestation.attesters.base import Attester
from safehold.broker import protocol
from safehold.broker.audit import Recorder
from safehold.broker.errors import (
    MalformedRequestError,
    NotReadyError,
    RecoveryError,
    StateConflictError,
    StateIntegrityError,
)
from safehold.broker.installed import InstalledManifest
from safehold.broker.shares import normalize_fingerprint
from safehold.broker.state import BrokerState
from safehold.errors import BrokerError, ConflictError
from safehold.jsontypes import JSONObject

log = logging.getLogger("safehold.broker")

#: Failed attempts kept in memory while sealed.
MAX_FAILED_KEPT = 1000
#: Most shares a recovery request may carry.
MAX_SHARES = 255


class Recovery:
    """The recovery endpoints of one broker.

    Args:
        state: the broker state (in recovery mode for :meth:`info` / :meth:`restore`).
        attester: the broker's own Attester (binds the recovery key to Evidence); None for a
            broker that cannot prove itself (tests, offline tools).
        record: appends an audit entry (a no-op while sealed).

    Attributes:
        key: the broker's current recovery key (P-256, replaced after every recovery).
    """

    def __init__(self, state: BrokerState, attester: Attester | None, record: Recorder):
        self._state = state
        self._attester = attester
        self._record = record
        self._failed: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.key = ECKey.generate_key("P-256")

    def info(self) -> JSONObject:
        """What a recovery client needs: ``{"threshold", "shares", "broker_key", "evidence",
        "reason"}`` — the encrypted shares, their threshold, a fresh broker key for the decrypted
        shares (public JWK) and Evidence (CMW) binding that key.

        Raises:
            StateConflictError: not in recovery mode. RecoveryError: nothing to recover with.
            NotReadyError: this broker has no attester to prove its recovery key.
        """
        if self._state.mode != "recovery":
            raise StateConflictError("broker is not in recovery mode")
        data = self._state.recovery_data()
        if self._attester is None:
            raise NotReadyError("this broker has no attester: it cannot prove its recovery key")
        jwk = protocol.public_jwk(self.key)
        evidence = self._attester.attest(protocol.recovery_report_data(jwk)).to_cmw()
        return {"threshold": data["threshold"], "shares": data["shares"], "broker_key": jwk,
                "evidence": evidence, "reason": self._state.reason}

    def restore(self, body: object) -> int:
        """Accept decrypted shares (each a JWE to :attr:`key`), restore and re-seal the master
        key. Returns the number of shares; the state is ready afterwards.

        ``body``: ``{"shares": [<JWE>, ...], "expect_fingerprint": "<32 hex>"}`` — the master-key
        fingerprint the recovery-key holders recorded at the broker's first start; a combined
        key with another fingerprint (a recovery record forged in the store) is refused.

        Raises:
            StateConflictError: not in recovery mode. MalformedRequestError: malformed body or
            missing fingerprint. RecoveryError: too few or wrong shares, or the fingerprint differs.
        """
        if self._state.mode != "recovery":
            self._record("recovery-denied", {"reason": "broker is not in recovery mode"})
            raise StateConflictError("broker is not in recovery mode")
        try:
            shares = self._decrypt(body)
            expect = normalize_fingerprint(body.get("expect_fingerprint") if isinstance(body, dict) else None)
            self._state.recover(shares, expect_fingerprint=expect)
        except (MalformedRequestError, RecoveryError) as e:
            # The audit key is sealed until recovery succeeds: keep the attempt (time, reason)
            # in memory and write it to the audit log then (attempts before a restart are in
            # the broker's log only).
            log.warning("recovery attempt failed: %s", e)
            with self._lock:
                if len(self._failed) < MAX_FAILED_KEPT:
                    self._failed.append({"time": int(time.time()), "reason": str(e)[:300]})
            if isinstance(e, RecoveryError) and str(e).startswith("expect_fingerprint"):
                raise MalformedRequestError(f"recovery: {e}") from None
            raise
        self.key = ECKey.generate_key("P-256")
        return len(shares)

    def audit_restored(self, shares: int) -> None:
        """Write the failed attempts kept while sealed and the recovery itself to the audit log
        (call once the broker's keys are loaded again)."""
        with self._lock:
            failed, self._failed = self._failed, []
        for f in failed:
            self._record("recovery-denied", {**f, "while": "sealed (kept in memory until this recovery)"})
        self._record("recovery", {"shares": shares, "failed_attempts_before": len(failed),
                                  "broker_measurement": self._state.identity.measurement.hex()})

    def _decrypt(self, body: object) -> list[bytes]:
        shares_in = body.get("shares") if isinstance(body, dict) else None
        if not isinstance(shares_in, list) or len(shares_in) > MAX_SHARES:
            raise MalformedRequestError(
                "recovery: expected {\"shares\": [<JWE>, ...], \"expect_fingerprint\": hex}"
            )
        shares = []
        for s in shares_in:
            try:
                shares.append(protocol.decrypt_response(s, self.key))
            except BrokerError:
                raise MalformedRequestError(
                    "recovery: a share is not a JWE to this broker's recovery key"
                ) from None
        return shares


def check_recovery_record(state: BrokerState, installed: InstalledManifest, *, repair: bool,
                          record: Recorder) -> str | None:
    """Compare ``m/recovery`` with the digest the state head records; if it is missing or was
    replaced, say so loudly (log, audit) and write fresh shares for the current manifest's
    recovery keys (the master key is at hand).

    Returns:
        None if the record is intact, else the warning to show in ``/status``.

    Raises:
        StateIntegrityError: the record is missing or replaced and ``repair`` is False, or
            rewriting it conflicted with another writer.
    """
    want, got = installed.head.get("recovery_sha256"), state.recovery_sha256()
    if want == got:
        return None
    what = "is missing" if got is None else "differs from the one the state head records"
    msg = f"broker state row m/recovery {what} (deleted or replaced in the store)"
    if not repair:
        raise StateIntegrityError(msg)
    m = installed.manifest
    if m is not None and m.recovery_keys:
        try:
            installed.head_ver = state.put_many(
                [], recovery_row=state.recovery_row(m.recovery_keys, m.recovery_threshold),
                head=(installed.head, installed.head_ver)) or installed.head_ver
        except ConflictError:
            raise StateIntegrityError(f"{msg}; rewriting it conflicted: restart the broker") from None
        installed.head, _ = state.read_head()
        msg += "; fresh recovery shares were written for the manifest's recovery keys"
    else:
        msg += "; the current manifest names no recovery keys, so nothing was rewritten"
    log.error("STATE TAMPERING: %s", msg)
    record("state-repaired", {"row": "m/recovery", "detail": msg})
    return msg
