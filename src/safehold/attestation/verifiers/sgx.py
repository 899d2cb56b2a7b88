"""Intel SGX DCAP quote verifier (quote v3, and v4/v5 with an SGX body).

Normalised claims (``Claims``): measurement = MRENCLAVE (32 B), signer = MRSIGNER (32 B),
product_id = ISVPRODID, security_version = ISVSVN, debug = ATTRIBUTES.DEBUG (bit 1 of the
64-bit flags), report_data (64 B), tcb_status and advisory_ids from the TCB evaluation.
SGX report body layout: Intel SGX Developer Reference, "REPORT" / SGX ECDSA Quote Library API
§A.4 "Enclave Report Body".
"""

from __future__ import annotations

import struct
from typing import ClassVar

from safehold.attestation.claims import Claims
from safehold.attestation.evidence import MEDIA_TYPES
from safehold.attestation.verifiers.dcap import TEE_SGX, DcapQuote, DcapVerifier, _Chain

#: SGX ATTRIBUTES.FLAGS bit 1: the enclave was launched in debug mode.
SGX_FLAG_DEBUG = 1 << 1


def sgx_body_fields(body: bytes) -> dict[str, object]:
    """Decode a 384-byte SGX report body into named fields (bytes as lowercase hex).

    Raises:
        ValueError: ``body`` is not 384 bytes.
    """
    if len(body) != 384:
        raise ValueError(f"SGX report body must be 384 bytes, got {len(body)}")
    return {
        "cpu_svn": body[0:16].hex(),
        "misc_select": struct.unpack_from("<I", body, 16)[0],
        "isv_ext_prod_id": body[32:48].hex(),
        "attributes": body[48:64].hex(),
        "mr_enclave": body[64:96].hex(),
        "mr_signer": body[128:160].hex(),
        "config_id": body[192:256].hex(),
        "isv_prod_id": struct.unpack_from("<H", body, 256)[0],
        "isv_svn": struct.unpack_from("<H", body, 258)[0],
        "config_svn": struct.unpack_from("<H", body, 260)[0],
        "isv_family_id": body[304:320].hex(),
        "report_data": body[320:384].hex(),
    }


class SgxVerifier(DcapVerifier):
    """Verifier plug-in for Intel SGX DCAP quotes (media type ``application/vnd.intel.sgx.quote``).

    See :class:`~safehold.attestation.verifiers.dcap.DcapVerifier` for arguments and errors.
    """

    media_types: ClassVar[tuple[str, ...]] = (MEDIA_TYPES["sgx"],)
    tee_name: ClassVar[str] = "sgx"
    tee_code: ClassVar[int] = TEE_SGX

    @classmethod
    def claims_for(
        cls, q: DcapQuote, ch: _Chain, status: str | None, adv: tuple[str, ...], with_coll: bool
    ) -> Claims:
        b = q.body
        raw = sgx_body_fields(b)
        raw.update(cls._common_raw(q, ch, status, adv, with_coll))
        flags = struct.unpack_from("<Q", b, 48)[0]
        return Claims(
            tee_type="sgx",
            measurement=b[64:96],
            report_data=b[320:384],
            debug=bool(flags & SGX_FLAG_DEBUG),
            signer=b[128:160],
            product_id=raw["isv_prod_id"],  # type: ignore[arg-type]
            security_version=raw["isv_svn"],  # type: ignore[arg-type]
            tcb_status=status,
            advisory_ids=adv,
            raw=raw,
        )
