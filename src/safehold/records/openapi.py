"""The OpenAPI 3.1 description of the native records API, written to match what
:mod:`safehold.records.http` serves — every status code an operation can return (with the
``{error, detail}`` body), the record-id pattern, the request bodies, the headers (``ETag``,
``If-Match``, ``If-None-Match``, ``Allow``) and the security schemes (bearer token; mutual TLS
with a client certificate from the broker's workload CA, OpenAPI 3.1 ``mutualTLS``).

``tests/records/test_openapi_contract.py`` runs schemathesis over it with every default check,
and checks that its paths and methods are exactly the app's routes.
"""

from __future__ import annotations

import copy
from typing import Any

from safehold.records.model import MAX_BATCH, SEARCH_FIELDS

__all__ = ["ID_PATTERN", "native_openapi"]

#: The record-id rule (:data:`safehold.records.model.RECORD_ID_RE`, not ``.``/``..``) as an
#: ECMA-262 pattern.
ID_PATTERN = r"^(?!\.{1,2}(?![\s\S]))[A-Za-z0-9._~:@-]{1,128}(?![\s\S])"
_ETAG_PATTERN = r'^(W/)?"[0-9]{1,18}"(?![\s\S])'

_ERROR = {"type": "object", "required": ["error", "detail"], "additionalProperties": False,
          "properties": {"error": {"type": "string", "description": "a stable code: invalid, "
                                   "unauthorized, forbidden, not-found, no-such-endpoint, "
                                   "method-not-allowed, exists, record-tampered, "
                                   "audit-chain-broken, audit-segment-refused, precondition-failed, "
                                   "too-large, "
                                   "store-corrupt, store-unavailable, record-error, internal"},
                         "detail": {"type": "string", "description": "what was wrong; never "
                                    "record content, query values or the path"}}}
_WHY = {
    400: "invalid: not JSON, NaN/Infinity, a record or id rule broken, a bad query parameter",
    401: "unauthorized: no or unknown bearer token / client certificate",
    403: "forbidden: the caller's role is too weak",
    404: "not-found: no such record",
    405: "method-not-allowed; Allow lists every method the path serves",
    409: "record-tampered (the stored row failed authentication), exists (If-None-Match: *), "
         "audit-chain-broken (every audited access is refused until an admin reseals), or "
         "audit-segment-refused (an audit export/seal names entries or a SHA-256 that do not fit "
         "the live log; nothing changed)",
    412: "precondition-failed: If-Match names another version",
    413: "too-large: the body is over the limit",
    415: "unsupported-media-type: the body is not declared as application/json",
    500: "store-corrupt (the database is damaged) or an internal error",
    503: "store-unavailable: the database does not answer",
}


def _err(status: int, extra: str = "") -> dict[str, Any]:
    r: dict[str, Any] = {"description": _WHY[status] + extra,
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status == 405:
        r["headers"] = {"Allow": {"schema": {"type": "string"}, "required": True}}
    return r


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _err(c) for c in codes}


_ALWAYS = (400, 401, 403, 405, 409, 500, 503)
_RID = {"name": "rid", "in": "path", "required": True, "description": "record id",
        "schema": {"type": "string", "pattern": ID_PATTERN}}
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False,
             "description": 'compare-and-set on the version, e.g. "3" (W/"3" too)',
             "schema": {"type": "string", "pattern": _ETAG_PATTERN}}
_ETAG = {"ETag": {"schema": {"type": "string", "pattern": _ETAG_PATTERN}, "required": True,
                  "description": 'the version, e.g. "3"'}}
_RECORD = {"type": "object", "description": "a FHIR R4 Patient or a flat record (a JSON object; "
           "finite numbers; at most 1 MiB stored)"}
_WRITE_RESULT = {"type": "object", "required": ["id", "version", "status"],
                 "properties": {"id": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
                                "status": {"enum": ["created", "updated"]}}}
#: Longest search value per field (as :func:`safehold.records.http.list_or_search` checks).
_MAX_LEN = {"family": 512, "given": 512, "birthDate": 64, "gender": 64, "identifier": 1024}


def _q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}


_LIST_OR_SEARCH = {
    "oneOf": [
        {"type": "object", "required": ["ids", "next"], "additionalProperties": False,
         "properties": {"ids": {"type": "array", "items": {"type": "string"}},
                        "next": {"type": ["string", "null"]}}},
        {"type": "object", "required": ["records"], "additionalProperties": False,
         "properties": {"records": {"type": "array", "items": {
             "type": "object", "required": ["id", "record", "version"],
             "properties": {"id": {"type": "string"}, "record": {"type": "object"},
                            "version": {"type": "integer", "minimum": 1}}}},
             "truncated": {"const": True}}},
    ]
}
_BATCH_BODY = {"type": "object", "required": ["records"], "additionalProperties": False,
               "properties": {"records": {"type": "array", "maxItems": MAX_BATCH, "items": {
                   "type": "object", "required": ["id", "record"], "additionalProperties": False,
                   "properties": {"id": {"type": "string", "minLength": 1,
                                         "description": "an id that breaks the id rule comes back "
                                                        "with status failed (the others are written)"},
                                  "record": _RECORD}}}}}
_BATCH_RESULT = {"type": "object", "required": ["results"], "properties": {"results": {
    "type": "array", "items": {"type": "object", "required": ["id", "status"], "properties": {
        "id": {"type": "string"}, "status": {"enum": ["created", "updated", "unchanged", "failed"]},
        "version": {"type": "integer"}, "error": {"type": "string"}}}}}}

_SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Safehold records", "version": "1",
             "description": "The native records API. Every request is over RA-TLS (the server "
                            "certificate carries the TEE's Evidence); FHIR R4 REST is at /fhir "
                            "(its own description: /fhir/openapi.json)."},
    "components": {
        "schemas": {"Error": _ERROR, "Record": _RECORD},
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "a token whose SHA-256 is in the access list the broker "
                                      "released to the workload (safehold-data/tokens.json)"},
            "clientCertificate": {"type": "mutualTLS",
                                  "description": "a client certificate from the broker's workload "
                                                 "CA; its subject CN is mapped to a role"},
        },
    },
    "security": [{"bearer": []}, {"clientCertificate": []}],
    "paths": {
        "/v1/patients/{rid}": {
            "put": {
                "summary": "Create (201) or replace (200) a record",
                "parameters": [_RID, _IF_MATCH,
                               {"name": "If-None-Match", "in": "header", "required": False,
                                "description": "* = create only (409 exists if the id is taken)",
                                "schema": {"const": "*"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _RECORD}}},
                "responses": {
                    "200": {"description": "replaced", "headers": _ETAG,
                            "content": {"application/json": {"schema": _WRITE_RESULT}}},
                    "201": {"description": "created", "headers": _ETAG,
                            "content": {"application/json": {"schema": _WRITE_RESULT}}},
                    **_errors(*_ALWAYS, 412, 413, 415),
                },
            },
            "get": {
                "summary": "Read a record (its stored form)",
                "parameters": [_RID],
                "responses": {
                    "200": {"description": "the record", "headers": _ETAG,
                            "content": {"application/json": {"schema": _RECORD}}},
                    **_errors(*_ALWAYS, 404),
                },
            },
            "delete": {
                "summary": "Delete a record and its history",
                "parameters": [_RID, _IF_MATCH],
                "responses": {"204": {"description": "deleted"}, **_errors(*_ALWAYS, 404, 412)},
            },
        },
        "/v1/patients": {
            "get": {
                "summary": "A page of ids, or (with search fields) the matching records",
                "description": "With none of " + ", ".join(SEARCH_FIELDS) + ": a page of ids in "
                               "blind-index order. With any: exact match after NFKC and case "
                               "folding (gender alone checks every record, refused above 10000).",
                "parameters": [
                    _q("cursor", {"type": "string", "pattern": r"^([0-9a-f]{2}){1,64}(?![\s\S])"},
                       "next from the previous page"),
                    _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                       "page size / most records returned"),
                    *[_q(f, {"type": "string", "maxLength": _MAX_LEN[f]}, f"search on {f}")
                      for f in SEARCH_FIELDS],
                ],
                "responses": {
                    "200": {"description": "ids or records",
                            "content": {"application/json": {"schema": _LIST_OR_SEARCH}}},
                    **_errors(*_ALWAYS),
                },
            },
        },
        "/v1/patients:batch": {
            "post": {
                "summary": "Upsert up to 500 records (not atomic: per-item results)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _BATCH_BODY}}},
                "responses": {
                    "200": {"description": "one result per item",
                            "content": {"application/json": {"schema": _BATCH_RESULT}}},
                    **_errors(*_ALWAYS, 413, 415),
                },
            },
        },
        "/v1/audit/verify": {
            "get": {
                "summary": "(admin) verify the access-audit chain against its authenticated head",
                "responses": {
                    "200": {"description": "the chain holds", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["entries"],
                                   "properties": {"entries": {"type": "integer"}}}}}},
                    **_errors(401, 403, 405, 409, 500, 503),
                },
            },
        },
        "/v1/audit/segment": {
            "get": {
                "summary": "(admin) export the oldest live audit entries through `through` (NDJSON)",
                "parameters": [{"name": "through", "in": "query", "required": True,
                                "schema": {"type": "integer", "minimum": 0}}],
                "responses": {
                    "200": {"description": "the segment; header X-Safehold-Segment-SHA256",
                            "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 403, 405, 409, 500, 503),
                },
            },
        },
        "/v1/audit/seal": {
            "post": {
                "summary": "(admin) drop an exported segment, keeping its digest in the chain",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["through", "sha256"],
                    "properties": {"through": {"type": "integer", "minimum": 0},
                                   "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}},
                "responses": {
                    "200": {"description": "sealed", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["first", "last", "sha256"],
                                   "properties": {"first": {"type": "integer"}, "last": {"type": "integer"},
                                                  "sha256": {"type": "string"}}}}}},
                    **_errors(400, 401, 403, 405, 409, 415, 500, 503),
                },
            },
        },
        "/v1/audit/reseal": {
            "post": {
                "summary": "(admin) accept the log as it is after a failed head check",
                "responses": {
                    "200": {"description": "resealed", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["entries", "outcome"],
                                   "properties": {"entries": {"type": "integer"},
                                                  "outcome": {"type": "string"}}}}}},
                    **_errors(401, 403, 405, 409, 500, 503),
                },
            },
        },
        "/v1/freshness": {
            "get": {
                "summary": "(admin) the freshness status: ledger, serving, committed / anchored epoch, rows",
                "responses": {
                    "200": {"description": "status", "content": {"application/json": {
                        "schema": {"type": "object"}}}},
                    **_errors(401, 403, 404, 405, 409, 500, 503),
                },
            },
        },
        "/v1/freshness/proposal": {
            "get": {
                "summary": "(admin) what re-anchoring would accept and the unsigned owner statement",
                "responses": {
                    "200": {"description": "proposal", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["action", "proposal", "payload"],
                                   "properties": {"action": {"type": "string"},
                                                  "proposal": {"type": "object"},
                                                  "payload": {"type": "string"}}}}}},
                    **_errors(401, 403, 404, 405, 409, 500, 503),
                },
            },
        },
        "/v1/freshness/reanchor": {
            "post": {
                "summary": "(admin) apply the owner-signed re-anchoring statement (audited)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["payload", "signature"],
                    "properties": {"payload": {"type": "string"}, "signature": {"type": "string"}}}}}},
                "responses": {
                    "200": {"description": "re-anchored", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["ledger", "epoch", "digest"],
                                   "properties": {"ledger": {"type": "string"},
                                                  "epoch": {"type": "integer"},
                                                  "digest": {"type": "string"}}}}}},
                    **_errors(400, 401, 403, 404, 405, 409, 413, 415, 500, 503),
                },
            },
        },
    },
}


def native_openapi() -> dict[str, Any]:
    """A copy of the native API's OpenAPI document (served at ``/openapi.json``)."""
    return copy.deepcopy(_SPEC)
