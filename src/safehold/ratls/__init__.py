"""RA-TLS: X.509 certificates that carry Evidence bound to their key; server TLS contexts; an
httpx client transport that attests the server before the first byte of application data.

See ``safehold.ratls.cert`` for the wire format (Gramine >= 1.8 compatible) and
docs/attestation.md.
"""

from safehold.ratls.cert import (
    OID_GRAMINE_LEGACY_QUOTE,
    OID_TCG_DICE_TAGGED_EVIDENCE,
    TAG_INTEL_TEE_QUOTE,
    TAG_SAFEHOLD_CMW,
    RATLSEvidence,
    RATLSIdentity,
    create_identity,
    parse_certificate,
)
from safehold.ratls.errors import (
    CertificateFormatError,
    ClaimsFormatError,
    EvidenceExtensionError,
    KeyBindingError,
    MissingEvidenceError,
    NonceMismatchError,
    UnknownEvidenceTagError,
)
from safehold.ratls.memkey import load_chain_from_memory, ssl_context_from_memory
from safehold.ratls.server import server_ssl_context
from safehold.ratls.verify import evaluate_certificate, verify_certificate

__all__ = [
    "OID_GRAMINE_LEGACY_QUOTE", "OID_TCG_DICE_TAGGED_EVIDENCE", "TAG_INTEL_TEE_QUOTE",
    "TAG_SAFEHOLD_CMW", "RATLSEvidence", "RATLSIdentity", "create_identity", "parse_certificate",
    "CertificateFormatError", "ClaimsFormatError", "EvidenceExtensionError", "KeyBindingError",
    "MissingEvidenceError", "NonceMismatchError", "UnknownEvidenceTagError", "server_ssl_context",
    "load_chain_from_memory", "ssl_context_from_memory", "evaluate_certificate", "verify_certificate",
]
