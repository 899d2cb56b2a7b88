"""Gramine SGX DCAP Attester: Evidence from Gramine's ``/dev/attestation`` pseudo-files.

Gramine (docs "Attestation and Secret Provisioning", ``/dev/attestation`` interface):

* ``attestation_type`` — ``"dcap"`` when DCAP quotes are available (``"epid"``, ``"none"``);
* ``user_report_data`` — write exactly 64 bytes: the REPORTDATA of the next quote;
* ``quote`` — read the SGX ECDSA (DCAP) quote over the last ``user_report_data``.

Writes and reads are done with whole-file ``open``/``write``/``read`` as Gramine requires.
The root directory is configurable so tests can point it at a stand-in directory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

from safehold.attestation.attesters.base import Attester
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.attestation.verifiers.dcap import TEE_SGX, parse_quote
from safehold.errors import AttestationError, EvidenceFormatError


class GramineAttester(Attester):
    """SGX DCAP quotes through Gramine's ``/dev/attestation``.

    Args:
        root: directory of the attestation pseudo-files (default ``/dev/attestation``).

    Raises (from :meth:`attest`):
        ValueError: report_data is not 64 bytes.
        AttestationError: the interface is absent, not DCAP, or returned a quote that is
            malformed or does not carry the requested report_data.
    """

    tee_type: ClassVar[str] = "sgx"
    _lock = threading.Lock()  # user_report_data → quote is a two-step protocol per process

    def __init__(self, root: str | os.PathLike[str] = "/dev/attestation") -> None:
        self.root = Path(root)

    def attest(self, report_data: bytes) -> Evidence:
        """Write ``report_data`` (64 B), read the quote, check it binds ``report_data``."""
        rd = self.check_report_data(report_data)
        atype = self.root / "attestation_type"
        with self._lock:
            try:
                if atype.exists():
                    kind = atype.read_text().strip()
                    if kind != "dcap":
                        raise AttestationError(f"Gramine attestation_type: expected 'dcap', got {kind!r:.20}")
                with open(self.root / "user_report_data", "wb", buffering=0) as f:
                    f.write(rd)
                with open(self.root / "quote", "rb", buffering=0) as f:
                    quote = f.read()
            except OSError as e:
                raise AttestationError(
                    f"Gramine attestation interface {self.root} failed: {e.strerror or e}"
                ) from None
        try:
            q = parse_quote(quote)
        except EvidenceFormatError as e:
            raise AttestationError(f"Gramine returned a malformed quote: {e}") from None
        if q.tee_type != TEE_SGX:
            raise AttestationError("Gramine returned a non-SGX quote")
        if q.body[320:384] != rd:
            raise AttestationError(
                "Gramine quote report_data: expected the 64 bytes just written, got other bytes"
            )
        return Evidence(MEDIA_TYPES["sgx"], q.quote)
