"""Who may call the records service: the access list the broker releases, principals, roles.

Framework-free: :func:`safehold.records.http.authenticate` reads the credentials off a request
and asks :class:`AccessList`; the HTTP layer turns :class:`AuthenticationError` into 401 and
:class:`PermissionDeniedError` into 403.

Only the data owner decides who holds a role: the list is an ``access`` secret of the owner's
manifest (``safehold.broker.manifest``), released by the broker to the attested workload, and
every identity in it is pinned — a bearer token by its SHA-256, a client certificate by the
SHA-256 of its public key (SubjectPublicKeyInfo DER). A certificate's subject, its CN, grants
nothing: the broker's workload CA issues client certificates with any CN to operators, so a
name is not an identity. Roles are ordered ``reader`` < ``writer`` < ``admin`` (:data:`ROLES`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.errors import ConfigError
from safehold.jsontypes import JSONValue
from safehold.records.errors import AuthenticationError, PermissionDeniedError

__all__ = ["ROLES", "AccessList", "Principal"]

ROLES = ("reader", "writer", "admin")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` (for the audit) and ``role`` (one of :data:`ROLES`)."""

    name: str
    role: str

    def can(self, role: str) -> bool:
        """True if this principal's role is at least ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def require(self, role: str) -> Principal:
        """Return this principal if its role is at least ``role``.

        Raises:
            PermissionDeniedError: names both roles.
        """
        if not self.can(role):
            raise PermissionDeniedError(f"role {self.role!r} may not do this (needs {role!r})")
        return self


@dataclass
class AccessList:
    """Who may call the service, as released by the broker (an ``access`` secret of the manifest).

    JSON form (:meth:`safehold.broker.manifest.SecretSpec.access_document`)::

        {"tokens": {"<hex SHA-256 of token>": {"name": "alice", "role": "writer"}},
         "keys":   {"<hex SHA-256 of SubjectPublicKeyInfo DER>": {"name": "alice", "role": "admin"}}}

    Raises (from :meth:`from_json`):
        ConfigError: malformed JSON, unknown role or member, a pin that is not 64 hex digits,
            or a ``certificates`` table (the old mapping by certificate CN, refused: see above).
    """

    tokens: dict[bytes, Principal] = field(default_factory=dict)
    keys: dict[bytes, Principal] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, JSONValue]) -> AccessList:
        """Parse the JSON form above."""
        try:
            obj = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("records access list is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError("records access list must be a JSON object")
        if "certificates" in obj:
            raise ConfigError("records access list: 'certificates' (roles by certificate CN) is not "
                              "accepted: anyone the broker issues certificates to can choose a CN; "
                              "pin client keys under 'keys' (SHA-256 of the SubjectPublicKeyInfo)")
        unknown = sorted(set(obj) - {"tokens", "keys"})
        if unknown:
            raise ConfigError(f"records access list: unknown member(s) {unknown}")
        acl = cls()
        acl.tokens = _pinned(obj.get("tokens") or {}, "tokens", "token")
        acl.keys = _pinned(obj.get("keys") or {}, "keys", "cert")
        return acl

    def by_token(self, token: str) -> Principal | None:
        """The principal for a bearer token, compared by SHA-256 in constant time per entry."""
        d = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for h, p in self.tokens.items():
            if hmac.compare_digest(h, d):
                found = p
        return found

    def by_certificate(self, der: bytes) -> Principal | None:
        """The principal for a verified client certificate (DER), by the SHA-256 of its public
        key (SubjectPublicKeyInfo DER); its subject and CN are not looked at."""
        try:
            spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        except Exception:  # noqa: BLE001 - a certificate that does not parse identifies nobody
            return None
        return self.keys.get(hashlib.sha256(spki).digest())

    def principal(self, *, certificate: bytes | None, authorization: str) -> Principal:
        """The caller's principal: a verified client certificate (DER) first, then the
        ``Authorization`` header's bearer token.

        Raises:
            AuthenticationError: neither identifies a known principal.
        """
        if certificate:
            p = self.by_certificate(certificate)
            if p is not None:
                return p
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            p = self.by_token(token.strip())
            if p is not None:
                return p
            raise AuthenticationError("bearer token not recognised")
        if certificate:
            raise AuthenticationError("client certificate key is not pinned in the access list")
        raise AuthenticationError("authentication required (bearer token or client certificate)")


def _pinned(table: object, where: str, kind: str) -> dict[bytes, Principal]:
    """``{"<64 hex>": {"name", "role"}}`` → digest → :class:`Principal` (``name`` for the audit:
    ``<name>`` for tokens, ``cert:<name>`` for keys)."""
    if not isinstance(table, dict):
        raise ConfigError(f"records access list: {where} must be an object")
    out: dict[bytes, Principal] = {}
    for h, ent in table.items():
        try:
            digest = bytes.fromhex(h)
        except ValueError:
            digest = b""
        if len(digest) != 32 or not isinstance(ent, dict):
            raise ConfigError(f"records access list: {where} keys must be 64 hex digits of SHA-256")
        role = ent.get("role")
        if role not in ROLES:
            raise ConfigError(f"records access list: role must be one of {ROLES}, got {role!r:.40}")
        name = str(ent.get("name", kind))
        out[digest] = Principal(f"cert:{name}" if kind == "cert" else name, role)
    return out
