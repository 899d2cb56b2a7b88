"""Errors of Secure Value Recovery (all :class:`~safehold.errors.SafeholdError`).

Shared by the service and the client SDK. Messages name a field, a label or a server, never a
PIN, an access key, a share or a secret.
"""

from __future__ import annotations

from safehold.errors import ConfigError, SafeholdError

__all__ = [
    "BackupMissingError", "InvalidPinError", "InvalidRequestError", "PinMismatchError",
    "RecoveryFailedError", "SvrClientError", "SvrConfigError", "SvrError", "SvrStateError",
]


class SvrError(SafeholdError):
    """A Secure Value Recovery operation failed."""


class InvalidRequestError(SvrError, ValueError):
    """A request is malformed: a field of the wrong size or encoding, a label outside the
    allowed characters, ``max_tries`` outside 1..255 (SVR2 ``INVALID_REQUEST``)."""


class InvalidPinError(SvrError, ValueError):
    """A PIN is empty or too short after normalisation (checked on the client)."""


class SvrConfigError(ConfigError):
    """The SVR server's configuration or start-up secrets are invalid."""


class SvrStateError(SvrError):
    """A stored SVR row does not decode (it authenticated, so this is a software fault or a
    format from another version); names the protocol and the blind index only."""


# --- outcomes the client SDK reports -------------------------------------------------------------


class PinMismatchError(SvrError):
    """The PIN was wrong; ``tries`` guesses are left (0 would mean the backup is gone, which
    is reported as :class:`BackupMissingError` instead)."""

    def __init__(self, message: str, tries: int):
        super().__init__(message)
        self.tries = tries


class BackupMissingError(SvrError):
    """No restorable backup under this label: never made, not exposed, deleted, or erased after
    the last allowed wrong guess."""


class RecoveryFailedError(SvrError):
    """SVR3: the servers' answers did not combine into the secret (a server missing, holding
    another version, or answering wrongly). Says nothing about which PIN digit was wrong; the
    guess is charged on every server that answered."""


class SvrClientError(SvrError):
    """A server answered with an HTTP error (``status``, ``code`` and ``server`` as sent)."""

    def __init__(self, message: str, status: int = 0, code: str = "", server: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code
        self.server = server
