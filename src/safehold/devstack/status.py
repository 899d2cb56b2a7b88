"""The status of a running local stack (``safehold status``).

Reads ``<data dir>/up.json``, asks the broker for its status (over TLS pinned to the workload
CA the owner pinned), attests the records service (RA-TLS appraisal under the client policy the
owner pinned: ``<owner dir>/pins.json``), counts records,
and shows the freshness anchor (members ready / lost mode; each ledger's committed vs anchored
epoch and the owner's checkpoint: :func:`safehold.devstack.anchor.freshness_status`).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from safehold.client.connection import load_connection, open_client, transport_reason
from safehold.errors import ConfigError, SafeholdError

__all__ = ["stack_status"]


def stack_status(data_dir: str | os.PathLike[str], *,
                 show: Callable[[str], None] | None = None,
                 owner: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Status of the stack in ``data_dir`` as a JSON-ready dict.

    ``broker.ok`` / ``records.attested`` say whether each answered (and attested);
    ``scone_auth`` is the SCONE port's authentication (``"none"`` = open to every local process).

    Args:
        show: displays the one-line simulated-TEE warning (default: stderr).
        owner: the owner directory (its admin token counts the records); default
            :func:`safehold.client.connection.owner_dir`.

    Raises:
        ConfigError: no ``up.json`` (the stack is not running) or an unreadable one.
    """
    p = Path(data_dir) / "up.json"
    if not p.exists():
        raise ConfigError(f"no running stack: {p} not found (start one with `safehold up`)")
    try:
        info = json.loads(p.read_text("utf-8"))
        broker_url, records_url = info["broker_url"], info["records_url"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p}: unreadable ({type(e).__name__}: {e})") from None
    out: dict[str, Any] = {"data_dir": str(Path(data_dir).resolve())}
    try:
        # the broker's TLS against the workload CA the owner pinned, never the CA file up.json
        # names (the operator's): an impostor must not show as a ready broker
        from safehold.devstack.datadir import https_url

        ctx = _pinned_ca_context(Path(data_dir), owner)
        https_url(broker_url, f"{p} (broker_url)")  # no TLS, no check: not an https broker
        r = httpx.get(f"{broker_url}/status", verify=ctx, timeout=5)
        ok = r.status_code == 200
        out["broker"] = {"url": broker_url, "ok": ok, "status": r.json() if ok else f"HTTP {r.status_code}"}
    except (httpx.HTTPError, ssl.SSLError, OSError, ValueError) as e:
        out["broker"] = {"url": broker_url, "ok": False,
                         "status": f"cannot reach the broker at {broker_url}: {transport_reason(e)}"}
    except ConfigError as e:
        out["broker"] = {"url": broker_url, "ok": False, "status": f"not checked: {e}"}

    rec: dict[str, Any] = {"url": records_url}
    try:
        conn = load_connection(data_dir, owner=owner)
        with open_client(conn) if show is None else open_client(conn, show=show) as c:
            rec["records"] = sum(1 for _ in c.list_ids())
            rec["attested"] = True
            appraisal = c.appraisal
            if appraisal is not None:
                rec["measurement"] = appraisal.claims.measurement.hex()
                rec["tee_type"] = appraisal.claims.tee_type
    except SafeholdError as e:
        rec["attested"] = False
        rec["error"] = str(e) or type(e).__name__
    try:  # worker processes (records.toml `workers`): from the service's ready file
        ready = json.loads((Path(data_dir) / "records-ready.json").read_text("utf-8"))
        if isinstance(ready, dict) and "workers" in ready:
            rec["workers"], rec["workers_ready"] = ready["workers"], ready.get("workers_ready")
    except (OSError, ValueError):
        pass
    out["records"] = rec
    out["restarts"] = info.get("restarts", {})  # by `safehold up`'s supervisor
    if info.get("scone_port"):
        out["scone_url"] = f"https://api:{info['scone_port']}"
        out["scone_auth"] = info.get("scone_auth")
    if info.get("services"):  # SVR, discovery, VAU (devstack/services.py)
        from safehold.devstack.services import services_status

        out["services"] = services_status(info, data_dir, owner)
    if info.get("anchor_urls"):
        from safehold.devstack.anchor import freshness_status

        try:
            out["freshness"] = freshness_status(Path(data_dir), Path(owner) if owner else None)
        except SafeholdError as e:
            out["freshness"] = {"error": str(e)}
    return out


def _pinned_ca_context(d: Path, owner: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A TLS context trusting only the workload CA the owner pinned for ``d`` (loaded once).

    Raises:
        ConfigError: no pin, or no CA file in ``d`` is the pinned one.
    """
    from safehold.client.connection import owner_dir
    from safehold.devstack.datadir import OWNER_PINS_FILE, pinned_ca_context

    return pinned_ca_context(d, owner_dir(d, owner) / OWNER_PINS_FILE)
