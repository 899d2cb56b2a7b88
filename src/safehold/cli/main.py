"""The ``safehold`` command: a click group; each command group lives in its own module.

Every module listed in :data:`COMMAND_MODULES` exposes ``register(group)`` that adds its
commands. Errors derived from :class:`~safehold.errors.SafeholdError` are printed as one clear
line and exit with status 1 — never a bare traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from safehold import __version__
from safehold.errors import SafeholdError

#: Modules under ``safehold.cli`` that add commands (one per command group).
COMMAND_MODULES: tuple[str, ...] = ('measure', 'attest', 'proxy', 'broker', 'evidence',
                                    'up', 'patients', 'status', 'demo', 'discovery', 'deploy', 'svr',
                                    'erezept', 'epa',
                                    'freshness')


class _SafeholdGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SafeholdError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_SafeholdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safehold")
def cli() -> None:
    """Safehold: patient records whose plaintext exists only inside an attested TEE."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"safehold.cli.{_name}").register(cli)


def main() -> None:
    """Console-script entry point."""
    import warnings

    from safehold.attestation.errors import SimulatedTEEWarning

    # the verifier also logs it as one line; the Python warning would repeat it with a source line
    warnings.simplefilter("ignore", SimulatedTEEWarning)
    cli()


if __name__ == "__main__":
    main()
