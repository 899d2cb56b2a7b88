"""Errors of the E-Rezept prescription service. Messages name the field or rule that failed,
never prescription content, names, KVNRs, access codes or secrets. HTTP status codes are
assigned in :mod:`safehold.erezept.http` only."""

from __future__ import annotations

from safehold.errors import SafeholdError


class ErezeptError(SafeholdError):
    """Root of the E-Rezept service's refusals."""


class AccessTokenError(ErezeptError):
    """The IdP access token is missing, malformed, badly signed, expired or from another issuer."""


class RoleError(ErezeptError):
    """The caller's role (from the token's professionOID) may not perform this operation."""


class AccessCodeError(ErezeptError):
    """The AccessCode or the pharmacy's secret does not match the Task (or the pharmacy is another)."""


class TaskNotFoundError(ErezeptError):
    """No Task with this id (or not visible to the caller)."""


class TaskGoneError(ErezeptError):
    """The Task was cancelled (aborted); its prescription content is deleted."""


class TaskStateError(ErezeptError):
    """The Task is not in a state that allows the operation (e.g. $accept on an in-progress Task)."""


class BundleInvalidError(ErezeptError):
    """The KBV prescription bundle (or a MedicationDispense) breaks a structural rule.

    Attributes:
        problems: every rule that failed, as short strings naming paths, never values.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = f"{message}: " + "; ".join(self.problems[:20])
        super().__init__(message)


class SignatureFormatError(BundleInvalidError):
    """The signed prescription is not a well-formed CMS SignedData enveloping the bundle."""
