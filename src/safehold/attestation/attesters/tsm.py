"""Linux configfs-tsm Attester for TDX and SEV-SNP guests (``/sys/kernel/config/tsm/report``).

Kernel ABI (Documentation/ABI/testing/configfs-tsm): ``mkdir <root>/<entry>`` creates a
report request with these attributes:

* ``inblob`` (write, 64 bytes): the report_data;
* ``outblob`` (read): the TDX quote or SEV-SNP report generated for the last inblob;
* ``auxblob`` (read, SEV-SNP): the certificate table (GHCB extended guest request): entries
  ``GUID (16 B) | offset u32 | length u32`` terminated by an all-zero entry, GUIDs for VCEK
  ``63da758d-e664-4564-adc5-f4b93be8accd``, VLEK ``a8074bc2-a25a-483e-aae6-39c045a0b8a1``,
  ASK ``4ab7b379-bbac-4fe4-a02f-05aef327c782``, ARK ``c0b406a4-a803-4952-9743-3fb6014cd0ae``;
* ``provider`` (read): ``tdx_guest`` or ``sev_guest``;
* ``generation`` (read): write counter; if it advanced by more than our one write, another
  writer raced us and the outblob may not be ours — retried.

An entry we create is removed (``rmdir``) afterwards; an existing ``entry`` is reused.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.attesters.base import Attester
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers.dcap import parse_quote
from safehold.attestation.verifiers.sev_snp import parse_report
from safehold.errors import AttestationError, EvidenceFormatError

GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


def parse_cert_table(aux: bytes) -> dict[str, bytes]:
    """Parse an SNP certificate table into endorsements ``vcek``/``vlek`` (DER) and
    ``cert_chain`` (PEM ASK then ARK).

    The GUIDs are stored in the little-endian mixed encoding (as ``uuid.UUID(bytes_le=...)``).

    Raises:
        AttestationError: an entry points outside the blob or the table is unterminated.
    """
    out: dict[str, bytes] = {}
    chain: list[bytes] = []
    pos = 0
    while True:
        if pos + 24 > len(aux):
            raise AttestationError("SNP certificate table (auxblob) is not terminated")
        guid = uuid.UUID(bytes_le=aux[pos : pos + 16])
        off, length = struct.unpack_from("<II", aux, pos + 16)
        pos += 24
        if guid.int == 0 and off == 0 and length == 0:
            break
        if off + length > len(aux):
            raise AttestationError(f"SNP certificate table entry {guid} points outside the auxblob")
        der = aux[off : off + length]
        if guid == GUID_VCEK:
            out["vcek"] = der
        elif guid == GUID_VLEK:
            out["vlek"] = der
        elif guid in (GUID_ASK, GUID_ARK):
            try:
                pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            except ValueError:
                raise AttestationError(f"SNP certificate table entry {guid} is not DER") from None
            chain.insert(0 if guid == GUID_ASK else len(chain), pem)
    if chain:
        out["cert_chain"] = b"".join(chain)
    return out


def build_cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """Inverse of :func:`parse_cert_table` (what the host/firmware supplies as auxblob)."""
    head = 24 * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, der in entries:
        table += guid.bytes_le + struct.pack("<II", head + len(blobs), len(der))
        blobs += der
    return table + bytes(24) + blobs


class TsmAttester(Attester):
    """TDX quotes / SEV-SNP reports through configfs-tsm.

    Args:
        root: the configfs-tsm report directory (default ``/sys/kernel/config/tsm/report``).
        entry: reuse this existing entry name instead of creating a fresh one.
        retries: attempts when another writer races on the same entry.

    Raises (from :meth:`attest`):
        ValueError: report_data is not 64 bytes.
        AttestationError: interface absent, unknown provider, persistent races, or an
            outblob that does not carry the requested report_data.
    """

    tee_type: ClassVar[str] = "tdx"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/sys/kernel/config/tsm/report",
        *,
        entry: str | None = None,
        retries: int = 3,
    ) -> None:
        self.root = Path(root)
        self.entry = entry
        self.retries = retries

    def attest(self, report_data: bytes) -> Evidence:
        """Write ``report_data`` to inblob and return the outblob as Evidence."""
        rd = self.check_report_data(report_data)
        created = self.entry is None
        d = self.root / (self.entry or f"safehold-{uuid.uuid4().hex[:16]}")
        try:
            if created:
                d.mkdir()
            for _ in range(max(1, self.retries)):
                ev = self._once(d, rd)
                if ev is not None:
                    return ev
            raise AttestationError(f"configfs-tsm entry {d.name}: concurrent writers, gave up")
        except OSError as e:
            raise AttestationError(f"configfs-tsm interface {d} failed: {e.strerror or e}") from None
        finally:
            if created:
                try:
                    d.rmdir()
                except OSError:
                    pass  # the kernel removes attributes with the entry; nothing half-written

    def _once(self, d: Path, rd: bytes) -> Evidence | None:
        provider = (d / "provider").read_text().strip()
        tee = _PROVIDERS.get(provider)
        if tee is None:
            raise AttestationError(
                f"configfs-tsm provider: expected tdx_guest or sev_guest, got {provider!r:.20}"
            )
        gen0 = int((d / "generation").read_text().strip() or 0)
        with open(d / "inblob", "wb", buffering=0) as f:
            f.write(rd)
        out = (d / "outblob").read_bytes()
        aux = (d / "auxblob").read_bytes() if (d / "auxblob").exists() else b""
        gen1 = int((d / "generation").read_text().strip() or 0)
        if gen1 > gen0 + 1:
            return None  # someone else wrote inblob between our write and read
        ends: dict[str, bytes] = {}
        if tee == "tdx":
            try:
                q = parse_quote(out)
            except EvidenceFormatError as e:
                raise AttestationError(f"configfs-tsm returned a malformed TDX quote: {e}") from None
            got = q.body[520:584]
            out = q.quote
        else:
            try:
                got = parse_report(out).report_data
            except EvidenceFormatError as e:
                raise AttestationError(f"configfs-tsm returned a malformed SNP report: {e}") from None
            if aux:
                ends = parse_cert_table(aux)
        if got != rd:
            raise AttestationError(
                "configfs-tsm outblob report_data: expected the 64 bytes written to inblob, got other bytes"
            )
        return Evidence(MEDIA_TYPES[tee], out, ends)
