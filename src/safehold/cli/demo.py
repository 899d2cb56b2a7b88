"""``safehold demo``: the main job in one command.

A click layer over :func:`safehold.devstack.demo.run_demo` (start the stack, import real
synthetic patients, read one back, search, prove the database holds no names, stop).
"""

from __future__ import annotations

import click

from safehold.cli.patients import show_warning
from safehold.cli.up import print_summary
from safehold.devstack.demo import run_demo


def register(group: click.Group) -> None:
    """Add ``safehold demo``."""

    @group.command("demo")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    def demo(data_dir: str) -> None:
        """Start Safehold, import real synthetic patients, read one back, prove the DB holds no names.

        The data directory (and <data-dir>.owner) stays: `safehold up` with the same
        --data-dir serves the demo's patients."""
        run_demo(data_dir, echo=click.echo, on_started=print_summary, show=show_warning)
