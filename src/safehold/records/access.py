"""Who may call the records service: the access list the broker releases, principals, roles.

Framework-free: :func:`safehold.records.http.authenticate` reads the credentials off a request
and asks :class:`AccessList`; the HTTP layer turns :class:`AuthenticationError` into 401 and
:class:`PermissionDeniedError` into 403.

Credentials: a bearer token whose SHA-256 appears in the access list, or a client certificate
issued by the broker's workload CA (mutual TLS) whose subject CN appears in it. Roles are
ordered ``reader`` < ``writer`` < ``admin`` (:data:`ROLES`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

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
    """Who may call the service, as released by the broker (secret ``records-access``).

    JSON form::

        {"tokens": {"<hex SHA-256 of token>": {"name": "alice", "role": "writer"}},
         "certificates": {"<subject CN>": "reader"}}

    Raises (from :meth:`from_json`):
        ConfigError: malformed JSON, unknown role, or a token hash that is not 64 hex digits.
    """

    tokens: dict[bytes, Principal] = field(default_factory=dict)
    certificates: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, JSONValue]) -> AccessList:
        """Parse the JSON form above."""
        try:
            obj = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("records access list is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError("records access list must be a JSON object")
        acl = cls()
        for h, ent in (obj.get("tokens") or {}).items():
            try:
                digest = bytes.fromhex(h)
            except ValueError:
                digest = b""
            if len(digest) != 32 or not isinstance(ent, dict):
                raise ConfigError("records access list: token keys must be 64 hex digits of SHA-256")
            role = ent.get("role")
            if role not in ROLES:
                raise ConfigError(f"records access list: role must be one of {ROLES}, got {role!r}")
            acl.tokens[digest] = Principal(str(ent.get("name", "token")), role)
        for cn, role in (obj.get("certificates") or {}).items():
            if role not in ROLES:
                raise ConfigError(f"records access list: role must be one of {ROLES}, got {role!r}")
            acl.certificates[str(cn)] = role
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
        """The principal for a verified client certificate (DER), by subject CN."""
        try:
            cert = x509.load_der_x509_certificate(der)
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return None
        if not cns:
            return None
        cn = str(cns[0].value)
        role = self.certificates.get(cn)
        return Principal(f"cert:{cn}", role) if role else None

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
        raise AuthenticationError("authentication required (bearer token or client certificate)")
