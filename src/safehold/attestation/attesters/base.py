"""The Attester interface (RFC 9334 §3.1): produce Evidence that binds 64 bytes of report_data.

Implementations: ``simulated`` (development and CI), ``gramine`` (SGX DCAP under Gramine,
``/dev/attestation``) and ``tsm`` (Linux configfs-tsm for TDX and SEV-SNP guests).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from safehold.attestation.evidence import Evidence

#: report_data is always exactly this many bytes (SGX/TDX REPORTDATA, SNP REPORT_DATA).
REPORT_DATA_LEN = 64


class Attester(ABC):
    """A TEE-side producer of Evidence.

    Attributes:
        tee_type: the TEE type of the Evidence it produces (see ``claims.TEE_TYPES``).
    """

    tee_type: ClassVar[str]

    @abstractmethod
    def attest(self, report_data: bytes) -> Evidence:
        """Return fresh Evidence binding ``report_data``.

        Args:
            report_data: exactly 64 bytes (callers zero-pad a 32-byte hash).

        Raises:
            ValueError: ``report_data`` is not 64 bytes.
            AttestationError: the TEE interface failed or is absent.
        """

    @staticmethod
    def check_report_data(report_data: bytes) -> bytes:
        """Return ``report_data`` if it is 64 bytes, else raise ValueError naming the length."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
            n = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data)
            raise ValueError(f"report_data must be {REPORT_DATA_LEN} bytes, got {n}")
        return bytes(report_data)
