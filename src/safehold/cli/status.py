"""``safehold status``: is the local stack (``safehold up``) running, and what does it serve?

A click layer over :func:`safehold.devstack.status.stack_status`.
"""

from __future__ import annotations

import json
import sys

import click

from safehold.cli.patients import show_warning
from safehold.devstack.status import stack_status


def register(group: click.Group) -> None:
    """Add ``safehold status``."""

    @group.command("status")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    @click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                  help="The data owner's directory (admin token). Default: <data-dir>.owner.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def status(data_dir: str, owner_dir: str | None, as_json: bool) -> None:
        """Show whether the broker and the records service of `safehold up` are up and attested.

        Exit status 0 = both answer and the records service attested, 1 = otherwise."""
        st = stack_status(data_dir, show=show_warning, owner=owner_dir)
        if st.get("scone_auth") == "none":
            click.secho(f"WARNING: the SCONE port ({st['scone_url']}) has NO AUTHENTICATION (started with "
                        "--scone-auth none): any process on this machine can read and create every record "
                        "there", fg="yellow", bold=True, err=True)
        healthy = bool(st["broker"].get("ok") and st["records"].get("attested"))
        if as_json:
            click.echo(json.dumps(st, indent=2))
            if not healthy:
                sys.exit(1)
            return
        b = st["broker"]
        bstat = b["status"]
        mode = bstat.get("mode") if isinstance(bstat, dict) else bstat
        click.echo(f"broker   {b['url']}  {mode}")
        r = st["records"]
        if r.get("attested"):
            click.echo(f"records  {r['url']}  attested ({r.get('tee_type', '?')}, measurement "
                       f"{r.get('measurement', '?')[:16]}…), {r['records']} records")
        else:
            click.echo(f"records  {r['url']}  NOT attested: {r.get('error')}")
        if st.get("scone_url"):
            click.echo(f"scone    {st['scone_url']}  auth {st.get('scone_auth')}")
        if not healthy:
            sys.exit(1)
