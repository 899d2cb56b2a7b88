"""KBV-style prescription bundles (KBV_PR_ERP_Bundle 1.1 shape) and their CMS signatures, for tests.

The "QES" here is a CMS SignedData made with pyca/cryptography's PKCS#7 builder under a
self-issued test certificate: it has the format of the real thing, not an HBA behind it.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from safehold.erezept.kbv import PRESCRIPTION_ID_SYSTEM


def kvnr(letter: str, eight: str) -> str:
    """A KVNR with the right check digit for ``letter`` + 8 digits."""
    digits = f"{ord(letter) - 64:02d}" + eight
    total = 0
    for i, c in enumerate(digits):
        p = int(c) * (1 if i % 2 == 0 else 2)
        total += p // 10 + p % 10
    return f"{letter}{eight}{total % 10}"


@dataclass
class Person:
    given: list[str]
    family: str
    birth_date: str
    kvnr: str
    own_prefix: str | None = None  # Vorsatzwort ("von", "von und zu")
    own_name: str | None = None
    namenszusatz: str | None = None  # "Freiherr", "Graf"
    prefix: list[str] = field(default_factory=list)  # "Dr."

    def secrets(self) -> list[str]:
        """Strings that must never reach the database in clear."""
        out = [self.family, self.kvnr, *self.given]
        out += [x for x in (self.own_name,) if x]
        return out


@dataclass
class Drug:
    name: str
    pzn: str
    form: str = "TAB"

    def secrets(self) -> list[str]:
        return [self.name, self.pzn]


PATIENTS = [
    Person(["Ludger"], "Königsstein", "1935-06-22", kvnr("K", "22063515")),
    Person(
        ["Karl-Theodor", "Maria"],
        "von und zu Müller-Lüdenscheidt",
        "1952",
        kvnr("M", "52010101"),
        own_prefix="von und zu",
        own_name="Müller-Lüdenscheidt",
        namenszusatz="Freiherr",
    ),
    Person(["Zoë"], "Çelik-Weiß", "2004-02-29", kvnr("Z", "04022900")),
    Person(
        ["Heinz-Jürgen"],
        "von Bülow",
        "1961-02",
        kvnr("B", "61020277"),
        own_prefix="von",
        own_name="Bülow",
        namenszusatz="Graf",
    ),
]
DRUGS = [
    Drug("Ibuprofen AL 600 mg Filmtabletten", "04020784"),
    Drug("Amoxicillin-ratiopharm 1000 mg", "03480453"),
    Drug("Metformin Lich 850 mg", "06313409"),
    Drug("Salbutamol-ratiopharm N Dosieraerosol", "00725734", "DOS"),
]
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
    """A KBV_PR_ERP_Bundle (FHIR JSON) for ``patient`` and ``drug`` with urn:uuid fullUrls."""
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


class TestSigner:
    """A self-issued "HBA" certificate and key that sign bundles as CMS SignedData (enveloping)."""

    __test__ = False

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Dr. med. Hans Topp-Glücklich TEST-ONLY")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )

    def sign(self, content: bytes, *, detached: bool = False) -> bytes:
        opts = [pkcs7.PKCS7Options.Binary] + ([pkcs7.PKCS7Options.DetachedSignature] if detached else [])
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(self.cert, self.key, hashes.SHA256())
            .sign(serialization.Encoding.DER, opts)
        )

    def sign_bundle(self, bundle: dict[str, Any]) -> bytes:
        return self.sign(json.dumps(bundle, ensure_ascii=False).encode("utf-8"))


def dispense(prescription_id: str, patient: Person, telematik_id: str) -> dict[str, Any]:
    """A MedicationDispense for ``$close``."""
    return {
        "resourceType": "MedicationDispense",
        "identifier": [{"system": PRESCRIPTION_ID_SYSTEM, "value": prescription_id}],
        "status": "completed",
        "subject": {"identifier": {"system": "http://fhir.de/sid/gkv/kvid-10", "value": patient.kvnr}},
        "performer": [
            {
                "actor": {
                    "identifier": {
                        "system": "https://gematik.de/fhir/sid/telematik-id",
                        "value": telematik_id,
                    }
                }
            }
        ],
        "whenHandedOver": "2025-03-02",
    }
