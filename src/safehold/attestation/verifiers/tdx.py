"""Intel TDX quote verifier (quote v4 with TD report 1.0, v5 with TD report 1.0 / 1.5).

Normalised claims: measurement = MRTD (48 B), report_data (64 B), debug = TD_ATTRIBUTES bit 0
(TUD.DEBUG), tcb_status and advisory_ids; ``raw`` holds RTMR0-3, MRSEAM, MRSIGNERSEAM,
TD_ATTRIBUTES, XFAM, MRCONFIGID, MROWNER, MROWNERCONFIG, TEE_TCB_SVN (and TEE_TCB_SVN2,
MRSERVICETD for TDX 1.5). Layout: Intel TDX DCAP Quoting Library API §A.3.2 "TD Quote Body".
"""

from __future__ import annotations

import struct
from typing import ClassVar

from safehold.attestation.claims import Claims
from safehold.attestation.evidence import MEDIA_TYPES
from safehold.attestation.verifiers.dcap import TEE_TDX, DcapQuote, DcapVerifier, _Chain

#: TD_ATTRIBUTES bit 0: the TD is debuggable (its memory is not confidential).
TD_ATTR_DEBUG = 1 << 0

_FIELDS = (
    ("tee_tcb_svn", 0, 16),
    ("mr_seam", 16, 64),
    ("mr_signer_seam", 64, 112),
    ("seam_attributes", 112, 120),
    ("td_attributes", 120, 128),
    ("xfam", 128, 136),
    ("mr_td", 136, 184),
    ("mr_config_id", 184, 232),
    ("mr_owner", 232, 280),
    ("mr_owner_config", 280, 328),
    ("rtmr0", 328, 376),
    ("rtmr1", 376, 424),
    ("rtmr2", 424, 472),
    ("rtmr3", 472, 520),
    ("report_data", 520, 584),
)
_FIELDS_15 = (("tee_tcb_svn2", 584, 600), ("mr_servicetd", 600, 648))


def td_report_fields(body: bytes) -> dict[str, str]:
    """Decode a TD quote body (584 B TDX 1.0 or 648 B TDX 1.5) to named lowercase-hex fields.

    Raises:
        ValueError: the body is neither 584 nor 648 bytes.
    """
    if len(body) not in (584, 648):
        raise ValueError(f"TD quote body must be 584 or 648 bytes, got {len(body)}")
    fields = _FIELDS + (_FIELDS_15 if len(body) == 648 else ())
    return {name: body[a:b].hex() for name, a, b in fields}


class TdxVerifier(DcapVerifier):
    """Verifier plug-in for Intel TDX quotes (media type ``application/vnd.intel.tdx.quote``).

    See :class:`~safehold.attestation.verifiers.dcap.DcapVerifier` for arguments and errors.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["tdx"],)
    tee_name: ClassVar[str] = "tdx"
    tee_code: ClassVar[int] = TEE_TDX

    @classmethod
    def claims_for(
        cls, q: DcapQuote, ch: _Chain, status: str | None, adv: tuple[str, ...], with_coll: bool
    ) -> Claims:
        b = q.body
        raw: dict[str, object] = dict(td_report_fields(b))
        raw["tdx_module"] = "1.5" if len(b) == 648 else "1.0"
        raw.update(cls._common_raw(q, ch, status, adv, with_coll))
        attrs = struct.unpack_from("<Q", b, 120)[0]
        return Claims(
            tee_type="tdx",
            measurement=b[136:184],
            report_data=b[520:584],
            debug=bool(attrs & TD_ATTR_DEBUG),
            tcb_status=status,
            advisory_ids=adv,
            raw=raw,
        )
