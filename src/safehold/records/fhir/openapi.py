"""A hand-written OpenAPI 3.1 description of ``/fhir`` (served at ``/fhir/openapi.json``).

FHIR's own contract is the CapabilityStatement (``/fhir/metadata``); this document describes
the same routes for OpenAPI tooling (and for the schemathesis run in the test suite): every
status code each interaction returns with an OperationOutcome body, the id and date patterns
the server accepts, the headers (``ETag``, ``If-Match``, ``If-None-Exist``, ``Location``,
``Allow``) and the security schemes. One rule OpenAPI cannot state: on ``PUT`` the body's
``id`` must equal the URL's (FHIR R4 §3.1.0.4; 400 otherwise).
"""

from __future__ import annotations

import copy
from typing import Any

from safehold.records.fhir.search import MAX_COUNT, MAX_VALUE
from safehold.records.fhir.types import R4_RESOURCE_TYPES
from safehold.records.model import MAX_BATCH

__all__ = ["BIRTHDATE_PATTERN", "FHIR_ID_PATTERN", "fhir_openapi"]

#: End of input in ECMA-262 and Python alike (``$`` would let Python accept a trailing newline).
END = r"(?![\s\S])"
#: FHIR R4 id (``[A-Za-z0-9\\-.]{1,64}``, not ``.``/``..``), ECMA-262.
FHIR_ID_PATTERN = rf"^(?!\.{{1,2}}{END})[A-Za-z0-9.-]{{1,64}}{END}"
_YEAR = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = (r"(0[1-9]|1[0-2])(-(0[1-9]|1[0-9]|2[0-8]))?|(0[13-9]|1[0-2])-(29|30)|"
              r"(0[13578]|1[02])-31")
_LEAP = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29"
_DATE = rf"(eq|ne|lt|gt|le|ge|sa|eb)?({_YEAR}(-({_MONTH_DAY}))?|{_LEAP})"
#: A ``birthdate`` value: comma-separated FHIR dates (year, month or day precision, real
#: calendar days) each with an optional prefix other than ``ap``.
BIRTHDATE_PATTERN = rf"^{_DATE}(,{_DATE})*{END}"

_FHIR_JSON = "application/fhir+json"
_OO = {"$ref": "#/components/schemas/OperationOutcome"}
_WHY = {
    400: "OperationOutcome: invalid request (not JSON, not a resource of the type, id mismatch, "
         "a refused search parameter, modifier or prefix, too costly a search)",
    401: "OperationOutcome: no or unknown bearer token / client certificate",
    403: "OperationOutcome: the caller's role is too weak",
    404: "OperationOutcome: no such resource, version or resource type",
    405: "OperationOutcome: method not allowed; Allow lists the methods served",
    406: "OperationOutcome: _format / Accept ask for a format other than JSON",
    409: "OperationOutcome: the stored row failed authentication, or the audit log is broken",
    412: "OperationOutcome: If-Match names another version, or If-None-Exist matches several",
    413: "OperationOutcome: body over the limit",
    415: "OperationOutcome: the body is not application/fhir+json",
    500: "OperationOutcome: the database is damaged",
    503: "OperationOutcome: the database does not answer",
}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in codes:
        r: dict[str, Any] = {"description": _WHY[c], "content": {_FHIR_JSON: {"schema": _OO}}}
        if c == 405:
            r["headers"] = {"Allow": {"schema": {"type": "string"}, "required": True}}
        out[str(c)] = r
    return out


_COMMON = (401, 403, 405, 406, 409, 500, 503)


def _ok(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"description": description,
                         "content": {_FHIR_JSON: {"schema": schema}, "application/json": {"schema": schema}}}
    if headers:
        r["headers"] = headers
    return r


_ETAG = {"ETag": {"required": True, "schema": {"type": "string", "pattern": rf'^W/"[0-9]+"{END}'}}}
_WRITTEN_HEADERS = {**_ETAG, "Location": {"required": True, "schema": {"type": "string"}}}
_FORMAT = {"name": "_format", "in": "query", "required": False,
           "description": "json, application/fhir+json, application/json+fhir or application/json",
           "schema": {"enum": ["json", "application/fhir+json", "application/json+fhir", "application/json"]}}
_PRETTY = {"name": "_pretty", "in": "query", "required": False, "schema": {"enum": ["true", "false"]}}
_IF_NONE_EXIST = {"name": "If-None-Exist", "in": "header", "required": False,
                  "description": "conditional create: identifier=[system|]value (repeatable with &)",
                  "schema": {"type": "string",
                             "pattern": rf"^identifier=[^&]{{0,256}}(&identifier=[^&]{{0,256}}){{0,7}}{END}"}}
_VID = {"name": "vid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": rf"^[1-9][0-9]{{0,17}}{END}"}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": FHIR_ID_PATTERN}}


def _type_param(types: list[str]) -> dict[str, Any]:
    return {"name": "type", "in": "path", "required": True, "schema": {"enum": types}}


def _resource_schema(rtype: str | None) -> dict[str, Any]:
    rt: dict[str, Any] = {"const": rtype} if rtype else {"type": "string"}
    return {"type": "object", "required": ["resourceType"], "properties": {"resourceType": rt}}


def _search_params(patient: bool) -> list[dict[str, Any]]:
    def q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}

    text = {"type": "string", "maxLength": MAX_VALUE}
    result = [
        q("_count", {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}, "page size; 0 = total only"),
        q("_total", {"enum": ["none", "estimate", "accurate"]}, "count every match (default)"),
        q("_summary", {"enum": ["count"]}, "only the total"),
        q("_cursor", text, "paging position: the last id of the previous page (from a next link)"),
        _FORMAT, _PRETTY,
    ]
    if not patient:
        # one or more comma-separated values (R4 §3.1.1.4.6 escaping), each [Type/]id whose id
        # is not empty: an empty value or one ending in "/" (also as "\/") is refused (400)
        one = r"(?:(?:[^,\\]|\\[\s\S])*/)?(?:[^,/\\]|\\[^/])+"
        ref = {"type": "string", "maxLength": MAX_VALUE, "pattern": rf"^{one}(?:,{one})*{END}"}
        return [q("patient", ref, "[Patient/]id or an absolute URL ending in it"),
                q("subject", ref, "[Type/]id or an absolute URL ending in it"), *result]
    string = "case- and accent-insensitive prefix at the start of the value or of a word in it"
    return [
        q("family", text, string), q("given", text, string), q("name", text, string + " (family or given)"),
        q("family:exact", text, "exact, case- and accent-sensitive"),
        q("given:exact", text, "exact, case- and accent-sensitive"),
        q("birthdate", {"type": "string", "pattern": BIRTHDATE_PATTERN, "maxLength": MAX_VALUE},
          "[eq|ne|lt|gt|le|ge|sa|eb]YYYY[-MM[-DD]] (comma = or)"),
        q("identifier", text, "[system]|value, |value or value"),
        q("gender", text, "male | female | other | unknown (filters; alone it scans)"),
        *result,
    ]


_BUNDLE = {"type": "object", "required": ["resourceType", "type"],
           "properties": {"resourceType": {"const": "Bundle"},
                          "type": {"enum": ["searchset", "batch-response"]},
                          "total": {"type": "integer", "minimum": 0},
                          "link": {"type": "array"}, "entry": {"type": "array"}}}


def _spec() -> dict[str, Any]:
    others = sorted(t for t in R4_RESOURCE_TYPES if t != "Patient")
    paths: dict[str, Any] = {
        "/metadata": {"get": {"summary": "CapabilityStatement", "security": [],
                              "parameters": [_FORMAT, _PRETTY],
                              "responses": {"200": _ok("what this server supports",
                                                       _resource_schema("CapabilityStatement")),
                                            **_errors(400, 405, 406)}}},
        "/": {"post": {
            "summary": "batch Bundle (not atomic; write entries need the writer role)",
            "requestBody": {"required": True, "content": {_FHIR_JSON: {"schema": {
                "type": "object", "required": ["resourceType", "type"],
                "properties": {"resourceType": {"const": "Bundle"}, "type": {"const": "batch"},
                               "entry": {"type": "array", "maxItems": MAX_BATCH, "items": {
                                   "type": "object", "required": ["request"], "properties": {
                                       "request": {"type": "object", "required": ["method", "url"],
                                                   "properties": {"method": {"enum": ["GET", "PUT", "POST",
                                                                                      "DELETE"]},
                                                                  "url": {"type": "string"}}},
                                       "resource": {"type": "object"}}}}}}}}},
            "responses": {"200": _ok("batch-response", _BUNDLE), **_errors(400, *_COMMON, 413, 415)}}},
    }
    for rtype, tparams in (("Patient", []), ("{type}", [_type_param(others)])):
        is_patient = rtype == "Patient"
        body = {"required": True, "content": {_FHIR_JSON: {"schema": _resource_schema("Patient" if is_patient
                                                                                     else None)}}}
        paths[f"/{rtype}"] = {
            "get": {"summary": f"search {rtype}", "parameters": [*tparams, *_search_params(is_patient)],
                    "responses": {"200": _ok("searchset Bundle", _BUNDLE), **_errors(400, *_COMMON, 404)}},
            "post": {"summary": f"create {rtype} (server-assigned id)",
                     "parameters": [*tparams, *([_IF_NONE_EXIST] if is_patient else []), _FORMAT],
                     "requestBody": body,
                     "responses": {"201": _ok("created", _resource_schema(None), _WRITTEN_HEADERS),
                                   "200": _ok("If-None-Exist matched one resource", _resource_schema(None),
                                              _WRITTEN_HEADERS),
                                   **_errors(400, *_COMMON, 404, 412, 413, 415)}},
        }
        paths[f"/{rtype}/{{id}}"] = {
            "get": {"summary": f"read {rtype}", "parameters": [*tparams, _ID, _FORMAT, _PRETTY],
                    "responses": {"200": _ok("the current version", _resource_schema(None), _ETAG),
                                  **_errors(400, *_COMMON, 404)}},
            "put": {"summary": f"update {rtype} (or create it with this id)",
                    "parameters": [*tparams, _ID, _FORMAT,
                                   {"name": "If-Match", "in": "header", "required": False,
                                    "schema": {"type": "string", "pattern": rf'^(W/)?"[0-9]{{1,18}}"{END}'}}],
                    "requestBody": body,
                    "responses": {"200": _ok("updated (or unchanged)", _resource_schema(None),
                                             _WRITTEN_HEADERS),
                                  "201": _ok("created", _resource_schema(None), _WRITTEN_HEADERS),
                                  **_errors(400, *_COMMON, 404, 412, 413, 415)}},
            "delete": {"summary": f"delete {rtype} and its history",
                       "parameters": [*tparams, _ID],
                       "responses": {"204": {"description": "deleted (or there was nothing)"},
                                     **_errors(400, *_COMMON, 404)}},
        }
        paths[f"/{rtype}/{{id}}/_history/{{vid}}"] = {
            "get": {"summary": f"vread {rtype}",
                    "parameters": [*tparams, _ID, _VID, _FORMAT, _PRETTY],
                    "responses": {"200": _ok("that version", _resource_schema(None), _ETAG),
                                  **_errors(400, *_COMMON, 404)}},
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Safehold FHIR R4", "version": "4.0.1",
                 "description": "FHIR R4 REST over encrypted storage; the CapabilityStatement at "
                                "/fhir/metadata is the FHIR contract."},
        "servers": [{"url": "/fhir"}],
        "components": {
            "schemas": {"OperationOutcome": {
                "type": "object", "required": ["resourceType", "issue"],
                "properties": {"resourceType": {"const": "OperationOutcome"},
                               "issue": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["severity", "code"],
                                   "properties": {"severity": {"type": "string"}, "code": {"type": "string"},
                                                  "diagnostics": {"type": "string"}}}}}}},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "clientCertificate": {"type": "mutualTLS",
                                      "description": "a client certificate from the broker's workload CA"},
            },
        },
        "security": [{"bearer": []}, {"clientCertificate": []}],
        "paths": paths,
    }


_SPEC = _spec()


def fhir_openapi() -> dict[str, Any]:
    """A copy of the ``/fhir`` OpenAPI document."""
    return copy.deepcopy(_SPEC)
