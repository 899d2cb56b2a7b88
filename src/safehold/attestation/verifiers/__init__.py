"""Verifier plug-ins, one module per Evidence type, looked up by CMW media type.

Plug-in modules register themselves by adding ``media_type → "module:Class"`` to
:data:`PLUGINS`; classes load lazily so a missing optional dependency (e.g. ``dcap-qvl``)
only affects its own Evidence type.
"""

from __future__ import annotations

import importlib

from safehold.attestation.evidence import MEDIA_TYPES
from safehold.attestation.verifiers.base import EvidenceVerifier
from safehold.errors import EvidenceFormatError

#: media type → "module:Class" of its :class:`EvidenceVerifier`.
PLUGINS: dict[str, str] = {
    MEDIA_TYPES["simulated"]: "safehold.attestation.verifiers.simulated:SimulatedVerifier",
    MEDIA_TYPES["sgx"]: "safehold.attestation.verifiers.sgx:SgxVerifier",
    MEDIA_TYPES["tdx"]: "safehold.attestation.verifiers.tdx:TdxVerifier",
    MEDIA_TYPES["sev-snp"]: "safehold.attestation.verifiers.sev_snp:SevSnpVerifier",
    MEDIA_TYPES["azure-sev-snp"]: "safehold.attestation.verifiers.azure:AzureSnpVerifier",
    MEDIA_TYPES["azure-tdx"]: "safehold.attestation.verifiers.azure:AzureTdxVerifier",
    MEDIA_TYPES["tpm"]: "safehold.attestation.verifiers.tpm:TpmQuoteVerifier",
}


def verifier_class(media_type: str) -> type[EvidenceVerifier]:
    """Return the plug-in class for ``media_type``.

    Raises:
        EvidenceFormatError: no plug-in handles that media type.
    """
    target = PLUGINS.get(media_type)
    if target is None:
        raise EvidenceFormatError(f"no Verifier plug-in for Evidence media type {media_type!r}")
    mod_name, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise EvidenceFormatError(
            f"Verifier plug-in for {media_type!r} is not available ({e.name})"
        ) from None
    cls: type[EvidenceVerifier] = getattr(mod, cls_name)
    return cls
