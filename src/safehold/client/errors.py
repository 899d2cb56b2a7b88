"""Exceptions of the client SDK: what a service answered or why it could not be reached.

All subclass :class:`safehold.errors.SafeholdError` (through the service's error family where one
exists: :class:`~safehold.errors.BrokerError`, :class:`~safehold.errors.RecordError`,
:class:`~safehold.vau.errors.VauError`), so the CLI prints each as one line.
"""

from __future__ import annotations

from safehold.discovery.errors import DiscoveryError
from safehold.errors import BrokerError, RecordError, SafeholdError
from safehold.jsontypes import JSONValue
from safehold.vau.errors import VauError

__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "BrokerRefusedError",
    "EpaResponseError",
    "ErezeptResponseError",
    "PreconditionFailedError",
    "RecordsClientError",
    "ServiceUnreachableError",
    "VauOuterError",
]


class ServiceUnreachableError(SafeholdError):
    """The records service could not be reached, or dropped the connection / did not answer
    (the message names the URL and the transport failure, never request content)."""


class BrokerRefusedError(BrokerError):
    """The broker answered with an error status; ``status`` and the problem ``detail`` are kept."""

    def __init__(self, status: int, detail: str):
        self.status = status
        self.detail = detail
        super().__init__(f"broker refused ({status}): {detail}")


class RecordsClientError(RecordError):
    """The records service answered with an error (the message holds its status and code)."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code


class PreconditionFailedError(RecordsClientError):
    """412: the record's version is not the one given (``if_version``); re-read and retry."""


class AlreadyExistsError(RecordsClientError):
    """409 ``exists``: a create-only write found the id taken."""


class AccessDeniedError(RecordsClientError):
    """401 (no/unknown credentials) or 403 (role too weak)."""


class VauOuterError(VauError):
    """The VAU web interface refused the outer request (non-200), with its status and text.

    Attributes:
        status: the outer HTTP status.
    """

    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"VAU answered HTTP {status}: {text[:300]}")


class ErezeptResponseError(SafeholdError):
    """The Fachdienst answered an inner request with an error (FHIR OperationOutcome).

    Attributes:
        status: inner HTTP status. outcome: the parsed OperationOutcome (or None).
    """

    def __init__(self, status: int, outcome: JSONValue) -> None:
        self.status = status
        self.outcome = outcome
        issues = outcome.get("issue") if isinstance(outcome, dict) else None
        first = issues[0] if isinstance(issues, list) and issues else None
        text = str(first.get("diagnostics", "")) if isinstance(first, dict) else ""
        super().__init__(f"E-Rezept Fachdienst answered {status}: {text}")


class EpaResponseError(SafeholdError):
    """The service behind the ePA 3 VAU answered an inner request with an error status.

    Attributes:
        status: inner HTTP status. text: the start of the inner body (at most 300 characters).
    """

    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text[:300]
        super().__init__(f"the service behind the ePA VAU answered HTTP {status}: {self.text}")


class DiscoveryClientError(DiscoveryError):
    """The service answered with an error (``status`` and ``code`` as sent)."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code
