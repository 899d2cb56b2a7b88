"""Client SDK for Secure Value Recovery (docs/svr.md): back up a secret under a PIN, restore it.

* :class:`Svr3Client` — the secret split across ``n`` servers after Signal's DB4
  (:mod:`safehold.svr.db4`); recovery needs the right PIN and every server.
* :class:`Svr2Client` — Signal's SVR2 on one server (two-phase backup + expose).

The PIN is normalised and stretched here only (Argon2id v1.3 with Signal's parameters,
:mod:`safehold.svr.pin`); the salt is ``make_salt(backup id, group id)`` with the backup id
and group id the servers report (every server must report the same ones). No server sees
the PIN; an SVR2 server sees the access key, an SVR3 server a blinded element.

Transport: for each server an attesting RA-TLS transport built from an appraisal ``policy``
(one for all servers or one per server: the TLS handshake verifies the server's Evidence
before any request byte is sent), caller-supplied ``transports``, or — only with
``insecure_loopback=True`` and ``http://`` loopback URLs — plain HTTP for development (loud).

This module imports no server code: only :mod:`safehold.crypto.oprf`, the shared
:mod:`safehold.svr.protocol` / :mod:`~safehold.svr.pin` / :mod:`~safehold.svr.db4` /
:mod:`~safehold.svr.errors`, and httpx.
"""

from __future__ import annotations

import base64
import secrets as _secrets
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from safehold.crypto import oprf
from safehold.crypto.errors import OPRFError
from safehold.errors import DecryptionError
from safehold.netaddr import is_loopback_http
from safehold.svr import db4
from safehold.svr.errors import (
    BackupMissingError,
    InvalidRequestError,
    PinMismatchError,
    RecoveryFailedError,
    SvrClientError,
    SvrError,
)
from safehold.svr.pin import (
    SIGNAL_ARGON2,
    Argon2Params,
    PinHash,
    make_salt,
    normalise_pin,
    open_secret,
    seal_secret,
    stretch,
)
from safehold.svr.protocol import (
    BACKUP_ID_SIZE,
    ELEMENT_SIZE,
    MAX_DATA,
    MIN_DATA,
    SESSION_SIZE,
    SHARE_SIZE,
    TOKEN_SIZE,
    Status,
    b64,
    check_label,
    check_tries,
    unb64,
)

__all__ = ["DEFAULT_TRIES", "BackupState", "Svr2Client", "Svr3Client", "sign_statement"]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
#: Guesses a new backup allows unless the caller says otherwise.
DEFAULT_TRIES = 10
#: Retries of a backup whose token went stale under it (another device of the same user).
_BACKUP_ATTEMPTS = 3


@dataclass(frozen=True)
class BackupState:
    """One server's view of a backup: ``server`` name, ``status`` (OK / MISSING), ``tries``
    left of ``max_tries``, ``exposed`` (SVR2: restorable) or ``version`` (SVR3)."""

    server: str
    status: str
    tries: int
    max_tries: int = 0
    exposed: bool = False
    version: int = 0


def sign_statement(payload_b64url: str, owner_key_pem: bytes) -> dict[str, str]:
    """Sign an owner statement payload (as ``GET /v1/svr/freshness`` gives it) with the data
    owner's key (Ed25519, or ECDSA with SHA-256); returns the ``{"payload", "signature"}`` body.

    Raises:
        SvrError: the key does not load or is of another type.
    """
    pad = "=" * (-len(payload_b64url) % 4)
    payload = base64.urlsafe_b64decode(payload_b64url + pad)
    try:
        key = serialization.load_pem_private_key(owner_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise SvrError(f"owner key does not load ({type(e).__name__})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(payload)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    else:
        raise SvrError("owner key must be Ed25519 or ECDSA")
    return {"payload": payload_b64url, "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode()}


class _Server:
    """One SVR server: an httpx client over its own (attesting) transport."""

    def __init__(self, url: str, token: str, transport: httpx.BaseTransport, timeout: httpx.Timeout) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, transport=transport, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})
        self.name = ""
        self.group_id = -1

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.http.get(path) if body is None else self.http.post(path, json=body)
        if resp.status_code >= 400:
            try:
                obj = resp.json()
                code, detail = str(obj.get("error", "")), str(obj.get("detail", ""))
            except (ValueError, AttributeError):
                code, detail = "", resp.text[:200]
            who = self.name or self.url
            raise SvrClientError(f"SVR server {who}: HTTP {resp.status_code} {code}: {detail}".rstrip(": "),
                                 resp.status_code, code, who)
        out = resp.json()
        if not isinstance(out, dict):
            raise SvrClientError(f"SVR server {self.name or self.url}: answer is not a JSON object")
        return out


def _status(obj: dict[str, Any], server: _Server) -> Status:
    try:
        return Status(str(obj.get("status")))
    except ValueError:
        raise SvrClientError(f"SVR server {server.name}: unknown status in its answer") from None


class _Client:
    """Connections to one or more servers, their ``info``, the PIN stretch."""

    def __init__(self, urls: Sequence[str], *, token: str, policy: Any = None,
                 transports: Sequence[httpx.BaseTransport] | None = None, insecure_loopback: bool = False,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, argon2: Argon2Params = SIGNAL_ARGON2) -> None:
        if not urls:
            raise ValueError("at least one SVR server URL is needed")
        if not token:
            raise ValueError("a bearer token is needed")
        ts = list(transports) if transports is not None else [self._transport(u, policy, i, insecure_loopback)
                                                               for i, u in enumerate(urls)]
        if len(ts) != len(urls):
            raise ValueError(f"{len(ts)} transports for {len(urls)} servers")
        self.servers = [_Server(u, token, t, timeout) for u, t in zip(urls, ts, strict=True)]
        self.argon2 = argon2
        self._pool = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="svr-client")
        self._info_done = False

    @staticmethod
    def _transport(url: str, policy: Any, i: int, insecure_loopback: bool) -> httpx.BaseTransport:
        if policy is not None:
            from safehold.client.records import attesting_transport

            p = policy[i] if isinstance(policy, list | tuple) else policy
            return attesting_transport(p)
        if insecure_loopback and is_loopback_http(url):
            warnings.warn(f"SVR: plain HTTP to {url}: the server is NOT attested (development only)",
                          stacklevel=3)
            return httpx.HTTPTransport()
        raise ValueError("an SVR client needs an appraisal policy or transports (plain HTTP only with "
                         "insecure_loopback=True to loopback URLs)")

    def close(self) -> None:
        """Close the connections."""
        self._pool.shutdown(wait=False)
        for s in self.servers:
            s.http.close()

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _each(self, fn: Callable[[int, _Server], dict[str, Any]]) -> list[dict[str, Any]]:
        """``fn`` on every server in parallel, in server order; the first failure is raised after
        every call finished (so no request is left half-sent)."""
        futures = [self._pool.submit(fn, i, s) for i, s in enumerate(self.servers)]
        results, first = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
                results.append({})
        if first is not None:
            raise first
        return results

    def _post_each(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST ``bodies[i]`` to server ``i``, in parallel."""
        return self._each(lambda i, s: s.call(path, bodies[i]))

    def info(self) -> list[dict[str, Any]]:
        """Every server's ``/v1/svr/info``; checks names are distinct and group ids agree.

        Raises:
            SvrError: two servers with one name, or different group ids.
        """
        infos = self._each(lambda i, s: s.call("/v1/svr/info"))
        for s, inf in zip(self.servers, infos, strict=True):
            s.name, s.group_id = str(inf.get("name", "")), int(inf.get("group_id", -1))
        if len({s.name for s in self.servers}) != len(self.servers) or not all(s.name for s in self.servers):
            raise SvrError("the SVR servers must have distinct names")
        if len({s.group_id for s in self.servers}) != 1 or self.servers[0].group_id < 0:
            raise SvrError("the SVR servers report different group ids: they are not one SVR group")
        self._info_done = True
        return infos

    def _ready(self) -> None:
        if not self._info_done:
            self.info()

    def stretch(self, pin: str, backup_id: bytes) -> PinHash:
        """Normalise and stretch ``pin`` for the backup ``backup_id`` of this group (Argon2id).

        Raises:
            InvalidPinError: a PIN under 4 characters after normalisation.
        """
        self._ready()
        salt = make_salt(backup_id, self.servers[0].group_id)
        return stretch(normalise_pin(pin), salt, self.argon2)

    # -- the data owner's freshness step ---------------------------------------------------------

    def freshness_statement(self, server: int) -> dict[str, Any]:
        """What server ``server``'s ledger needs the owner to sign (admin role)."""
        return self.servers[server].call("/v1/svr/freshness")

    def apply_statement(self, server: int, signed: dict[str, str]) -> dict[str, Any]:
        """Post the owner's signed statement to server ``server`` (admin role)."""
        return self.servers[server].call("/v1/svr/freshness", signed)

    def owner_initialise(self, owner_key_pem: bytes) -> list[str]:
        """Sign and apply every server's pending statement with the owner key (development
        stacks and tests; a real owner reviews each proposal first). Returns the actions taken
        per server (``initialise`` / ``reanchor``)."""
        done = []
        for i in range(len(self.servers)):
            st = self.freshness_statement(i)
            self.apply_statement(i, sign_statement(st["payload"], owner_key_pem))
            done.append(str(st["action"]))
        return done


def _bid_of(answers: Sequence[dict[str, Any]]) -> bytes:
    ids = {str(a.get("backup_id", "")) for a in answers}
    if len(ids) != 1:
        raise RecoveryFailedError("the SVR servers report different backup ids for this label")
    try:
        bid = bytes.fromhex(ids.pop())
    except ValueError:
        bid = b""
    if len(bid) != BACKUP_ID_SIZE:
        raise SvrError("an SVR server sent a malformed backup id")
    return bid


class Svr2Client(_Client):
    """SVR2 on one server (``url``); the options are those of :class:`Svr3Client`."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__([url], **kw)

    @property
    def _s(self) -> _Server:
        return self.servers[0]

    def _context(self, bid: bytes) -> bytes:
        return b"safehold/svr2/v1|" + self._s.group_id.to_bytes(8, "big") + bid

    def _query(self, label: str) -> tuple[dict[str, Any], bytes]:
        self._ready()
        q = self._s.call("/v1/svr2/query", {"label": check_label(label)})
        return q, _bid_of([q])

    def query(self, *, label: str = "default") -> BackupState:
        """The backup's state; charges nothing."""
        q, _ = self._query(label)
        return BackupState(self._s.name, str(_status(q, self._s)), int(q.get("tries", 0)),
                           int(q.get("max_tries", 0)), exposed=bool(q.get("exposed")))

    def backup(self, pin: str | PinHash, secret: bytes, *, label: str = "default",
               max_tries: int = DEFAULT_TRIES) -> int:
        """Back ``secret`` (1..256 bytes) up under ``pin``: backup, then expose. Returns the tries.

        Raises:
            InvalidPinError, InvalidRequestError (secret size, tries), SvrError (the backup was
            changed by another client during the two phases), SvrClientError.
        """
        check_tries(max_tries)
        q, bid = self._query(label)
        ph = pin if isinstance(pin, PinHash) else self.stretch(pin, bid)
        data = seal_secret(ph.encryption_key, secret, self._context(bid))
        return self._backup(label, bid, ph, data, max_tries, unb64(q.get("token"), "token", size=TOKEN_SIZE))

    def _backup(self, label: str, bid: bytes, ph: PinHash, data: bytes, max_tries: int, token: bytes) -> int:
        for _ in range(_BACKUP_ATTEMPTS):
            r = self._s.call("/v1/svr2/backup", {"label": label, "data": b64(data), "pin": b64(ph.access_key),
                                                 "max_tries": max_tries, "token": b64(token)})
            st = _status(r, self._s)
            if st == Status.OK:
                e = self._s.call("/v1/svr2/expose", {"label": label, "data": b64(data)})
                if _status(e, self._s) != Status.OK:
                    raise SvrError("SVR2 expose failed: the backup was reset, deleted or guessed at "
                                   "between backup and expose; back up again")
                return max_tries
            if st != Status.ALREADY_EXISTS:
                raise SvrError(f"SVR2 backup refused ({st})")
            q, _ = self._query(label)
            token = unb64(q.get("token"), "token", size=TOKEN_SIZE)
        raise SvrError("SVR2 backup: the backup kept changing under this client; try again")

    def restore(self, pin: str | PinHash, *, label: str = "default", refill: bool = True) -> bytes:
        """Recover the secret (one guess). With ``refill`` a success backs the same secret up
        again with the backup's original ``max_tries`` (a success does not refill by itself).

        Raises:
            BackupMissingError: no restorable backup (nothing charged), or this wrong guess was
                the last one and the backup is erased.
            PinMismatchError: wrong PIN; ``.tries`` left.
            InvalidPinError, SvrClientError, DecryptionError (the server sent data that does not
            open under this PIN's key).
        """
        q, bid = self._query(label)
        if _status(q, self._s) != Status.OK or not q.get("exposed"):
            raise BackupMissingError(f"no restorable SVR2 backup {label!r} on {self._s.name}")
        ph = pin if isinstance(pin, PinHash) else self.stretch(pin, bid)
        r = self._s.call("/v1/svr2/restore", {"label": label, "pin": b64(ph.access_key)})
        st = _status(r, self._s)
        if st == Status.PIN_MISMATCH:
            raise PinMismatchError(f"wrong PIN; {int(r['tries'])} tries left", int(r["tries"]))
        if st == Status.MISSING:
            raise BackupMissingError(f"SVR2 backup {label!r} is gone (erased after the last allowed wrong "
                                     "guess, or deleted)")
        if st != Status.OK:
            raise SvrError(f"SVR2 restore: unexpected status {st}")
        data = unb64(r.get("data"), "data", min_size=MIN_DATA, max_size=MAX_DATA)
        secret = open_secret(ph.encryption_key, data, self._context(bid))
        if refill:
            token = unb64(r.get("token"), "token", size=TOKEN_SIZE)
            self._backup(label, bid, ph, data, check_tries(int(q.get("max_tries", 0))), token)
        return secret

    def delete(self, *, label: str = "default") -> None:
        """Erase the backup."""
        self._ready()
        self._s.call("/v1/svr2/delete", {"label": check_label(label)})


class Svr3Client(_Client):
    """SVR3 across ``urls`` (all are needed to recover; order does not matter).

    Args:
        urls: the servers' base URLs.
        token: bearer token (role ``backup``; the same principal on every server).
        policy: an appraisal policy (object, Verifier or TOML path) for every server, or a list
            with one per server.
        transports: httpx transports, one per server, that authenticate the servers themselves.
        insecure_loopback: allow plain HTTP to loopback URLs (development; warns).
        argon2: the PIN stretch; :data:`~safehold.svr.pin.SIGNAL_ARGON2` unless a test says so.

    Raises:
        ValueError: no URL, no token, neither a policy nor transports (nor an allowed loopback).
    """

    def _context(self, bid: bytes, version: int) -> bytes:
        group = self.servers[0].group_id.to_bytes(8, "big")
        return b"safehold/svr3/v1|" + group + bid + version.to_bytes(4, "big")

    def _query(self, label: str) -> tuple[list[dict[str, Any]], bytes]:
        self._ready()
        label = check_label(label)
        qs = self._each(lambda i, s: s.call("/v1/svr3/query", {"label": label}))
        return qs, _bid_of(qs)

    def query(self, *, label: str = "default") -> list[BackupState]:
        """Every server's view of the backup; charges nothing."""
        qs, _ = self._query(label)
        return [BackupState(s.name, str(_status(q, s)), int(q.get("tries", 0)), int(q.get("max_tries", 0)),
                            version=int(q.get("version", 0))) for s, q in zip(self.servers, qs, strict=True)]

    def backup(self, pin: str | PinHash, secret: bytes, *, label: str = "default",
               max_tries: int = DEFAULT_TRIES) -> int:
        """Split a fresh OPRF key and encryption secret across the servers and store ``secret``
        (1..256 bytes) sealed under the derived key. Returns the tries each server allows.

        Raises:
            InvalidPinError, InvalidRequestError, SvrError, SvrClientError.
        """
        check_tries(max_tries)
        qs, bid = self._query(label)
        ph = pin if isinstance(pin, PinHash) else self.stretch(pin, bid)
        tokens = [unb64(q.get("token"), "token", size=TOKEN_SIZE) for q in qs]
        return self._create(label, bid, ph, secret, max_tries, tokens)

    def _create(self, label: str, bid: bytes, ph: PinHash, secret: bytes, max_tries: int,
                tokens: list[bytes]) -> int:
        x = db4.oprf_input(ph.raw)
        for _ in range(_BACKUP_ATTEMPTS):
            shares = db4.split(len(self.servers))
            k_auth = db4.master_auth_key(oprf.evaluate(shares.oprf_key, [x])[0])
            version = 1 + _secrets.randbelow(2**32 - 1)
            sealed = seal_secret(db4.encryption_key(shares.encryption_secret, k_auth), secret,
                                 self._context(bid, version))

            bodies = [{
                "label": label, "version": version, "max_tries": max_tries,
                "oprf_share": b64(shares.oprf_shares[i]), "zero_share": b64(shares.zero_shares[i]),
                "encryption_share": b64(shares.encryption_shares[i]),
                "auth_commitment": b64(db4.auth_commitment(db4.server_auth_key(k_auth, s.name))),
                "sealed": b64(sealed), "token": b64(tokens[i])} for i, s in enumerate(self.servers)]
            answers = self._post_each("/v1/svr3/create", bodies)
            sts = [_status(a, s) for a, s in zip(answers, self.servers, strict=True)]
            if all(st == Status.OK for st in sts):
                return max_tries
            if any(st not in (Status.OK, Status.ALREADY_EXISTS) for st in sts):
                raise SvrError(f"SVR3 create refused ({', '.join(sorted(set(sts)))})")
            qs, _ = self._query(label)  # a token went stale: look again, split again
            tokens = [unb64(q.get("token"), "token", size=TOKEN_SIZE) for q in qs]
        raise SvrError("SVR3 backup: the backup kept changing under this client; try again")

    def restore(self, pin: str | PinHash, *, label: str = "default", refill: bool = True) -> bytes:
        """Recover the secret: one guess charged on every server. With ``refill`` a success
        backs the secret up again (fresh shares) with the backup's original ``max_tries``.

        Raises:
            BackupMissingError: some server holds no share (checked first, nothing charged), or
                this guess was the last and the shares are erased.
            PinMismatchError: the PIN did not recover the secret — a wrong PIN, or a server that
                answered wrongly (indistinguishable by design); ``.tries`` left (the least of
                the servers').
            RecoveryFailedError: the servers disagree (versions, a server erased in between).
            InvalidPinError, SvrClientError.
        """
        qs, bid = self._query(label)
        missing = [s.name for s, q in zip(self.servers, qs, strict=True) if _status(q, s) != Status.OK]
        if missing:
            raise BackupMissingError(f"no SVR3 backup {label!r} on {', '.join(missing)}")
        versions = {int(q.get("version", 0)) for q in qs}
        if len(versions) != 1:
            raise RecoveryFailedError("the SVR servers hold different versions of this backup (an "
                                      "interrupted backup): back up again")
        version = versions.pop()
        ph = pin if isinstance(pin, PinHash) else self.stretch(pin, bid)
        x = db4.oprf_input(ph.raw)
        blinded = oprf.blind([x])
        b = blinded.elements[0]
        r1 = self._each(lambda i, s: s.call("/v1/svr3/restore1", {"label": label, "blinded": b64(b)}))
        sts = [_status(r, s) for r, s in zip(r1, self.servers, strict=True)]
        if any(st != Status.OK for st in sts):
            raise RecoveryFailedError("a server holds no share any more (erased or deleted in between); "
                                      "the guess was charged on the others")
        tries = min(int(r.get("tries", 0)) for r in r1)
        if any(int(r.get("version", 0)) != version for r in r1):
            raise RecoveryFailedError("the SVR servers changed version during the restore")
        try:
            combined = db4.combine([unb64(r.get("element"), "element", size=ELEMENT_SIZE) for r in r1])
            k_auth = db4.master_auth_key(oprf.finalize([x], blinded.blinds, [combined])[0])
        except (OPRFError, InvalidRequestError, ValueError):
            k_auth = b""  # a malformed answer: prove with nothing, learn nothing

        def restore2(i: int, s: _Server) -> dict[str, Any]:
            session = unb64(r1[i].get("session"), "session", size=SESSION_SIZE)
            sk = db4.server_auth_key(k_auth, s.name) if k_auth else oprf.random_scalar()
            point, scalar = db4.prove(sk, b, session)
            return s.call("/v1/svr3/restore2", {"label": label, "session": b64(session), "version": version,
                                                "auth_point": b64(point), "auth_scalar": b64(scalar)})

        r2 = self._each(restore2)
        sts = [_status(r, s) for r, s in zip(r2, self.servers, strict=True)]
        if all(st == Status.OK for st in sts) and k_auth:
            secret = self._open(r2, k_auth, bid, version)
            if secret is not None:
                if refill:
                    tokens = [unb64(r.get("token"), "token", size=TOKEN_SIZE) for r in r1]
                    max_tries = min(int(q.get("max_tries", 0)) for q in qs)
                    self._create(label, bid, ph, secret, check_tries(max_tries), tokens)
                return secret
        if any(st == Status.OK for st in sts) and not all(st == Status.OK for st in sts):
            raise RecoveryFailedError("the SVR servers disagree about this PIN (a server answered wrongly)")
        if tries == 0:
            raise BackupMissingError("the PIN did not recover the secret, and that was the last allowed "
                                     "guess: the backup is erased")
        raise PinMismatchError(f"the PIN did not recover the secret (wrong PIN, or a server answered "
                               f"wrongly); {tries} tries left", tries)

    def _open(self, r2: list[dict[str, Any]], k_auth: bytes, bid: bytes, version: int) -> bytes | None:
        try:
            shares = [unb64(r.get("encryption_share"), "encryption_share", size=SHARE_SIZE) for r in r2]
            sealed = {unb64(r.get("sealed"), "sealed", min_size=MIN_DATA, max_size=MAX_DATA) for r in r2}
        except InvalidRequestError:
            return None
        key = db4.encryption_key(db4.xor_all(shares), k_auth)
        for blob in sealed:
            try:
                return open_secret(key, blob, self._context(bid, version))
            except DecryptionError:
                continue
        return None

    def delete(self, *, label: str = "default") -> None:
        """Erase the backup's shares on every server."""
        self._ready()
        label = check_label(label)
        self._each(lambda i, s: s.call("/v1/svr3/remove", {"label": label}))

