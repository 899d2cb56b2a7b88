"""Sample KBV prescription bundles for trying the E-Rezept flow by hand (``safehold erezept
sample-bundle``, the README) — the KBV_PR_ERP_Bundle 1.1 shape that ``$activate`` checks
(:mod:`safehold.erezept.kbv`), and a development CMS signer whose "signature" has the format of a
QES (CMS SignedData, RFC 5652) and none of its meaning: a self-issued certificate, no HBA.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from safehold.erezept.kbv import PRESCRIPTION_ID_SYSTEM

__all__ = ["DOCTOR", "PRACTICE", "Drug", "Person", "build_bundle", "dev_sign", "dispense"]


@dataclass
class Person:
    """A person in a bundle: given names, family name, FHIR birth date, KVNR; optional German
    name parts (Vorsatzwort ``own_prefix``, ``own_name``, Namenszusatz, academic ``prefix``)."""

    given: list[str]
    family: str
    birth_date: str
    kvnr: str
    own_prefix: str | None = None
    own_name: str | None = None
    namenszusatz: str | None = None
    prefix: list[str] = field(default_factory=list)


@dataclass
class Drug:
    """A medication: name, PZN, KBV dosage form code."""

    name: str
    pzn: str
    form: str = "TAB"


#: The sample prescriber and practice of every bundle (development and tests).
DOCTOR = Person(["Hans"], "Topp-Glücklich", "1970", "", prefix=["Dr. med."])
PRACTICE = "Hausarztpraxis Dr. Topp-Glücklich, Musterstraße 1, 10623 Berlin"


def _name(p: Person) -> dict[str, Any]:
    name: dict[str, Any] = {"use": "official", "family": p.family, "given": p.given}
    ext = []
    if p.namenszusatz:
        ext.append(
            {
                "url": "http://fhir.de/StructureDefinition/humanname-namenszusatz",
                "valueString": p.namenszusatz,
            }
        )
    if p.own_name:
        ext.append(
            {"url": "http://hl7.org/fhir/StructureDefinition/humanname-own-name", "valueString": p.own_name}
        )
    if p.own_prefix:
        ext.append(
            {
                "url": "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix",
                "valueString": p.own_prefix,
            }
        )
    if ext:
        name["_family"] = {"extension": ext}
    if p.prefix:
        name["prefix"] = p.prefix
    return name


def build_bundle(
    prescription_id: str, patient: Person, drug: Drug, *, authored_on: str = "2025-03-01"
) -> dict[str, Any]:
    """A KBV_PR_ERP_Bundle (FHIR R4 JSON document) for ``patient`` and ``drug`` with urn:uuid
    fullUrls, under ``prescription_id`` (the Task's PrescriptionID)."""
    ids = {k: str(uuid.uuid4()) for k in ("comp", "mr", "med", "pat", "prac", "org", "cov")}

    def ref(k: str) -> dict[str, str]:
        return {"reference": f"urn:uuid:{ids[k]}"}

    res = {
        "comp": {
            "resourceType": "Composition",
            "id": ids["comp"],
            "meta": {"profile": ["https://fhir.kbv.de/StructureDefinition/KBV_PR_ERP_Composition|1.1.0"]},
            "status": "final",
            "title": "elektronische Arzneimittelverordnung",
            "date": authored_on + "T08:00:00+01:00",
            "type": {
                "coding": [
                    {"system": "https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_FORMULAR_ART", "code": "e16A"}
                ]
            },
            "subject": ref("pat"),
            "author": [ref("prac")],
            "custodian": ref("org"),
            "section": [
                {"code": {"coding": [{"code": "Prescription"}]}, "entry": [ref("mr")]},
                {"code": {"coding": [{"code": "Coverage"}]}, "entry": [ref("cov")]},
            ],
        },
        "mr": {
            "resourceType": "MedicationRequest",
            "id": ids["mr"],
            "status": "active",
            "intent": "order",
            "medicationReference": ref("med"),
            "subject": ref("pat"),
            "requester": ref("prac"),
            "insurance": [ref("cov")],
            "authoredOn": authored_on,
            "dosageInstruction": [{"text": "1-0-1"}],
            "dispenseRequest": {
                "quantity": {"value": 1, "system": "http://unitsofmeasure.org", "code": "{Package}"}
            },
        },
        "med": {
            "resourceType": "Medication",
            "id": ids["med"],
            "code": {
                "coding": [{"system": "http://fhir.de/CodeSystem/ifa/pzn", "code": drug.pzn}],
                "text": drug.name,
            },
            "form": {
                "coding": [
                    {
                        "system": "https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_DARREICHUNGSFORM",
                        "code": drug.form,
                    }
                ]
            },
        },
        "pat": {
            "resourceType": "Patient",
            "id": ids["pat"],
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://fhir.de/CodeSystem/identifier-type-de-basis", "code": "GKV"}
                        ]
                    },
                    "system": "http://fhir.de/sid/gkv/kvid-10",
                    "value": patient.kvnr,
                }
            ],
            "name": [_name(patient)],
            "birthDate": patient.birth_date,
        },
        "prac": {
            "resourceType": "Practitioner",
            "id": ids["prac"],
            "identifier": [
                {"system": "https://fhir.kbv.de/NamingSystem/KBV_NS_Base_ANR", "value": "838382202"}
            ],
            "name": [_name(DOCTOR)],
        },
        "org": {
            "resourceType": "Organization",
            "id": ids["org"],
            "name": PRACTICE,
            "identifier": [
                {"system": "https://fhir.kbv.de/NamingSystem/KBV_NS_Base_BSNR", "value": "031234567"}
            ],
        },
        "cov": {
            "resourceType": "Coverage",
            "id": ids["cov"],
            "status": "active",
            "beneficiary": ref("pat"),
            "payor": [
                {
                    "identifier": {"system": "http://fhir.de/sid/arge-ik/iknr", "value": "104212059"},
                    "display": "AOK Rheinland/Hamburg",
                }
            ],
        },
    }
    order = ["comp", "mr", "med", "pat", "prac", "org", "cov"]
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": ["https://fhir.kbv.de/StructureDefinition/KBV_PR_ERP_Bundle|1.1.0"]},
        "identifier": {"system": PRESCRIPTION_ID_SYSTEM, "value": prescription_id},
        "type": "document",
        "timestamp": authored_on + "T08:00:00+01:00",
        "entry": [{"fullUrl": f"urn:uuid:{ids[k]}", "resource": res[k]} for k in order],
    }


def dev_sign(content: bytes) -> bytes:
    """CMS SignedData (RFC 5652, enveloping, DER) over ``content`` under a fresh self-issued
    P-256 certificate named TEST-ONLY: the format ``$activate`` checks, no qualified signature."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs7
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Safehold development signer TEST-ONLY")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return (pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))


def dispense(prescription_id: str, kvnr: str, telematik_id: str, handed_over: str) -> dict[str, Any]:
    """A MedicationDispense for ``$close`` (FHIR R4; ``handed_over`` a FHIR date)."""
    return {
        "resourceType": "MedicationDispense",
        "identifier": [{"system": PRESCRIPTION_ID_SYSTEM, "value": prescription_id}],
        "status": "completed",
        "subject": {"identifier": {"system": "http://fhir.de/sid/gkv/kvid-10", "value": kvnr}},
        "performer": [{"actor": {"identifier": {"system": "https://gematik.de/fhir/sid/telematik-id",
                                                "value": telematik_id}}}],
        "whenHandedOver": handed_over,
    }
