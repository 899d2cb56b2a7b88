"""``safehold svr backup|restore|query|delete``: a click layer over the SVR client SDK.

The PIN is read from the terminal without echo (``click.prompt(hide_input=True)``, or
``getpass`` on the controlling terminal when the secret itself comes from standard input); it
is never accepted in argv or the environment. The secret comes from a file or standard input
(``--secret-file -``); a restored secret goes to a file created 0600 (``--out``), or to
standard output with ``--out -``.

Servers: ``--url`` once per server (or ``SAFEHOLD_SVR_URLS``, comma-separated); the bearer token
from ``SAFEHOLD_SVR_TOKEN`` (or ``--token``: argv is visible to other users); ``--policy`` (once,
or once per server) appraises each server's RA-TLS Evidence before anything is sent. Without
``--url``, the servers and their policy come from the ``up.json`` of ``safehold up`` in
``--data-dir`` (and the token from its ``tokens.json``, the ``writer`` user).
``--protocol svr3`` (default) splits the secret across every server; ``svr2`` uses the first.
"""

from __future__ import annotations

import getpass
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from safehold.cli.stackinfo import DATA_DIR_OPTION, stack_policy, stack_service, stack_token
from safehold.errors import ConfigError
from safehold.fsutil import write_atomic

DEFAULT_URLS = "https://127.0.0.1:8730,https://127.0.0.1:8731,https://127.0.0.1:8732"


def _urls(value: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in value:
        out += [u.strip() for u in v.replace(" ", ",").split(",") if u.strip()]
    return out


def _client(protocol: str, urls: tuple[str, ...], token: str | None, policies: tuple[Any, ...],
            insecure_loopback: bool, data_dir: str = "./safehold-data", **_: Any) -> Any:
    # imported here: the SDK loads libsodium and argon2, which the rest of the CLI does not need
    from safehold.client.svr import Svr2Client, Svr3Client

    if not urls:  # from the running `safehold up` (its attested servers), else the default ports
        entry = stack_service(data_dir, "svr")
        if entry is not None:
            urls = tuple(entry["urls"])
            # the data directory's policy only as the owner pinned it (a Verifier, read once)
            policies = policies or (stack_policy(data_dir, "svr"),)
            token = token or stack_token(data_dir, "writer")
        else:
            urls = (DEFAULT_URLS,)
    if not token:
        raise ConfigError("no bearer token: set SAFEHOLD_SVR_TOKEN (or --token)")
    urls_ = _urls(urls)
    if not urls_:
        raise ConfigError("no SVR server: pass --url (once per server) or set SAFEHOLD_SVR_URLS")
    if len(policies) not in (0, 1, len(urls_)):
        raise ConfigError(f"--policy: give one policy, or one per server ({len(urls_)})")
    policy: Any = None
    if policies:
        policy = policies[0] if len(policies) == 1 else list(policies)
    elif insecure_loopback:
        click.secho("WARNING: plain HTTP to loopback SVR servers: they are NOT attested "
                    "(development only)", fg="yellow", err=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if protocol == "svr2":
                p2 = policy[0] if isinstance(policy, list) else policy
                return Svr2Client(urls_[0], token=token, policy=p2, insecure_loopback=insecure_loopback)
            return Svr3Client(urls_, token=token, policy=policy, insecure_loopback=insecure_loopback)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _read_pin(*, confirm: bool, stdin_taken: bool) -> str:
    """The PIN from the terminal, never echoed."""
    if stdin_taken:  # standard input carried the secret: ask the controlling terminal
        try:
            pin = getpass.getpass("PIN: ")
            if confirm and getpass.getpass("Repeat PIN: ") != pin:
                raise click.UsageError("the two PINs differ")
        except (OSError, EOFError):
            raise click.UsageError("no terminal to read the PIN from (the secret came from standard "
                                   "input); pass the secret with --secret-file FILE") from None
        return pin
    return str(click.prompt("PIN", hide_input=True, confirmation_prompt="Repeat PIN" if confirm else False))


def _read_secret(path: str) -> bytes:
    from safehold.svr.protocol import MAX_SECRET

    try:
        data = sys.stdin.buffer.read(MAX_SECRET + 1) if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the secret: {e}") from None
    if not 1 <= len(data) <= MAX_SECRET:
        raise ConfigError(f"the secret must be 1..{MAX_SECRET} bytes, got {len(data)}")
    return data


def register(group: click.Group) -> None:
    """Add ``safehold svr``."""

    @group.group("svr")
    def svr() -> None:
        """Secure Value Recovery: protect a secret with a PIN; the servers limit the guesses."""

    common = [
        DATA_DIR_OPTION,
        click.option("--url", "urls", multiple=True, envvar="SAFEHOLD_SVR_URLS",
                     help="SVR server URL (repeat once per server; or comma-separated). Default: from "
                          f"up.json in --data-dir, else {DEFAULT_URLS}."),
        click.option("--token", default=None, envvar="SAFEHOLD_SVR_TOKEN",
                     help="Bearer token (prefer the SAFEHOLD_SVR_TOKEN variable)."),
        click.option("--policy", "policies", multiple=True, type=click.Path(dir_okay=False),
                     help="Appraisal policy TOML for the servers' RA-TLS Evidence (once, or once per URL)."),
        click.option("--insecure-loopback", is_flag=True,
                     help="Allow plain HTTP to loopback URLs (development servers; not attested)."),
        click.option("--protocol", type=click.Choice(["svr3", "svr2"]), default="svr3", show_default=True,
                     help="svr3: split across every server; svr2: the first server alone."),
        click.option("--label", default="default", show_default=True, help="Which of your backups."),
    ]

    def with_common(f: Any) -> Any:
        for opt in reversed(common):
            f = opt(f)
        return f

    @svr.command("backup")
    @with_common
    @click.option("--secret-file", required=True, help="File holding the secret (1..256 bytes); - for stdin.")
    @click.option("--tries", default=10, show_default=True, type=click.IntRange(1, 255),
                  help="Wrong guesses allowed before the backup is erased.")
    def backup_cmd(label: str, secret_file: str, tries: int, **conn: Any) -> None:
        """Back a secret up under a PIN (asked for twice, not echoed)."""
        secret = _read_secret(secret_file)
        from_stdin = secret_file == "-"  # noqa: S105 - a file name, not a password
        with _client(**conn) as c:
            c.info()
            pin = _read_pin(confirm=True, stdin_taken=from_stdin)
            c.backup(pin, secret, label=label, max_tries=tries)
        done = f"backed up {len(secret)} bytes as {label!r} ({conn['protocol']}, {tries} tries)"
        click.echo(done, err=True)

    @svr.command("restore")
    @with_common
    @click.option("--out", required=True, help="Write the secret here (created 0600); - for stdout.")
    @click.option("--no-refill", is_flag=True, help="Do not back the secret up again after a success.")
    def restore_cmd(label: str, out: str, no_refill: bool, **conn: Any) -> None:
        """Recover the secret: one guess (not echoed)."""
        with _client(**conn) as c:
            c.info()
            pin = _read_pin(confirm=False, stdin_taken=False)
            secret = c.restore(pin, label=label, refill=not no_refill)
        if out == "-":
            sys.stdout.buffer.write(secret)
            sys.stdout.buffer.flush()
        else:
            write_atomic(out, secret, mode=0o600)
        click.echo(f"restored {len(secret)} bytes from {label!r}", err=True)

    @svr.command("query")
    @with_common
    def query_cmd(label: str, **conn: Any) -> None:
        """Show the tries left on each server (charges nothing)."""
        with _client(**conn) as c:
            states = c.query(label=label)
        for s in states if isinstance(states, list) else [states]:
            extra = f"exposed={s.exposed}" if conn["protocol"] == "svr2" else f"version={s.version}"
            click.echo(f"{s.server}\t{s.status}\ttries={s.tries}/{s.max_tries}\t{extra}")

    @svr.command("delete")
    @with_common
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def delete_cmd(label: str, yes: bool, **conn: Any) -> None:
        """Erase the backup on every server."""
        if not yes:
            click.confirm(f"Erase the backup {label!r}? It cannot be recovered afterwards", abort=True)
        with _client(**conn) as c:
            c.delete(label=label)
        click.echo(f"deleted {label!r}", err=True)
