"""Exceptions of the records service and its record model, in one place.

Every class subclasses :class:`safehold.errors.SafeholdError` (most through
:class:`~safehold.errors.RecordError`); the HTTP layer (:mod:`safehold.records.http`) maps them to
status codes, nothing below it does. Messages name the blind index of a row, never a record key
or record content.
"""

from __future__ import annotations

from safehold.errors import (
    ConfigError,
    ConflictError,
    RecordError,
    RecordTamperedError,
    SafeholdError,
    UnknownKeyError,
)

__all__ = [
    "AlreadyExistsError",
    "AuthError",
    "AuthenticationError",
    "BrokerIdentityError",
    "ImportFormatError",
    "InvalidRecordError",
    "NoKeysError",
    "NonFiniteNumberError",
    "PayloadTooLargeError",
    "SearchTooCostlyError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "RecordConflictError",
    "RecordCopiedError",
    "RecordCorruptedError",
    "RecordMovedError",
    "RecordUnknownKeyError",
    "RecordVersionMismatchError",
    "SconeFormError",
    "UnsupportedMediaTypeError",
]


class InvalidRecordError(RecordError):
    """A record or record id is not acceptable (names the rule broken, never the content)."""


class NonFiniteNumberError(ValueError):
    """JSON text holds ``NaN``, ``Infinity`` or ``-Infinity``: Python's :mod:`json` accepts them,
    RFC 8259 §6 does not ("Numeric values that cannot be represented … such as Infinity and NaN
    are not permitted"), so Safehold never stores them."""


class ImportFormatError(RecordError):
    """A whole input file cannot be read in any supported format (the message names the file)."""


class AuthError(SafeholdError):
    """Base of the access refusals."""


class AuthenticationError(AuthError):
    """Missing or unknown credentials (HTTP 401 ``unauthorized``)."""


class PermissionDeniedError(AuthError):
    """The caller's role is too weak for the operation (HTTP 403 ``forbidden``)."""


class PayloadTooLargeError(InvalidRecordError):
    """The request body is over the endpoint's limit (413; the message names the limit)."""


class UnsupportedMediaTypeError(InvalidRecordError):
    """The request body's ``Content-Type`` is not one the endpoint parses (HTTP 415; the message
    names what is accepted)."""


class PreconditionFailedError(RecordError):
    """``If-Match`` / expected version does not match the record's current version."""


class AlreadyExistsError(RecordError):
    """Create-only write on a record id that exists."""


class SearchTooCostlyError(InvalidRecordError):
    """A search would decrypt more than ``repository.MAX_CANDIDATES`` records: narrow it."""


class SconeFormError(InvalidRecordError):
    """A ``POST /patient/<id>`` form lacks fields or holds a bad value (the message is the
    demo-style ``error`` text: names the fields, never their values)."""


class _RowRefusedError(RecordTamperedError):
    """Base of the per-attack errors: carries ``reason``, ``namespace`` and ``row_index`` (hex)."""

    reason = "tampered"

    def __init__(self, namespace: str, row_key: bytes, detail: str):
        self.namespace = namespace
        self.row_index = bytes(row_key).hex()
        self.detail = detail
        super().__init__(
            f"record row {self.row_index} in store namespace {namespace!r} refused "
            f"({self.reason}): {detail}"
        )


class RecordCorruptedError(_RowRefusedError):
    """The stored value's bytes were changed (flipped bit, truncated, garbled): GCM tag or frame invalid."""

    reason = "corrupted"


class RecordCopiedError(_RowRefusedError):
    """An authentic value sealed for another record key (another blind index) sits in this row."""

    reason = "copied-from-another-record"


class RecordMovedError(_RowRefusedError):
    """An authentic value sealed for another namespace sits in this row."""

    reason = "moved-from-another-namespace"


class RecordVersionMismatchError(_RowRefusedError):
    """The row's version number differs from the version the value was sealed for."""

    reason = "version-changed"


class RecordUnknownKeyError(_RowRefusedError, UnknownKeyError):
    """The value names a key id the keyset does not hold (retired too early, or forged).

    Attributes:
        key_id: the id the envelope names.
    """

    reason = "unknown-key-id"

    def __init__(self, namespace: str, row_key: bytes, key_id: int):
        self.key_id = key_id
        super().__init__(namespace, row_key, f"envelope names key id {key_id}, not in the keyset")


class RecordConflictError(ConflictError, RecordError):
    """Optimistic concurrency failed: the record's version is not the expected one.

    Attributes:
        expected: the version the caller expected (0 = must not exist), or None.
        actual: the version found (0 = no record), or None if unknown.
    """

    def __init__(self, message: str, expected: int | None = None, actual: int | None = None):
        self.expected = expected
        self.actual = actual
        super().__init__(message)


class BrokerIdentityError(ConfigError):
    """The broker's workload CA is not the one pinned in the measured configuration (or the
    broker's TLS certificate does not chain to it): the service talks to no other broker."""


class NoKeysError(SafeholdError):
    """The broker refused this workload (its Evidence did not pass the manifest's policy), so
    the service has no keys and must not serve."""


class NotAcceptableError(SafeholdError):
    """``_format`` / ``Accept`` ask for a format this server does not produce (406)."""


class FhirUnsupportedMediaTypeError(SafeholdError):
    """The request body is not FHIR JSON (415)."""


class FhirInvalidError(InvalidRecordError):
    """The request is not valid FHIR for this interaction (400, IssueType ``invalid``)."""


class FhirNotSupportedError(RecordError):
    """The server does not support what was asked (IssueType ``not-supported``)."""


class UnknownResourceTypeError(FhirNotSupportedError):
    """The URL names a type that is not an R4 resource type (404)."""


class MultipleMatchesError(RecordError):
    """A conditional create's criteria match more than one resource (412, R4 §3.1.0.8)."""


class SearchRefusedError(RecordError):
    """A search the blind index cannot answer, or a malformed one (the message names the
    parameter and the reason; never its value). ``code`` is the FHIR IssueType
    (``invalid``, ``not-supported``)."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code
