"""Reader for the recorded ePA 3 session ``app-Tiger/vau3traffic.tgr`` (RBel JSON lines).

The recording was made by an old lib-vau. Its legacy encodings are accepted **only here**:
Kyber768_PK wrapped in an ASN.1 SubjectPublicKeyInfo (1208 bytes), signature-ES256 as DER,
and request counters written as a 4-byte integer followed by 4 zero bytes. The production
decoders in safehold.vau.epa refuse all three.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from asn1crypto import core


@dataclass
class Recorded:
    start_line: str
    headers: dict[str, str]
    body: bytes


def read_recording(data: bytes) -> list[Recorded]:
    out = []
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        raw = base64.b64decode(json.loads(line)["rawMessageContent"])
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for h in lines[1:]:
            name, sep, value = h.partition(":")
            if sep:
                headers[name.strip()] = value.strip()
        out.append(Recorded(lines[0], headers, body))
    return out


def legacy_kyber_public_key(spki: bytes) -> bytes:
    """The raw 1184-byte key inside the old BouncyCastle SubjectPublicKeyInfo wrapping."""
    seq = core.Sequence.load(spki)  # SubjectPublicKeyInfo {AlgorithmIdentifier, BIT STRING}
    assert seq[0][0].dotted == "1.3.6.1.4.1.22554.5.6.2"  # BouncyCastle's Kyber768 OID
    raw = seq[1].contents[1:]  # BIT STRING: skip the unused-bits byte
    assert len(raw) == 1184, len(raw)
    return raw


def legacy_counter(header: bytes) -> int:
    """Request counter of an old-format user-data header: 4-byte int, then 4 zero bytes."""
    assert header[7:11] == b"\x00\x00\x00\x00", "not the legacy counter layout"
    return int.from_bytes(header[3:7], "big")
