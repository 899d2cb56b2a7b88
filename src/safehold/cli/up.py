"""``safehold up``: run the key broker and the records service on this machine (development).

A click layer over :mod:`safehold.devstack` (data directory layout, measured configuration,
processes: see there).
"""

from __future__ import annotations

import signal
import time

import click

from safehold.devstack import SCONE_AUTH_CHOICES, Stack, prepare, start, stop, summary_lines
from safehold.devstack.errors import StackError


def print_summary(s: Stack) -> None:
    """Print URLs, CA path and policy path (warnings in yellow on stderr)."""
    for line, warning in summary_lines(s):
        if warning:
            click.secho(line, fg="yellow", bold=True, err=True)
        else:
            click.echo(line)


def register(group: click.Group) -> None:
    """Add ``safehold up``."""

    @group.command("up")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    @click.option("--broker-port", default=8443, show_default=True, type=click.IntRange(1, 65535))
    @click.option("--port", "records_port", default=8700, show_default=True, type=click.IntRange(1, 65535),
                  help="Records API port.")
    @click.option("--scone-port", default=4996, show_default=True, type=click.IntRange(0, 65535),
                  help="SCONE-compatible port (0 = off).")
    @click.option("--scone-auth", type=click.Choice(SCONE_AUTH_CHOICES), default=None,
                  help="Authentication on the SCONE port: token (bearer tokens, as the native API) or "
                       "none (as SCONE's demo: loopback only, anyone on this machine can read and write "
                       "records; warned about loudly). Default: the value in an existing records.toml, "
                       "else token.")
    @click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                  help="The data owner's directory (owner.key, tokens.json), kept apart from the "
                       "server's data; never given to the servers. Default: <data-dir>.owner.")
    @click.option("--reset", is_flag=True,
                  help="Regenerate records.toml even if it was edited (otherwise up refuses).")
    @click.option("--store", "store_url", default=None, help="Store URL (default: sqlite in the data dir).")
    def up(data_dir: str, broker_port: int, records_port: int, scone_port: int, scone_auth: str | None,
           reset: bool, store_url: str | None, owner_dir: str | None) -> None:
        """Start the key broker and the records service (simulated TEE) until Ctrl-C."""
        s = prepare(data_dir, broker_port=broker_port, records_port=records_port,
                    scone_port=scone_port or None, store_url=store_url, scone_auth=scone_auth,
                    reset=reset, owner=owner_dir)
        stopping = {"flag": False}

        def on_signal(signum: int, frame: object) -> None:
            stopping["flag"] = True

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            start(s)
            print_summary(s)
            click.echo("running; Ctrl-C stops both")
            while not stopping["flag"]:
                for name, p in s.procs.items():
                    if p.poll() is not None:
                        raise StackError(f"{name} exited unexpectedly with status {p.returncode}")
                time.sleep(0.2)
        finally:
            codes = stop(s)
            for sig, h in old.items():
                signal.signal(sig, h)
        click.echo(f"stopped ({', '.join(f'{k} exit {v}' for k, v in codes.items())})")
