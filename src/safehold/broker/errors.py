"""Why the key broker refuses a request, as domain exceptions (no HTTP here).

Every class is a :class:`~safehold.errors.BrokerError` (or, for the state, a
:class:`~safehold.errors.SealingError`); :mod:`safehold.broker.http` maps each one to an HTTP
status and an RFC 7807 problem document in one table. Messages name what was wrong (field,
secret, workload, state row) and never carry key material or secret values.
"""

from __future__ import annotations

from safehold.errors import BrokerError, SealingError


class MalformedRequestError(BrokerError):
    """A request body or parameter has the wrong shape or an unknown value (KBS Request,
    Attestation, certificate request, CSR, manifest update envelope, recovery body)."""


class NotAuthenticatedError(BrokerError):
    """The caller is not who it must be: no session or credentials, an unknown user token or
    client key, a nonce or attestation that expired, Evidence that is not authentic or not
    bound to this session's nonce and ``tee-pubkey``, or an EAR token not issued here."""


class NonceReplayedError(NotAuthenticatedError):
    """A KBS challenge nonce was presented a second time (each one is single use)."""


class PermissionDeniedError(BrokerError):
    """The caller is authenticated, but the manifest or an appraisal policy denies the
    operation (workload may not read that secret, user lacks the role, claims refused,
    manifest update not signed by an owner, a first manifest already set)."""


class NotFoundError(BrokerError):
    """No such resource, secret, certificate, session name or manifest version, or a
    ``value`` secret that has no value yet."""


class StateConflictError(BrokerError):
    """The operation does not fit the broker's current state: a manifest version that is not
    current + 1, a concurrent manifest install, recovery asked of a broker that is not sealed."""


class NotReadyError(BrokerError):
    """The broker cannot serve this yet: it is in recovery mode (master key sealed) or no
    manifest is set."""


class RecoveryError(BrokerError):
    """Recovery failed: too few or wrong shares, a master-key fingerprint that differs from the
    recorded one, or no recovery data stored."""


class StateIntegrityError(SealingError):
    """A broker state row is missing, edited, moved or rolled back in the store; the message
    names the row (e.g. ``m/head``, ``manifest/current (o/3f2a…)``). The broker refuses to serve."""


class CertificateRequestError(MalformedRequestError):
    """A certificate request is invalid: key type, curve or size, or an extension that is not
    allowed, given twice or too large."""
