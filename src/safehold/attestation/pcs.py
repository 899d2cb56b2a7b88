"""Collateral from a PCCS or Intel PCS (Intel "PCS API v4": ``/sgx|tdx/certification/v4/tcb``,
``/qe|qve/identity``, ``/pckcrl``, ``/rootcacrl``) and the in-memory / on-disk
:class:`CollateralCache` a DCAP Verifier asks. The only attestation module that does network I/O
(through :mod:`httpx`); the collateral model and its freshness rules are
:mod:`safehold.attestation.collateral`.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safehold.attestation.certs import load_certificates
from safehold.attestation.collateral import DcapCollateral, load_collateral
from safehold.errors import (
    EndorsementError,
    EndorsementExpiredError,
)

__all__ = ["CollateralCache", "Fetcher", "fetch_pcs"]

#: Fetches collateral ``(base_url, tee, fmspc, ca) -> DcapCollateral`` (default: :func:`fetch_pcs`).
Fetcher = Callable[[str, str, str, str], "DcapCollateral"]

_PCS_TIMEOUT = 30.0


def _pcs_get(client: httpx.Client, url: str, *headers: str) -> tuple[bytes, str | None]:
    try:
        r = client.get(url)
    except httpx.HTTPError as e:
        raise EndorsementError(f"fetching DCAP collateral {url} failed: {type(e).__name__}") from None
    if r.status_code != 200:
        raise EndorsementError(f"fetching DCAP collateral {url}: HTTP {r.status_code}")
    chain = next((r.headers[h] for h in headers if h in r.headers), None)
    if headers and chain is None:
        raise EndorsementError(f"DCAP collateral {url}: response lacks the {headers[0]} header")
    return r.content, urllib.parse.unquote(chain) if chain is not None else None


def _crl_bytes(body: bytes, what: str) -> bytes:
    """PCS/PCCS CRL bodies come as DER, PEM or hex text (PCCS ``rootcacrl``)."""
    if body[:1] == b"\x30":
        return body
    text = body.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_crl(text).public_bytes(serialization.Encoding.DER)
        except Exception:  # noqa: BLE001 - any parse failure of a fetched CRL means "malformed"
            raise EndorsementError(f"{what} is not a PEM CRL") from None
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise EndorsementError(f"{what} is neither DER, PEM nor hex") from None


def fetch_pcs(base_url: str, tee: str, fmspc: str, ca: str) -> DcapCollateral:
    """Fetch collateral over HTTPS from a PCCS or Intel PCS (PCS API v4 paths).

    ``GET {base}/sgx/certification/v4/pckcrl?ca=<ca>&encoding=der`` (header
    ``SGX-PCK-CRL-Issuer-Chain``), ``{base}/<tee>/certification/v4/tcb?fmspc=<FMSPC>``
    (``TCB-Info-Issuer-Chain``), ``{base}/<tee>/certification/v4/qe/identity``
    (``SGX-Enclave-Identity-Issuer-Chain``), and the root CA CRL from the PCCS
    ``rootcacrl`` endpoint or else the root certificate's CRL distribution point. Responses are
    parsed by :meth:`DcapCollateral.from_pcs_responses` (signed bytes kept verbatim).

    Raises:
        EndorsementError: a request failed, a header is missing, or a body is malformed.
    """
    base = base_url.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        base = base.removesuffix(suffix)
    with httpx.Client(timeout=_PCS_TIMEOUT, follow_redirects=False) as client:
        crl, crl_chain = _pcs_get(
            client, f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", "SGX-PCK-CRL-Issuer-Chain"
        )
        tcb, tcb_chain = _pcs_get(
            client,
            f"{base}/{tee}/certification/v4/tcb?fmspc={fmspc.upper()}",
            "TCB-Info-Issuer-Chain",
            "SGX-TCB-Info-Issuer-Chain",
        )
        qe, qe_chain = _pcs_get(
            client,
            f"{base}/{tee}/certification/v4/qe/identity?update=standard",
            "SGX-Enclave-Identity-Issuer-Chain",
            "Enclave-Identity-Issuer-Chain",
        )
        try:
            root_crl = _crl_bytes(
                _pcs_get(client, f"{base}/sgx/certification/v4/rootcacrl")[0], "root CA CRL"
            )
        except EndorsementError:
            root_crl = _crl_bytes(_pcs_get(client, _root_crl_url(qe_chain or ""))[0], "root CA CRL")
    try:
        tcb_text, qe_text = tcb.decode("utf-8"), qe.decode("utf-8")
    except UnicodeDecodeError:
        raise EndorsementError("PCS TCB info / QE identity response is not UTF-8") from None
    return DcapCollateral.from_pcs_responses(
        tcb_info_response=tcb_text,
        tcb_info_issuer_chain=tcb_chain or "",
        qe_identity_response=qe_text,
        qe_identity_issuer_chain=qe_chain or "",
        pck_crl=_crl_bytes(crl, "PCK CRL"),
        pck_crl_issuer_chain=crl_chain or "",
        root_ca_crl=root_crl,
    )


def _root_crl_url(chain_pem: str) -> str:
    try:
        root = load_certificates(chain_pem.encode(), "PCK CRL issuer chain", EndorsementError)[-1]
        dps = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        for dp in dps:
            for name in dp.full_name or []:
                if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith("https://"):
                    return name.value
    except (EndorsementError, IndexError, x509.ExtensionNotFound):
        pass
    raise EndorsementError(
        "no root CA CRL: PCCS rootcacrl failed and the root has no HTTPS CRL distribution point"
    )


class CollateralCache:
    """Collateral per ``(tee, fmspc, ca)``, kept until its earliest ``nextUpdate``.

    Look-ups at a time past ``nextUpdate`` drop the entry; then, if a PCCS/PCS URL is
    configured, fresh collateral is fetched (:func:`fetch_pcs`, Intel PCS API v4 paths),
    checked for freshness, cached in memory and, with ``cache_dir``, written as dcap-qvl JSON.
    Thread-safe.

    Args:
        collaterals: initial entries (e.g. from :func:`load_collateral`).
        pccs_url: base URL of a PCCS or of Intel PCS (``dcap_qvl.INTEL_PCS_URL``); None = offline.
        cache_dir: directory to persist fetched collateral and to read it back on start.
        fetcher: override of :func:`fetch_pcs` (e.g. another transport).
    """

    def __init__(
        self,
        collaterals: Iterable[DcapCollateral] = (),
        *,
        pccs_url: str | None = None,
        cache_dir: str | Path | None = None,
        fetcher: Fetcher | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, str], DcapCollateral] = {}
        self.pccs_url = pccs_url
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._fetch = fetcher or fetch_pcs
        self.fetches = 0
        if self.cache_dir is not None and self.cache_dir.is_dir():
            for c in load_collateral(self.cache_dir) if any(self.cache_dir.glob("*collateral*.json")) else []:
                self.add(c)
        for c in collaterals:
            self.add(c)

    def add(self, c: DcapCollateral) -> None:
        """Insert ``c``, replacing an entry for the same key that expires earlier."""
        with self._lock:
            old = self._entries.get(c.key)
            if old is None or c.next_update >= old.next_update:
                self._entries[c.key] = c

    def lookup(self, tee: str, fmspc: str, ca: str, at: datetime) -> DcapCollateral | None:
        """Return fresh collateral for the key at ``at``, evicting it if it expired."""
        key = (tee, fmspc.lower(), ca)
        with self._lock:
            c = self._entries.get(key)
            if c is None:
                return None
            if at >= c.next_update:
                del self._entries[key]
                return None
            return c if at >= c.not_before else None

    def get(self, tee: str, fmspc: str, ca: str, at: datetime) -> DcapCollateral:
        """Fresh collateral for a quote: cached, else fetched from :attr:`pccs_url`.

        Raises:
            EndorsementError: nothing fresh is cached and no URL is configured, the fetch
                failed, or the fetched collateral is for another FMSPC or already expired.
        """
        stale = self._entries.get((tee, fmspc.lower(), ca))
        c = self.lookup(tee, fmspc, ca, at)
        if c is not None:
            return c
        if self.pccs_url is None:
            if stale is not None and at < stale.not_before:
                stale.check_fresh(at)  # raises EndorsementNotYetValidError: not an expiry
            hint = f" (cached collateral expired at {stale.next_update.isoformat()})" if stale else ""
            raise (EndorsementExpiredError if stale else EndorsementError)(
                f"no fresh DCAP collateral for {tee.upper()} FMSPC {fmspc.lower()} ({ca} CA) at "
                f"{at.isoformat()}{hint}; supply collateral or configure a PCCS URL"
            )
        c = self._fetch(self.pccs_url, tee, fmspc.lower(), ca)
        self.fetches += 1
        if c.key != (tee, fmspc.lower(), ca):
            raise EndorsementError(f"fetched collateral is for {c.key}, expected {(tee, fmspc.lower(), ca)}")
        c.check_fresh(at)
        self.add(c)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{tee}-{c.fmspc}-{ca}-collateral.json.tmp"
            tmp.write_text(c.to_json())
            tmp.replace(self.cache_dir / f"{tee}-{c.fmspc}-{ca}-collateral.json")
        return c
