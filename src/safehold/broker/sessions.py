"""KBS sessions (Trustee RCAR): challenge nonces, attested keys and their EAR tokens, with expiry.

``POST /kbs/v0/auth`` opens a session (cookie ``kbs-session-id``) holding one challenge nonce
(32 random bytes, base64url). The nonce is single use whatever the outcome of the attestation
and expires after ``nonce_ttl`` seconds. A successful attestation binds an :class:`Attested`
key to the session and, through the RFC 7638 thumbprint of ``tee-pubkey`` that the EAR token
carries as ``eat_nonce``, to the token; both stop working after ``token_ttl`` seconds.

Sessions live in memory only: a broker restart (or another replica) forgets them and the
workload attests again. Memory is bounded: above ``max_sessions / 2`` sessions the expired ones
are dropped, at ``max_sessions`` the oldest one; expired token bindings go at every new session.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass

from joserfc.jwk import ECKey, RSAKey

from safehold.broker.errors import NonceReplayedError, NotAuthenticatedError
from safehold.broker.protocol import b64url

#: Seconds a challenge nonce stays valid.
DEFAULT_NONCE_TTL = 300
#: Seconds an attestation (and its EAR token) stays valid.
DEFAULT_TOKEN_TTL = 600
#: Most sessions held in memory.
MAX_SESSIONS = 10_000


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
