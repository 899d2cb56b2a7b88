"""Types for parsed JSON (RFC 8259), for signatures that take or return JSON.

``JSONValue`` is what :func:`json.loads` returns (strict parsing, no NaN:
:func:`safehold.records.model.loads_strict`); ``JSONObject`` is a JSON object. Code that reads
JSON from outside narrows with ``isinstance`` before use, so a wrong shape is refused with a
message instead of failing deep inside. A leaf module: it imports nothing of Safehold.
"""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["JSONObject", "JSONScalar", "JSONValue"]

#: A JSON string, number, ``true`` / ``false`` or ``null``.
JSONScalar: TypeAlias = str | int | float | bool | None
#: Any JSON value.
JSONValue: TypeAlias = JSONScalar | list["JSONValue"] | dict[str, "JSONValue"]
#: A JSON object.
JSONObject: TypeAlias = dict[str, JSONValue]
