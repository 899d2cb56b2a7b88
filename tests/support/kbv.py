"""KBV-style prescription bundles (KBV_PR_ERP_Bundle 1.1 shape) and their CMS signatures, for tests.

The "QES" here is a CMS SignedData made with pyca/cryptography's PKCS#7 builder under a
self-issued test certificate: it has the format of the real thing, not an HBA behind it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from safehold.erezept.kbv import PRESCRIPTION_ID_SYSTEM
from safehold.erezept.sample import DOCTOR, PRACTICE, build_bundle
from safehold.erezept.sample import Drug as _Drug
from safehold.erezept.sample import Person as _Person

__all__ = ["DOCTOR", "DRUGS", "PATIENTS", "PRACTICE", "Drug", "Person", "TestSigner", "build_bundle",
           "dispense", "kvnr"]


def kvnr(letter: str, eight: str) -> str:
    """A KVNR with the right check digit for ``letter`` + 8 digits."""
    digits = f"{ord(letter) - 64:02d}" + eight
    total = 0
    for i, c in enumerate(digits):
        p = int(c) * (1 if i % 2 == 0 else 2)
        total += p // 10 + p % 10
    return f"{letter}{eight}{total % 10}"


@dataclass
class Person(_Person):
    """:class:`safehold.erezept.sample.Person` with the strings a test looks for in the database."""

    def secrets(self) -> list[str]:
        """Strings that must never reach the database in clear."""
        out = [self.family, self.kvnr, *self.given]
        out += [x for x in (self.own_name,) if x]
        return out


@dataclass
class Drug(_Drug):
    """:class:`safehold.erezept.sample.Drug` with the strings a test looks for in the database."""

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
