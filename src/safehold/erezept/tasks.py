"""E-Rezept Task workflow (the Fachdienst's public FHIR API, gemSpec_FD_eRp), framework-free.

State machine of a Task::

    $create (prescriber)                       → draft      (PrescriptionID, AccessCode)
    $activate (prescriber, AccessCode, QES)     draft       → ready      (Task.for = KVNR)
    $accept (pharmacy, AccessCode)              ready       → in-progress (Secret issued)
    $reject (pharmacy, Secret)                  in-progress → ready
    $close (pharmacy, Secret, dispense)         in-progress → completed  (receipt)
    $abort  prescriber + AccessCode             draft|ready → cancelled
            insured (own KVNR)                  ready       → cancelled
            pharmacy + Secret                   in-progress → cancelled
    GET /Task (insured)                         the insured person's Tasks (by KVNR)

Storage: every Task is one record of Safehold's encrypted :class:`~safehold.records.engine.RecordEngine`
(namespace ``erezept.task``, record key = PrescriptionID), and each insured person's list of
Task ids is one record keyed by the KVNR (namespace ``erezept.kvnr``). The engine seals values
with AES-256-GCM and addresses rows by a keyed blind index, so the database holds no prescription
content, names, KVNRs, AccessCodes or Secrets — only namespaces, blind indexes, versions and
ciphertext. The engine detects altered, copied and moved rows (refused with its
RecordTamperedError subclasses); it does **not** detect a rollback of a row to an older
authentic version (a Task set back from completed to in-progress by the database operator).

Every state change is a compare-and-set on the Task record's version, so two pharmacies racing
to accept one Task cannot both win.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from safehold.erezept.errors import (
    AccessCodeError,
    BundleInvalidError,
    RoleError,
    TaskGoneError,
    TaskNotFoundError,
    TaskStateError,
)
from safehold.erezept.kbv import (
    PRESCRIPTION_ID_SYSTEM,
    open_signed_prescription,
    parse_bundle_json,
    validate_bundle,
    validate_dispense,
)
from safehold.erezept.tokens import Principal
from safehold.errors import ConflictError, RecordNotFoundError
from safehold.jsontypes import JSONObject
from safehold.records.engine import RecordEngine

__all__ = ["FLOW_TYPES", "TaskService", "prescription_id_valid"]

NS_TASK = "erezept.task"
NS_KVNR = "erezept.kvnr"
ACCESS_CODE_SYSTEM = "https://gematik.de/fhir/erp/NamingSystem/GEM_ERP_NS_AccessCode"
SECRET_SYSTEM = "https://gematik.de/fhir/erp/NamingSystem/GEM_ERP_NS_Secret"  # noqa: S105 - a URI
FLOW_TYPE_SYSTEM = "https://gematik.de/fhir/erp/CodeSystem/GEM_ERP_CS_FlowType"
TASK_PROFILE = "https://gematik.de/fhir/erp/StructureDefinition/GEM_ERP_PR_Task|1.2"
KVNR_SYSTEM = "http://fhir.de/sid/gkv/kvid-10"
TELEMATIK_ID_SYSTEM = "https://gematik.de/fhir/sid/telematik-id"

#: Workflow types (GEM_ERP_CS_FlowType) Safehold accepts.
FLOW_TYPES = {
    "160": "Muster 16 (Apothekenpflichtige Arzneimittel)",
    "169": "Muster 16 (Direkte Zuweisung)",
    "200": "PKV (Apothekenpflichtige Arzneimittel)",
    "209": "PKV (Direkte Zuweisung)",
}


def _check_digits(digits: str) -> str:
    """ISO 7064 MOD 97-10 check digits over a digit string."""
    return f"{98 - (int(digits) * 100) % 97:02d}"


def prescription_id_valid(pid: str) -> bool:
    """True for ``aaa.bbb.bbb.bbb.bbb.cc`` with a known flow type and correct ISO 7064 check digits."""
    if not isinstance(pid, str) or len(pid) != 22:
        return False
    parts = pid.split(".")
    if [len(x) for x in parts] != [3, 3, 3, 3, 3, 2] or not all(x.isdigit() and x.isascii() for x in parts):
        return False
    return parts[0] in FLOW_TYPES and _check_digits("".join(parts[:5])) == parts[5]


def _new_prescription_id(flow: str) -> str:
    n = f"{secrets.randbelow(10**12):012d}"
    body = flow + n
    return ".".join([flow, n[0:3], n[3:6], n[6:9], n[9:12], _check_digits(body)])


def _eq(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


class TaskService:
    """The E-Rezept Task operations over a :class:`RecordEngine`.

    Args:
        engine: the encrypted records engine (its store may be SQLite or PostgreSQL).
        clock: seconds since the epoch.

    Every method takes the verified :class:`Principal` and raises, besides what it lists,
    :class:`RoleError` when the role may not call it, and the engine's RecordTamperedError
    subclasses / StoreUnavailableError when the database misbehaves.
    """

    def __init__(self, engine: RecordEngine, *, clock: Callable[[], float] = time.time):
        self.engine = engine
        self._clock = clock

    def __repr__(self) -> str:
        return f"TaskService({self.engine!r})"

    # --- storage -------------------------------------------------------------------------------

    def _now(self) -> str:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).isoformat(timespec="seconds")

    def _load(self, task_id: str) -> tuple[dict[str, Any], int]:
        if not prescription_id_valid(task_id):
            raise TaskNotFoundError("no Task with this id (malformed PrescriptionID)")
        try:
            raw, version = self.engine.get(NS_TASK, task_id)
        except RecordNotFoundError:
            raise TaskNotFoundError("no Task with this id") from None
        rec = json.loads(raw)
        if rec.get("id") != task_id:
            raise TaskNotFoundError("stored Task does not carry its own id")
        return rec, version

    def _save(self, rec: dict[str, Any], version: int) -> int:
        rec["modified"] = self._now()
        blob = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            return self.engine.put(NS_TASK, rec["id"], blob, expected_version=version)
        except ConflictError:
            raise TaskStateError("the Task changed concurrently; read it again and retry") from None

    def _index_add(self, kvnr: str, task_id: str) -> None:
        key = f"kvnr/{kvnr}"
        for _ in range(16):
            try:
                raw, version = self.engine.get(NS_KVNR, key)
                ids = json.loads(raw)
            except RecordNotFoundError:
                ids, version = [], 0
            if task_id in ids:
                return
            ids.append(task_id)
            try:
                self.engine.put(NS_KVNR, key, json.dumps(ids).encode(), expected_version=version)
                return
            except ConflictError:
                continue
        raise TaskStateError("could not update the insured person's Task list (too many concurrent writers)")

    # --- FHIR shapes ---------------------------------------------------------------------------

    def _task_json(self, rec: dict[str, Any], *, show_access_code: bool, show_secret: bool) -> dict[str, Any]:
        ident = [{"use": "official", "system": PRESCRIPTION_ID_SYSTEM, "value": rec["id"]}]
        if show_access_code and rec.get("access_code"):
            ident.append({"use": "official", "system": ACCESS_CODE_SYSTEM, "value": rec["access_code"]})
        if show_secret and rec.get("secret"):
            ident.append({"use": "official", "system": SECRET_SYSTEM, "value": rec["secret"]})
        task: dict[str, Any] = {
            "resourceType": "Task",
            "id": rec["id"],
            "meta": {"profile": [TASK_PROFILE], "lastUpdated": rec["modified"]},
            "extension": [
                {
                    "url": "https://gematik.de/fhir/erp/StructureDefinition/GEM_ERP_EX_PrescriptionType",
                    "valueCoding": {
                        "system": FLOW_TYPE_SYSTEM,
                        "code": rec["flow"],
                        "display": FLOW_TYPES[rec["flow"]],
                    },
                }
            ],
            "identifier": ident,
            "status": rec["status"],
            "intent": "order",
            "authoredOn": rec["created"],
            "lastModified": rec["modified"],
        }
        if rec.get("kvnr"):
            task["for"] = {"identifier": {"system": KVNR_SYSTEM, "value": rec["kvnr"]}}
        if rec.get("pharmacy"):
            task["owner"] = {"identifier": {"system": TELEMATIK_ID_SYSTEM, "value": rec["pharmacy"]}}
        return task

    @staticmethod
    def _require(p: Principal, *roles: str) -> None:
        if p.role not in roles:
            raise RoleError(f"role {p.role!r} may not perform this operation (needs {' or '.join(roles)})")

    @staticmethod
    def _not_cancelled(rec: dict[str, Any]) -> None:
        if rec["status"] == "cancelled":
            raise TaskGoneError("the Task was cancelled; its prescription is deleted")

    # --- operations ----------------------------------------------------------------------------

    def create(self, p: Principal, flow_type: str = "160") -> JSONObject:
        """``POST /Task/$create``: a draft Task with a fresh PrescriptionID and AccessCode.

        Returns:
            The Task (FHIR JSON) including the AccessCode.

        Raises:
            BundleInvalidError: unknown flow type.
        """
        self._require(p, "prescriber")
        if flow_type not in FLOW_TYPES:
            raise BundleInvalidError(f"workflowType must be one of {', '.join(sorted(FLOW_TYPES))}")
        now = self._now()
        for _ in range(16):
            rec = {
                "id": _new_prescription_id(flow_type),
                "flow": flow_type,
                "status": "draft",
                "access_code": secrets.token_hex(32),
                "secret": None,
                "kvnr": None,
                "prescriber": p.id_number,
                "pharmacy": None,
                "created": now,
                "modified": now,
                "signed": None,
                "dispense": None,
                "completed": None,
            }
            try:
                self._save(rec, 0)
                return self._task_json(rec, show_access_code=True, show_secret=False)
            except TaskStateError:
                continue  # PrescriptionID collision: draw another
        raise TaskStateError("could not allocate a PrescriptionID")

    def activate(
        self, p: Principal, task_id: str, access_code: str, signed_prescription: bytes
    ) -> JSONObject:
        """``POST /Task/{id}/$activate``: attach the QES-signed KBV bundle; draft → ready.

        Raises:
            AccessCodeError: wrong AccessCode. TaskStateError: not a draft.
            SignatureFormatError / BundleInvalidError: envelope or bundle rejected (see kbv).
            TaskNotFoundError, TaskGoneError.
        """
        self._require(p, "prescriber")
        rec, version = self._load(task_id)
        self._not_cancelled(rec)
        if not _eq(rec["access_code"], access_code):
            raise AccessCodeError("AccessCode does not match the Task")
        if rec["status"] != "draft":
            raise TaskStateError(f"$activate needs a draft Task; it is {rec['status']}")
        bundle_raw = open_signed_prescription(signed_prescription)
        facts = validate_bundle(parse_bundle_json(bundle_raw), prescription_id=task_id)
        self._index_add(facts.kvnr, task_id)
        rec.update(
            status="ready", kvnr=facts.kvnr, signed=base64.b64encode(bytes(signed_prescription)).decode()
        )
        self._save(rec, version)
        return self._task_json(rec, show_access_code=True, show_secret=False)

    def accept(self, p: Principal, task_id: str, access_code: str) -> JSONObject:
        """``POST /Task/{id}/$accept``: a pharmacy claims the prescription; ready → in-progress.

        Returns:
            A collection Bundle with the Task (with its new Secret) and the signed prescription
            as a Binary.

        Raises:
            AccessCodeError: wrong AccessCode. TaskStateError: not ready (in progress or done).
            TaskNotFoundError, TaskGoneError.
        """
        self._require(p, "pharmacy")
        rec, version = self._load(task_id)
        self._not_cancelled(rec)
        if not _eq(rec["access_code"], access_code):
            raise AccessCodeError("AccessCode does not match the Task")
        if rec["status"] != "ready":
            raise TaskStateError(f"$accept needs a ready Task; it is {rec['status']}")
        rec.update(status="in-progress", secret=secrets.token_hex(32), pharmacy=p.id_number)
        self._save(rec, version)
        return {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": rec["modified"],
            "entry": [
                {
                    "fullUrl": f"Task/{task_id}",
                    "resource": self._task_json(rec, show_access_code=False, show_secret=True),
                },
                {
                    "fullUrl": f"Binary/{task_id}",
                    "resource": {
                        "resourceType": "Binary",
                        "id": task_id,
                        "contentType": "application/pkcs7-mime",
                        "data": rec["signed"],
                    },
                },
            ],
        }

    def _pharmacy_owns(self, p: Principal, rec: dict[str, Any], secret: str) -> None:
        if not _eq(rec.get("secret"), secret) or not _eq(rec.get("pharmacy"), p.id_number):
            raise AccessCodeError("Secret does not match the Task, or another pharmacy accepted it")

    def reject(self, p: Principal, task_id: str, secret: str) -> None:
        """``POST /Task/{id}/$reject``: the pharmacy hands the Task back; in-progress → ready.

        Raises:
            AccessCodeError, TaskStateError, TaskNotFoundError, TaskGoneError.
        """
        self._require(p, "pharmacy")
        rec, version = self._load(task_id)
        self._not_cancelled(rec)
        self._pharmacy_owns(p, rec, secret)
        if rec["status"] != "in-progress":
            raise TaskStateError(f"$reject needs an in-progress Task; it is {rec['status']}")
        rec.update(status="ready", secret=None, pharmacy=None)
        self._save(rec, version)

    def close(self, p: Principal, task_id: str, secret: str, dispense: object) -> JSONObject:
        """``POST /Task/{id}/$close``: record the dispense; in-progress → completed.

        Returns:
            The receipt Bundle (PrescriptionID, digest of the signed prescription, time). It is
            not signed (a production Fachdienst signs its receipt with its own key).

        Raises:
            AccessCodeError, TaskStateError, BundleInvalidError (dispense), TaskNotFoundError,
            TaskGoneError.
        """
        self._require(p, "pharmacy")
        rec, version = self._load(task_id)
        self._not_cancelled(rec)
        self._pharmacy_owns(p, rec, secret)
        if rec["status"] != "in-progress":
            raise TaskStateError(f"$close needs an in-progress Task; it is {rec['status']}")
        validate_dispense(dispense, prescription_id=task_id, kvnr=rec["kvnr"])
        now = self._now()
        digest = hashlib.sha256(base64.b64decode(rec["signed"])).digest()
        rec.update(status="completed", dispense=dispense, completed=now)
        self._save(rec, version)
        return {
            "resourceType": "Bundle",
            "type": "document",
            "timestamp": now,
            "identifier": {"system": PRESCRIPTION_ID_SYSTEM, "value": task_id},
            "entry": [
                {
                    "fullUrl": f"urn:uuid:receipt-{task_id}",
                    "resource": {
                        "resourceType": "Composition",
                        "status": "final",
                        "title": "Quittung",
                        "date": now,
                        "type": {
                            "coding": [
                                {
                                    "system": "https://gematik.de/fhir/erp/CodeSystem/GEM_ERP_CS_DocumentType",
                                    "code": "3",
                                    "display": "Receipt",
                                }
                            ]
                        },
                        "extension": [
                            {
                                "url": "https://gematik.de/fhir/erp/StructureDefinition/GEM_ERP_EX_PrescriptionDigest",
                                "valueString": base64.b64encode(digest).decode(),
                            }
                        ],
                    },
                }
            ],
        }

    def abort(
        self, p: Principal, task_id: str, *, access_code: str | None = None, secret: str | None = None
    ) -> None:
        """``POST /Task/{id}/$abort``: cancel the Task and delete its prescription content.

        Prescriber with AccessCode (draft or ready), insured person for their own ready Task,
        pharmacy with Secret (in progress).

        Raises:
            AccessCodeError, TaskStateError, TaskNotFoundError, TaskGoneError.
        """
        rec, version = self._load(task_id)
        self._not_cancelled(rec)
        if p.role == "prescriber":
            if not _eq(rec["access_code"], access_code):
                raise AccessCodeError("AccessCode does not match the Task")
            if rec["status"] not in ("draft", "ready"):
                raise TaskStateError(f"a prescriber may abort a draft or ready Task; it is {rec['status']}")
        elif p.role == "insured":
            if not _eq(rec.get("kvnr"), p.id_number):
                raise TaskNotFoundError("no Task with this id")
            if rec["status"] != "ready":
                raise TaskStateError(f"an insured person may abort a ready Task; it is {rec['status']}")
        else:
            self._pharmacy_owns(p, rec, secret or "")
            if rec["status"] != "in-progress":
                raise TaskStateError(f"a pharmacy may abort an in-progress Task; it is {rec['status']}")
        rec.update(status="cancelled", signed=None, dispense=None, secret=None, access_code=None)
        self._save(rec, version)

    def get(
        self, p: Principal, task_id: str, *, access_code: str | None = None, secret: str | None = None
    ) -> JSONObject:
        """``GET /Task/{id}``: the insured person sees their Task (with AccessCode); a pharmacy
        sees it with the AccessCode or its Secret.

        Raises:
            TaskNotFoundError (also when the caller may not see it), RoleError.
        """
        self._require(p, "insured", "pharmacy")
        rec, _ = self._load(task_id)
        if p.role == "insured":
            if not _eq(rec.get("kvnr"), p.id_number):
                raise TaskNotFoundError("no Task with this id")
            return self._task_json(rec, show_access_code=True, show_secret=False)
        if not (
            _eq(rec.get("access_code"), access_code)
            or (_eq(rec.get("secret"), secret) and _eq(rec.get("pharmacy"), p.id_number))
        ):
            raise TaskNotFoundError("no Task with this id")
        return self._task_json(rec, show_access_code=False, show_secret=secret is not None)

    def list_for_insured(self, p: Principal) -> JSONObject:
        """``GET /Task``: the insured person's Tasks (KVNR from the access token) as a searchset.

        Index entries whose Task is not (or no longer) for this KVNR are skipped.
        """
        self._require(p, "insured")
        try:
            raw, _ = self.engine.get(NS_KVNR, f"kvnr/{p.id_number}")
            ids = json.loads(raw)
        except RecordNotFoundError:
            ids = []
        tasks = []
        for tid in ids:
            try:
                rec, _ = self._load(tid)
            except TaskNotFoundError:
                continue
            if _eq(rec.get("kvnr"), p.id_number):
                tasks.append(self._task_json(rec, show_access_code=True, show_secret=False))
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(tasks),
            "entry": [
                {"fullUrl": f"Task/{t['id']}", "resource": t, "search": {"mode": "match"}} for t in tasks
            ],
        }
