"""What the service CLIs (``safehold svr``, ``discovery``, ``epa``, ``erezept``) take from a
running ``safehold up``: the service's URLs from ``<data_dir>/up.json``, its client policy from
the data directory only as the owner pinned it (:func:`stack_policy`), and the development
bearer tokens from the owner directory's ``tokens.json``
(:func:`safehold.client.connection.owner_dir`: ``SAFEHOLD_OWNER_DIR`` or ``<data_dir>.owner``).
Explicit options always win.

The data directory is the operator's: a URL from ``up.json`` is trusted only as far as the
server there passes the pinned policy (RA-TLS, before any byte of a request); no CA or policy
*path* that ``up.json`` names is used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from safehold.client.connection import owner_dir
from safehold.client.owner_pins import pinned_policy
from safehold.errors import ConfigError

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

__all__ = ["DATA_DIR_OPTION", "stack_policy", "stack_service", "stack_token"]

#: ``--data-dir`` (``SAFEHOLD_DATA_DIR``): where ``safehold up`` keeps up.json.
DATA_DIR_OPTION = click.option("--data-dir", default="./safehold-data", show_default=True,
                               envvar="SAFEHOLD_DATA_DIR",
                               help="Data directory of `safehold up` (URLs and policy from its up.json).")


def stack_service(data_dir: str, service: str) -> dict[str, Any] | None:
    """``up.json``'s entry for ``service`` (``svr`` / ``discovery`` / ``erezept``); None when no
    stack runs there.

    Raises:
        ConfigError: up.json exists but is unreadable, or the stack runs without that service
            (names the ``--services`` option).
    """
    p = Path(data_dir) / "up.json"
    if not p.exists():
        return None
    try:
        info = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    entry = info.get(service)
    if not isinstance(entry, dict):
        raise ConfigError(f"the stack in {data_dir} does not run {service} (safehold up --services)")
    return entry


def stack_policy(data_dir: str, service: str, owner: str | None = None) -> Verifier:
    """The client policy of ``service`` (``svr`` / ``discovery`` / ``erezept``) in the data
    directory, loaded once, if it is the one the owner pinned (``<owner dir>/pins.json``,
    written by ``safehold up``); the policy path in ``up.json`` is not used.

    Raises:
        ConfigError: no pin, or the file (or the simulated root it names) differs from the pin
            (names the file and what to do: restart ``safehold up``, or ``--url`` and
            ``--policy``). See :func:`safehold.client.owner_pins.pinned_policy`.
    """
    return pinned_policy(data_dir, service, owner)


def stack_token(data_dir: str, role: str, owner: str | None = None) -> str | None:
    """The development token of ``role`` (``admin`` / ``writer`` / ``reader``) from the owner
    directory's ``tokens.json`` (``owner``, else ``SAFEHOLD_OWNER_DIR``, else
    ``<data_dir>.owner``); None if there is none."""
    p = owner_dir(data_dir, owner) / "tokens.json"
    try:
        tok = json.loads(p.read_text("utf-8")).get(role)
    except (OSError, ValueError, AttributeError):
        return None
    return tok if isinstance(tok, str) else None
