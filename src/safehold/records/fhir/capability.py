"""The CapabilityStatement ``GET /fhir/metadata`` returns (FHIR R4 §3.1.0.14, resource
CapabilityStatement): exactly what ``/fhir`` supports — no interaction, parameter, modifier or
prefix is listed that :mod:`safehold.records.fhir.core` refuses."""

from __future__ import annotations

from typing import Any

from safehold.records.fhir.search import DEFAULT_COUNT, MAX_COUNT
from safehold.records.fhir.types import R4_RESOURCE_TYPES
from safehold.records.model import MAX_BATCH
from safehold.records.repository import MAX_CANDIDATES
from safehold.records.tokens import MAX_PREFIX, MIN_PREFIX, TOKEN_BUDGET

__all__ = ["RELEASE_DATE", "capability_statement"]

#: ``CapabilityStatement.date``: when this statement last changed.
RELEASE_DATE = "2026-12-07"

_STRING_DOC = (f"Case- and accent-insensitive prefix match at the start of the value or of any word in it "
               f"(at least {MIN_PREFIX} characters; through keyed blind-index prefix tokens of "
               f"{MIN_PREFIX}..{MAX_PREFIX} characters, longer queries re-checked inside the TEE). "
               "Modifier :exact (case- and accent-sensitive). :contains, :text, :missing are refused.")
_PATIENT_PARAMS: list[dict[str, Any]] = [
    {"name": "family", "type": "string", "documentation": _STRING_DOC},
    {"name": "given", "type": "string", "documentation": _STRING_DOC},
    {"name": "name", "type": "string",
     "documentation": "family or given (or HumanName.text of a name that has neither). " + _STRING_DOC},
    {"name": "birthdate", "type": "date",
     "documentation": "YYYY, YYYY-MM or YYYY-MM-DD with prefixes eq, ne, lt, gt, le, ge, sa, eb "
                      "(blind-index date levels: millennium, century, decade, year, month, day); "
                      "ap and times are refused."},
    {"name": "identifier", "type": "token",
     "documentation": "[system]|value, |value or value (a value is required)."},
    {"name": "gender", "type": "token",
     "documentation": "Not indexed (it would reveal every record's gender to the database): it "
                      f"filters; alone it checks every Patient (refused above {MAX_CANDIDATES})."},
]
_REFERENCE_PARAMS: list[dict[str, Any]] = [
    {"name": "patient", "type": "reference",
     "documentation": "Patient/[id], [id] or an absolute URL: the resource's patient element, or "
                      "a subject that references that Patient."},
    {"name": "subject", "type": "reference",
     "documentation": "[Type/]id or an absolute URL: the resource's subject element."},
]
_INTERACTIONS = [{"code": c} for c in ("read", "vread", "update", "delete", "create", "search-type")]


def _resource(rtype: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": rtype,
        "interaction": _INTERACTIONS,
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": params,
    }


def capability_statement(base_url: str) -> dict[str, Any]:
    """The CapabilityStatement for the ``/fhir`` endpoint at ``base_url``."""
    others = [_resource(t, _REFERENCE_PARAMS) for t in sorted(R4_RESOURCE_TYPES) if t != "Patient"]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": RELEASE_DATE,
        "publisher": "Safehold",
        "kind": "instance",
        "software": {"name": "Safehold records service"},
        "implementation": {"description": "Safehold FHIR R4 endpoint: every resource encrypted "
                                          "inside an attested TEE, searched through keyed blind "
                                          "indexes", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": (
                f"Search results are Bundles of type searchset with total and self/first/next "
                f"links; _count 0..{MAX_COUNT} (default {DEFAULT_COUNT}), _total, _summary=count. "
                f"Unknown parameters are refused unless Prefer: handling=lenient. At most "
                f"{MAX_CANDIDATES} candidates per search are checked; at most {TOKEN_BUDGET} search "
                f"tokens per record. Delete erases the resource and its history. "
                f"POST [base] takes a batch Bundle (at most {MAX_BATCH} entries; transaction is "
                "not supported). JSON only: _format and Accept asking for XML get 406."),
            "security": {
                "cors": False,
                "description": "HTTPS only, RA-TLS: the server certificate carries the TEE's "
                               "attestation Evidence. Authenticate with Authorization: Bearer "
                               "<token> or a client certificate from the broker's workload CA "
                               "(mutual TLS); roles reader (read, vread, search), writer "
                               "(create, update, delete) and admin. Every access is recorded in "
                               "the hash-chained access audit.",
            },
            "resource": [_resource("Patient", _PATIENT_PARAMS), *others],
            "interaction": [{"code": "batch"}],
        }],
    }
