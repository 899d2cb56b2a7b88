"""KBS sessions (Trustee RCAR): challenge nonces, attested keys and their EAR tokens, with expiry.

``POST /kbs/v0/auth`` opens a session (cookie ``kbs-session-id``) holding one challenge nonce
(32 random bytes, base64url). The nonce is single use whatever the outcome of the attestation
and expires after ``nonce_ttl`` seconds. A successful attestation binds an :class:`Attested`
key to the session and, through the RFC 7638 thumbprint of ``tee-pubkey`` that the EAR token
carries as ``eat_nonce``, to the token; both stop working after ``token_ttl`` seconds.

:class:`SessionTable` keeps sessions in memory (one broker process; a restart forgets them and
the workload attests again). Memory is bounded: above ``max_sessions / 2`` sessions the expired
ones are dropped, at ``max_sessions`` the oldest one; expired token bindings go at every new
session. :class:`StoredSessionTable` keeps them in the broker's shared store instead (what the
broker uses): any replica can finish a handshake another started, and a nonce is claimed with a
compare-and-set, so it is used once across all replicas.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import ECKey, RSAKey

from safehold.broker import protocol
from safehold.broker.errors import NonceReplayedError, NotAuthenticatedError
from safehold.broker.protocol import b64url
from safehold.errors import ConflictError
from safehold.store.base import Store

log = logging.getLogger("safehold.broker")

#: Seconds a challenge nonce stays valid.
DEFAULT_NONCE_TTL = 300
#: Seconds an attestation (and its EAR token) stays valid.
DEFAULT_TOKEN_TTL = 600
#: Most sessions held in memory.
MAX_SESSIONS = 10_000
#: Store namespaces of :class:`StoredSessionTable`.
SESSION_NAMESPACE = "safehold.broker.kbs-sessions"
KEY_NAMESPACE = "safehold.broker.kbs-keys"


@dataclass
class Attested:
    """A successfully attested TEE key.

    ``manifest_version`` is the manifest version whose appraisal policy affirmed the Evidence;
    the attestation is honoured only while that version is current (an update may revoke the
    measurement or remove the workload). ``expires`` is a Unix time in seconds, ``thumbprint``
    the 32-byte RFC 7638 thumbprint of ``key``, ``measurement`` hex.
    """

    workload: str
    key: ECKey | RSAKey
    thumbprint: bytes
    expires: float
    measurement: str
    manifest_version: int = 0


@dataclass
class Session:
    """One ``kbs-session-id`` session: the challenge and, after attestation, its result."""

    nonce: str
    created: float
    tee: str
    workload: str | None
    used: bool = False
    attested: Attested | None = None
    row_key: bytes = b""  # StoredSessionTable: the row and its version as last read or written
    row_version: int = 0


class SessionTable:
    """The broker's KBS sessions and EAR token bindings (thread-safe).

    Args:
        nonce_ttl / token_ttl: seconds a challenge nonce / an attestation stays valid.
        max_sessions: most sessions held at once.
    """

    def __init__(self, nonce_ttl: int = DEFAULT_NONCE_TTL, token_ttl: int = DEFAULT_TOKEN_TTL, *,
                 max_sessions: int = MAX_SESSIONS):
        self.nonce_ttl = nonce_ttl
        self.token_ttl = token_ttl
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._tokens: dict[bytes, Attested] = {}
        self._lock = threading.Lock()

    def open(self, tee: str, workload: str | None, now: float) -> tuple[str, Session]:
        """Start a session with a fresh challenge nonce; returns ``(session id, session)``."""
        sid = secrets.token_urlsafe(24)
        sess = Session(b64url(os.urandom(32)), now, tee, workload)
        with self._lock:
            self._gc(now)
            self._sessions[sid] = sess
        return sid, sess

    def _gc(self, now: float) -> None:
        ttl = max(self.nonce_ttl, self.token_ttl)
        if len(self._sessions) > self.max_sessions // 2:
            for sid in [sid for sid, s in self._sessions.items() if now - s.created > ttl]:
                del self._sessions[sid]
        if len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]
        for tp in [tp for tp, a in self._tokens.items() if a.expires < now]:
            del self._tokens[tp]

    def claim(self, sid: str | None, now: float) -> Session:
        """Use up the session's challenge nonce for one attestation and return the session.

        Raises:
            NotAuthenticatedError: no such session, or its nonce expired (it is used up anyway).
            NonceReplayedError: the nonce was used before.
        """
        with self._lock:
            sess = self._sessions.get(sid or "")
            if sess is None:
                raise NotAuthenticatedError("KBS attest: no session; POST /kbs/v0/auth first")
            if sess.used:
                raise NonceReplayedError("KBS attest: the challenge nonce was already used (replay)")
            sess.used = True  # single use, whatever the outcome
        if now - sess.created > self.nonce_ttl:
            raise NotAuthenticatedError(f"KBS attest: the challenge nonce expired ({self.nonce_ttl} s)")
        return sess

    def bind(self, sess: Session, att: Attested) -> None:
        """Record a successful attestation for the session and for EAR tokens naming its key."""
        with self._lock:
            sess.attested = att
            self._tokens[att.thumbprint] = att

    def by_session(self, sid: str | None) -> Attested | None:
        """The attestation made in session ``sid`` (expired or not), or None."""
        with self._lock:
            sess = self._sessions.get(sid or "")
        return sess.attested if sess is not None else None

    def by_thumbprint(self, thumbprint: bytes) -> Attested | None:
        """The attestation of the key with this RFC 7638 thumbprint (expired or not), or None."""
        with self._lock:
            return self._tokens.get(thumbprint)


class StoredSessionTable(SessionTable):
    """KBS sessions and token bindings in the broker's shared store, so that any replica can
    finish a handshake another started and a challenge nonce is used once across replicas.

    Rows (namespace :data:`SESSION_NAMESPACE`, key = SHA-256 of the session id, so the
    database never holds the bearer cookie; namespace :data:`KEY_NAMESPACE`, key = the RFC
    7638 thumbprint of the attested key): canonical JSON sealed with the broker state keyset
    (AES-256-GCM envelope, associated data = namespace || 0 || row key), so the database can
    neither read, forge nor move a row. Claiming a nonce is a compare-and-set on the session
    row's version (one atomic statement on SQLite and PostgreSQL): of two replicas claiming
    the same nonce, exactly one succeeds. What a database operator can still do (delete rows,
    put an old row back) is in docs/threat-model.md ("KBS sessions in the store").

    Args:
        store: the broker's store (a FreshStore when freshness wraps it: then an old row put
            back is refused too).
        seal / unseal: ``(plaintext, aad) -> blob`` and back (``BrokerState.seal_bytes`` /
            ``open_bytes``); unseal raises on a forged or moved row.
        nonce_ttl / token_ttl / max_sessions: as :class:`SessionTable`; expired rows are
            deleted at most every ``gc_seconds``.
    """

    def __init__(self, store: Store, seal: Callable[[bytes, bytes], bytes],
                 unseal: Callable[[bytes, bytes], bytes], nonce_ttl: int = DEFAULT_NONCE_TTL,
                 token_ttl: int = DEFAULT_TOKEN_TTL, *, max_sessions: int = MAX_SESSIONS,
                 gc_seconds: float = 60.0):
        super().__init__(nonce_ttl, token_ttl, max_sessions=max_sessions)
        self._store = store
        self._seal = seal
        self._unseal = unseal
        self._gc_seconds = gc_seconds
        self._last_gc = 0.0

    @staticmethod
    def _aad(namespace: str, key: bytes) -> bytes:
        return namespace.encode() + b"\x00" + key

    def _pack(self, namespace: str, key: bytes, doc: dict[str, Any]) -> bytes:
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return self._seal(body, self._aad(namespace, key))

    def _unpack(self, namespace: str, key: bytes, blob: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(self._unseal(blob, self._aad(namespace, key)))
        except Exception:  # noqa: BLE001 - any failure to open is the same finding
            log.warning("KBS: a %s row does not authenticate (edited, forged or moved by the "
                        "database); refused", namespace)
            raise NotAuthenticatedError("KBS session refused: its stored row does not authenticate; "
                                        "POST /kbs/v0/auth again") from None
        if not isinstance(doc, dict):
            raise NotAuthenticatedError("KBS session refused: malformed stored row")
        return doc

    @staticmethod
    def _att_doc(att: Attested) -> dict[str, Any]:
        return {"workload": att.workload, "key": protocol.public_jwk(att.key),
                "thumbprint": protocol.b64url(att.thumbprint), "expires": att.expires,
                "measurement": att.measurement, "manifest_version": att.manifest_version}

    @staticmethod
    def _att_of(doc: Any) -> Attested | None:
        if doc is None:
            return None
        try:
            return Attested(str(doc["workload"]), protocol.import_tee_pubkey(doc["key"]),
                            protocol.unb64url(doc["thumbprint"]), float(doc["expires"]),
                            str(doc["measurement"]), int(doc["manifest_version"]))
        except (KeyError, TypeError, ValueError) as e:
            raise NotAuthenticatedError(f"KBS session refused: malformed stored attestation ({e})") from None

    def _doc(self, sess: Session) -> dict[str, Any]:
        return {"nonce": sess.nonce, "created": sess.created, "tee": sess.tee,
                "workload": sess.workload, "used": sess.used,
                "attested": None if sess.attested is None else self._att_doc(sess.attested)}

    def _session_of(self, key: bytes, doc: dict[str, Any], version: int) -> Session:
        try:
            s = Session(str(doc["nonce"]), float(doc["created"]), str(doc["tee"]),
                        None if doc["workload"] is None else str(doc["workload"]), bool(doc["used"]),
                        self._att_of(doc["attested"]))
        except (KeyError, TypeError, ValueError) as e:
            raise NotAuthenticatedError(f"KBS session refused: malformed stored row ({e})") from None
        s.row_key, s.row_version = key, version
        return s

    def _load(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        key = _sid_key(sid)
        row = self._store.get(SESSION_NAMESPACE, key)
        if row is None:
            return None
        return self._session_of(key, self._unpack(SESSION_NAMESPACE, key, row.value), row.version)

    def open(self, tee: str, workload: str | None, now: float) -> tuple[str, Session]:
        """Start a session (a new row); see :meth:`SessionTable.open`. Raises StoreError."""
        sid = secrets.token_urlsafe(24)
        sess = Session(b64url(os.urandom(32)), now, tee, workload)
        key = _sid_key(sid)
        sess.row_key = key
        blob = self._pack(SESSION_NAMESPACE, key, self._doc(sess))
        sess.row_version = self._store.put(SESSION_NAMESPACE, key, blob, expected_version=0)
        if now - self._last_gc >= self._gc_seconds:
            self._last_gc = now
            self.gc(now)
        return sid, sess

    def claim(self, sid: str | None, now: float) -> Session:
        """Use up the nonce with a compare-and-set on the session row; see
        :meth:`SessionTable.claim`. Two replicas claiming one nonce: exactly one succeeds, the
        other gets NonceReplayedError."""
        sess = self._load(sid)
        if sess is None:
            raise NotAuthenticatedError("KBS attest: no session; POST /kbs/v0/auth first")
        if sess.used:
            raise NonceReplayedError("KBS attest: the challenge nonce was already used (replay)")
        sess.used = True
        try:
            sess.row_version = self._store.put(SESSION_NAMESPACE, sess.row_key,
                                               self._pack(SESSION_NAMESPACE, sess.row_key, self._doc(sess)),
                                               expected_version=sess.row_version)
        except ConflictError:  # another replica claimed it first
            raise NonceReplayedError("KBS attest: the challenge nonce was already used (replay)") from None
        if now - sess.created > self.nonce_ttl:
            raise NotAuthenticatedError(f"KBS attest: the challenge nonce expired ({self.nonce_ttl} s)")
        return sess

    def bind(self, sess: Session, att: Attested) -> None:
        """Record the attestation in the session row and the token row, in one transaction."""
        sess.attested = att
        tkey = att.thumbprint
        with self._store.transaction() as tx:
            blob = self._pack(SESSION_NAMESPACE, sess.row_key, self._doc(sess))
            tx.put(SESSION_NAMESPACE, sess.row_key, blob, expected_version=sess.row_version)
            cur = tx.get(KEY_NAMESPACE, tkey)
            tx.put(KEY_NAMESPACE, tkey, self._pack(KEY_NAMESPACE, tkey, self._att_doc(att)),
                   expected_version=0 if cur is None else cur.version)

    def by_session(self, sid: str | None) -> Attested | None:
        """The attestation made in session ``sid`` on any replica, or None."""
        sess = self._load(sid)
        return None if sess is None else sess.attested

    def by_thumbprint(self, thumbprint: bytes) -> Attested | None:
        """The attestation of the key with this thumbprint, made on any replica, or None."""
        if len(thumbprint) != 32:
            return None
        row = self._store.get(KEY_NAMESPACE, thumbprint)
        if row is None:
            return None
        return self._att_of(self._unpack(KEY_NAMESPACE, thumbprint, row.value))

    def gc(self, now: float) -> int:
        """Delete expired session and token rows (and rows that do not authenticate); returns
        how many. A row another replica changed meanwhile is left for the next round."""
        ttl = max(self.nonce_ttl, self.token_ttl)
        gone = 0
        for ns in (SESSION_NAMESPACE, KEY_NAMESPACE):
            for row in list(self._store.scan_all(ns)):
                try:
                    doc = self._unpack(ns, row.key, row.value)
                    expired = (now - float(doc["created"]) > ttl if ns == SESSION_NAMESPACE
                               else float(doc["expires"]) < now)
                except (NotAuthenticatedError, KeyError, TypeError, ValueError):
                    expired = True
                if expired:
                    with contextlib.suppress(ConflictError):
                        gone += bool(self._store.delete(ns, row.key, expected_version=row.version))
        return gone


def _sid_key(sid: str) -> bytes:
    """Row key of a session id: SHA-256 (the database never sees the cookie)."""
    return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).digest()
