"""Verifier plug-in for the SIMULATED TEE (development and CI only — no hardware protection).

Evidence format (media type ``application/vnd.safehold.simulated-report+cbor``):

* ``Evidence.data`` = CBOR (RFC 8949) array ``[report: bstr, signature: bstr]``;
* ``report`` = deterministically encoded (RFC 8949 §4.2) CBOR map with text keys
  ``format`` = ``"safehold-simulated-report"``, ``version`` = 1, ``tee`` = ``"simulated"``,
  ``measurement`` (bstr, 48 B, see ``safehold.attestation.measure``), ``report_data``
  (bstr, 64 B), ``debug`` (bool), ``timestamp`` (uint, Unix seconds);
* ``signature`` = ECDSA P-384 / SHA-384 (FIPS 186-5), DER-encoded (RFC 3279 §2.2.3), by the
  simulated platform key over :data:`SIGNING_PREFIX` ``|| report``;
* Endorsement ``platform_cert``: the DER X.509 certificate of the simulated platform key,
  issued by the simulated root CA. The Verifier is configured with the root(s) it trusts —
  like pinning the AMD ARK or the Intel SGX Root CA for hardware Evidence.

Authenticity only; the appraisal policy decides whether simulated Evidence is acceptable at
all (``allow_simulated``, default false).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from safehold.attestation.certs import load_certificate
from safehold.attestation.claims import Claims
from safehold.attestation.collateral import check_validity
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.errors import EndorsementError, EvidenceFormatError, EvidenceSignatureError

MEDIA_TYPE = MEDIA_TYPES["simulated"]
REPORT_FORMAT = "safehold-simulated-report"
REPORT_VERSION = 1
#: Domain separation so a simulated-platform signature can never be replayed as anything else.
SIGNING_PREFIX = b"safehold simulated TEE report v1\x00"
PLATFORM_CERT = "platform_cert"
MEASUREMENT_LEN = 48
REPORT_DATA_LEN = 64
_KEYS = {"format", "version", "tee", "measurement", "report_data", "debug", "timestamp"}


@dataclass(frozen=True)
class SimulatedReport:
    """A parsed (not yet verified) simulated report.

    Attributes:
        report: the signed CBOR bytes; signature: DER ECDSA signature; measurement: 48 B;
        report_data: 64 B; debug: debug flag; timestamp: Unix seconds at signing.
    """

    report: bytes
    signature: bytes
    measurement: bytes
    report_data: bytes
    debug: bool
    timestamp: int


def encode_report(*, measurement: bytes, report_data: bytes, debug: bool, timestamp: int) -> bytes:
    """Encode the to-be-signed report (deterministic CBOR map, see module docstring)."""
    return cbor2.dumps(
        {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "tee": "simulated",
            "measurement": measurement,
            "report_data": report_data,
            "debug": debug,
            "timestamp": timestamp,
        },
        canonical=True,
    )


def parse_report(data: bytes) -> SimulatedReport:
    """Parse ``Evidence.data`` of a simulated report without checking the signature.

    Raises:
        EvidenceFormatError: not CBOR, wrong structure, unknown format/version, wrong field
            types or lengths, trailing bytes.
    """
    outer = _loads(data, "simulated Evidence")
    if not isinstance(outer, list | tuple) or len(outer) != 2 or not all(
        isinstance(x, bytes) for x in outer
    ):
        raise EvidenceFormatError("simulated Evidence: expected a CBOR array [report, signature]")
    report, sig = outer
    m = _loads(report, "simulated report")
    if not isinstance(m, dict) or set(m) != _KEYS:
        got = sorted(map(str, m)) if isinstance(m, dict) else type(m).__name__
        raise EvidenceFormatError(f"simulated report: expected fields {sorted(_KEYS)}, got {got}")
    if m["format"] != REPORT_FORMAT or m["tee"] != "simulated":
        raise EvidenceFormatError(
            f"simulated report: format expected {REPORT_FORMAT!r}, got {m['format']!r:.40}"
        )
    if m["version"] != REPORT_VERSION or isinstance(m["version"], bool):
        raise EvidenceFormatError(
            f"simulated report: version expected {REPORT_VERSION}, got {m['version']!r:.20}"
        )
    for name, n in (("measurement", MEASUREMENT_LEN), ("report_data", REPORT_DATA_LEN)):
        v = m[name]
        if not isinstance(v, bytes) or len(v) != n:
            size = len(v) if isinstance(v, bytes) else type(v).__name__
            raise EvidenceFormatError(f"simulated report: {name} expected {n} bytes, got {size}")
    if not isinstance(m["debug"], bool):
        raise EvidenceFormatError("simulated report: debug must be a boolean")
    ts = m["timestamp"]
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**63:
        raise EvidenceFormatError("simulated report: timestamp must be a non-negative integer")
    return SimulatedReport(report, sig, m["measurement"], m["report_data"], m["debug"], ts)


def _loads(data: bytes, what: str) -> object:
    if not isinstance(data, bytes | bytearray) or not data:
        raise EvidenceFormatError(f"{what} is empty")
    try:
        obj, rest = _decode_one(bytes(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError, LookupError) as e:
        raise EvidenceFormatError(f"{what} is not valid CBOR: {type(e).__name__}") from None
    if rest:
        raise EvidenceFormatError(f"{what} has {rest} trailing bytes after the CBOR item")
    return obj


def _decode_one(data: bytes) -> tuple[object, int]:
    import io

    fp = io.BytesIO(data)
    obj = cbor2.CBORDecoder(fp).decode()
    return obj, len(data) - fp.tell()


class SimulatedVerifier:
    """Checks a SIMULATED report: platform certificate chains to a configured simulated root,
    and the report signature verifies under the platform key.

    Args:
        trusted_roots: PEM or DER certificates of simulated root CAs to trust (see
            ``SimulatedAttester.root_ca_pem``). With none configured every report is refused.

    Raises (from :meth:`verify`):
        EvidenceFormatError, EvidenceSignatureError, EndorsementError.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPE,)

    def __init__(self, *, trusted_roots: Iterable[bytes | str] = ()) -> None:
        self._roots: list[x509.Certificate] = []
        for r in trusted_roots:
            raw = r.encode("ascii") if isinstance(r, str) else bytes(r)
            self._roots.append(load_certificate(raw, "simulated root CA", EndorsementError))

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify simulated Evidence and return its claims (``tcb_status="Simulated"``).

        Raises:
            EvidenceFormatError: wrong media type, malformed report or platform certificate.
            EndorsementError: no trusted simulated root configured, the platform certificate
                is missing, not issued by a trusted root, or outside its validity at ``at``.
            EvidenceSignatureError: the report signature does not verify.
        """
        if evidence.media_type != MEDIA_TYPE:
            raise EvidenceFormatError(
                f"simulated Verifier: media type expected {MEDIA_TYPE!r}, got {evidence.media_type!r}"
            )
        rep = parse_report(evidence.data)
        der = evidence.endorsements.get(PLATFORM_CERT)
        if der is None:
            raise EndorsementError("simulated Evidence lacks the 'platform_cert' Endorsement")
        if bytes(der).lstrip().startswith(b"-----"):
            raise EvidenceFormatError("simulated platform certificate must be DER, got PEM")
        leaf = load_certificate(bytes(der), "simulated platform certificate", EvidenceFormatError)
        if not self._roots:
            raise EndorsementError(
                "no simulated root CA is configured: set simulated_root in the appraisal policy"
            )
        when = at or datetime.now(UTC)
        for root in self._roots:
            try:
                leaf.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            check_validity("simulated root CA", root.not_valid_before_utc, root.not_valid_after_utc, when)
            break
        else:
            raise EndorsementError(
                "simulated platform certificate does not chain to a trusted simulated root CA"
            )
        check_validity("simulated platform certificate", leaf.not_valid_before_utc,
                       leaf.not_valid_after_utc, when)
        pub = leaf.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp384r1":
            raise EndorsementError("simulated platform key is not ECDSA P-384")
        try:
            pub.verify(rep.signature, SIGNING_PREFIX + rep.report, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise EvidenceSignatureError(
                "simulated report signature does not verify under the platform key"
            ) from None
        return Claims(
            tee_type="simulated",
            measurement=rep.measurement,
            report_data=rep.report_data,
            debug=rep.debug,
            tcb_status="Simulated",
            raw={
                "format": REPORT_FORMAT,
                "version": REPORT_VERSION,
                "timestamp": rep.timestamp,
                "platform_cert_subject": leaf.subject.rfc4514_string(),
            },
        )
