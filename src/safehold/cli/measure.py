"""``safehold measure``: print the workload measurement (a Reference Value for the policy)."""

from __future__ import annotations

import importlib.machinery
import json
import time

import click

from safehold.attestation.measure import measure_workload
from safehold.devstack.stack import BROKER_ENV, BROKER_MODULE, RECORDS_ENV, RECORDS_MODULE

#: The environment allow-list each workload `safehold up` launches runs with (the default of
#: ``--env`` for that module, so that the value printed is the one `up` pins).
WORKLOAD_ENV = {RECORDS_MODULE: RECORDS_ENV, BROKER_MODULE: BROKER_ENV}


def _on_path(module: str, path: list[str]) -> bool:
    """Whether ``module`` (dotted) can be found on ``path`` without importing anything (the
    workload's ``sys.path``, not this process's)."""
    search: list[str] | None = path
    for part in module.split("."):
        if not part.isidentifier() or search is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or []) or None
    return True


def register(group: click.Group) -> None:
    """Add ``measure`` to the ``safehold`` group."""
    group.add_command(measure)


@click.command()
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Workload configuration file to include (repeatable); named config/<file name>.")
@click.option("--module", default=RECORDS_MODULE, show_default=True,
              help="The module the workload runs as __main__ (part of the measured launch); it must "
                   "exist.")
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False),
              help="Directory put first on the workload's sys.path (a snapshot's parent). Default: "
                   "the directory holding the imported safehold package, unless it is site-packages.")
@click.option("--env", "passthrough", multiple=True, metavar="NAME",
              help="Environment variable the workload takes from the host (repeatable; part of the "
                   "measured launch, its value is not). Default: the allow-list `safehold up` gives "
                   f"{RECORDS_MODULE} and {BROKER_MODULE}, none for other modules.")
@click.option("--package-only", is_flag=True,
              help="DIAGNOSTIC, NOT a Reference Value: the old package-only digest (safehold package "
                   "+ config, format v1). No TEE reports it; a policy pinning it admits nothing. "
                   "Prints no TOML snippet.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="With --package-only: package tree to measure instead of the installed one.")
@click.option("--format", "fmt", type=click.Choice(["text", "toml", "json", "manifest"]),
              default="text", show_default=True,
              help="text: hex + TOML snippet; toml: snippet only; json: digest, roots and files; "
                   "manifest: the exact canonical bytes that were hashed.")
def measure(configs: tuple[str, ...], module: str, app_dir: str | None, passthrough: tuple[str, ...],
            package_only: bool, root: str | None, fmt: str) -> None:
    """Measure the workload closure: SHA-384 over the interpreter, libpython, the standard
    library, every installed distribution on the workload's sys.path, the package, the config
    files and the launch (module, flags, environment allow-list) — what a TEE under Gramine
    measures as its trusted files. Paste the TOML snippet into an appraisal policy's
    [reference_values]. A summary (files, bytes, seconds) goes to stderr."""
    if package_only or root:
        if fmt == "toml":
            raise click.UsageError("--package-only is a diagnostic, not a Reference Value: no TOML "
                                   "snippet (measure the closure instead: drop --package-only)")
        click.secho("DIAGNOSTIC: package-only digest (format v1), NOT a Reference Value: it omits "
                    "the interpreter, the standard library, every dependency and the launch; no TEE "
                    "reports it", fg="yellow", err=True)
        m = measure_workload(configs, root=root)
        if fmt == "json":
            click.echo(json.dumps({"package_only_diagnostic": m.hex(), "algorithm": "sha-384",
                                   "reference_value": False,
                                   "files": [{"path": p, "sha256": d} for p, d in m.manifest]}, indent=2))
        elif fmt == "manifest":
            click.echo(m.canonical().decode("utf-8"), nl=False)
        else:
            click.echo(m.hex())
        return
    from safehold.attestation.closure import describe
    from safehold.attestation.workload import LaunchSpec, package_app_dir

    spec = LaunchSpec(module, app_dir=app_dir if app_dir else package_app_dir(),
                      passthrough=passthrough or WORKLOAD_ENV.get(module, ()))
    if not _on_path(module, spec.sys_path()):  # a value for a module that cannot run matches nothing
        raise click.BadParameter(f"no module {module!r} on the workload's sys.path (app dir, standard "
                                 "library, site-packages)", param_hint="--module")
    t0 = time.perf_counter()
    c = spec.closure(configs)
    took = time.perf_counter() - t0
    click.echo(f"measured {len(c.files)} files, {c.total_bytes} bytes in {took:.2f} s", err=True)
    if fmt == "toml":
        click.echo(c.to_toml(), nl=False)
    elif fmt == "json":
        click.echo(json.dumps({**describe(c), "launch": spec.description()}, indent=2))
    elif fmt == "manifest":
        click.echo(c.canonical().decode("utf-8"), nl=False)
    else:
        click.echo(c.hex())
        click.echo()
        click.echo(c.to_toml(), nl=False)
