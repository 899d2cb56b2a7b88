"""The verifier plug-in interface: one module per Evidence type, one :class:`EvidenceVerifier`.

A plug-in checks *authenticity* (signatures, certificate chains to pinned vendor roots,
collateral freshness) and returns normalised :class:`~safehold.attestation.claims.Claims`.
It does not decide whether the claims are *acceptable*: that is the appraisal policy's job
(``safehold.attestation.policy``), which runs after the plug-in (RFC 9334 §3: the Verifier
appraises Evidence against Endorsements, then Reference Values).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from safehold.attestation.claims import Claims
    from safehold.attestation.evidence import Evidence


@runtime_checkable
class EvidenceVerifier(Protocol):
    """One Evidence type's verifier.

    Attributes:
        media_types: the CMW media types this plug-in accepts (see ``evidence.MEDIA_TYPES``).
    """

    media_types: ClassVar[tuple[str, ...]]

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Check the Evidence's signatures and Endorsements and return its claims.

        Args:
            evidence: the Evidence (media type, raw bytes, optional endorsements).
            at: verification time (timezone-aware) for certificate and collateral validity;
                None means now. Tests always pass a pinned time.

        Raises:
            EvidenceFormatError: truncated, garbled or unsupported Evidence.
            EvidenceSignatureError: a signature does not verify.
            EndorsementError: certificates/collateral missing, expired, revoked or not
                chaining to the pinned root.
        """
        ...
