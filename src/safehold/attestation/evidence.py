"""Evidence and its CMW transport encoding (draft-ietf-rats-msg-wrap, JSON serialisation).

Evidence is what an Attester produces (RFC 9334 §3.1): a TEE-specific signed report, plus
optional Endorsements carried alongside it (e.g. a PCK or VCEK certificate chain, collateral).

Wire form:

* Evidence without endorsements: a CMW JSON *record* ``["<media-type>", "<base64url bytes>"]``
  (draft-ietf-rats-msg-wrap §3.1; base64url without padding, RFC 4648 §5).
* Evidence with endorsements: a CMW JSON *collection* (§3.3) — an object whose ``"evidence"``
  member is the record above and whose other members (``"vcek"``, ``"cert_chain"``,
  ``"collateral"``, …) are records of the endorsements; ``"__cmwc_t"`` names the collection
  type :data:`COLLECTION_TYPE`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from safehold.errors import EvidenceFormatError

#: Media types of the Evidence formats Safehold understands.
MEDIA_TYPES = {
    "simulated": "application/vnd.safehold.simulated-report+cbor",
    "sgx": "application/vnd.intel.sgx.quote",
    "tdx": "application/vnd.intel.tdx.quote",
    "sev-snp": "application/vnd.amd.sev-snp.report",
    "azure-sev-snp": "application/vnd.microsoft.azure.hcl-report.snp",
    "azure-tdx": "application/vnd.microsoft.azure.hcl-report.tdx",
    "tpm": "application/vnd.tcg.tpm2.quote",
}
COLLECTION_TYPE = "tag:safehold.dev,2026:evidence-with-endorsements"
#: Upper bound on one Evidence blob (a TDX quote with chain is ~5 KiB; an HCL report ~2.6 KiB).
MAX_EVIDENCE_BYTES = 256 * 1024
_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")


@dataclass(frozen=True)
class Evidence:
    """Evidence as produced by an Attester.

    Attributes:
        media_type: one of :data:`MEDIA_TYPES` values.
        data: the raw Evidence bytes (quote, report, signed simulated report).
        endorsements: name → bytes (DER/PEM certificates, collateral JSON), may be empty.
    """

    media_type: str
    data: bytes
    endorsements: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def tee_type(self) -> str:
        """The TEE type for :attr:`media_type`.

        Raises:
            EvidenceFormatError: the media type is not one Safehold knows.
        """
        for tee, mt in MEDIA_TYPES.items():
            if mt == self.media_type:
                return tee
        raise EvidenceFormatError(f"unsupported Evidence media type {self.media_type!r}")

    def to_cmw(self) -> str:
        """Encode as a CMW JSON record, or a CMW collection when endorsements are present."""
        rec = _record(self.media_type, self.data)
        if not self.endorsements:
            return json.dumps(rec, separators=(",", ":"))
        coll: dict[str, object] = {"__cmwc_t": COLLECTION_TYPE, "evidence": rec}
        for name, blob in sorted(self.endorsements.items()):
            coll[name] = _record("application/octet-stream", blob)
        return json.dumps(coll, separators=(",", ":"))

    @classmethod
    def from_cmw(cls, text: str | bytes) -> Evidence:
        """Decode :meth:`to_cmw` output.

        Raises:
            EvidenceFormatError: not JSON, not a CMW record/collection, bad base64url,
                an unknown media type, or bytes over :data:`MAX_EVIDENCE_BYTES`.
        """
        if isinstance(text, bytes | bytearray):
            if len(text) > 4 * MAX_EVIDENCE_BYTES:
                raise EvidenceFormatError("CMW is larger than the Evidence size limit")
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvidenceFormatError(f"CMW is not UTF-8 text: {e.reason}") from None
        if len(text) > 4 * MAX_EVIDENCE_BYTES:
            raise EvidenceFormatError("CMW is larger than the Evidence size limit")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise EvidenceFormatError(f"CMW is not valid JSON: {e}") from None
        if isinstance(obj, list):
            mt, data = _unrecord(obj, "record")
            ev = cls(mt, data)
        elif isinstance(obj, dict):
            if obj.get("__cmwc_t") != COLLECTION_TYPE:
                raise EvidenceFormatError(
                    f"CMW collection type: expected {COLLECTION_TYPE!r}, got {obj.get('__cmwc_t')!r}"
                )
            if "evidence" not in obj:
                raise EvidenceFormatError("CMW collection has no 'evidence' member")
            mt, data = _unrecord(obj["evidence"], "evidence")
            ends = {}
            for name, rec in obj.items():
                if name in ("__cmwc_t", "evidence"):
                    continue
                if not isinstance(name, str) or not name:
                    raise EvidenceFormatError("CMW collection has an empty member name")
                ends[name] = _unrecord(rec, name)[1]
            ev = cls(mt, data, ends)
        else:
            raise EvidenceFormatError(
                f"CMW: expected a JSON array (record) or object (collection), got {type(obj).__name__}"
            )
        ev.tee_type  # noqa: B018 - validates the media type
        return ev


def _record(media_type: str, data: bytes) -> list[str]:
    return [media_type, base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")]


def _unrecord(obj: object, where: str) -> tuple[str, bytes]:
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise EvidenceFormatError(f"CMW {where}: expected [type, value(, indicator)], got {obj!r:.60}")
    mt, val = obj[0], obj[1]
    if not isinstance(mt, str) or not _MEDIA_TYPE_RE.match(mt):
        raise EvidenceFormatError(f"CMW {where}: type is not a media type: {mt!r:.60}")
    if not isinstance(val, str):
        raise EvidenceFormatError(f"CMW {where}: value must be a base64url string")
    if len(obj) == 3 and (not isinstance(obj[2], int) or isinstance(obj[2], bool) or obj[2] < 0):
        raise EvidenceFormatError(f"CMW {where}: indicator must be a non-negative integer")
    if not re.fullmatch(r"[A-Za-z0-9_-]*", val):
        raise EvidenceFormatError(f"CMW {where}: value is not base64url (RFC 4648 §5)")
    try:
        data = base64.urlsafe_b64decode(val + "=" * (-len(val) % 4))
    except (binascii.Error, ValueError) as e:
        raise EvidenceFormatError(f"CMW {where}: bad base64url: {e}") from None
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceFormatError(
            f"CMW {where}: {len(data)} bytes exceeds the limit of {MAX_EVIDENCE_BYTES}"
        )
    return mt, data
