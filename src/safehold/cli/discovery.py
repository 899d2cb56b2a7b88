"""``safehold discovery register|unregister|query FILE``: a click layer over the discovery SDK.

Files are CSV or one entry per line (``#`` starts a comment line):

* register: ``identifier,user_id`` (kind from ``--kind``) or ``kind,identifier,user_id``, or a
  CSV with a header naming ``identifier``, ``user_id`` and optionally ``kind``;
* unregister / query: ``identifier`` or ``kind,identifier``, or a CSV with a header naming
  ``identifier`` (and optionally ``kind``).

``query`` prints CSV (``kind,identifier,registered,user_id``) on stdout and a summary on stderr;
``--state FILE`` keeps the rate-limit token and the OPRF outputs already asked about, so asking
again is free. The bearer token comes from ``--token`` or ``SAFEHOLD_DISCOVERY_TOKEN`` (prefer
the variable: argv is visible to other users). Without ``--url``, the service and its policy
come from the ``up.json`` of ``safehold up`` in ``--data-dir``, and the token from its
``tokens.json`` (``admin`` registers, ``reader`` queries). Progress bars appear for files of more than
:data:`PROGRESS_MIN` entries.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from safehold.cli.stackinfo import DATA_DIR_OPTION, stack_policy, stack_service, stack_token
from safehold.discovery.errors import InvalidRequestError
from safehold.errors import ConfigError
from safehold.fsutil import write_atomic

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

PROGRESS_MIN = 2000
DEFAULT_URL = "https://127.0.0.1:8720"


def _rows(path: str) -> Iterator[tuple[int, dict[str, str] | list[str]]]:
    """``(line number, row)``: a dict when the file has a header naming ``identifier``."""
    try:
        text = Path(path).read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return
    first = [c.strip().lower() for c in next(csv.reader([lines[0][1]]))]
    header = first if "identifier" in first else None
    for n, line in lines[1:] if header else lines:
        cells = [c.strip() for c in next(csv.reader(io.StringIO(line)))]
        if header:
            if len(cells) != len(header):
                raise InvalidRequestError(f"{path}:{n}: {len(cells)} columns, header has {len(header)}")
            yield n, dict(zip(header, cells, strict=True))
        else:
            yield n, cells


def _entries(path: str, kind: str, *, with_user: bool) -> list[tuple[int, tuple[str, ...]]]:
    out = []
    want = 3 if with_user else 2
    for n, row in _rows(path):
        if isinstance(row, dict):
            cells = [row.get("kind") or kind, row.get("identifier", "")]
            if with_user:
                cells.append(row.get("user_id", ""))
        elif len(row) == want - 1:
            cells = [kind, *row]
        elif len(row) == want:
            cells = list(row)
        else:
            shape = "[kind,]identifier,user_id" if with_user else "[kind,]identifier"
            raise InvalidRequestError(f"{path}:{n}: expected {shape}, got {len(row)} columns")
        out.append((n, tuple(cells)))
    if not out:
        raise InvalidRequestError(f"{path}: no entries")
    return out


def _client(url: str | None, token: str | None, policy: str | Verifier | None, insecure_loopback: bool,
            data_dir: str = "./safehold-data", role: str = "reader") -> Any:
    # imported here: the SDK loads libsodium, which the rest of the CLI does not need
    from safehold.client.discovery import DiscoveryClient

    if url is None:  # from the running `safehold up` (attested), else the default port
        entry = stack_service(data_dir, "discovery")
        if entry is not None:
            url, policy = str(entry["url"]), policy or stack_policy(data_dir, "discovery")
            token = token or stack_token(data_dir, role)
        else:
            url = DEFAULT_URL
    if not token:
        raise ConfigError("no bearer token: set SAFEHOLD_DISCOVERY_TOKEN (or --token)")
    if policy is None and insecure_loopback:
        click.secho("WARNING: plain HTTP to a loopback discovery service: it is NOT attested "
                    "(development only)", fg="yellow", err=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DiscoveryClient(url, token=token, policy=policy, insecure_loopback=insecure_loopback)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _progress(total: int, label: str) -> Progress | None:
    if total < PROGRESS_MIN:
        return None
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def _with_line(entries: list[tuple[int, tuple[str, ...]]], path: str, exc: Exception) -> Exception:
    msg = str(exc)
    if msg.startswith("entry "):
        idx_text, _, rest = msg[6:].partition(": ")
        if idx_text.isdigit() and int(idx_text) < len(entries):
            return type(exc)(f"{path}:{entries[int(idx_text)][0]}: {rest}")
    return exc


def register(group: click.Group) -> None:
    """Add ``safehold discovery``."""

    @group.group("discovery")
    def discovery() -> None:
        """Private contact discovery: register identifiers, ask which are registered."""

    common = [
        DATA_DIR_OPTION,
        click.option("--url", default=None, envvar="SAFEHOLD_DISCOVERY_URL",
                     help=f"Discovery service URL (default: from up.json in --data-dir, else "
                          f"{DEFAULT_URL})."),
        click.option("--token", default=None, envvar="SAFEHOLD_DISCOVERY_TOKEN",
                     help="Bearer token (prefer the SAFEHOLD_DISCOVERY_TOKEN variable)."),
        click.option("--policy", default=None, type=click.Path(dir_okay=False),
                     help="Appraisal policy TOML for the service's RA-TLS Evidence."),
        click.option("--insecure-loopback", is_flag=True,
                     help="Allow plain HTTP to a loopback URL (development server; not attested)."),
        click.option("--kind", default="e164", show_default=True,
                     help="Identifier kind for lines without one (e164, kvnr, ...)."),
        click.option("--region", default=None, help="Default region for phone numbers without +, e.g. DE."),
    ]

    def with_common(f):
        for opt in reversed(common):
            f = opt(f)
        return f

    @discovery.command("register")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @with_common
    def register_cmd(file: str, data_dir: str, url: str | None,
                     token: str | None, policy: str | None, insecure_loopback: bool,
                     kind: str, region: str | None) -> None:
        """Register identifiers → user ids from FILE."""
        entries = _entries(file, kind, with_user=True)
        items = [(e[0], e[1], e[2]) for _, e in entries]
        bar = _progress(len(items), "registering")
        with _client(url, token, policy, insecure_loopback, data_dir, "admin") as c:
            try:
                if bar:
                    with bar:
                        task = bar.add_task("register", total=len(items))
                        n = c.register(items, region=region,
                                       progress=lambda d, t: bar.update(task, completed=d))
                else:
                    n = c.register(items, region=region)
            except ValueError as e:
                raise _with_line(entries, file, e) from None
        click.echo(f"registered {n} identifiers", err=True)

    @discovery.command("unregister")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @with_common
    def unregister_cmd(file: str, data_dir: str, url: str | None,
                       token: str | None, policy: str | None, insecure_loopback: bool,
                       kind: str, region: str | None) -> None:
        """Remove the registrations of the identifiers in FILE."""
        entries = _entries(file, kind, with_user=False)
        with _client(url, token, policy, insecure_loopback, data_dir, "admin") as c:
            try:
                n = c.unregister([(e[0], e[1]) for _, e in entries], region=region)
            except ValueError as e:
                raise _with_line(entries, file, e) from None
        click.echo(f"removed {n} registrations", err=True)

    @discovery.command("query")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @with_common
    @click.option("--state", "state_file", default=None, type=click.Path(dir_okay=False),
                  help="File keeping the rate-limit token and outputs already asked (created 0600).")
    def query_cmd(file: str, data_dir: str, url: str | None,
                  token: str | None, policy: str | None, insecure_loopback: bool,
                  kind: str, region: str | None, state_file: str | None) -> None:
        """Ask which identifiers in FILE are registered; CSV on stdout."""
        from safehold.client.discovery import QueryState

        entries = _entries(file, kind, with_user=False)
        state = QueryState()
        if state_file and os.path.exists(state_file):
            state = QueryState.from_json(Path(state_file).read_text("utf-8"))
        bar = _progress(len(entries), "evaluating")
        with _client(url, token, policy, insecure_loopback, data_dir, "reader") as c:
            try:
                pairs = [(e[0], e[1]) for _, e in entries]
                if bar:
                    with bar:
                        task = bar.add_task("evaluate", total=len(pairs))
                        res = c.query(pairs, region=region, state=state,
                                      progress=lambda d, t: bar.update(task, completed=d, total=t))
                else:
                    res = c.query(pairs, region=region, state=state)
            except ValueError as e:
                raise _with_line(entries, file, e) from None
        if state_file:
            write_atomic(state_file, res.state.to_json().encode(), mode=0o600)
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["kind", "identifier", "registered", "user_id"])
        for (k, ident), user in res.matches.items():
            out.writerow([k, ident, "yes" if user is not None else "no", user or ""])
        found = sum(u is not None for u in res.matches.values())
        click.echo(f"{found} of {len(res.matches)} registered; charged {res.charged} new, "
                   f"{res.used} of {res.limit} used this period", err=True)
