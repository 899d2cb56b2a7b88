"""``safehold up``: run the key broker and the records service on this machine (development).

A click layer over :mod:`safehold.devstack` (data directory layout, measured configuration,
processes: see there).
"""

from __future__ import annotations

import signal
import time

import click

from safehold.devstack import SCONE_AUTH_CHOICES, Stack, Supervisor, prepare, start, stop, summary_lines
from safehold.devstack.services import ALL_SERVICES, ServicePorts, parse_services
from safehold.errors import ConfigError


def _ports(value: str, n: int, what: str) -> list[int]:
    try:
        ports = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        ports = []
    if len(ports) != n or not all(1 <= p <= 65535 for p in ports):
        raise ConfigError(f"{what}: give {n} comma-separated ports 1..65535, got {value!r}")
    return ports


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
    @click.option("--records-workers", type=click.IntRange(1, 64), default=None,
                  help="Records worker processes (one attestation, forked workers sharing the port, "
                       "the store and the freshness ledger; measured in records.toml, so a change "
                       "updates the manifest). Default: the value in an existing records.toml, else 1.")
    @click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                  help="The data owner's directory (owner.key, tokens.json), kept apart from the "
                       "server's data; never given to the servers. Default: <data-dir>.owner.")
    @click.option("--reset", is_flag=True,
                  help="Regenerate records.toml even if it was edited (otherwise up refuses).")
    @click.option("--store", "store_url", default=None, help="Store URL (default: sqlite in the data dir).")
    @click.option("--services", "services_opt", default="all", show_default=True, envvar="SAFEHOLD_SERVICES",
                  help="Which services to start after the broker and records: a comma-separated list "
                       f"of {', '.join(ALL_SERVICES)}, or all, or none.")
    @click.option("--svr-ports", default="8730,8731,8732", show_default=True,
                  help="The three SVR servers' ports (comma-separated).")
    @click.option("--svr-anchor-ports", default="8735,8736,8737", show_default=True,
                  help="The SVR anchor members' ports (measured: a change changes the manifest).")
    @click.option("--discovery-port", default=8720, show_default=True, type=click.IntRange(1, 65535))
    @click.option("--vau-port", default=8740, show_default=True, type=click.IntRange(1, 65535),
                  help="E-Rezept VAU port.")
    def up(data_dir: str, broker_port: int, records_port: int, scone_port: int, scone_auth: str | None,
           reset: bool, store_url: str | None, owner_dir: str | None, services_opt: str, svr_ports: str,
           svr_anchor_ports: str, discovery_port: int, vau_port: int,
           records_workers: int | None) -> None:
        """Start the key broker, the records service and the services (SVR, contact discovery,
        E-Rezept VAU; simulated TEE) until Ctrl-C.

        A process that exits is restarted with a bounded back-off (the records service and the
        services keep serving while the broker restarts: they need it only at start); `safehold
        status` shows the restarts."""
        ports = ServicePorts(svr=_ports(svr_ports, 3, "--svr-ports"),
                             anchor=_ports(svr_anchor_ports, 3, "--svr-anchor-ports"),
                             discovery=discovery_port, vau=vau_port)
        t0 = time.monotonic()
        s = prepare(data_dir, broker_port=broker_port, records_port=records_port,
                    scone_port=scone_port or None, store_url=store_url, scone_auth=scone_auth,
                    reset=reset, owner=owner_dir, services=parse_services(services_opt),
                    service_ports=ports, records_workers=records_workers)
        stopping = {"flag": False}

        def on_signal(signum: int, frame: object) -> None:
            stopping["flag"] = True

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            start(s)
            print_summary(s)
            click.echo(f"running (started in {time.monotonic() - t0:.1f} s); Ctrl-C stops everything")
            sup = Supervisor(s)  # a crashed process is restarted, logged
            while not stopping["flag"]:
                for line in sup.check():
                    click.secho(line, fg="yellow", err=True)
                time.sleep(0.2)
        finally:
            codes = stop(s)
            for sig, h in old.items():
                signal.signal(sig, h)
        click.echo(f"stopped ({', '.join(f'{k} exit {v}' for k, v in codes.items())})")
