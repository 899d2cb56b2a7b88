"""Helpers for the discovery tests: real phone numbers from the shared patient data, KVNRs,
and the client side of the OPRF run against a service object."""

from __future__ import annotations

import json
from collections.abc import Sequence

from safehold.crypto import oprf
from safehold.discovery.core import DiscoveryService
from safehold.discovery.identifiers import E164, kvnr_check_digit, oprf_input
from tests.support.shared import shared_path


def patient_phone_numbers() -> list[str]:
    """Canonical E.164 numbers from the ``telecom`` entries of the HL7 FHIR Patient examples
    (region NL for numbers written without +, as the examples are Dutch) — those valid per
    libphonenumber, de-duplicated, in file order."""
    folder = shared_path("data", "hl7-fhir-r4-patient-examples")
    kind, seen, out = E164(), set(), []
    for path in sorted(folder.glob("Patient-*.json")):
        for tel in json.loads(path.read_text("utf-8")).get("telecom", []):
            if tel.get("system") != "phone" or not tel.get("value"):
                continue
            try:
                num = kind.normalise(tel["value"], "NL")
            except ValueError:
                continue
            if num not in seen:
                seen.add(num)
                out.append(num)
    return out


def synthetic_numbers(count: int, prefix: str = "+4915") -> list[str]:
    """``count`` distinct valid German mobile numbers (+4915x…), canonical."""
    kind, out, n = E164(), [], 0
    while len(out) < count:
        cand = f"{prefix}{n:09d}"
        n += 1
        try:
            out.append(kind.normalise(cand))
        except ValueError:
            continue
    return out


def kvnrs(count: int, letter: str = "A") -> list[str]:
    """``count`` distinct valid KVNRs starting with ``letter``."""
    out = []
    for n in range(count):
        first9 = f"{letter}{n:08d}"
        out.append(first9 + str(kvnr_check_digit(first9)))
    return out


def client_outputs(service: DiscoveryService, client: str,
                   identifiers: Sequence[tuple[str, str]]) -> list[bytes]:
    """What a client computes: Blind → the service's evaluate → Finalize."""
    inputs = [oprf_input(k, i) for k, i in identifiers]
    b = oprf.blind(inputs)
    return oprf.finalize(inputs, b.blinds, service.evaluate(client, b.elements))
