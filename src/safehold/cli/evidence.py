"""``safehold evidence inspect FILE`` and ``safehold evidence verify FILE --policy P``.

FILE may hold any supported Evidence:

* a CMW JSON record or collection (``Evidence.to_cmw()``, any media type incl. simulated);
* a raw binary SGX/TDX DCAP quote, SEV-SNP report (1184 B), Azure HCL report (``HCLA``) or
  TPM 2.0 TPMS_ATTEST;
* the same as hex text (optionally ``0x``-prefixed) or base64 text.

The type of raw Evidence is detected from its bytes (``--type`` overrides); endorsements
(VCEK, certificate chains, runtime data, TPM signature / AK / PCRs, collateral) are added
with ``--endorsement NAME=FILE``. ``inspect`` decodes WITHOUT verifying; ``verify`` checks
signatures and endorsements, then appraises the claims against the policy.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from safehold.attestation.claims import Claims
from safehold.attestation.evidence import MEDIA_TYPES, Evidence
from safehold.errors import ConfigError, EvidenceFormatError, SafeholdError

TYPES = tuple(MEDIA_TYPES)


def register(group: click.Group) -> None:
    """Add the ``evidence`` command group to ``safehold``."""
    group.add_command(evidence)


def _decode_text(raw: bytes) -> bytes | None:
    """Hex or base64 text → bytes; None when ``raw`` is not such text."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    t = text[2:] if text[:2] in ("0x", "0X") else text
    t = re.sub(r"\s+", "", t)
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", t):
        return bytes.fromhex(t)
    if re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", t):
        try:
            return base64.b64decode(t.replace("-", "+").replace("_", "/") + "=" * (-len(t) % 4))
        except (binascii.Error, ValueError):
            return None
    return None


def _is_text(raw: bytes) -> bool:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and all(c.isprintable() or c in "\r\n\t" for c in text)


def detect_type(data: bytes) -> str:
    """Guess the TEE type (a key of ``MEDIA_TYPES``) of raw Evidence bytes.

    Raises:
        EvidenceFormatError: the bytes match no supported format.
    """
    if data[:4] == b"HCLA" and len(data) >= 1236:
        rtype = struct.unpack_from("<I", data, 1216 + 8)[0]
        return "azure-tdx" if rtype == 4 else "azure-sev-snp"
    if data[:4] == b"\xffTCG":
        return "tpm"
    if len(data) >= 48:
        version, akt, tee = struct.unpack_from("<HHI", data, 0)
        if version in (3, 4, 5) and akt in (2, 3):
            return "tdx" if tee == 0x81 else "sgx"
    if len(data) in (1184, 1204) and struct.unpack_from("<I", data, 0)[0] in (2, 3, 5):
        return "sev-snp" if len(data) == 1184 else "azure-sev-snp"
    raise EvidenceFormatError(
        "cannot tell the Evidence type from its bytes (expected a DCAP quote, SNP report, "
        "HCL report, TPMS_ATTEST or CMW JSON); use --type"
    )


def load_evidence(
    path: str | Path, *, tee_type: str | None = None, endorsements: dict[str, bytes] | None = None
) -> Evidence:
    """Read Evidence from a file in any of the forms in the module docstring.

    Raises:
        ConfigError: the file cannot be read.
        EvidenceFormatError: the contents are not supported Evidence.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read Evidence file {path}: {e.strerror}") from None
    ends = dict(endorsements or {})
    stripped = raw.lstrip()
    if stripped[:1] in (b"[", b"{"):
        try:
            ev = Evidence.from_cmw(raw)
        except EvidenceFormatError as e:
            raise EvidenceFormatError(
                f"{path} is JSON but not CMW Evidence ({e}); collateral goes to --collateral"
            ) from None
        if ends:
            ev = Evidence(ev.media_type, ev.data, {**ev.endorsements, **ends})
        return ev
    data = raw
    if tee_type is not None or detect_type_or_none(raw) is None:
        decoded = _decode_text(raw)  # hex / base64 text; binary is not ASCII text
        if decoded is None and _is_text(raw):
            raise EvidenceFormatError(
                f"{path} is text but neither hex (even number of hex digits) nor base64; "
                "expected binary Evidence, hex, base64 or CMW JSON"
            )
        data = decoded or raw
    tee = tee_type or detect_type(data)
    return Evidence(MEDIA_TYPES[tee], data, ends)


def detect_type_or_none(data: bytes) -> str | None:
    """:func:`detect_type` returning None instead of raising."""
    try:
        return detect_type(data)
    except EvidenceFormatError:
        return None


def unverified_claims(ev: Evidence) -> Claims:
    """Decode Evidence into normalised claims WITHOUT checking any signature (display only).

    Raises:
        EvidenceFormatError: the Evidence does not parse.
    """
    tee = ev.tee_type
    if tee in ("sgx", "tdx"):
        from safehold.attestation.verifiers import dcap
        from safehold.attestation.verifiers.sgx import SgxVerifier
        from safehold.attestation.verifiers.tdx import TdxVerifier

        q = dcap.parse_quote(ev.data, strict_chain=False)
        want = dcap.TEE_SGX if tee == "sgx" else dcap.TEE_TDX
        if q.tee_type != want:
            raise EvidenceFormatError(f"quote tee_type {q.tee_type:#x} is not {tee}")
        try:
            ch = dcap._chain(q.pck_pem)
        except SafeholdError:
            ch = dcap._Chain((), b"", "unknown", "unknown")
        cls = SgxVerifier if tee == "sgx" else TdxVerifier
        return cls.claims_for(q, ch, None, (), False)
    if tee == "sev-snp":
        from safehold.attestation.verifiers.sev_snp import parse_report, snp_claims

        return snp_claims(parse_report(ev.data), None)
    if tee in ("azure-sev-snp", "azure-tdx"):
        from safehold.attestation.verifiers.azure import inspect_hcl

        raw = inspect_hcl(ev.data, ev.endorsements.get("runtime_data"))
        mt = bytes.fromhex(raw.get("measurement") or raw["mr_td"])
        attrs = raw.get("td_attributes")
        if "policy_debug" not in raw and not isinstance(attrs, str):
            raise EvidenceFormatError("HCL report carries neither policy_debug nor td_attributes")
        debug = bool(raw["policy_debug"]) if "policy_debug" in raw else bool(int(str(attrs)[:2], 16) & 1)
        return Claims(tee, mt, bytes.fromhex(raw["report_data"]), debug, raw=raw)
    if tee == "tpm":
        from safehold.attestation.verifiers.tpm import HASH_ALGS, parse_tpms_attest

        tq = parse_tpms_attest(ev.data)
        raw_t: dict[str, Any] = {
            "extra_data": tq.extra_data.hex(),
            "pcr_digest": tq.pcr_digest.hex(),
            "pcr_selection": {HASH_ALGS[a][0]: list(i) for a, i in tq.selection},
            "clock": tq.clock,
            "reset_count": tq.reset_count,
            "restart_count": tq.restart_count,
            "firmware_version": tq.firmware_version,
        }
        return Claims("tpm", tq.pcr_digest, tq.extra_data.ljust(64, b"\x00"), False, raw=raw_t)
    if tee == "simulated":
        from safehold.attestation.verifiers.simulated import parse_report as sim_parse

        r = sim_parse(ev.data)
        return Claims(
            "simulated",
            r.measurement,
            r.report_data,
            r.debug,
            tcb_status="Simulated",
            raw={"timestamp": r.timestamp},
        )
    raise EvidenceFormatError(f"no decoder for {tee}")  # pragma: no cover - TEE_TYPES is closed


def parse_time(value: str | None) -> datetime | None:
    """``--at``: ISO 8601 (``Z`` allowed; naive = UTC) or Unix seconds; None = now.

    Raises:
        click.BadParameter: neither form.
    """
    if value is None:
        return None
    if re.fullmatch(r"\d+", value):
        try:
            return datetime.fromtimestamp(int(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise click.BadParameter(f"Unix time {value} is out of range",
                                     param_hint="--at") from None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("expected ISO 8601 or Unix seconds", param_hint="--at") from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _endorsements(items: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE, got {it!r}", param_hint="--endorsement")
        try:
            out[name] = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read endorsement {name} from {path}: {e.strerror}") from None
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return "none" if v is None else str(v)


def render_claims(claims: Claims, console: Console, *, title: str, full: bool = False) -> None:
    """Print claims (normalised, then vendor ``raw`` fields) as a rich table."""
    t = Table(title=title)
    t.add_column("claim", style="bold")
    t.add_column("value", overflow="fold")
    d = claims.as_dict()
    raw = d.pop("raw")
    for k, v in d.items():
        t.add_row(k, _fmt(v))
    for k, v in raw.items():
        s = _fmt(v)
        t.add_row(f"raw.{k}", s if full or len(s) <= 200 else s[:199] + "…")
    console.print(t)


@click.group()
def evidence() -> None:
    """Inspect and verify attestation Evidence (SGX, TDX, SEV-SNP, Azure CVM, TPM, simulated)."""


_type_opt = click.option(
    "--type", "tee_type", type=click.Choice(TYPES), help="Evidence type (default: detect)."
)
_end_opt = click.option(
    "--endorsement",
    "endorsements",
    multiple=True,
    metavar="NAME=FILE",
    help="Add an endorsement (vcek, vlek, cert_chain, runtime_data, collateral, signature, "
    "ak_pub, pcrs, ak_cert, ...). Repeatable.",
)


@evidence.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_type_opt
@_end_opt
@click.option("--json", "as_json", is_flag=True, help="Print the claims as JSON.")
@click.option("--full", is_flag=True, help="Do not shorten long values.")
def inspect(
    file: str, tee_type: str | None, endorsements: tuple[str, ...], as_json: bool, full: bool
) -> None:
    """Decode FILE and print its normalised claims. Does NOT verify anything."""
    ev = load_evidence(file, tee_type=tee_type, endorsements=_endorsements(endorsements))
    claims = unverified_claims(ev)
    if as_json:
        click.echo(json.dumps(claims.as_dict(), indent=1, default=str))
        return
    console = Console()
    render_claims(
        claims, console, title=f"{claims.tee_type} Evidence (NOT VERIFIED: decoded only)", full=full
    )


@evidence.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--policy",
    "policy_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Appraisal policy (TOML).",
)
@click.option(
    "--collateral",
    type=click.Path(exists=True),
    help="DCAP collateral: a dcap-qvl JSON file or a directory (JSON files / PCS responses).",
)
@click.option("--pccs-url", help="PCCS or Intel PCS base URL to fetch missing DCAP collateral from.")
@click.option("--at", "at_text", help="Verification time (ISO 8601 or Unix seconds; default now).")
@click.option("--report-data", "report_data", help="Expected report_data (hex, zero-padded to 64 B).")
@click.option(
    "--trusted-ak",
    "trusted_aks",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Trusted TPM attestation key (PEM/DER/TPMT_PUBLIC). Repeatable.",
)
@click.option(
    "--ak-ca",
    "ak_cas",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="TPM AK CA certificate (root or intermediate). Repeatable.",
)
@_type_opt
@_end_opt
@click.option("--full", is_flag=True, help="Do not shorten long values.")
def verify(
    file: str,
    policy_path: str,
    collateral: str | None,
    pccs_url: str | None,
    at_text: str | None,
    report_data: str | None,
    trusted_aks: tuple[str, ...],
    ak_cas: tuple[str, ...],
    tee_type: str | None,
    endorsements: tuple[str, ...],
    full: bool,
) -> None:
    """Verify FILE (signatures, certificate chains, collateral) and appraise its claims
    against the policy. Exit status 0 = acceptable, 1 = refused (the failing claims are named)."""
    from safehold.attestation.checks import raise_for
    from safehold.attestation.errors import SimulatedTEEWarning
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.cli.attest import render

    policy = AppraisalPolicy.from_toml(policy_path)
    at = parse_time(at_text)
    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError:
            raise click.BadParameter("not hex", param_hint="--report-data") from None
        if len(expected) > 64:
            raise click.BadParameter("longer than 64 bytes", param_hint="--report-data")
        expected = expected.ljust(64, b"\x00")
    opts: dict[str, dict[str, Any]] = {}
    if collateral or pccs_url:
        dcap = {"collateral": collateral, "pccs_url": pccs_url}
        opts["sgx"] = dict(dcap)
        opts["tdx"] = dict(dcap)
    if trusted_aks or ak_cas:
        cas = [Path(p).read_bytes() for p in ak_cas]
        opts["tpm"] = {
            "trusted_aks": [Path(p).read_bytes() for p in trusted_aks],
            "ak_roots": cas,
            "ak_intermediates": cas,
        }
    ev = load_evidence(file, tee_type=tee_type, endorsements=_endorsements(endorsements))
    verifier = Verifier(policy, verifier_options=opts)
    console = Console()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)  # shown in the table instead
        appraisal = verifier.evaluate(ev, expected_report_data=expected, at=at)
    when = (at or datetime.now(UTC)).isoformat()
    render_claims(
        appraisal.claims, console, title=f"verified {appraisal.claims.tee_type} claims at {when}", full=full
    )
    render(appraisal, console, full=full)
    if appraisal.ok:
        console.print(f"[green]verified[/green]: {file} satisfies policy {policy.name!r}")
        return
    raise_for(appraisal.verdicts, f"{file} refused under policy {policy.name!r}")
