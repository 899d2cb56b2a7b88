"""Intel DCAP collateral (Endorsements for SGX and TDX quotes): the model, loading, freshness.

Collateral is what a DCAP Verifier needs besides the quote (Intel "PCK Certificate and
Certificate Revocation List Profile" and "PCS API v4" specifications):

* TCB info (JSON, signed by the Intel TCB Signing key) for the platform's FMSPC,
* QE identity (JSON, signed by the same key) for the Quoting Enclave / TD Quoting Enclave,
* the PCK CRL (issued by the Processor or Platform CA) and the Root CA CRL,
* the PEM issuer chains of all of the above.

Two on-disk shapes are read:

1. the ``dcap-qvl`` JSON shape (one file, :meth:`DcapCollateral.from_json`): keys
   ``tcb_info``/``qe_identity`` (exact signed JSON text), ``*_signature`` (hex r‖s),
   ``*_issuer_chain`` (PEM), ``pck_crl``/``root_ca_crl`` (DER as hex);
2. raw Intel PCS responses (:meth:`DcapCollateral.from_pcs_responses`):
   ``{"tcbInfo": {...}, "signature": "<hex>"}`` and ``{"enclaveIdentity": {...}, ...}`` whose
   signed bytes are the *raw text* of the inner object, DER CRLs, and the
   ``*-Issuer-Chain`` response headers (URL-decoded PEM).

Collateral carries its own expiry: it is fresh while ``issueDate <= at < nextUpdate`` for the
TCB info and QE identity, and ``lastUpdate <= at < nextUpdate`` for both CRLs.
Fetching from a PCCS / Intel PCS and the cache that keeps collateral until its earliest
``nextUpdate`` are :mod:`safehold.attestation.pcs`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dcap_qvl
from cryptography import x509

from safehold.attestation.certs import load_certificates, load_crl
from safehold.errors import (
    ConfigError,
    EndorsementError,
    EndorsementExpiredError,
    EndorsementNotYetValidError,
)

__all__ = ["DcapCollateral", "check_validity", "load_collateral", "require_aware"]


def check_validity(name: str, not_before: datetime, not_after: datetime, at: datetime) -> None:
    """Raise unless ``not_before <= at <= not_after`` (RFC 5280 §4.1.2.5: both bounds inclusive),
    saying which side failed.

    Raises:
        EndorsementNotYetValidError: ``at`` is before ``not_before`` (a clock behind, or an item
            issued in the future).
        EndorsementExpiredError: ``at`` is after ``not_after``.
    """
    window = f"{name} validity {not_before.isoformat()}..{not_after.isoformat()}"
    if at < not_before:
        raise EndorsementNotYetValidError(f"{window}: not yet valid at verification time {at.isoformat()}")
    if at > not_after:
        raise EndorsementExpiredError(f"{window}: expired at verification time {at.isoformat()}")


def require_aware(at: datetime | None) -> datetime:
    """Return ``at`` (or now, UTC) as a timezone-aware datetime.

    Raises:
        ValueError: ``at`` is naive (no timezone): verification times must be unambiguous.
    """
    if at is None:
        return datetime.now(UTC)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("verification time must be timezone-aware (e.g. datetime(..., tzinfo=UTC))")
    return at


def _iso(ts: str, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise EndorsementError(f"collateral {what}: not an ISO 8601 time: {ts!r:.40}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


def _crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    return load_crl(der, f"collateral {what}", EndorsementError)


def _unhex(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EndorsementError(f"collateral {what}: expected a hex string")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise EndorsementError(f"collateral {what}: not hex") from None


def _pck_ca(pck_crl_issuer_chain: str) -> str:
    """'processor' or 'platform' from the PCK CRL issuer (Intel PCK cert profile §1.3)."""
    leaf = load_certificates(pck_crl_issuer_chain.encode(), "collateral pck_crl_issuer_chain",
                             EndorsementError)[0]
    cn = " ".join(a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))  # type: ignore[misc]
    if "Processor" in cn:
        return "processor"
    if "Platform" in cn:
        return "platform"
    raise EndorsementError(f"collateral pck_crl_issuer_chain: unknown PCK CA {cn!r:.60}")


@dataclass(frozen=True)
class DcapCollateral:
    """One parsed set of DCAP collateral, valid for one FMSPC and one PCK CA.

    Attributes:
        qvl: the ``dcap_qvl.QuoteCollateralV3`` handed to dcap-qvl (parsed once, reused).
        tee: ``"sgx"`` or ``"tdx"`` (TCB info ``id``; SGX TCB info v2 has no id → sgx).
        fmspc: 6-byte FMSPC as 12 lowercase hex digits.
        ca: PCK CA of the PCK CRL, ``"processor"`` or ``"platform"``.
        not_before: latest issueDate / CRL lastUpdate (UTC).
        next_update: earliest nextUpdate of TCB info, QE identity and both CRLs (UTC).
        expiry_source: which item's nextUpdate is :attr:`next_update` (for error messages).
    """

    qvl: dcap_qvl.QuoteCollateralV3
    tee: str
    fmspc: str
    ca: str
    not_before: datetime
    next_update: datetime
    expiry_source: str

    @property
    def key(self) -> tuple[str, str, str]:
        """Cache key ``(tee, fmspc, ca)``."""
        return (self.tee, self.fmspc, self.ca)

    def check_fresh(self, at: datetime) -> None:
        """Raise unless ``not_before <= at < next_update``.

        Raises:
            EndorsementNotYetValidError: ``at`` is before the latest issueDate / thisUpdate.
            EndorsementExpiredError: ``at`` is at or after the earliest nextUpdate (names it).
        """
        if at < self.not_before:
            raise EndorsementNotYetValidError(
                f"DCAP collateral for FMSPC {self.fmspc} is not yet valid at {at.isoformat()} "
                f"(issued {self.not_before.isoformat()}; a clock behind, or collateral from the future)"
            )
        if at >= self.next_update:
            raise EndorsementExpiredError(
                f"DCAP collateral for FMSPC {self.fmspc} expired: {self.expiry_source} nextUpdate "
                f"{self.next_update.isoformat()} is not after verification time {at.isoformat()}"
            )

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_qvl(cls, qvl: dcap_qvl.QuoteCollateralV3) -> DcapCollateral:
        """Wrap a ``dcap_qvl.QuoteCollateralV3``, reading FMSPC, TEE type and validity.

        Raises:
            EndorsementError: the TCB info / QE identity JSON or a CRL does not parse.
        """
        try:
            tcb = json.loads(qvl.tcb_info)
            qe = json.loads(qvl.qe_identity)
        except ValueError:
            raise EndorsementError("collateral tcb_info / qe_identity is not JSON") from None
        if not isinstance(tcb, dict) or not isinstance(qe, dict):
            raise EndorsementError("collateral tcb_info / qe_identity must be JSON objects")
        tee = str(tcb.get("id", "SGX")).lower()
        if tee not in ("sgx", "tdx"):
            raise EndorsementError(f"collateral tcb_info id: expected SGX or TDX, got {tee!r:.20}")
        fmspc = str(tcb.get("fmspc", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{12}", fmspc):
            raise EndorsementError(f"collateral tcb_info fmspc: expected 12 hex digits, got {fmspc!r:.20}")
        pck_crl = _crl(bytes(qvl.pck_crl), "pck_crl")
        root_crl = _crl(bytes(qvl.root_ca_crl), "root_ca_crl")
        starts = [
            ("tcb_info issueDate", _iso(tcb.get("issueDate", ""), "tcb_info issueDate")),
            ("qe_identity issueDate", _iso(qe.get("issueDate", ""), "qe_identity issueDate")),
            ("pck_crl thisUpdate", pck_crl.last_update_utc),
            ("root_ca_crl thisUpdate", root_crl.last_update_utc),
        ]
        ends = [
            ("tcb_info", _iso(tcb.get("nextUpdate", ""), "tcb_info nextUpdate")),
            ("qe_identity", _iso(qe.get("nextUpdate", ""), "qe_identity nextUpdate")),
            ("pck_crl", pck_crl.next_update_utc),
            ("root_ca_crl", root_crl.next_update_utc),
        ]
        if any(e is None for _, e in ends):
            raise EndorsementError("collateral CRL has no nextUpdate")
        src, nxt = min(((s, e) for s, e in ends if e is not None), key=lambda p: p[1])
        return cls(
            qvl=qvl,
            tee=tee,
            fmspc=fmspc,
            ca=_pck_ca(qvl.pck_crl_issuer_chain),
            not_before=max(t for _, t in starts),
            next_update=nxt,
            expiry_source=src,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> DcapCollateral:
        """Parse the dcap-qvl collateral JSON shape (see module docstring).

        Raises:
            EndorsementError: not JSON, a key missing, bad hex, or unparsable contents.
        """
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise EndorsementError("collateral JSON is not UTF-8") from None
        try:
            obj = json.loads(text)
        except ValueError:
            raise EndorsementError("collateral is not valid JSON") from None
        need = (
            "pck_crl_issuer_chain",
            "root_ca_crl",
            "pck_crl",
            "tcb_info_issuer_chain",
            "tcb_info",
            "tcb_info_signature",
            "qe_identity_issuer_chain",
            "qe_identity",
            "qe_identity_signature",
        )
        if not isinstance(obj, dict) or any(k not in obj for k in need):
            missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
            raise EndorsementError(f"collateral JSON lacks {', '.join(missing)}")
        if not all(isinstance(obj[k], str) for k in need):
            raise EndorsementError("collateral JSON values must be strings")
        qvl = dcap_qvl.QuoteCollateralV3(
            obj["pck_crl_issuer_chain"],
            _unhex(obj["root_ca_crl"], "root_ca_crl"),
            _unhex(obj["pck_crl"], "pck_crl"),
            obj["tcb_info_issuer_chain"],
            obj["tcb_info"],
            _unhex(obj["tcb_info_signature"], "tcb_info_signature"),
            obj["qe_identity_issuer_chain"],
            obj["qe_identity"],
            _unhex(obj["qe_identity_signature"], "qe_identity_signature"),
        )
        return cls.from_qvl(qvl)

    @classmethod
    def from_pcs_responses(
        cls,
        *,
        tcb_info_response: str,
        tcb_info_issuer_chain: str,
        qe_identity_response: str,
        qe_identity_issuer_chain: str,
        pck_crl: bytes,
        pck_crl_issuer_chain: str,
        root_ca_crl: bytes,
    ) -> DcapCollateral:
        """Build collateral from raw Intel PCS v4 responses (as go-tdx-guest stores them).

        Args:
            tcb_info_response: body of ``GET /{sgx,tdx}/certification/v4/tcb``.
            qe_identity_response: body of ``GET /{sgx,tdx}/certification/v4/qe/identity``.
            *_issuer_chain: PEM chains from the ``*-Issuer-Chain`` headers (URL-decoded).
            pck_crl, root_ca_crl: DER CRLs.

        Raises:
            EndorsementError: a response is not of the PCS shape.
        """
        ti, ts = _pcs_inner(tcb_info_response, "tcbInfo")
        qi, qs = _pcs_inner(qe_identity_response, "enclaveIdentity")
        qvl = dcap_qvl.QuoteCollateralV3(
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            ti,
            ts,
            qe_identity_issuer_chain,
            qi,
            qs,
        )
        return cls.from_qvl(qvl)

    def to_json(self) -> str:
        """Serialise in the dcap-qvl JSON shape (round-trips through :meth:`from_json`)."""
        q = self.qvl
        return json.dumps(
            {
                "pck_crl_issuer_chain": q.pck_crl_issuer_chain,
                "root_ca_crl": bytes(q.root_ca_crl).hex(),
                "pck_crl": bytes(q.pck_crl).hex(),
                "tcb_info_issuer_chain": q.tcb_info_issuer_chain,
                "tcb_info": q.tcb_info,
                "tcb_info_signature": bytes(q.tcb_info_signature).hex(),
                "qe_identity_issuer_chain": q.qe_identity_issuer_chain,
                "qe_identity": q.qe_identity,
                "qe_identity_signature": bytes(q.qe_identity_signature).hex(),
            },
            indent=1,
        )


def _pcs_inner(text: str, key: str) -> tuple[str, bytes]:
    """Return (raw inner object text, signature bytes) of a PCS signed-JSON response."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise EndorsementError(f"PCS {key} response is not JSON") from None
    if not isinstance(obj, dict) or key not in obj or "signature" not in obj:
        raise EndorsementError(f"PCS response lacks {key!r} or 'signature'")
    m = re.search(r'"' + key + r'"\s*:\s*', text)
    if m is None:  # pragma: no cover - json.loads found the key, so the text has it
        raise EndorsementError(f"PCS response lacks {key!r}")
    # The signature covers the exact bytes of the inner object as Intel serialised it.
    _, end = json.JSONDecoder().raw_decode(text, m.end())
    return text[m.end() : end], _unhex(obj["signature"], f"{key} signature")


def _load_pcs_dir(d: Path) -> DcapCollateral | None:
    """Load a directory holding one set of PCS responses (go-tdx-guest file naming), if any."""

    def one(pattern: str) -> Path | None:
        hits = sorted(p for p in d.iterdir() if re.search(pattern, p.name, re.IGNORECASE))
        return hits[0] if hits else None

    files = {
        "tcb": one(r"tcbinfo.*\.json$"),
        "qe": one(r"qeidentity.*\.json$"),
        "pckcrl": one(r"pckcrl.*\.der$"),
        "rootcrl": one(r"rootcrl.*\.der$"),
        "tcb_chain": one(r"tcbinfoissuerchain.*\.pem$"),
        "qe_chain": one(r"qeidentityissuerchain.*\.pem$"),
        "crl_chain": one(r"pckcrlissuerchain.*\.pem$"),
    }
    if files["tcb"] is None:
        return None
    missing = [k for k, v in files.items() if v is None]
    if missing:
        raise EndorsementError(f"PCS collateral in {d.name}: missing {', '.join(missing)}")
    f = {k: v for k, v in files.items() if v is not None}
    return DcapCollateral.from_pcs_responses(
        tcb_info_response=f["tcb"].read_text(),
        tcb_info_issuer_chain=f["tcb_chain"].read_text(),
        qe_identity_response=f["qe"].read_text(),
        qe_identity_issuer_chain=f["qe_chain"].read_text(),
        pck_crl=f["pckcrl"].read_bytes(),
        pck_crl_issuer_chain=f["crl_chain"].read_text(),
        root_ca_crl=f["rootcrl"].read_bytes(),
    )


def load_collateral(path: str | Path) -> list[DcapCollateral]:
    """Load collateral from a dcap-qvl JSON file or from a directory.

    A directory may hold any number of dcap-qvl JSON files (``*collateral*.json``) and at most
    one set of PCS responses (``*tcbinfo*.json``, ``*qeidentity*.json``, ``*pckcrl*.der``,
    ``*rootcrl*.der``, ``*{tcbInfo,qeIdentity,pckCrl}IssuerChain*.pem``).

    Raises:
        ConfigError: the path does not exist.
        EndorsementError: a file is not valid collateral.
    """
    p = Path(path)
    if p.is_file():
        return [DcapCollateral.from_json(p.read_bytes())]
    if not p.is_dir():
        raise ConfigError(f"collateral path not found: {p}")
    out = [DcapCollateral.from_json(f.read_bytes()) for f in sorted(p.glob("*collateral*.json"))]
    pcs = _load_pcs_dir(p)
    if pcs is not None:
        out.append(pcs)
    if not out:
        raise EndorsementError(f"no DCAP collateral files in {p}")
    return out


