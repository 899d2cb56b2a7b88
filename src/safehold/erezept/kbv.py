"""The signed KBV prescription (``KBV_PR_ERP_Bundle``): CMS envelope and bundle structure.

What ``$activate`` receives is the prescriber's qualified electronic signature (QES) over the
bundle: a CMS SignedData (RFC 5652; CAdES enveloping) whose encapsulated content is the bundle.

**Verified** here:

* the signature envelope's *format*: a DER ``ContentInfo`` of type signedData, encapsulated
  content present (enveloping, not detached) of type ``data``, at least one SignerInfo, each
  naming a certificate contained in the envelope, with signed attributes holding content-type
  and a ``message-digest`` equal to the digest of the encapsulated content (SHA-256/384/512);
* the bundle's structure (:func:`validate_bundle`): FHIR R4 document Bundle with the KBV
  profile, the PrescriptionID of the Task, a Composition first, exactly one Patient carrying a
  KVNR (pattern and check digit), Practitioner, Organization, MedicationRequest, Medication and
  Coverage, the references the KBV profiles require between them, and that **every** reference
  in the bundle resolves to an entry; FHIR dates (year-only and 29 February allowed, invalid
  calendar dates refused).

**Not verified**: the signature value itself, the signer certificate's chain to the TI trust list
(TSL), that it is a qualified HBA certificate of a physician, its OCSP status, the signing time,
and conformance to every constraint of the KBV FHIR profiles (terminologies, value sets,
slicing). A production Fachdienst checks all of these (gemSpec_FD_eRp); Safehold does not yet.
Only FHIR JSON bundles are accepted (no XML).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from asn1crypto import cms

from safehold.erezept.errors import BundleInvalidError, SignatureFormatError
from safehold.erezept.tokens import kvnr_valid
from safehold.jsontypes import JSONValue

__all__ = [
    "KVNR_SYSTEMS",
    "PRESCRIPTION_ID_SYSTEM",
    "BundleFacts",
    "open_signed_prescription",
    "valid_fhir_date",
    "validate_bundle",
    "validate_dispense",
]

PRESCRIPTION_ID_SYSTEM = "https://gematik.de/fhir/erp/NamingSystem/GEM_ERP_NS_PrescriptionId"
KVNR_SYSTEMS = ("http://fhir.de/sid/gkv/kvid-10", "http://fhir.de/NamingSystem/gkv/kvid-10")
BUNDLE_PROFILE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_ERP_Bundle"
COMPOSITION_PROFILE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_ERP_Composition"
MAX_SIGNED_SIZE = 2 * 1024 * 1024

_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")
_DIGESTS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def valid_fhir_date(value: object) -> bool:
    """FHIR R4 ``date``: ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``, a real calendar date."""
    if not isinstance(value, str):
        return False
    m = _DATE.fullmatch(value)
    if m is None:
        return False
    y, mo, d = m.group(1), m.group(2), m.group(3)
    try:
        dt.date(int(y), int(mo or 1), int(d or 1))
    except ValueError:
        return False
    return int(y) >= 1


# --- CMS envelope ------------------------------------------------------------------------------


def open_signed_prescription(data: bytes) -> bytes:
    """Check the CMS SignedData envelope's format and return the encapsulated bundle bytes.

    Raises:
        SignatureFormatError: any rule in the module docstring's "verified" list is broken.
    """
    if not isinstance(data, bytes | bytearray) or not data:
        raise SignatureFormatError("signed prescription is empty")
    if len(data) > MAX_SIGNED_SIZE:
        raise SignatureFormatError(f"signed prescription exceeds {MAX_SIGNED_SIZE} bytes")
    try:
        info = cms.ContentInfo.load(bytes(data), strict=True)
        if info["content_type"].native != "signed_data":
            raise SignatureFormatError("signed prescription is not a CMS SignedData")
        sd = info["content"]
        encap = sd["encap_content_info"]
        if encap["content_type"].native != "data":
            raise SignatureFormatError("signed content type is not id-data")
        content = encap["content"].native
        if not isinstance(content, bytes) or not content:
            raise SignatureFormatError("signature is detached: the bundle is not enveloped in the CMS")
        certs = [c.chosen for c in sd["certificates"] or [] if c.name == "certificate"]
        signers = list(sd["signer_infos"])
        if not signers:
            raise SignatureFormatError("CMS SignedData has no SignerInfo (no signature)")
        if not certs:
            raise SignatureFormatError("CMS SignedData carries no signer certificate")
        for si in signers:
            _check_signer(si, certs, content)
    except SignatureFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - asn1crypto raises ValueError/TypeError/... on garbage
        raise SignatureFormatError(f"signed prescription is not valid DER CMS ({type(e).__name__})") from None
    return bytes(content)


def _check_signer(si: Any, certs: list[Any], content: bytes) -> None:
    sid = si["sid"]
    if sid.name == "issuer_and_serial_number":
        want = (sid.chosen["issuer"].dump(), sid.chosen["serial_number"].native)
        found = any((c.issuer.dump(), c.serial_number) == want for c in certs)
    else:
        found = any(c.key_identifier == sid.chosen.native for c in certs)
    if not found:
        raise SignatureFormatError("SignerInfo names a certificate that is not in the envelope")
    if not si["signature"].native:
        raise SignatureFormatError("SignerInfo has an empty signature value")
    attrs = si["signed_attrs"]
    if not attrs:
        raise SignatureFormatError("SignerInfo has no signed attributes (CAdES requires them)")
    by_type = {a["type"].native: a["values"] for a in attrs}
    if "content_type" not in by_type or "message_digest" not in by_type:
        raise SignatureFormatError("signed attributes lack content-type or message-digest")
    algo = si["digest_algorithm"]["algorithm"].native
    if algo not in _DIGESTS:
        raise SignatureFormatError(f"digest algorithm {algo} is not SHA-256/384/512")
    if by_type["message_digest"][0].native != _DIGESTS[algo](content).digest():
        raise SignatureFormatError("message-digest attribute does not match the enveloped bundle")


# --- bundle --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleFacts:
    """What the Fachdienst takes from a valid bundle. ``repr`` hides the KVNR."""

    prescription_id: str
    kvnr: str

    def __repr__(self) -> str:
        return f"BundleFacts(prescription_id={self.prescription_id!r})"


def _refs(obj: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield path, v
            else:
                yield from _refs(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _refs(v, f"{path}[{i}]")


class _Index:
    """Resolves references against the bundle's entries (FHIR R4 Bundle §3.3.1.4.1 rules)."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.by_url: dict[str, dict[str, Any]] = {}
        self.by_type_id: dict[tuple[str, str], dict[str, Any]] = {}
        for e in entries:
            r = e["resource"]
            self.by_url[e["fullUrl"]] = r
            if isinstance(r.get("id"), str):
                self.by_type_id[(r["resourceType"], r["id"])] = r

    def resolve(self, ref: str) -> dict[str, Any] | None:
        if ref in self.by_url:
            return self.by_url[ref]
        parts = ref.rstrip("/").split("/")
        if len(parts) >= 2:
            return self.by_type_id.get((parts[-2], parts[-1]))
        return None


def _ref_of(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("reference"), str):
        return obj["reference"]
    return None


def _profiles(res: dict[str, Any]) -> list[str]:
    meta = res.get("meta")
    prof = meta.get("profile") if isinstance(meta, dict) else None
    return [p for p in prof if isinstance(p, str)] if isinstance(prof, list) else []


def _first(by_type: Mapping[str, list[dict[str, Any]]], rtype: str) -> dict[str, Any] | None:
    """The first resource of ``rtype`` in the Bundle, or None."""
    found = by_type.get(rtype)
    return found[0] if found else None


def validate_bundle(bundle: object, *, prescription_id: str) -> BundleFacts:
    """Check a ``KBV_PR_ERP_Bundle`` (FHIR JSON, parsed) as the module docstring lists.

    Raises:
        BundleInvalidError: with ``problems`` naming every failed rule (paths, never values).
    """
    p: list[str] = []
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BundleInvalidError("prescription is not a FHIR Bundle")
    if bundle.get("type") != "document":
        p.append("Bundle.type must be 'document'")
    if not any(x.split("|")[0] == BUNDLE_PROFILE for x in _profiles(bundle)):
        p.append("Bundle.meta.profile lacks KBV_PR_ERP_Bundle")
    ident = bundle.get("identifier")
    if not isinstance(ident, dict) or ident.get("system") != PRESCRIPTION_ID_SYSTEM:
        p.append("Bundle.identifier must be a PrescriptionID")
    elif ident.get("value") != prescription_id:
        p.append("Bundle.identifier PrescriptionID differs from the Task's")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise BundleInvalidError("KBV bundle is invalid", p + ["Bundle.entry is empty"])
    good = []
    for i, e in enumerate(entries):
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("fullUrl"), str)
            or not isinstance(e.get("resource"), dict)
        ):
            p.append(f"Bundle.entry[{i}] needs fullUrl and resource")
        elif not isinstance(e["resource"].get("resourceType"), str):
            p.append(f"Bundle.entry[{i}].resource lacks resourceType")
        else:
            good.append(e)
    if len({e["fullUrl"] for e in good}) != len(good):
        p.append("Bundle.entry fullUrls are not unique")
    idx = _Index(good)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in good:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    for i, e in enumerate(good):
        for path, ref in _refs(e["resource"], f"Bundle.entry[{i}].resource"):
            if idx.resolve(ref) is None:
                p.append(f"{path} does not resolve to a bundle entry")

    def target(obj: Any, rtype: str, path: str) -> dict[str, Any] | None:
        ref = _ref_of(obj)
        if ref is None:
            p.append(f"{path} is missing")
            return None
        res = idx.resolve(ref)
        if res is not None and res["resourceType"] != rtype:
            p.append(f"{path} must reference a {rtype}")
            return None
        return res

    for rtype in (
        "Composition",
        "Patient",
        "Practitioner",
        "Organization",
        "MedicationRequest",
        "Medication",
        "Coverage",
    ):
        n = len(by_type.get(rtype, []))
        if n == 0:
            p.append(f"bundle has no {rtype}")
        elif n > 1 and rtype in ("Composition", "Patient", "MedicationRequest", "Coverage"):
            p.append(f"bundle has {n} {rtype} resources, expected one")
    if good and good[0]["resource"]["resourceType"] != "Composition":
        p.append("the first entry of a document Bundle must be the Composition")

    comp = _first(by_type, "Composition")
    if comp is not None:
        if not any(x.split("|")[0] == COMPOSITION_PROFILE for x in _profiles(comp)):
            p.append("Composition.meta.profile lacks KBV_PR_ERP_Composition")
        target(comp.get("subject"), "Patient", "Composition.subject")
        authors = comp.get("author")
        if not isinstance(authors, list) or not any(
            (r := idx.resolve(_ref_of(a) or "")) is not None and r["resourceType"] == "Practitioner"
            for a in authors
        ):
            p.append("Composition.author must include the Practitioner")
        target(comp.get("custodian"), "Organization", "Composition.custodian")
        section_targets = {
            (r or {}).get("resourceType")
            for s in comp.get("section") or []
            if isinstance(s, dict)
            for ent in s.get("entry") or []
            for r in [idx.resolve(_ref_of(ent) or "")]
        }
        for rtype in ("MedicationRequest", "Coverage"):
            if rtype not in section_targets:
                p.append(f"Composition.section must list the {rtype}")

    kvnr = ""
    pat = _first(by_type, "Patient")
    if pat is not None:
        ids = [
            i for i in pat.get("identifier") or [] if isinstance(i, dict) and i.get("system") in KVNR_SYSTEMS
        ]
        if len(ids) != 1 or not isinstance(ids[0].get("value"), str):
            p.append("Patient.identifier must hold exactly one KVNR (kvid-10)")
        elif not kvnr_valid(ids[0]["value"]):
            p.append("Patient.identifier KVNR is malformed or its check digit is wrong")
        else:
            kvnr = ids[0]["value"]
        names = pat.get("name")
        if not isinstance(names, list) or not any(
            isinstance(n, dict) and isinstance(n.get("family"), str) and n["family"].strip() for n in names
        ):
            p.append("Patient.name needs a family name")
        if not valid_fhir_date(pat.get("birthDate")):
            p.append("Patient.birthDate is missing or not a valid FHIR date")

    for prac in by_type.get("Practitioner", []):
        if not isinstance(prac.get("name"), list) or not prac["name"]:
            p.append("Practitioner.name is missing")
    mr = _first(by_type, "MedicationRequest")
    if mr is not None:
        if mr.get("intent") != "order":
            p.append("MedicationRequest.intent must be 'order'")
        if mr.get("status") != "active":
            p.append("MedicationRequest.status must be 'active'")
        target(mr.get("subject"), "Patient", "MedicationRequest.subject")
        target(mr.get("requester"), "Practitioner", "MedicationRequest.requester")
        target(mr.get("medicationReference"), "Medication", "MedicationRequest.medicationReference")
        ins = mr.get("insurance")
        if not isinstance(ins, list) or not ins:
            p.append("MedicationRequest.insurance is missing")
        else:
            target(ins[0], "Coverage", "MedicationRequest.insurance[0]")
        if "authoredOn" in mr and not valid_fhir_date(mr["authoredOn"]):
            p.append("MedicationRequest.authoredOn is not a valid FHIR date")
    cov = _first(by_type, "Coverage")
    if cov is not None:
        target(cov.get("beneficiary"), "Patient", "Coverage.beneficiary")
        payor = cov.get("payor")
        if (
            not isinstance(payor, list)
            or not payor
            or not isinstance(payor[0], dict)
            or not (isinstance(payor[0].get("identifier"), dict) and payor[0]["identifier"].get("value"))
        ):
            p.append("Coverage.payor needs the insurer's identifier (IKNR)")
    for med in by_type.get("Medication", []):
        if not isinstance(med.get("code"), dict):
            p.append("Medication.code is missing")
    if p:
        raise BundleInvalidError("KBV bundle is invalid", p)
    return BundleFacts(prescription_id, kvnr)


def parse_bundle_json(raw: bytes) -> JSONValue:
    """Parse the enveloped bundle as FHIR JSON.

    Raises:
        BundleInvalidError: not UTF-8 JSON (XML bundles are not supported).
    """
    if raw.lstrip()[:1] == b"<":
        raise BundleInvalidError("XML bundles are not supported; sign the FHIR JSON representation")
    try:
        value: JSONValue = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleInvalidError("enveloped prescription is not UTF-8 FHIR JSON") from None
    return value


def validate_dispense(dispense: object, *, prescription_id: str, kvnr: str) -> None:
    """Check a MedicationDispense for ``$close``: resourceType, the Task's PrescriptionID, the
    insured person's KVNR and ``whenHandedOver``.

    Raises:
        BundleInvalidError: with the failed rules.
    """
    p: list[str] = []
    if not isinstance(dispense, dict) or dispense.get("resourceType") != "MedicationDispense":
        raise BundleInvalidError("$close needs a MedicationDispense")
    ids = dispense.get("identifier")
    if not isinstance(ids, list) or not any(
        isinstance(i, dict)
        and i.get("system") == PRESCRIPTION_ID_SYSTEM
        and i.get("value") == prescription_id
        for i in ids
    ):
        p.append("MedicationDispense.identifier must carry the Task's PrescriptionID")
    subj = dispense.get("subject")
    ident = subj.get("identifier") if isinstance(subj, dict) else None
    if not isinstance(ident, dict) or ident.get("system") not in KVNR_SYSTEMS or ident.get("value") != kvnr:
        p.append("MedicationDispense.subject must name the prescription's insured person (KVNR)")
    if not isinstance(dispense.get("whenHandedOver"), str) or not valid_fhir_date(
        dispense["whenHandedOver"][:10]
    ):
        p.append("MedicationDispense.whenHandedOver is missing or malformed")
    if p:
        raise BundleInvalidError("MedicationDispense is invalid", p)
