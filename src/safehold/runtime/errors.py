"""Exceptions of the workload runtime (:mod:`safehold.runtime`).

``safehold.records.errors`` re-exports :class:`NoKeysError` and :class:`BrokerIdentityError`
(the records service raised them first), so ``except`` clauses on either name catch both.
"""

from __future__ import annotations

from safehold.errors import ConfigError, SafeholdError

__all__ = ["BrokerIdentityError", "NoKeysError"]


class BrokerIdentityError(ConfigError):
    """The broker's workload CA is not the one pinned in the measured configuration (or the
    broker's TLS certificate does not chain to it): the service talks to no other broker."""


class NoKeysError(SafeholdError):
    """The broker refused this workload (its Evidence did not pass the manifest's policy), so
    the service has no keys and must not serve."""
