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
  ``entry[].resource`` of type ``Patient`` becomes one record; other resources become
  :class:`ImportResource` items with ``resources=True`` (their ``urn:uuid:`` references to
  other entries rewritten to ``<Type>/<id>``), else they are counted as skipped. A resource
  without ``id`` takes the UUID of an ``urn:uuid:`` ``fullUrl``.
* **FHIR NDJSON** (FHIR Bulk Data Access IG, one resource per line).
* **A single FHIR Patient resource** (``.json``), as in the HL7 R4 examples package.

Within one file a record id is imported once: **the first occurrence wins**; every later item
with the same id becomes an :class:`ImportProblem` (a failure naming where the first one was,
never the id or content), so a duplicated ``Id`` row in a CSV is reported and counted instead of
silently overwriting the first. Across files, a later file's record updates the earlier one.

Every item is checked with :func:`~safehold.records.model.parse_record` (the record rules:
id, JSON object, finite numbers, size), so a record the service would refuse is reported here,
by source, before anything is sent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safehold.csvtext import CountedLines, diagnose
from safehold.records.errors import ImportFormatError, InvalidRecordError, NonFiniteNumberError
from safehold.records.fhir.types import check_fhir_id, check_type
from safehold.records.model import loads_strict, parse_record


@dataclass(frozen=True)
class ImportItem:
    """One record read from an input file.

    Attributes:
        id: the record id (matches :data:`~safehold.records.model.RECORD_ID_RE`).
        record: the JSON object to store (a FHIR ``Patient`` or a flat Synthea row); it passed
            :func:`~safehold.records.model.parse_record`.
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


@dataclass(frozen=True)
class ImportResource:
    """A FHIR resource other than Patient (Observation, Condition, Encounter, …) read from a
    Bundle or NDJSON when resources are asked for (``resources=True``); stored through the FHIR
    endpoint (``PUT /fhir/<type>/<id>`` in a batch).

    Attributes:
        type: the R4 resource type.  id: its FHIR id.
        resource: the resource, ``urn:uuid:`` references to other entries of its Bundle
            rewritten to ``<Type>/<id>`` (FHIR R4 §3.1.0.11.2: how a server resolves them).
        source: as in :class:`ImportItem`.
    """

    type: str
    id: str
    resource: dict[str, Any]
    source: str

    @property
    def key(self) -> str:
        """``<type>/<id>``."""
        return f"{self.type}/{self.id}"


# --- reading files ---------------------------------------------------------------------------


Item = ImportItem | ImportResource | ImportProblem


def iter_file(path: str | Path, *, resources: bool = False) -> Iterator[Item]:
    """Yield the records (and problems) of one input file, format detected from its content.

    Args:
        path: a Synthea ``patients.csv``, a FHIR R4 Bundle / Patient ``.json``, or FHIR NDJSON.
        resources: yield other FHIR resources as :class:`ImportResource` (else they are
            skipped :class:`ImportProblem` items).

    Raises:
        ImportFormatError: the file cannot be opened, is not UTF-8, or is none of the formats.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ImportFormatError(f"{p}: cannot read ({e.strerror})") from None
    yield from iter_bytes(raw, name=str(p), resources=resources)


def iter_bytes(raw: bytes, *, name: str = "<input>", resources: bool = False) -> Iterator[Item]:
    """Like :func:`iter_file` on bytes already read; ``name`` is used in ``source`` strings.

    Raises:
        ImportFormatError: as in :func:`iter_file`.
    """
    yield from _first_id_wins(_iter_text(raw, name, resources))


def _first_id_wins(items: Iterator[Item]) -> Iterator[Item]:
    first: dict[str, str] = {}
    for it in items:
        if isinstance(it, ImportItem | ImportResource):
            key = it.id if isinstance(it, ImportItem) else it.key
            prev = first.get(key)
            if prev is not None:
                yield ImportProblem(it.source, f"duplicate record id (first at {prev}); "
                                               "not imported: the first occurrence wins")
                continue
            first[key] = it.source
        yield it


def _iter_text(raw: bytes, name: str, resources: bool = False) -> Iterator[Item]:
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
            yield from _from_json(obj, name, resources)
            return
        yield from _from_ndjson(text, name, resources)
        return
    if stripped[0] == "[":
        raise ImportFormatError(f"{name}: a JSON array is not a FHIR format (use a Bundle or NDJSON)")
    yield from _from_synthea_csv(text, name)


def _from_json(obj: object, name: str, resources: bool = False) -> Iterator[Item]:
    if not isinstance(obj, dict):
        raise ImportFormatError(f"{name}: expected a JSON object")
    rt = obj.get("resourceType")
    if rt == "Bundle":
        entries = obj.get("entry", [])
        if not isinstance(entries, list):
            raise ImportFormatError(f"{name}: Bundle.entry is not an array")
        urls = _bundle_urls(entries) if resources else {}
        for i, entry in enumerate(entries):
            src = f"{name}#entry{i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                yield ImportProblem(src, "Bundle entry has no resource object")
                continue
            res = _resolve(entry["resource"], urls) if urls else entry["resource"]
            if res.get("resourceType") != "Patient":
                if resources:
                    yield _resource_item(res, src, full_url=entry.get("fullUrl"))
                else:
                    yield ImportProblem(src, f"not a Patient ({res.get('resourceType')!s:.40})", skipped=True)
                continue
            yield _patient_item(res, src, full_url=entry.get("fullUrl"))
    elif rt == "Patient":
        yield _patient_item(obj, name, full_url=None)
    elif isinstance(rt, str):
        raise ImportFormatError(f"{name}: resourceType {rt!r:.40} is neither Bundle nor Patient")
    else:
        raise ImportFormatError(f"{name}: JSON object without resourceType is not FHIR")


def _from_ndjson(text: str, name: str, resources: bool = False) -> Iterator[Item]:
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
            if resources:
                yield _resource_item(res, src, full_url=None)
            else:
                yield ImportProblem(src, f"not a Patient ({res.get('resourceType')!s:.40})", skipped=True)
        else:
            yield _patient_item(res, src, full_url=None)


def _bundle_urls(entries: list[Any]) -> dict[str, str]:
    """``{fullUrl: "<Type>/<id>"}`` for the ``urn:uuid:`` entries of a Bundle."""
    out: dict[str, str] = {}
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("resource"), dict):
            url, res = e.get("fullUrl"), e["resource"]
            if isinstance(url, str) and url.startswith("urn:uuid:") and \
                    isinstance(res.get("resourceType"), str):
                rid = res.get("id") if isinstance(res.get("id"), str) else url[len("urn:uuid:"):]
                out[url] = f"{res['resourceType']}/{rid}"
    return out


def _resolve(value: Any, urls: dict[str, str]) -> Any:
    """``value`` with every ``"reference": "urn:uuid:…"`` naming a Bundle entry rewritten."""
    if isinstance(value, dict):
        return {k: (urls.get(v, v) if k == "reference" and isinstance(v, str) else _resolve(v, urls))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, urls) for v in value]
    return value


def _resource_item(res: dict[str, Any], src: str, *, full_url: object) -> ImportResource | ImportProblem:
    rtype = res.get("resourceType")
    if not isinstance(rtype, str) or not check_type(rtype):
        return ImportProblem(src, f"resourceType {rtype!s:.40} is not an R4 resource type")
    rid = res.get("id")
    if rid is None and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        rid = full_url[len("urn:uuid:"):]
        res = {**res, "id": rid}
    if not check_fhir_id(rid):
        return ImportProblem(src, f"{rtype} has no FHIR id (1..64 of A-Z a-z 0-9 - .)")
    try:
        parse_record(f"{rtype}:{rid}", res)
    except InvalidRecordError as e:
        return ImportProblem(src, str(e))
    return ImportResource(rtype, str(rid), res, src)


def _patient_item(res: dict[str, Any], src: str, *, full_url: object) -> ImportItem | ImportProblem:
    rid = res.get("id")
    if rid is None and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        rid = full_url[len("urn:uuid:"):]
    if not isinstance(rid, str):
        return ImportProblem(src, "Patient has no id (and no urn:uuid fullUrl)")
    try:
        parse_record(rid, res)
    except InvalidRecordError as e:
        return ImportProblem(src, str(e))
    return ImportItem(rid, res, src)


def _from_synthea_csv(text: str, name: str) -> Iterator[ImportItem | ImportProblem]:
    """Rows of a Synthea CSV, each named by the line it starts on.

    Read with ``strict=True`` (RFC 4180 quoting): a row ``csv`` refuses is one problem naming
    its line and why (:func:`safehold.csvtext.diagnose`), and the reader goes on with the next
    row. A quote that is never closed swallows every later line into one field; each of those
    lines is counted as a problem of its own ("not imported: …"), never imported as a guess and
    never lost from the summary.
    """
    lines = io.StringIO(text, newline="").readlines()
    counted = CountedLines(lines)
    reader = csv.reader(counted, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFormatError(f"{name}: not a CSV file (no header row)") from None
    except csv.Error as e:
        raise ImportFormatError(f"{name}: not a CSV file ({diagnose(e, 1, counted.n).message})") from None
    header = [h.strip() for h in header]
    if "Id" not in header:
        raise ImportFormatError(
            f"{name}: not a Synthea patients.csv (header has no 'Id' column; got {len(header)} columns)"
        )
    if len(set(header)) != len(header):
        raise ImportFormatError(f"{name}: CSV header repeats a column name")
    idx = header.index("Id")
    while True:
        start = counted.n + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            problem = diagnose(e, start, counted.n)
            yield ImportProblem(f"{name}:{start}", problem.message)
            for ln in problem.swallowed:
                if lines[ln - 1].strip():
                    yield ImportProblem(f"{name}:{ln}", (
                        f"not imported: this line was read into the field that starts on line "
                        f"{start} ({problem.kind.replace('-', ' ')}); fix line {start} and import "
                        "the file again"))
            continue
        src = f"{name}:{start}"
        if not row or all(not c for c in row):
            continue
        if len(row) != len(header):
            yield ImportProblem(src, f"row has {len(row)} cells, header has {len(header)}")
            continue
        rid = row[idx]
        record = dict(zip(header, row, strict=True))
        try:
            parse_record(rid, record)
        except InvalidRecordError as e:
            yield ImportProblem(src, str(e))
            continue
        yield ImportItem(rid, record, src)
