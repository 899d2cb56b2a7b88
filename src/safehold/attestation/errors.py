"""Appraisal outcomes of :mod:`safehold.attestation.checks`: one :class:`~safehold.errors.AppraisalError`
subclass per failure kind (``failures`` lists every failed claim), and the warning category for
accepted simulated Evidence. The other attestation errors (Evidence format and signature,
endorsements, EAR results) are in :mod:`safehold.errors`.
"""

from __future__ import annotations

from safehold.errors import AppraisalError

__all__ = [
    "DebugModeError",
    "ReferenceValueMismatchError",
    "ReportDataMismatchError",
    "SimulatedEvidenceError",
    "SimulatedTEEWarning",
    "TcbStatusError",
    "TeeTypeError",
]


class SimulatedTEEWarning(UserWarning):
    """Simulated (not hardware-protected) Evidence was accepted because the policy allows it."""


# --- distinct appraisal errors ---------------------------------------------------------------


class SimulatedEvidenceError(AppraisalError):
    """Evidence comes from the simulated TEE and the policy does not set ``allow_simulated``."""


class TeeTypeError(AppraisalError):
    """The Evidence's TEE type is not in ``allowed_tee_types``."""


class DebugModeError(AppraisalError):
    """The TEE runs in debug mode (memory not protected) and ``debug_allowed`` is false."""


class ReportDataMismatchError(AppraisalError):
    """report_data is not the expected nonce / key binding (stale, replayed or relayed Evidence)."""


class ReferenceValueMismatchError(AppraisalError):
    """Measurement, signer, product id or security version does not match the Reference Values."""


class TcbStatusError(AppraisalError):
    """The platform TCB status or an applicable advisory is not accepted."""


