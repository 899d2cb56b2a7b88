"""The record model: what a patient record is, checked once where it enters Safehold.

Every edge that accepts a record — the native API (``PUT``, ``POST :batch``), the
SCONE-compatible API and the file importers — calls :func:`parse_record` (or
:func:`parse_batch`) exactly once; what comes out is a :class:`ValidRecord`, and the
repository (:mod:`safehold.records.repository`) stores it without checking it again.

The rules:

* **id**: :data:`RECORD_ID_RE`, but not ``.`` or ``..`` — FHIR R4 ``id``
  (§2.24.0.1: ``[A-Za-z0-9\\-\\.]{1,64}``) widened to the characters other sources use
  (Synthea UUIDs, SCONE demo ids such as ``patient_3``), at most 128 characters. Messages
  never repeat the id (it may be built from a name): they name the refused character's class and position.
* **a JSON object** (RFC 8259 §4): FHIR R4 ``Patient`` resources or flat records.
* **finite numbers**: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259 §6),
  although Python's :mod:`json` reads and writes them; neither they nor numbers that overflow to
  an infinity (``1e999``) are ever stored.
* **size**: at most :data:`MAX_RECORD_BYTES` in the stored form.
* **stored form**: compact JSON text (no insignificant white space, member order as received,
  UTF-8, non-ASCII characters as themselves) — :func:`encode_record`.
* **search fields**: :data:`SEARCH_FIELDS`, extracted by :func:`search_terms` from the three
  record shapes; :data:`INDEXED_FIELDS` get blind-index postings (:func:`postings`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from safehold.errors import RecordError
from safehold.jsontypes import JSONObject, JSONValue
from safehold.records.errors import InvalidRecordError, NonFiniteNumberError
from safehold.records.tokens import date_range, record_tokens

__all__ = [
    "INDEXED_FIELDS",
    "MAX_BATCH",
    "MAX_RECORD_BYTES",
    "NON_FINITE_MESSAGE",
    "RECORD_ID_RE",
    "SEARCH_FIELDS",
    "RefusedItem",
    "ValidRecord",
    "check_record_id",
    "decode_stored",
    "display_name",
    "encode_record",
    "loads_strict",
    "normalise",
    "parse_batch",
    "parse_record",
    "postings",
    "search_terms",
]

#: Record ids (see the module docstring); always applied with ``fullmatch`` (a ``$`` anchor
#: would let a trailing newline through).
RECORD_ID_RE = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")
_ID_CHAR_RE = re.compile(r"[A-Za-z0-9._~:@-]")
#: Largest record accepted, in bytes of its stored form (a Synthea FHIR Patient is ~4-6 KiB).
MAX_RECORD_BYTES = 1024 * 1024
#: Most records in one batch (``POST /v1/patients:batch``).
MAX_BATCH = 500
#: The fields a record can be searched by (exact match after :func:`normalise`).
SEARCH_FIELDS = ("family", "given", "birthDate", "gender", "identifier")
#: Fields with search postings; the other :data:`SEARCH_FIELDS` only filter (``gender`` has two
#: values: a lookup would scan half the database), as does the ``system|value`` identifier form.
INDEXED_FIELDS = ("family", "given", "birthDate", "identifier")

NON_FINITE_MESSAGE = "NaN, Infinity and -Infinity are not JSON numbers (RFC 8259 §6)"
_SYNTHEA_GENDER = {"M": "male", "F": "female"}


@dataclass(frozen=True, slots=True)
class ValidRecord:
    """A record that passed every rule; made only by :func:`parse_record` / :func:`parse_batch`.

    Attributes:
        id: the record id (matches :data:`RECORD_ID_RE`).
        data: the JSON object.
        raw: its stored form (:func:`encode_record`), at most :data:`MAX_RECORD_BYTES`.
        postings: the blind-index search terms (:func:`postings`), ``"<field>=<value>"``.
    """

    id: str
    data: dict[str, Any]
    raw: bytes
    postings: frozenset[str]


@dataclass(frozen=True, slots=True)
class RefusedItem:
    """A batch item that broke a record rule: its ``id`` and the ``error`` message."""

    id: str
    error: str


# --- JSON ----------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumberError(f"{name} found: {NON_FINITE_MESSAGE}")


def loads_strict(data: str | bytes) -> JSONValue:
    """:func:`json.loads` that refuses ``NaN`` / ``Infinity`` / ``-Infinity`` (RFC 8259 §6).

    Raises:
        NonFiniteNumberError: one of those constants appears (a :class:`ValueError`).
        json.JSONDecodeError, UnicodeDecodeError, RecursionError: as :func:`json.loads`.
    """
    value: JSONValue = json.loads(data, parse_constant=_refuse_constant)
    return value


def encode_record(record: Mapping[str, JSONValue]) -> bytes:
    """The stored form of a record: compact JSON (RFC 8259), UTF-8, member order kept.

    Raises:
        InvalidRecordError: a non-finite number (RFC 8259 §6), a value JSON cannot hold, or a
            string that is not valid Unicode (a lone surrogate, not encodable as UTF-8).
    """
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecordError("record holds a string that is not valid Unicode "
                                 "(a lone surrogate)") from None
    except ValueError:
        raise InvalidRecordError(f"record holds a non-finite number: {NON_FINITE_MESSAGE}") from None
    except (TypeError, RecursionError) as e:
        raise InvalidRecordError(f"record is not JSON-serialisable: {type(e).__name__}") from None


def decode_stored(raw: bytes) -> JSONObject:
    """The JSON object of a stored record (authenticated plaintext written by
    :func:`encode_record`), exactly as written.

    Raises:
        RecordError: the stored bytes are not a JSON object (written by another tool?).
    """
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RecordError("stored record is not JSON (written by another tool?)") from None
    if not isinstance(obj, dict):
        raise RecordError("stored record is not a JSON object")
    return obj


def decode_for_match(raw: bytes) -> JSONObject:
    """As :func:`decode_stored`, by orjson (about half the CPU: a 100-hit search decodes 100
    records), for *matching only*: orjson returns an integer beyond 64 bits as a rounded float,
    so the result may be used to test text criteria (names, dates, identifiers) but never
    served or written back; answers use the stored bytes or :func:`decode_stored`.

    Raises:
        RecordError: as :func:`decode_stored`.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return decode_stored(raw)  # its error says what is wrong (or json reads what orjson won't)
    if not isinstance(obj, dict):
        raise RecordError("stored record is not a JSON object")
    return obj


# --- the rules -----------------------------------------------------------------------------------


def _describe_char(ch: str) -> str:
    """Name a refused id character by its class; only printable ASCII is shown as itself (one
    character of an id is not the id), anything else as its code point."""
    if ch == " ":
        return "a space"
    if ch.isascii() and ch.isprintable():
        return f"{ch!r}"
    if unicodedata.category(ch).startswith("C"):
        return f"a control or invisible character (U+{ord(ch):04X})"
    if ch.isspace():
        return f"a white-space character (U+{ord(ch):04X})"
    return f"a non-ASCII character (U+{ord(ch):04X})"


def check_record_id(record_id: object) -> str:
    """Return ``record_id`` if it matches :data:`RECORD_ID_RE`.

    Messages name the first refused character by class and 1-based position (``got a space
    at position 4``; printable ASCII is shown, anything else as ``U+XXXX``) or the length —
    never the id itself, which may be sensitive (e.g. built from a name).

    Raises:
        InvalidRecordError: not a string, empty, too long (> 128 characters), a character
            outside the set, or ``.`` / ``..`` (URL dot segments, RFC 3986 §5.2.4).
    """
    if not isinstance(record_id, str):
        raise InvalidRecordError(f"record id must be a string, got {type(record_id).__name__}")
    if record_id in (".", ".."):  # dot segments: no URL can address them (RFC 3986 §5.2.4)
        raise InvalidRecordError("record id may not be '.' or '..' (URL dot segments)")
    if RECORD_ID_RE.fullmatch(record_id):
        return record_id
    for i, ch in enumerate(record_id, start=1):
        if not _ID_CHAR_RE.fullmatch(ch):
            raise InvalidRecordError(
                f"record id may contain only A-Z a-z 0-9 . _ ~ : @ - "
                f"(got {_describe_char(ch)} at position {i})"
            )
    raise InvalidRecordError(f"record id must be 1..128 characters long (got {len(record_id)})")


def _valid(rid: str, obj: dict[str, Any]) -> ValidRecord:
    """Encode (finite numbers, serialisable), size-check and index a JSON object whose id
    already passed :func:`check_record_id`."""
    if obj.get("resourceType") == "Patient" and "birthDate" in obj:
        bd = obj["birthDate"]
        if not isinstance(bd, str) or date_range(bd) is None:  # the value itself is not echoed
            raise InvalidRecordError(
                "Patient.birthDate must be a FHIR date (R4 §2.24.0.1: YYYY, YYYY-MM or YYYY-MM-DD, a "
                f"real calendar day), got {_json_kind(bd)}")
    raw = encode_record(obj)
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecordError(f"record is {len(raw)} bytes, over the limit of {MAX_RECORD_BYTES}")
    return ValidRecord(rid, obj, raw, postings(obj))


def _json_kind(v: object) -> str:
    """How a JSON value is named in an error message that must not echo it."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return "a string that is not one"
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(v), "another type")


def parse_record(rid: object, data: object, *, what: str = "body") -> ValidRecord:
    """Check a record against every rule and return it as a :class:`ValidRecord`.

    Args:
        rid: the record id.
        data: JSON text (``bytes`` in UTF-8, or ``str``) — a request body — or a JSON value
            already parsed (a ``dict`` / mapping; anything else is refused).
        what: how a refused JSON text is named in the message (``"body"``).

    Raises:
        InvalidRecordError: JSON text that is not JSON (``"<what> is not JSON"``) or holds
            ``NaN`` / ``Infinity`` (``"<what>: NaN found: …"``); not a JSON object; a bad id
            (:func:`check_record_id`); a non-finite number or a value JSON cannot hold
            (:func:`encode_record`); over :data:`MAX_RECORD_BYTES` in its stored form; a FHIR
            ``Patient`` whose ``birthDate`` is not a FHIR ``date``.
    """
    if isinstance(data, bytes | bytearray | memoryview | str):
        try:
            obj = loads_strict(bytes(data) if not isinstance(data, str) else data)
        except NonFiniteNumberError as e:
            raise InvalidRecordError(f"{what}: {e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidRecordError(f"{what} is not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidRecordError("record must be a JSON object")
        return _valid(check_record_id(rid), obj)
    checked_id = check_record_id(rid)
    if isinstance(data, dict):
        return _valid(checked_id, data)
    if isinstance(data, Mapping):
        return _valid(checked_id, dict(data))
    raise InvalidRecordError(f"record must be a JSON object, got {type(data).__name__}")


def parse_batch(items: Sequence[tuple[object, object]]) -> list[ValidRecord | RefusedItem]:
    """Check a batch: its shape for the whole batch, the record rules per item.

    The shape — at most :data:`MAX_BATCH` items, every id a non-empty string, every record a
    JSON object — is checked for all items first, so a malformed batch is refused whole. An
    item that breaks a record rule (bad id characters, non-finite number, too large) becomes a
    :class:`RefusedItem`, in its place; the others are :class:`ValidRecord`.

    Raises:
        InvalidRecordError: the shape is wrong (names the first bad item's 0-based index).
    """
    if len(items) > MAX_BATCH:
        raise InvalidRecordError(f"batch has {len(items)} items, at most {MAX_BATCH} are allowed")
    shaped: list[tuple[str, Mapping[str, Any]]] = []
    for i, (rid, rec) in enumerate(items):
        if not isinstance(rid, str) or not rid:
            raise InvalidRecordError(f"batch item {i}: id must be a non-empty string")
        if not isinstance(rec, Mapping):
            got = "null" if rec is None else type(rec).__name__
            raise InvalidRecordError(f"batch item {i}: record must be a JSON object, got {got}")
        shaped.append((rid, rec))
    out: list[ValidRecord | RefusedItem] = []
    for rid, rec in shaped:
        try:
            out.append(_valid(check_record_id(rid), rec if isinstance(rec, dict) else dict(rec)))
        except InvalidRecordError as e:
            out.append(RefusedItem(rid, str(e)))
    return out


# --- search fields -------------------------------------------------------------------------------


def normalise(value: str) -> str:
    """Normalise a search value: Unicode NFKC, case-folded, surrounding blanks removed, inner
    runs of white space collapsed to one space. Matching is exact on the normalised text."""
    v = unicodedata.normalize("NFKC", value).casefold()
    return " ".join(v.split())


def search_terms(record: Mapping[str, JSONValue],
                 fields: Collection[str] | None = None) -> set[tuple[str, str]]:
    """Extract the ``(field, normalised value)`` pairs a record is findable by (only those of
    ``fields`` when given: a search re-check needs just the fields it asks for).

    Fields (:data:`SEARCH_FIELDS`), by record shape:

    * FHIR R4 Patient: ``family`` = every ``name[].family``; ``given`` = every
      ``name[].given[]``; ``birthDate``; ``gender``; ``identifier`` = every
      ``identifier[].value`` and ``system|value`` (FHIR token search form, R4 §3.1.1.5.6).
    * Synthea CSV row: ``LAST``, ``FIRST``, ``BIRTHDATE``, ``GENDER`` (``M``/``F`` →
      ``male``/``female``, as in Synthea's FHIR export), identifiers ``Id``, ``SSN``,
      ``DRIVERS``, ``PASSPORT``.
    * SCONE demo record: ``lname``, ``fname``, ``dob``, identifier ``ssn``.

    Values that are missing, empty or not text are ignored. Never raises for well-formed JSON.
    """
    out: set[tuple[str, str]] = set()

    def add(field: str, value: object) -> None:
        if (fields is None or field in fields) and isinstance(value, str) and value.strip():
            out.add((field, normalise(value)))

    if record.get("resourceType") == "Patient":
        for n in _list(record.get("name")):
            if isinstance(n, dict):
                add("family", n.get("family"))
                for g in _list(n.get("given")):
                    add("given", g)
        add("birthDate", record.get("birthDate"))
        add("gender", record.get("gender"))
        for ident in _list(record.get("identifier")):
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                add("identifier", ident["value"])
                if isinstance(ident.get("system"), str):
                    add("identifier", f"{ident['system']}|{ident['value']}")
    elif "Id" in record and ("LAST" in record or "FIRST" in record):
        add("family", record.get("LAST"))
        add("given", record.get("FIRST"))
        add("birthDate", record.get("BIRTHDATE"))
        g = record.get("GENDER")
        add("gender", _SYNTHEA_GENDER.get(g, g) if isinstance(g, str) else None)
        for col in ("Id", "SSN", "DRIVERS", "PASSPORT"):
            add("identifier", record.get(col))
    else:
        add("family", record.get("lname"))
        add("given", record.get("fname"))
        add("birthDate", record.get("dob"))
        add("identifier", record.get("ssn"))
    return out


def posting_term(field: str, value: str) -> str:
    """The term a posting row is blinded under: ``"<field>=<normalised value>"``."""
    return f"{field}={value}"


def postings(record: Mapping[str, JSONValue]) -> frozenset[str]:
    """The posting terms of a record: whole values, prefixes, date levels and references as
    :func:`safehold.records.tokens.record_tokens` makes them (at most its token budget)."""
    return record_tokens(record)


def display_name(record: Mapping[str, JSONValue]) -> str:
    """A person's name for display (given names, then family), from any of the three record
    shapes; ``""`` when the record has none."""
    if record.get("resourceType") == "Patient":
        for n in _list(record.get("name")):
            if isinstance(n, dict):
                return " ".join([*(n.get("given") or []), n.get("family") or ""]).strip()
        return ""
    if "FIRST" in record or "LAST" in record:
        return f"{record.get('FIRST', '')} {record.get('LAST', '')}".strip()
    return f"{record.get('fname', '')} {record.get('lname', '')}".strip()


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []
