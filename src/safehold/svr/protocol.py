"""Wire format of Secure Value Recovery, shared by the service and the client SDK (no server code).

Every request and answer is a JSON object; byte fields are standard base64. Protocol outcomes
travel as a ``status`` in a 200 answer, as in Signal's SVR2 / SVR3 protobufs; HTTP errors
mean the request was not processed as a protocol step (malformed, unauthenticated, the state
could not be served as fresh).

Statuses (:class:`Status`), after SVR2 ``client.proto`` and DB4 ``client4.proto``, plus SVR1's
``ALREADY_EXISTS`` for a backup whose ``token`` is stale:

==================  ==============================================================================
``OK``              done
``ALREADY_EXISTS``  ``token`` is not the row's current token: the state changed since the client's
                    last look (query again); nothing written
``MISSING``         no restorable row (never made, not exposed, deleted, erased at 0 tries)
``PIN_MISMATCH``    SVR2 restore: wrong access key, one guess charged; ``tries`` left
``ERROR``           SVR2 expose: the row is not the one the client backed up; SVR3 restore2: the
                    authorisation proof failed (wrong PIN, or a server answered wrongly)
``INVALID_REQUEST`` a field's value is not acceptable (sizes are checked before, as HTTP 400)
``RESTORE1_MISSING``SVR3 restore2 without a live restore1 session
``VERSION_MISMATCH``SVR3 restore2 for another version than restore1 saw
==================  ==============================================================================

Sizes: backup id 16 bytes, SVR2 access key (``pin``) 32 bytes, SVR3 scalars and elements 32
bytes, encryption shares 32 bytes, tokens 16 bytes, restore2 sessions 32 bytes, stored data
(an AES-SIV ciphertext of the secret) :data:`MIN_DATA`..:data:`MAX_DATA` bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from enum import StrEnum

from safehold.svr.errors import InvalidRequestError

__all__ = [
    "ACCESS_KEY_SIZE", "BACKUP_ID_SIZE", "ELEMENT_SIZE", "LABEL_RE", "MAX_DATA", "MAX_SECRET",
    "MAX_TRIES", "MIN_DATA", "MIN_TRIES", "SESSION_SIZE", "SHARE_SIZE", "Status", "TOKEN_SIZE",
    "ZERO_TOKEN", "b64", "backup_id", "check_label", "check_tries", "unb64",
]

BACKUP_ID_SIZE = 16
ACCESS_KEY_SIZE = 32
ELEMENT_SIZE = 32
SHARE_SIZE = 32
TOKEN_SIZE = 16
SESSION_SIZE = 32
#: The secret a client protects: 1..256 bytes (a key, a device key, a short PEM).
MAX_SECRET = 256
#: Stored data = AES-SIV ciphertext of the secret (16-byte synthetic IV + secret).
MIN_DATA = 17
MAX_DATA = MAX_SECRET + 16
#: SVR2 ``MIN_ALLOWED_MAX_TRIES`` / ``MAX_ALLOWED_MAX_TRIES`` (``enclave/db/db2.h``).
MIN_TRIES = 1
MAX_TRIES = 255
#: The token of a backup id that has never held a row.
ZERO_TOKEN = bytes(TOKEN_SIZE)
#: Labels name one of a principal's backups.
LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Status(StrEnum):
    """Protocol outcome of one SVR operation (module docstring)."""

    OK = "OK"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    MISSING = "MISSING"
    PIN_MISMATCH = "PIN_MISMATCH"
    ERROR = "ERROR"
    INVALID_REQUEST = "INVALID_REQUEST"
    RESTORE1_MISSING = "RESTORE1_MISSING"
    VERSION_MISMATCH = "VERSION_MISMATCH"


def check_label(label: object) -> str:
    """``label`` if it is 1..64 characters of ``[A-Za-z0-9._-]``.

    Raises:
        InvalidRequestError: anything else.
    """
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        raise InvalidRequestError("label must be 1..64 characters of A-Z a-z 0-9 . _ -")
    return label


def check_tries(max_tries: object) -> int:
    """``max_tries`` if it is an integer in 1..255 (SVR2 limits).

    Raises:
        InvalidRequestError: anything else.
    """
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) \
            or not MIN_TRIES <= max_tries <= MAX_TRIES:
        raise InvalidRequestError(f"max_tries must be an integer in {MIN_TRIES}..{MAX_TRIES}")
    return max_tries


def backup_id(principal: str, label: str) -> bytes:
    """The 16-byte backup id of ``principal``'s backup ``label``: SHA-256 over a length-prefixed
    encoding (``b"safehold/svr/backup-id/v1" | u16 len | principal UTF-8 | u8 len | label``),
    truncated. The service derives it from the authenticated caller, so a caller can only ever
    touch its own backups (Signal derives it from the authenticated user name)."""
    p = principal.encode("utf-8")
    lab = check_label(label).encode("ascii")
    h = hashlib.sha256(b"safehold/svr/backup-id/v1" + len(p).to_bytes(2, "big") + p
                       + len(lab).to_bytes(1, "big") + lab)
    return h.digest()[:BACKUP_ID_SIZE]


def b64(raw: bytes) -> str:
    """Standard base64 of ``raw``."""
    return base64.b64encode(raw).decode("ascii")


def unb64(text: object, what: str, *, size: int | None = None, min_size: int = 0,
          max_size: int | None = None) -> bytes:
    """Decode a base64 field and check its size.

    Args:
        text: the field's value.
        what: the field's name, for the message.
        size: exact size in bytes, or ``min_size`` / ``max_size`` bounds.

    Raises:
        InvalidRequestError: not a base64 string, or the wrong size (names ``what``).
    """
    if not isinstance(text, str) or len(text) > 4 * ((max_size or size or 1024) + 3) // 3 + 4:
        raise InvalidRequestError(f"{what} must be a base64 string of the right size")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidRequestError(f"{what} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise InvalidRequestError(f"{what} must be {size} bytes, got {len(raw)}")
    if len(raw) < min_size or (max_size is not None and len(raw) > max_size):
        raise InvalidRequestError(f"{what} must be {min_size}..{max_size} bytes, got {len(raw)}")
    return raw
