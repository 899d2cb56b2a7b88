"""``safehold attest URL --policy FILE``: attest an RA-TLS server and show the appraisal;
``safehold ratls-demo-server``: a local RA-TLS server on the simulated TEE to try it on."""

from __future__ import annotations

import warnings

import click
from rich.console import Console
from rich.table import Table

from safehold.attestation.checks import raise_for
from safehold.attestation.errors import SimulatedTEEWarning
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Appraisal, Verifier
from safehold.ratls.client import fetch_peer_certificate
from safehold.ratls.verify import evaluate_certificate


def register(group: click.Group) -> None:
    """Add ``attest`` and ``ratls-demo-server`` to the ``safehold`` group."""
    group.add_command(attest)
    group.add_command(ratls_demo_server)


def _short(s: str, width: int) -> str:
    if len(s) <= width:
        return s
    half = (width - 1) // 2  # keep both ends: hex prefixes and "(label)" suffixes stay readable
    return s[:half] + "…" + s[-half:]


def render(appraisal: Appraisal, console: Console, *, full: bool = False) -> None:
    """Print the appraisal as a table: claim / expected / got / verdict."""
    t = Table(title=f"Appraisal under policy {appraisal.policy_name!r} "
                    f"(TEE: {appraisal.claims.tee_type})")
    t.add_column("claim", style="bold")
    t.add_column("expected")
    t.add_column("got")
    t.add_column("verdict")
    w = 10_000 if full else 72
    for v in appraisal.verdicts:
        t.add_row(v.claim, _short(v.expected, w), _short(v.got, w),
                  "[green]ok[/green]" if v.ok else "[red]FAIL[/red]")
    console.print(t)
    for warning in appraisal.warnings:
        console.print(f"[yellow]warning: {warning}[/yellow]")


@click.command()
@click.argument("url")
@click.option("--policy", "policy_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Appraisal policy (TOML).")
@click.option("--nonce", help="Hex nonce the server's RA-TLS claims must carry.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds.")
@click.option("--full", is_flag=True, help="Do not shorten long values.")
def attest(url: str, policy_path: str, nonce: str | None, timeout: float, full: bool) -> None:
    """Connect to URL, verify the RA-TLS certificate's Evidence and key binding against the
    policy, and print every claim with expected / got / verdict. Sends no request.
    Exit status 0 = attested, 1 = refused."""
    console = Console()
    policy = AppraisalPolicy.from_toml(policy_path)
    verifier = Verifier(policy)
    try:
        n = bytes.fromhex(nonce) if nonce else None
    except ValueError:
        raise click.BadParameter("not hex", param_hint="--nonce") from None
    der = fetch_peer_certificate(url, timeout=timeout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedTEEWarning)  # shown in the table instead
        _, appraisal = evaluate_certificate(der, verifier, expected_nonce=n)
    render(appraisal, console, full=full)
    if appraisal.ok:
        console.print(f"[green]attested[/green]: {url} satisfies policy {policy.name!r}")
        return
    raise_for(appraisal.verdicts, f"{url} refused under policy {policy.name!r}")


@click.command("ratls-demo-server")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the simulated TEE keys and the generated policy.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Workload config file to measure (repeatable).")
@click.option("--debug", is_flag=True, help="Report a debug-mode TEE.")
def ratls_demo_server(data_dir: str, host: str, port: int, configs: tuple[str, ...],
                      debug: bool) -> None:
    """Run a local RA-TLS server on the SIMULATED TEE (writes <data-dir>/demo-policy.toml)
    to try `safehold attest` against."""
    from safehold.ratls.demo import main

    args = ["--data-dir", data_dir, "--host", host, "--port", str(port)]
    for c in configs:
        args += ["--config", c]
    if debug:
        args.append("--debug")
    raise SystemExit(main(args))
