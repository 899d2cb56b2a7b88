"""Errors of the contact discovery service (all :class:`~safehold.errors.SafeholdError`).

Messages name the field or the position in a batch, never an identifier or a user id.
"""

from __future__ import annotations

from safehold.errors import ConfigError, SafeholdError


class DiscoveryError(SafeholdError):
    """A discovery operation failed."""


class InvalidIdentifierError(DiscoveryError, ValueError):
    """An identifier is malformed for its kind (E.164 number, KVNR, ...) or of an unknown kind."""


class InvalidUserIdError(DiscoveryError, ValueError):
    """A user id is empty, not UTF-8 or longer than :data:`safehold.discovery.protocol.USER_ID_MAX`."""


class InvalidRequestError(DiscoveryError, ValueError):
    """A request is malformed: wrong sizes, duplicate outputs, too many items."""


class RateLimitedError(DiscoveryError):
    """The client asked about more new identifiers than its budget allows in this period.

    ``retry_after`` is the number of seconds until the period ends.
    """

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidTokenError(DiscoveryError):
    """A rate-limit token is malformed, not this client's, or does not cover the presented set."""


class RegistryTamperedError(DiscoveryError):
    """A stored registry or rate-limit row failed authentication (names the row's key only)."""


class TableOverflowError(DiscoveryError):
    """More queries fell into one block of the oblivious table than it has slots (probability
    below 2^-40 per batch; the caller retries the batch in halves)."""


class DiscoveryConfigError(ConfigError):
    """The discovery service configuration is invalid."""
