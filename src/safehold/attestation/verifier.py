"""The Verifier (RFC 9334 §3.2): authenticity via a per-Evidence-type plug-in, then appraisal
of the resulting claims against an :class:`~safehold.attestation.policy.AppraisalPolicy`.

.. code-block:: python

    policy = AppraisalPolicy.from_toml("policy.toml")
    verifier = Verifier(policy)
    appraisal = verifier.appraise(evidence, expected_report_data=rd)   # raises on failure
    for row in appraisal.verdicts: print(row.claim, row.expected, row.got, row.ok)

Plug-ins (``safehold.attestation.verifiers.PLUGINS``) are built once per TEE type as
``cls(**options)``, where ``options`` = ``verifier_options[<tee type>]`` (e.g. collateral,
pinned roots). They must be constructible without options (using their pinned vendor roots).
For ``simulated`` the policy's ``simulated_root`` is passed as ``trusted_roots``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from safehold.attestation.checks import Verdict, raise_for
from safehold.attestation.claims import Claims
from safehold.attestation.evidence import Evidence
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifiers import verifier_class
from safehold.attestation.verifiers.base import EvidenceVerifier
from safehold.errors import AppraisalError, ConfigError, EvidenceFormatError

#: Identifies this Verifier in EAR ``ear.verifier-id`` (draft-ietf-rats-ear §3.1).
VERIFIER_DEVELOPER = "https://safehold.dev"


@dataclass(frozen=True)
class Appraisal:
    """The outcome of appraising one piece of Evidence.

    Attributes:
        claims: the verified claims.
        verdicts: every checked claim as ``(claim, expected, got, ok)`` rows.
        policy_name: the policy's ``name``.
    """

    claims: Claims
    verdicts: tuple[Verdict, ...]
    policy_name: str = "default"
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every verdict passed."""
        return all(v.ok for v in self.verdicts)

    @property
    def failures(self) -> list[Verdict]:
        """The failed verdicts."""
        return [v for v in self.verdicts if not v.ok]

    def raise_for_failures(self) -> None:
        """Raise the most specific :class:`AppraisalError` naming every failed claim, if any."""
        raise_for(self.verdicts, f"Evidence appraisal failed under policy {self.policy_name!r}")


class Verifier:
    """Verify and appraise Evidence of any supported type under one policy.

    Args:
        policy: the appraisal policy.
        verifier_options: TEE type → keyword options for that plug-in's constructor.

    Raises:
        ConfigError: the policy's ``simulated_root`` cannot be read.
    """

    def __init__(self, policy: AppraisalPolicy, *,
                 verifier_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.policy = policy
        self._options = {k: dict(v) for k, v in (verifier_options or {}).items()}
        if policy.simulated_root is not None:
            try:
                root = policy.simulated_root.read_bytes()
            except OSError as e:
                raise ConfigError(
                    f"cannot read simulated_root {policy.simulated_root}: {e.strerror}"
                ) from None
            opts = self._options.setdefault("simulated", {})
            opts["trusted_roots"] = [*opts.get("trusted_roots", ()), root]
        self._plugins: dict[str, EvidenceVerifier] = {}

    def plugin(self, media_type: str) -> EvidenceVerifier:
        """The (cached) plug-in instance for ``media_type``.

        Raises:
            EvidenceFormatError: no plug-in for that media type, or it is unavailable.
        """
        p = self._plugins.get(media_type)
        if p is None:
            cls = verifier_class(media_type)
            tee = Evidence(media_type, b"").tee_type
            try:
                p = cls(**self._options.get(tee, {}))
            except TypeError as e:
                raise ConfigError(f"verifier_options for {tee!r} do not fit its plug-in: {e}") from None
            self._plugins[media_type] = p
        return p

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Authenticity only: run the plug-in and return the claims.

        Raises:
            EvidenceFormatError, EvidenceSignatureError, EndorsementError: from the plug-in.
        """
        if not isinstance(evidence, Evidence):
            raise EvidenceFormatError(f"expected Evidence, got {type(evidence).__name__}")
        return self.plugin(evidence.media_type).verify(evidence, at=at)

    def evaluate(self, evidence: Evidence, *, expected_report_data: bytes | None = None,
                 at: datetime | None = None) -> Appraisal:
        """Verify, then appraise; return the :class:`Appraisal` even when claims fail the policy.

        Raises:
            EvidenceFormatError, EvidenceSignatureError, EndorsementError: Evidence is not
                authentic (no claims to show).
        """
        claims = self.verify(evidence, at=at)
        return self.evaluate_claims(claims, expected_report_data=expected_report_data)

    def evaluate_claims(self, claims: Claims, *, expected_report_data: bytes | None = None) -> Appraisal:
        """Appraise already-verified claims (no raising on failure)."""
        rows = tuple(self.policy.verdicts(claims, expected_report_data=expected_report_data))
        warns: tuple[str, ...] = ()
        if claims.tee_type == "simulated":
            warns += ("SIMULATED TEE: not hardware-protected",)
        if claims.debug:
            warns += ("DEBUG TEE: the host can read its memory",)
        return Appraisal(claims, rows, self.policy.name, warns)

    def appraise(self, evidence: Evidence, *, expected_report_data: bytes | None = None,
                 at: datetime | None = None) -> Appraisal:
        """Verify and appraise; raise unless every claim satisfies the policy.

        Args:
            evidence: the Evidence.
            expected_report_data: the 64 bytes report_data must equal (nonce or key binding).
            at: verification time for certificates/collateral (None = now).

        Raises:
            EvidenceFormatError, EvidenceSignatureError, EndorsementError: not authentic.
            AppraisalError: a subclass naming every failed claim, expected vs. got (see
                ``policy.ERROR_CLASSES``).
        """
        a = self.evaluate(evidence, expected_report_data=expected_report_data, at=at)
        a.raise_for_failures()
        return a


__all__ = ["Appraisal", "AppraisalError", "Verifier", "VERIFIER_DEVELOPER"]
