"""``safehold freshness status|proposal|reanchor|checkpoint``: the data owner's view of the
freshness anchor of the local stack (``safehold up``) and the owner's re-anchoring step
(docs/freshness.md). A click layer over :mod:`safehold.devstack.anchor`.

``reanchor`` shows what would be accepted (rows, head, last entry, last audit entry), compares
it with the owner's checkpoint (an older state is refused unless ``--accept-rollback``; a fork
always), asks for confirmation, signs the statement with the owner key (on this device; it is
never sent) and posts it; the service records the step in its audit log and its journal.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

_DATA = click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR",
                     type=click.Path(file_okay=False))
_OWNER = click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                      type=click.Path(file_okay=False),
                      help="The owner directory (owner.key, tokens.json); default <data-dir>.owner.")
_SERVICE = click.option("--service", "ledger", type=click.Choice(["records", "broker"]), default="records",
                        show_default=True, help="Whose ledger.")


def _show_proposal(doc: dict[str, Any]) -> None:
    p = doc["proposal"]
    when = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p["last_entry_time_ms"] / 1000))
            if p.get("last_entry_time_ms") else "-")
    click.echo(f"ledger        {p['ledger']}  ({doc['action']})")
    click.echo(f"head          epoch {p['epoch']}  digest {p['digest']}")
    per_ns = ", ".join(f"{k}={v}" for k, v in sorted(p["namespaces"].items()))
    click.echo(f"rows          {p['rows']}  {per_ns}")
    click.echo(f"newest entry  {when}")
    if "last_audit_entry" in p:
        click.echo(f"last audit    {json.dumps(p['last_audit_entry'])}")
    click.echo(f"problem       {p.get('problem')}")
    click.echo(f"checkpoint    {doc.get('checkpoint')}")


def register(group: click.Group) -> None:
    """Add ``safehold freshness``."""

    @group.group("freshness")
    def freshness() -> None:
        """Rollback / fork detection: anchor members, ledgers, the owner's re-anchoring."""

    @freshness.command("status")
    @_DATA
    @_OWNER
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def status(data_dir: str, owner_dir: str | None, as_json: bool) -> None:
        """Members (ready / lost mode) and each ledger's committed vs anchored epoch.
        Exit 1 if a ledger is not serving."""
        from safehold.devstack.anchor import freshness_status

        st = freshness_status(Path(data_dir), owner_dir)
        ok = all(r.get("serving") for r in st["ledgers"].values())
        if as_json:
            click.echo(json.dumps(st, indent=2))
        else:
            ready = sum(1 for m in st["members"] if m["ready"])
            lost = sum(1 for m in st["members"] if m["lost_mode"])
            click.echo(f"anchor   {ready}/{len(st.get('member_urls', []))} members ready"
                       + (f", {lost} started in lost mode" if lost else "")
                       + (f"  ({st['members_error']})" if st.get("members_error") else ""))
            for led, r in st["ledgers"].items():
                if "error" in r:
                    click.echo(f"{led:<8} unreachable: {r['error']}")
                    continue
                cp = "none yet" if r["checkpoint_epoch"] is None else r["checkpoint_epoch"]
                click.echo(f"{led:<8} committed {r['committed_epoch']}  anchored {r['anchored_epoch']}  "
                           f"checkpoint {cp}  "
                           + ("serving" if r["serving"] else f"NOT SERVING: {r['problem']}"))
        if not ok:
            sys.exit(1)

    @freshness.command("proposal")
    @_DATA
    @_OWNER
    @_SERVICE
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def proposal_cmd(data_dir: str, owner_dir: str | None, ledger: str, as_json: bool) -> None:
        """What re-anchoring the ledger would accept, and what the checkpoint says of it."""
        from safehold.devstack.anchor import proposal

        doc = proposal(Path(data_dir), ledger, owner_dir)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            _show_proposal(doc)

    @freshness.command("reanchor")
    @_DATA
    @_OWNER
    @_SERVICE
    @click.option("--key", "key_path", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="The owner's private key (PEM; default <owner-dir>/owner.key, the dev owner).")
    @click.option("--accept-rollback", is_flag=True,
                  help="Accept a state older than the owner's checkpoint (data written since is lost).")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def reanchor_cmd(data_dir: str, owner_dir: str | None, ledger: str, key_path: str | None,
                     accept_rollback: bool, yes: bool) -> None:
        """Sign and apply the owner's re-anchoring (or first initialisation) of a ledger."""
        from safehold.client.connection import owner_dir as default_owner_dir
        from safehold.devstack.anchor import reanchor

        key = Path(key_path) if key_path else default_owner_dir(data_dir, owner_dir) / "owner.key"

        def confirm(doc: dict[str, Any]) -> bool:
            _show_proposal(doc)
            if accept_rollback and doc.get("checkpoint", "").startswith("StoreRolledBack"):
                click.secho("ACCEPTING A ROLLBACK: writes after this state are lost for good", fg="red",
                            err=True)
            return yes or click.confirm(f"sign and apply this with {key}?", default=False)

        out = reanchor(Path(data_dir), ledger, key.read_bytes(), accept_rollback=accept_rollback,
                       confirm=confirm, owner=owner_dir)
        click.echo(f"re-anchored {out['ledger']} at epoch {out['epoch']} (digest {out['digest'][:16]}…); "
                   "recorded in its audit log and journal")

    @freshness.command("checkpoint")
    @_DATA
    @_OWNER
    def checkpoint_cmd(data_dir: str, owner_dir: str | None) -> None:
        """Take the owner's checkpoint now (``<owner-dir>/anchor-checkpoint.json``)."""
        from safehold.devstack.anchor import checkpoint_now

        for led, epoch in checkpoint_now(Path(data_dir), owner_dir).items():
            click.echo(f"{led:<8} checkpoint at epoch {epoch}")
