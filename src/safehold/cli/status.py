"""``safehold status``: is the local stack (``safehold up``) running, and what does it serve?

A click layer over :func:`safehold.devstack.status.stack_status`.
"""

from __future__ import annotations

import json
import sys

import click

from safehold.cli.patients import show_warning
from safehold.client.connection import simulated_tee_notice
from safehold.devstack.status import stack_status


def register(group: click.Group) -> None:
    """Add ``safehold status``."""

    @group.command("status")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    @click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                  help="The data owner's directory (admin token). Default: <data-dir>.owner.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def status(data_dir: str, owner_dir: str | None, as_json: bool) -> None:
        """Show whether the broker, the records service and the services (SVR, discovery, VAU) of
        `safehold up` are up and attested.

        Exit status 0 = all answer and every workload attested, 1 = otherwise."""
        shown = False

        def once(line: str) -> None:
            nonlocal shown
            if not shown:
                shown = True
                show_warning(line)

        # every workload's appraisal (SVR, discovery, VAU, anchor members too) would log the
        # simulated-TEE warning again: one line for the whole command, as `patients` shows it
        with simulated_tee_notice(once):
            st = stack_status(data_dir, show=once, owner=owner_dir)
        if st.get("scone_auth") == "none":
            click.secho(f"WARNING: the SCONE port ({st['scone_url']}) has NO AUTHENTICATION (started with "
                        "--scone-auth none): any process on this machine can read and create every record "
                        "there", fg="yellow", bold=True, err=True)
        services = st.get("services", {})
        healthy = bool(st["broker"].get("ok") and st["records"].get("attested")
                       and all(v["ok"] for v in services.values()))
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
            workers = f", workers {r.get('workers_ready')}/{r['workers']} ready" if "workers" in r else ""
            click.echo(f"records  {r['url']}  attested ({r.get('tee_type', '?')}, measurement "
                       f"{r.get('measurement', '?')[:16]}…), {r['records']} records{workers}")
        else:
            click.echo(f"records  {r['url']}  NOT attested: {r.get('error')}")
        if st.get("scone_url"):
            click.echo(f"scone    {st['scone_url']}  auth {st.get('scone_auth')}")
        for name, v in services.items():
            click.echo(f"{name:<10}{v['url']}  {v['status']}")
        for name, r in sorted(st.get("restarts", {}).items()):
            click.echo(f"restarts {name}: {r.get('count', 0)} (last exit status {r.get('last_exit_status')} "
                       f"at {r.get('last_exit_at', '?')}, restarted {r.get('last_restart_at', 'not yet')})")
        fr = st.get("freshness")
        if isinstance(fr, dict) and "ledgers" in fr:
            ready = sum(1 for m in fr.get("members", []) if m.get("ready"))
            lost = sum(1 for m in fr.get("members", []) if m.get("lost_mode"))
            click.echo(f"anchor   {ready}/{len(fr.get('member_urls', []))} members ready"
                       + (f", {lost} started in lost mode" if lost else ""))
            for led, r in fr["ledgers"].items():
                if "error" in r:
                    click.echo(f"  {led:<8} unreachable: {r['error']}")
                else:
                    click.echo(f"  {led:<8} committed epoch {r['committed_epoch']}, anchored "
                               f"{r['anchored_epoch']}, checkpoint {_epoch(r['checkpoint_epoch'])}"
                               + ("" if r["serving"] else f"  NOT FRESH: {r['problem']}"))
        elif isinstance(fr, dict):
            click.echo(f"anchor   {fr.get('error')}")
        if not healthy:
            sys.exit(1)


def _epoch(e: object) -> object:
    """A checkpoint epoch for the text view: ``none yet`` before the owner's first checkpoint
    (the JSON's null), not Python's ``None``."""
    return "none yet" if e is None else e
