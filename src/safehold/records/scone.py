"""SCONE's Flask patient demo, its record shape and its score (framework-free).

The routes are in :mod:`safehold.records.scone_http`. A SCONE demo record is a flat JSON object
of the 13 text fields of :data:`FIELDS`, an ordinary record in the patients namespace (so also
readable and searchable through the native API: ``lname``, ``fname``, ``dob``, ``ssn``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from safehold.records.errors import SconeFormError

__all__ = ["FIELDS", "MAX_FIELD", "form_record", "score"]

#: The demo's form fields, in its order.
FIELDS = (
    "fname", "lname", "address", "city", "state", "ssn", "email", "dob", "contactphone",
    "drugallergies", "preexistingconditions", "dateadmitted", "insurancedetails",
)
#: Longest field value, in characters.
MAX_FIELD = 4096


def form_record(form: Mapping[str, object]) -> dict[str, str]:
    """The record of a demo form: the :data:`FIELDS`, in that order (other fields ignored).

    Raises:
        SconeFormError: ``missing fields: a, b`` or ``field f must be text of at most 4096 chars``
            (a file upload, or too long).
    """
    missing = [f for f in FIELDS if f not in form]
    if missing:
        raise SconeFormError(f"missing fields: {', '.join(missing)}")
    record: dict[str, str] = {}
    for f in FIELDS:
        v = form[f]
        if not isinstance(v, str) or len(v) > MAX_FIELD:
            raise SconeFormError(f"field {f} must be text of at most {MAX_FIELD} chars")
        record[f] = v
    return record


def score(raw: bytes) -> float:
    """The SCONE demo's ``score`` for a record, made deterministic.

    SCONE's demo returns a random number as a stand-in for a model's risk score. Safehold
    returns ``int(SHA-256(stored form)[0:4], big-endian) / 2**32`` rounded to 6 decimals
    (``raw``: the record's stored form, :func:`~safehold.records.model.encode_record`): a value
    in [0, 1) that is stable for the same record and changes when it changes. It is not a
    clinical score.
    """
    digest = hashlib.sha256(raw).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32, 6)
