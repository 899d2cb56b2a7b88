"""Read patient records from Synthea CSV exports and HL7 FHIR R4 JSON (Bundle, NDJSON, Patient).

Every importer yields :class:`ImportItem` (a record to store under an id) or
:class:`ImportProblem` (an input item that cannot become a record, with the reason). One bad
item never stops a file; a file that cannot be read at all raises :class:`ImportFormatError`.

Formats (chosen by content, not by file name alone):

* **Synthea CSV** ``patients.csv`` (Synthea 3.x CSV exporter): one flat record per row — a JSON
  object of header column → cell text, exactly as in the file (empty cells stay ``""``) —
  keyed by the ``Id`` column. The header is read from the file, so Synthea versions that add
  or drop columns work; only ``Id`` is required.
* **FHIR R4 Bundle** (HL7 FHIR R4 §2.36 Bundle, any ``type`` incl. ``transaction``): every
  ``entry[].resource`` of type ``Patient`` becomes one record; other resources are counted as
  skipped. A Patient without ``id`` takes the UUID of an ``urn:uuid:`` ``fullUrl``.
* **FHIR NDJSON** (FHIR Bulk Data Access IG, one resource per line).
* **A single FHIR Patient resource** (``.json``), as in the HL7 R4 examples package.

Within one file a record id is imported once: **the first occurrence wins**; every later item
with the same id becomes an :class:`ImportProblem` (a failure naming where the first one was,
never the id or content), so a duplicated ``Id`` row in a CSV is reported and counted instead of
silently overwriting the first. Across files, a later file's record updates the earlier one.

Search fields (:func:`search_terms`) are extracted from both record shapes for the
blind-index search: ``family``, ``given``, ``birthDate``, ``gender``, ``identifier``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safehold.errors import RecordError

#: Record ids: FHIR R4 ``id`` (§2.24.0.1: ``[A-Za-z0-9\-\.]{1,64}``) widened to the characters
#: other sources use (Synthea UUIDs, SCONE demo ids such as ``patient_3``).
RECORD_ID_RE = re.compile(r"^[A-Za-z0-9._~:@-]{1,128}$")
_ID_CHAR_RE = re.compile(r"^[A-Za-z0-9._~:@-]$")
#: The fields the records service indexes for exact-match search.
SEARCH_FIELDS = ("family", "given", "birthDate", "gender", "identifier")
#: Largest single record accepted (a Synthea FHIR Patient is ~4-6 KiB).
MAX_RECORD_BYTES = 1024 * 1024

_SYNTHEA_GENDER = {"M": "male", "F": "female"}


class ImportFormatError(RecordError):
    """A whole input file cannot be read in any supported format (the message names the file)."""


class InvalidRecordError(RecordError):
    """A record or record id is not acceptable (names the rule broken, never the content)."""


class NonFiniteNumberError(ValueError):
    """JSON text holds ``NaN``, ``Infinity`` or ``-Infinity``: Python's :mod:`json` accepts them,
    RFC 8259 §6 does not ("Numeric values that cannot be represented … such as Infinity and NaN
    are not permitted"), so Safehold never stores them."""


NON_FINITE_MESSAGE = "NaN, Infinity and -Infinity are not JSON numbers (RFC 8259 §6)"


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumberError(f"{name} found: {NON_FINITE_MESSAGE}")


def loads_strict(data: str | bytes) -> Any:
    """:func:`json.loads` that refuses ``NaN`` / ``Infinity`` / ``-Infinity`` (RFC 8259 §6).

    Raises:
        NonFiniteNumberError: one of those constants appears (a :class:`ValueError`).
        json.JSONDecodeError, UnicodeDecodeError, RecursionError: as :func:`json.loads`.
    """
    return json.loads(data, parse_constant=_refuse_constant)


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


@dataclass(frozen=True)
class ImportItem:
    """One record read from an input file.

    Attributes:
        id: the record id (matches :data:`RECORD_ID_RE`).
        record: the JSON object to store (a FHIR ``Patient`` or a flat Synthea row).
        source: where it came from, ``"<file>:<line>"`` or ``"<file>#entry<n>"``.
    """

    id: str
    record: dict[str, Any]
    source: str


@dataclass(frozen=True)
class ImportProblem:
    """An input item that is not imported.

    Attributes:
        source: as in :class:`ImportItem`.
        reason: why (no plaintext content, only structure).
        skipped: True for items that are simply not patients (other Bundle resources);
            False for failures (malformed items).
    """

    source: str
    reason: str
    skipped: bool = False


def check_record_id(record_id: str) -> str:
    """Return ``record_id`` if it matches :data:`RECORD_ID_RE`.

    Messages name the first refused character by class and 1-based position (``got a space
    at position 4``; printable ASCII is shown, anything else as ``U+XXXX``) or the length —
    never the id itself, which may be sensitive (e.g. built from a name).

    Raises:
        InvalidRecordError: not a string, empty, too long (> 128 characters) or a character
            outside the set.
    """
    if not isinstance(record_id, str):
        raise InvalidRecordError(f"record id must be a string, got {type(record_id).__name__}")
    if RECORD_ID_RE.match(record_id):
        return record_id
    for i, ch in enumerate(record_id, start=1):
        if not _ID_CHAR_RE.match(ch):
            raise InvalidRecordError(
                f"record id may contain only A-Z a-z 0-9 . _ ~ : @ - "
                f"(got {_describe_char(ch)} at position {i})"
            )
    raise InvalidRecordError(f"record id must be 1..128 characters long (got {len(record_id)})")


def check_record(record: object) -> dict[str, Any]:
    """Return ``record`` if it is a JSON object that fits the size limit.

    Raises:
        InvalidRecordError: not a JSON object, not JSON-serialisable (also: holds NaN or an
            infinity), or larger than :data:`MAX_RECORD_BYTES` when serialised.
    """
    if not isinstance(record, dict):
        raise InvalidRecordError(f"record must be a JSON object, got {type(record).__name__}")
    try:
        size = len(json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except ValueError:
        raise InvalidRecordError(f"record holds a non-finite number: {NON_FINITE_MESSAGE}") from None
    except TypeError as e:
        raise InvalidRecordError(f"record is not JSON-serialisable: {type(e).__name__}") from None
    if size > MAX_RECORD_BYTES:
        raise InvalidRecordError(f"record is {size} bytes, over the limit of {MAX_RECORD_BYTES}")
    return record


# --- reading files ---------------------------------------------------------------------------


def iter_file(path: str | Path) -> Iterator[ImportItem | ImportProblem]:
    """Yield the records (and problems) of one input file, format detected from its content.

    Args:
        path: a Synthea ``patients.csv``, a FHIR R4 Bundle / Patient ``.json``, or FHIR NDJSON.

    Raises:
        ImportFormatError: the file cannot be opened, is not UTF-8, or is none of the formats.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ImportFormatError(f"{p}: cannot read ({e.strerror})") from None
    yield from iter_bytes(raw, name=str(p))


def iter_bytes(raw: bytes, *, name: str = "<input>") -> Iterator[ImportItem | ImportProblem]:
    """Like :func:`iter_file` on bytes already read; ``name`` is used in ``source`` strings.

    Raises:
        ImportFormatError: as in :func:`iter_file`.
    """
    yield from _first_id_wins(_iter_text(raw, name))


def _first_id_wins(items: Iterator[ImportItem | ImportProblem]) -> Iterator[ImportItem | ImportProblem]:
    first: dict[str, str] = {}
    for it in items:
        if isinstance(it, ImportItem):
            prev = first.get(it.id)
            if prev is not None:
                yield ImportProblem(it.source, f"duplicate record id (first at {prev}); "
                                               "not imported: the first occurrence wins")
                continue
            first[it.id] = it.source
        yield it


def _iter_text(raw: bytes, name: str) -> Iterator[ImportItem | ImportProblem]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ImportFormatError(f"{name}: not UTF-8 text (byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ImportFormatError(f"{name}: empty file")
    if stripped[0] == "{":
        try:
            obj = loads_strict(text)
        except NonFiniteNumberError as e:
            raise ImportFormatError(f"{name}: {e}") from None
        except json.JSONDecodeError:
            obj = None  # maybe NDJSON: several objects on several lines
        except RecursionError:
            raise ImportFormatError(f"{name}: JSON nested too deeply") from None
        if obj is not None:
            yield from _from_json(obj, name)
            return
        yield from _from_ndjson(text, name)
        return
    if stripped[0] == "[":
        raise ImportFormatError(f"{name}: a JSON array is not a FHIR format (use a Bundle or NDJSON)")
    yield from _from_synthea_csv(text, name)


def _from_json(obj: object, name: str) -> Iterator[ImportItem | ImportProblem]:
    if not isinstance(obj, dict):
        raise ImportFormatError(f"{name}: expected a JSON object")
    rt = obj.get("resourceType")
    if rt == "Bundle":
        entries = obj.get("entry", [])
        if not isinstance(entries, list):
            raise ImportFormatError(f"{name}: Bundle.entry is not an array")
        for i, entry in enumerate(entries):
            src = f"{name}#entry{i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                yield ImportProblem(src, "Bundle entry has no resource object")
                continue
            res = entry["resource"]
            if res.get("resourceType") != "Patient":
                yield ImportProblem(src, f"not a Patient ({res.get('resourceType')!s:.40})", skipped=True)
                continue
            yield _patient_item(res, src, full_url=entry.get("fullUrl"))
    elif rt == "Patient":
        yield _patient_item(obj, name, full_url=None)
    elif isinstance(rt, str):
        raise ImportFormatError(f"{name}: resourceType {rt!r:.40} is neither Bundle nor Patient")
    else:
        raise ImportFormatError(f"{name}: JSON object without resourceType is not FHIR")


def _from_ndjson(text: str, name: str) -> Iterator[ImportItem | ImportProblem]:
    seen_any = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        src = f"{name}:{lineno}"
        try:
            res = loads_strict(line)
        except NonFiniteNumberError as e:
            seen_any = True
            yield ImportProblem(src, str(e))
            continue
        except (json.JSONDecodeError, RecursionError):
            if not seen_any:
                raise ImportFormatError(f"{name}: neither JSON nor NDJSON (line {lineno})") from None
            yield ImportProblem(src, "line is not valid JSON")
            continue
        seen_any = True
        if not isinstance(res, dict):
            yield ImportProblem(src, "line is not a JSON object")
        elif res.get("resourceType") != "Patient":
            yield ImportProblem(src, f"not a Patient ({res.get('resourceType')!s:.40})", skipped=True)
        else:
            yield _patient_item(res, src, full_url=None)


def _patient_item(res: dict[str, Any], src: str, *, full_url: object) -> ImportItem | ImportProblem:
    rid = res.get("id")
    if rid is None and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        rid = full_url[len("urn:uuid:"):]
    if not isinstance(rid, str):
        return ImportProblem(src, "Patient has no id (and no urn:uuid fullUrl)")
    try:
        check_record_id(rid)
        check_record(res)
    except InvalidRecordError as e:
        return ImportProblem(src, str(e))
    return ImportItem(rid, res, src)


def _from_synthea_csv(text: str, name: str) -> Iterator[ImportItem | ImportProblem]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise ImportFormatError(f"{name}: not a CSV file ({e})") from None
    header = [h.strip() for h in header]
    if "Id" not in header:
        raise ImportFormatError(
            f"{name}: not a Synthea patients.csv (header has no 'Id' column; got {len(header)} columns)"
        )
    if len(set(header)) != len(header):
        raise ImportFormatError(f"{name}: CSV header repeats a column name")
    idx = header.index("Id")
    while True:
        lineno = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield ImportProblem(f"{name}:{lineno}", f"CSV syntax error: {e}")
            return
        src = f"{name}:{reader.line_num}"
        if not row or all(not c for c in row):
            continue
        if len(row) != len(header):
            yield ImportProblem(src, f"row has {len(row)} cells, header has {len(header)}")
            continue
        rid = row[idx]
        try:
            check_record_id(rid)
        except InvalidRecordError as e:
            yield ImportProblem(src, str(e))
            continue
        yield ImportItem(rid, dict(zip(header, row, strict=True)), src)


# --- search fields ---------------------------------------------------------------------------


def normalise(value: str) -> str:
    """Normalise a search value: Unicode NFKC, case-folded, surrounding blanks removed, inner
    runs of white space collapsed to one space. Matching is exact on the normalised text."""
    v = unicodedata.normalize("NFKC", value).casefold()
    return " ".join(v.split())


def search_terms(record: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Extract the ``(field, normalised value)`` pairs a record is findable by.

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
        if isinstance(value, str) and value.strip():
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


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []
