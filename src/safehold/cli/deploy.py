"""``safehold deploy …``: a click layer over :mod:`safehold.deploy` (docs/deploy-aks.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from safehold.errors import ConfigError


def register(group: click.Group) -> None:
    """Add the ``deploy`` group to the ``safehold`` group."""
    group.add_command(deploy)


@click.group("deploy")
def deploy() -> None:
    """Deployment artefacts: Gramine (GSC) manifests, the chart's workload file, launches."""


def _names() -> list[str]:
    from safehold.deploy.workloads import WORKLOADS

    return sorted(WORKLOADS)


@deploy.command("gramine-manifest")
@click.option("--workload", "name", required=True, type=click.Choice(_names()),
              help="Workload to build for.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for NAME.manifest, NAME.Dockerfile and the config file "
                   "(the GSC build context).")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The workload's measured config file as the data owner approved it "
                   "(records.toml, anchor.toml, ...).")
def gramine_manifest(name: str, out: str, config: str | None) -> None:
    """Write the Gramine Shielded Containers manifest and input Dockerfile of a workload.

    Run it INSIDE the Safehold image (docs/deploy-aks.md): the trusted files are the workload's
    measured closure at the image's paths, the same list `safehold measure` hashes."""
    from safehold.deploy.gramine import gsc_artefacts
    from safehold.deploy.workloads import get

    w = get(name)
    art = gsc_artefacts(w, config_file=config)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / art.manifest_name).write_text(art.manifest, "utf-8")
    (d / art.dockerfile_name).write_text(art.dockerfile, "utf-8")
    if config and w.config and Path(config).resolve() != (d / w.config).resolve():
        shutil.copyfile(config, d / w.config)
    click.echo(f"{d / art.manifest_name}: {len(art.closure.files)} trusted files from the measured closure "
               f"(SHA-384 {art.closure.hex()})", err=True)
    if not w.deployable:
        click.secho(f"note: {name} is not deployable as a pod yet: {w.blocker}", fg="yellow", err=True)


@deploy.command("chart-workloads")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file (deploy/helm/safehold/files/workloads.json), or - for stdout.")
def chart_workloads(out: str) -> None:
    """Write the chart's generated workload file (commands, env allow-lists, ports)."""
    from safehold.deploy.workloads import chart_json

    text = chart_json()
    if out == "-":
        click.echo(text, nl=False)
    else:
        Path(out).write_text(text, "utf-8")


@deploy.command("launch")
@click.option("--workload", "name", required=True, type=click.Choice(_names()))
@click.option("--gramine", is_flag=True, help="The launch under Gramine Shielded Containers.")
def launch(name: str, gramine: bool) -> None:
    """Print the container command line of a workload (JSON array)."""
    from safehold.deploy.workloads import get

    click.echo(json.dumps(get(name).argv(gramine=gramine), ensure_ascii=False))


@deploy.command("check-image")
def check_image() -> None:
    """Check that this interpreter is the image layout the chart's commands assume (run in the
    image build: a changed base image fails here instead of measuring differently)."""
    from safehold.attestation.closure import interpreter_layout
    from safehold.deploy.workloads import IMAGE_VENV, image_layout

    want = image_layout()
    got = interpreter_layout(f"{IMAGE_VENV}/bin/python")
    diffs = [f"{k}: expected {getattr(want, k)!r}, got {getattr(got, k)!r}"
             for k in ("executable", "real_executable", "libpython", "stdlib_path", "site_packages",
                       "anchors")
             if getattr(want, k) != getattr(got, k)]
    if diffs:
        raise ConfigError("the image's interpreter layout differs from "
                          "safehold.deploy.workloads.image_layout(): " + "; ".join(diffs))
    click.echo("image layout matches", err=True)
