"""``safehold measure``: print the workload measurement (a Reference Value for the policy)."""

from __future__ import annotations

import json

import click

from safehold.attestation.measure import measure_workload


def register(group: click.Group) -> None:
    """Add ``measure`` to the ``safehold`` group."""
    group.add_command(measure)


@click.command()
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Workload configuration file to include (repeatable); named config/<file name>.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Package tree to measure instead of the installed safehold package.")
@click.option("--format", "fmt", type=click.Choice(["text", "toml", "json", "manifest"]),
              default="text", show_default=True,
              help="text: hex + TOML snippet; toml: snippet only; json: digest and manifest; "
                   "manifest: the exact canonical bytes that were hashed.")
def measure(configs: tuple[str, ...], root: str | None, fmt: str) -> None:
    """Measure the workload: SHA-384 over the canonical manifest of the safehold package files
    (+ config files). The simulated TEE reports this same value; paste the TOML snippet into
    an appraisal policy's [reference_values]."""
    m = measure_workload(configs, root=root)
    if fmt == "toml":
        click.echo(m.to_toml(), nl=False)
    elif fmt == "json":
        click.echo(json.dumps({"measurement": m.hex(), "algorithm": "sha-384",
                               "files": [{"path": p, "sha256": d} for p, d in m.manifest]}, indent=2))
    elif fmt == "manifest":
        click.echo(m.canonical().decode("utf-8"), nl=False)
    else:
        click.echo(m.hex())
        click.echo()
        click.echo(m.to_toml(), nl=False)
