"""The FHIR R4 resource store: interactions over the encrypted repositories (framework-free).

:class:`FhirStore` implements the FHIR RESTful interactions (R4 §3.1.0) Safehold serves —
read, vread, create, update, delete, search-type, conditional create and ``batch`` — on two
:class:`~safehold.records.repository.PatientRepository` instances, so every access is
encrypted, blind-indexed, committed with its postings and history in one transaction and
recorded in the access audit like any native call:

* **Patient** resources live in the native API's ``patients`` namespace under their id: a
  Patient written through ``/fhir`` is the record ``GET /v1/patients/{id}`` returns and the
  other way round. A record there that is not a FHIR Patient (a flat Synthea row, a SCONE form)
  is not a FHIR resource: ``/fhir`` reads it as not found and never returns it from a search.
* **every other R4 resource type** lives in one ``resources`` namespace under the record key
  ``<Type>:<id>`` (one namespace, so the database does not see how many records each type has).

Versions: ``meta.versionId`` is the repository's version (the native API's ``ETag``), set on
every resource this module returns; ``meta.lastUpdated`` is set on every write through
``/fhir`` (native writes store the body as sent). The version a write replaces is kept
encrypted for ``vread`` (:mod:`safehold.records.history`); delete erases the resource and all
its versions (a later read is 404: R4 §3.1.0.7.1 allows a server that does not keep deleted
resources to answer so). An update whose content equals the current one (``meta`` aside)
writes nothing and keeps the version (a no-op, as common FHIR servers do).

Errors are Safehold exceptions (the HTTP layer maps them to status codes and OperationOutcome):
:class:`FhirInvalidError`, :class:`FhirNotSupportedError`, :class:`MultipleMatchesError`,
:class:`~safehold.records.fhir.search.SearchRefusedError`, and the repository's
``RecordNotFoundError``, ``PreconditionFailedError``, ``RecordTamperedError``,
``SearchTooCostlyError``.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from safehold.errors import RecordNotFoundError, SafeholdError
from safehold.records.access import PermissionDeniedError
from safehold.records.errors import (
    AlreadyExistsError,
    FhirInvalidError,
    FhirNotSupportedError,
    MultipleMatchesError,
    NonFiniteNumberError,
    PreconditionFailedError,
    UnknownResourceTypeError,
)
from safehold.records.fhir.search import SearchPlan, plan_search
from safehold.records.fhir.types import check_fhir_id, check_type
from safehold.records.model import (
    MAX_BATCH,
    ValidRecord,
    decode_stored,
    loads_strict,
    parse_record,
)
from safehold.records.repository import PatientRepository, PutResult

__all__ = ["RESOURCES_NAMESPACE", "EntryOutcome", "FhirInvalidError", "FhirNotSupportedError", "FhirStore",
           "MultipleMatchesError", "SearchResult", "UnknownResourceTypeError", "Written",
           "operation_outcome"]

#: What ``If-None-Exist`` may hold: ``identifier`` criteria (conditional create is about identity).
IF_NONE_EXIST_RE = re.compile(r"identifier=[^&]{0,256}(?:&identifier=[^&]{0,256}){0,7}")
#: Namespace of the non-Patient resources.
RESOURCES_NAMESPACE = "resources"
_NOT_FHIR = "record is not a FHIR {t} resource (a record of the native API)"

def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """An R4 OperationOutcome with one issue (``code`` an IssueType)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


@dataclass(frozen=True)
class Written:
    """Result of a write: the resource as stored (with ``id`` and ``meta``), its version,
    ``created`` (201) and ``changed`` (False for a no-op update or a conditional create that
    found its match)."""

    resource: dict[str, Any]
    version: int
    created: bool
    changed: bool = True


@dataclass(frozen=True)
class SearchResult:
    """One searchset page: ``entries`` as ``(id, resource)``, ``total`` (None when not
    counted), the ``next`` cursor (None on the last page) and the plan."""

    entries: list[tuple[str, dict[str, Any]]]
    total: int | None
    next_cursor: str | None
    plan: SearchPlan


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _without_server_meta(res: Mapping[str, Any]) -> dict[str, Any]:
    """A resource without ``meta.versionId`` / ``meta.lastUpdated`` (to compare contents)."""
    out = dict(res)
    meta = out.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            out["meta"] = meta
        else:
            out.pop("meta")
    out.pop("id", None)
    return out


class FhirStore:
    """FHIR interactions over the Patient repository and the repository of other resources.

    Args:
        patients: the native API's repository (namespace ``patients``).
        resources: a repository on namespace :data:`RESOURCES_NAMESPACE` of the same store,
            keyset, committer and audit log.
    """

    def __init__(self, patients: PatientRepository, resources: PatientRepository) -> None:
        self.patients = patients
        self.resources = resources
        self._conditional = threading.Lock()

    @classmethod
    def beside(cls, patients: PatientRepository) -> FhirStore:
        """A store whose resources repository shares ``patients``' store, keyset, namespace
        prefix, codec, compression setting, group committer and access audit (namespace
        :data:`RESOURCES_NAMESPACE`)."""
        e = patients.engine
        resources = PatientRepository(e.store, e.keyset, committer=patients.committer,
                                      audit=patients.audit, prefix=e.prefix,
                                      namespace=RESOURCES_NAMESPACE, codec=e.codec,
                                      compress=e.frame.compress)
        return cls(patients, resources)

    # -- addressing ---------------------------------------------------------------------------

    def _where(self, rtype: str, rid: str) -> tuple[PatientRepository, str]:
        """Repository and record key of ``rtype/rid``.

        Raises:
            FhirNotSupportedError: not an R4 resource type.  FhirInvalidError: not a FHIR id.
        """
        if not check_type(rtype):
            raise UnknownResourceTypeError(f"resource type {rtype[:64]!r} is not an R4 resource type")
        if not check_fhir_id(rid):
            raise FhirInvalidError("resource id must be 1..64 characters of A-Z a-z 0-9 - . "
                                   "(FHIR R4 id), not '.' or '..'")
        if rtype == "Patient":
            return self.patients, rid
        return self.resources, f"{rtype}:{rid}"

    @staticmethod
    def _present(rtype: str, rid: str, rec: dict[str, Any], version: int) -> dict[str, Any]:
        """The resource as returned: ``id`` and ``meta.versionId`` set by the server.

        Raises:
            RecordNotFoundError: the record is not a ``rtype`` resource.
        """
        if rec.get("resourceType") != rtype:
            raise RecordNotFoundError(_NOT_FHIR.format(t=rtype))
        meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
        meta["versionId"] = str(version)
        out: dict[str, Any] = {"resourceType": rtype, "id": rid}
        out.update((k, v) for k, v in rec.items() if k not in ("resourceType", "id", "meta"))
        out["meta"] = meta
        return out

    # -- read ---------------------------------------------------------------------------------

    def read(self, who: str, rtype: str, rid: str) -> tuple[dict[str, Any], int]:
        """``GET [base]/[type]/[id]``: ``(resource, version)``.

        Raises:
            RecordNotFoundError, RecordTamperedError, FhirInvalidError, FhirNotSupportedError.
        """
        repo, key = self._where(rtype, rid)
        rec, version = repo.get(who, key)
        return self._present(rtype, rid, rec, version), version

    def vread(self, who: str, rtype: str, rid: str, vid: str) -> tuple[dict[str, Any], int]:
        """``GET [base]/[type]/[id]/_history/[vid]``: ``(resource, vid)``.

        Raises:
            RecordNotFoundError: no such resource or version.  FhirInvalidError: ``vid`` is
                not a positive integer.  RecordTamperedError.
        """
        repo, key = self._where(rtype, rid)
        if not vid.isascii() or not vid.isdigit() or not 1 <= int(vid) < 2**63:
            raise FhirInvalidError("version id must be a positive integer")
        raw = repo.get_version(who, key, int(vid))
        return self._present(rtype, rid, decode_stored(raw), int(vid)), int(vid)

    # -- write --------------------------------------------------------------------------------

    @staticmethod
    def parse_body(body: bytes | Mapping[str, Any], rtype: str | None) -> dict[str, Any]:
        """A resource from a request body (JSON text) or an already parsed object.

        Raises:
            FhirInvalidError: not JSON, not an object, ``NaN``/``Infinity``, no or another
                ``resourceType``, or a ``meta`` that is not an object.
        """
        obj: object
        if isinstance(body, bytes | bytearray):
            try:
                obj = loads_strict(bytes(body))
            except NonFiniteNumberError as e:
                raise FhirInvalidError(f"body: {e}") from None
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise FhirInvalidError("body is not JSON") from None
        else:
            obj = body
        if not isinstance(obj, dict):
            raise FhirInvalidError("body must be a JSON object (a FHIR resource)")
        got = obj.get("resourceType")
        if not isinstance(got, str):
            raise FhirInvalidError("resource has no resourceType")
        if rtype is not None and got != rtype:
            raise FhirInvalidError(f"resourceType {got[:64]!r} does not match the URL's type {rtype!r}")
        if "meta" in obj and not isinstance(obj["meta"], dict):
            raise FhirInvalidError("meta must be an object")
        return dict(obj)

    def _stored_form(self, res: dict[str, Any], rid: str) -> dict[str, Any]:
        meta = {k: v for k, v in res.get("meta", {}).items() if k != "versionId"}
        meta["lastUpdated"] = _now()
        out: dict[str, Any] = {"resourceType": res["resourceType"], "id": rid}
        out.update((k, v) for k, v in res.items() if k not in ("resourceType", "id", "meta"))
        out["meta"] = meta
        return out

    def create(self, who: str, rtype: str, body: bytes | Mapping[str, Any], *,
               if_none_exist: str | None = None) -> Written:
        """``POST [base]/[type]``: store under a new server-assigned id (UUID v4; a client id
        in the body is ignored, R4 §3.1.0.9). With ``if_none_exist`` (a search query), return
        the one matching resource instead of creating (R4 §3.1.0.8.1); Patient only, criteria
        ``identifier=…`` (:data:`IF_NONE_EXIST_RE`).

        Raises:
            FhirInvalidError, FhirNotSupportedError, MultipleMatchesError,
            SearchRefusedError (the If-None-Exist query), InvalidRecordError (record rules).
        """
        res = self.parse_body(body, rtype)
        self._where(rtype, "x")  # the type check
        if if_none_exist is None:
            return self._create(who, rtype, res)
        if rtype != "Patient":
            raise FhirNotSupportedError("conditional create (If-None-Exist) is supported for Patient only")
        if not IF_NONE_EXIST_RE.fullmatch(if_none_exist):
            raise FhirInvalidError("If-None-Exist must be identifier=[system|]value (repeatable with &)")
        params = parse_qsl(if_none_exist, keep_blank_values=True)
        with self._conditional:  # one conditional create at a time in this process
            found = self.search(who, rtype, [*params, ("_count", "2")])
            if found.total == 1:
                rid, resource = found.entries[0]
                return Written(resource, int(resource["meta"]["versionId"]), created=False, changed=False)
            if found.total:
                raise MultipleMatchesError(f"If-None-Exist matches {found.total} resources")
            return self._create(who, rtype, res)

    def _create(self, who: str, rtype: str, res: dict[str, Any]) -> Written:
        rid = str(uuid.uuid4())
        repo, key = self._where(rtype, rid)
        stored = self._stored_form(res, rid)
        result = repo.put(who, parse_record(key, stored), expected_version=0)
        return Written(self._present(rtype, rid, stored, result.version), result.version, created=True)

    def update(self, who: str, rtype: str, rid: str, body: bytes | Mapping[str, Any], *,
               if_match: int | None = None) -> Written:
        """``PUT [base]/[type]/[id]``: replace, or create with this id (update as create).

        Args:
            if_match: the version from ``If-Match: W/"n"``; another current version → 412.

        Raises:
            FhirInvalidError: the body's ``id`` is missing or differs from the URL's
                (R4 §3.1.0.4), or the body is not a resource of the type.
            PreconditionFailedError: ``if_match`` is not the current version.
            AlreadyExistsError: the id holds a native record that is not a ``rtype`` resource.
            RecordTamperedError, InvalidRecordError.
        """
        repo, key = self._where(rtype, rid)
        res = self.parse_body(body, rtype)
        if res.get("id") != rid:
            raise FhirInvalidError("the resource's id must be present and equal the id in the URL")
        for _ in range(8):
            try:
                cur_rec, cur = repo.get(who, key)
            except RecordNotFoundError:
                cur_rec, cur = None, 0
            if cur_rec is not None and cur_rec.get("resourceType") != rtype:
                raise AlreadyExistsError(f"a record of the native API has this id and is not a FHIR "
                                         f"{rtype} resource: not overwritten through /fhir")
            if if_match is not None and if_match != cur:
                raise PreconditionFailedError(f"If-Match names version {if_match}, the current "
                                              f"version is {cur}")
            if cur_rec is not None and cur_rec.get("resourceType") == rtype and \
                    _without_server_meta(cur_rec) == _without_server_meta(res):
                return Written(self._present(rtype, rid, cur_rec, cur), cur, created=False, changed=False)
            stored = self._stored_form(res, rid)
            try:
                result = repo.put(who, parse_record(key, stored), expected_version=cur)
            except PreconditionFailedError:
                if if_match is not None:
                    raise
                continue  # changed between our read and the write: look again
            return Written(self._present(rtype, rid, stored, result.version), result.version,
                           created=result.status == "created")
        raise PreconditionFailedError("the resource kept changing concurrently; retry")

    def delete(self, who: str, rtype: str, rid: str) -> bool:
        """``DELETE [base]/[type]/[id]``: erase the resource and its history; False when there
        was none (still a success, R4 §3.1.0.7.1).

        Raises:
            FhirInvalidError, FhirNotSupportedError, RecordNotFoundError (the record is not a
            ``rtype`` resource: a native record is not deleted through /fhir).
        """
        repo, key = self._where(rtype, rid)
        try:
            rec, _ = repo.get(who, key)
        except RecordNotFoundError:
            return False
        if rec.get("resourceType") != rtype:
            raise RecordNotFoundError(_NOT_FHIR.format(t=rtype))
        try:
            repo.delete(who, key)
        except RecordNotFoundError:
            return False
        return True

    # -- search -------------------------------------------------------------------------------

    def search(self, who: str, rtype: str, params: Iterable[tuple[str, str]], *,
               lenient: bool = False) -> SearchResult:
        """``GET [base]/[type]?…``: one page of matches in id order (module
        :mod:`~safehold.records.fhir.search` for the parameters).

        Raises:
            SearchRefusedError, SearchTooCostlyError, FhirNotSupportedError, RecordTamperedError.
        """
        repo, _ = self._where(rtype, "x")
        plan = plan_search(rtype, params, lenient=lenient)
        after_key = None
        if plan.cursor is not None:  # the last id of the previous page (any string is a position)
            after_key = plan.cursor if rtype == "Patient" else f"{rtype}:{plan.cursor}"
        page = repo.find(who, plan.groups, plan.matches, after=after_key,
                         limit=max(plan.count, 1), count=plan.total or plan.count == 0)
        entries = []
        for key, rec, version in page.hits[: plan.count]:
            rid = key if rtype == "Patient" else key.split(":", 1)[1]
            entries.append((rid, self._present(rtype, rid, rec, version)))
        nxt = entries[-1][0] if page.more and entries else None
        return SearchResult(entries, page.total, nxt, plan)

    # -- batch --------------------------------------------------------------------------------

    def batch(self, who: str, bundle: Mapping[str, Any], *, base: str,
              can_write: bool) -> list[EntryOutcome]:
        """``POST [base]`` with a ``batch`` Bundle (R4 §3.1.0.11): each entry is processed on
        its own (not atomic); the HTTP layer answers each in a ``batch-response`` entry in its
        place. The ``PUT Type/id`` entries are written together in one transaction per
        repository (:meth:`PatientRepository.put_many`; an entry whose record changed since its
        read is 412 like a lone update with a stale version). Entries: ``PUT Type/id`` (update
        or create), ``POST Type`` (create; ``ifNoneExist`` honoured), ``GET Type/id``,
        ``DELETE Type/id``; ``request.url`` may be relative or start with ``base``.

        Args:
            can_write: the caller may write (else write entries fail with
                PermissionDeniedError).

        Raises:
            FhirInvalidError: not a Bundle, more than :data:`MAX_BATCH` entries, or an entry
                without ``request.method`` / ``request.url`` (nothing is processed).
            FhirNotSupportedError: not ``type: batch`` (a ``transaction`` would have to be
                atomic).
        """
        if bundle.get("resourceType") != "Bundle":
            raise FhirInvalidError("POST to the base URL takes a Bundle")
        if bundle.get("type") != "batch":
            raise FhirNotSupportedError("only Bundle.type 'batch' is supported (a 'transaction' "
                                        "would need all entries in one atomic commit)")
        entries = bundle.get("entry", [])
        if not isinstance(entries, list) or len(entries) > MAX_BATCH:
            raise FhirInvalidError(f"Bundle.entry must be an array of at most {MAX_BATCH} entries")
        for i, e in enumerate(entries):
            req = e.get("request") if isinstance(e, dict) else None
            if not isinstance(req, dict) or req.get("method") not in ("GET", "PUT", "POST", "DELETE") \
                    or not isinstance(req.get("url"), str):
                raise FhirInvalidError(f"Bundle.entry[{i}] needs request.method (GET, PUT, POST or "
                                       "DELETE) and request.url")
            if "resource" in e and not isinstance(e["resource"], dict):
                raise FhirInvalidError(f"Bundle.entry[{i}].resource must be a resource (an object)")
        outcomes: list[EntryOutcome | None] = [None] * len(entries)
        # PUT Type/id entries are written together: one transaction per repository (issue 17;
        # R4 §3.1.0.11 batch entries SHALL NOT depend on each other, so the order is free)
        planned: dict[int, tuple[PatientRepository, ValidRecord, str, dict[str, Any], int]] = {}
        for i, e in enumerate(entries):
            req = e["request"]
            url = req["url"].strip()
            url = url[len(base):] if base and url.startswith(base) else url
            parts = [p for p in url.split("?", 1)[0].split("/") if p]
            if req["method"] == "PUT" and len(parts) == 2 and can_write:
                res = e.get("resource")
                try:
                    plan = self._plan_update(who, parts[0], parts[1], res if isinstance(res, dict) else {})
                except (SafeholdError, ValueError) as ex:
                    outcomes[i] = EntryOutcome("error", error=ex)
                    continue
                if isinstance(plan, Written):
                    outcomes[i] = EntryOutcome("write", written=plan)
                else:
                    planned[i] = plan
                continue
            outcomes[i] = self._batch_entry(who, e, base, can_write)
        for repo in {id(p[0]): p[0] for p in planned.values()}.values():
            idx = [i for i, p in planned.items() if p[0] is repo]
            results = repo.put_many(who, [(planned[i][1], planned[i][4]) for i in idx])
            for i, r in zip(idx, results, strict=True):
                _, _, rtype, stored, _ = planned[i]
                if isinstance(r, PutResult):
                    rid = stored["id"]
                    outcomes[i] = EntryOutcome("write", written=Written(
                        self._present(rtype, rid, stored, r.version), r.version,
                        created=r.status == "created"))
                else:
                    outcomes[i] = EntryOutcome("error", error=r)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _plan_update(self, who: str, rtype: str, rid: str, body: dict[str, Any],
                     ) -> Written | tuple[PatientRepository, ValidRecord, str, dict[str, Any], int]:
        """The checks of :meth:`update` (no ``If-Match``) without the write: the unchanged
        :class:`Written`, or ``(repository, record, rtype, stored form, expected version)``.

        Raises:
            as :meth:`update`.
        """
        repo, key = self._where(rtype, rid)
        res = self.parse_body(body, rtype)
        if res.get("id") != rid:
            raise FhirInvalidError("the resource's id must be present and equal the id in the URL")
        try:
            cur_rec, cur = repo.get(who, key)
        except RecordNotFoundError:
            cur_rec, cur = None, 0
        if cur_rec is not None and cur_rec.get("resourceType") != rtype:
            raise AlreadyExistsError(f"a record of the native API has this id and is not a FHIR "
                                     f"{rtype} resource: not overwritten through /fhir")
        if cur_rec is not None and _without_server_meta(cur_rec) == _without_server_meta(res):
            return Written(self._present(rtype, rid, cur_rec, cur), cur, created=False, changed=False)
        stored = self._stored_form(res, rid)
        return repo, parse_record(key, stored), rtype, stored, cur

    def _batch_entry(self, who: str, entry: Mapping[str, Any], base: str, can_write: bool) -> EntryOutcome:
        req = entry["request"]
        method = req["method"]
        url = req["url"].strip()
        url = url[len(base):] if base and url.startswith(base) else url
        parts = [p for p in url.split("?", 1)[0].split("/") if p]
        res = entry.get("resource")
        body: dict[str, Any] = res if isinstance(res, dict) else {}
        try:
            if method != "GET" and not can_write:
                raise PermissionDeniedError("role may not write (needs 'writer')")
            if method == "PUT" and len(parts) == 2:
                return EntryOutcome("write", written=self.update(who, parts[0], parts[1], body))
            if method == "POST" and len(parts) == 1:
                ine = req.get("ifNoneExist")
                return EntryOutcome("write", written=self.create(
                    who, parts[0], body, if_none_exist=ine if isinstance(ine, str) else None))
            if method == "GET" and len(parts) == 2:
                res, _ = self.read(who, parts[0], parts[1])
                return EntryOutcome("read", resource=res)
            if method == "DELETE" and len(parts) == 2:
                self.delete(who, parts[0], parts[1])
                return EntryOutcome("delete")
            raise FhirNotSupportedError(f"batch entry {method[:8]} with {len(parts)} path segments "
                                        "is not supported (PUT/GET/DELETE Type/id, POST Type)")
        except (SafeholdError, ValueError) as e:  # each entry is answered on its own
            return EntryOutcome("error", error=e)


@dataclass(frozen=True)
class EntryOutcome:
    """What one batch entry did: ``kind`` = ``write`` (``written``), ``read`` (``resource``),
    ``delete``, or ``error`` (``error``, the exception)."""

    kind: str
    written: Written | None = None
    resource: dict[str, Any] | None = None
    error: Exception | None = None
