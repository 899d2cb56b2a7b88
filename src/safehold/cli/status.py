"""``safehold status``: is the local stack (``safehold up``) running, and what does it serve?

Reads ``<data dir>/up.json``, asks the broker for its status (over TLS pinned to the workload
CA), attests the records service (RA-TLS appraisal under the client policy) and counts records.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import click

from safehold.errors import ConfigError, SafeholdError


def collect(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Status of the stack in ``data_dir`` as a JSON-ready dict.

    ``broker.ok`` / ``records.attested`` say whether each answered (and attested).

    Raises:
        ConfigError: no ``up.json`` (the stack is not running) or an unreadable one.
    """
    import httpx

    from safehold.cli.patients import load_connection, open_client, transport_reason

    p = Path(data_dir) / "up.json"
    if not p.exists():
        raise ConfigError(f"no running stack: {p} not found (start one with `safehold up`)")
    try:
        info = json.loads(p.read_text("utf-8"))
        broker_url, records_url, ca = info["broker_url"], info["records_url"], info["ca"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p}: unreadable ({type(e).__name__}: {e})") from None
    out: dict[str, Any] = {"data_dir": str(Path(data_dir).resolve())}
    try:
        ctx = ssl.create_default_context(cafile=ca)
        r = httpx.get(f"{broker_url}/status", verify=ctx, timeout=5)
        ok = r.status_code == 200
        out["broker"] = {"url": broker_url, "ok": ok, "status": r.json() if ok else f"HTTP {r.status_code}"}
    except (httpx.HTTPError, ssl.SSLError, OSError, ValueError) as e:
        out["broker"] = {"url": broker_url, "ok": False,
                         "status": f"cannot reach the broker at {broker_url}: {transport_reason(e)}"}

    rec: dict[str, Any] = {"url": records_url}
    try:
        with open_client(load_connection(data_dir)) as c:
            rec["records"] = sum(1 for _ in c.list_ids())
            rec["attested"] = True
            appraisal = c.appraisal
            if appraisal is not None:
                rec["measurement"] = appraisal.claims.measurement.hex()
                rec["tee_type"] = appraisal.claims.tee_type
    except SafeholdError as e:
        rec["attested"] = False
        rec["error"] = str(e) or type(e).__name__
    out["records"] = rec
    if info.get("scone_port"):
        out["scone_url"] = f"https://api:{info['scone_port']}"
    return out


def register(group: click.Group) -> None:
    """Add ``safehold status``."""

    @group.command("status")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def status(data_dir: str, as_json: bool) -> None:
        """Show whether the broker and the records service of `safehold up` are up and attested.

        Exit status 0 = both answer and the records service attested, 1 = otherwise."""
        st = collect(data_dir)
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
            click.echo(f"scone    {st['scone_url']}")
        if not healthy:
            sys.exit(1)
