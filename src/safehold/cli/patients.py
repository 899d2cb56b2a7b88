"""``safehold patients …``: import, get, list, search and delete patient records.

A click layer over :mod:`safehold.client.connection` (connection settings from the ``up.json``
that ``safehold up`` writes, the data directory's ``policy.toml`` only as the owner pinned it in
``<owner dir>/pins.json``, or from ``--url`` / ``--policy`` / ``--token`` / ``SAFEHOLD_TOKEN``;
every request over the attesting transport: no byte is sent before the service's Evidence
passes the policy) and :mod:`safehold.client.importer` (the resumable
import). A transport failure is one line naming the URL and exit status 1; the simulated-TEE
warning shows once as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import click

from safehold.client.connection import Connection, load_connection, open_client
from safehold.client.connection import owner_dir as owner_path
from safehold.client.errors import RecordsClientError
from safehold.client.importer import (
    ON_CONFLICT,
    STATE_FILE,
    ImportCheckpoint,
    ImportCounts,
    count_patients,
    expand_paths,
    import_files,
)
from safehold.client.owner_pins import check_owner_private
from safehold.client.records import RecordsClient
from safehold.errors import RecordNotFoundError, SafeholdError
from safehold.fsutil import write_atomic
from safehold.records.model import display_name

F = TypeVar("F", bound=Callable[..., object])


def show_warning(line: str) -> None:
    """Show a one-line warning (the simulated-TEE notice) in yellow on stderr."""
    click.secho(line, fg="yellow", err=True)


@contextlib.contextmanager
def client(conn: Connection) -> Iterator[RecordsClient]:
    """:func:`~safehold.client.connection.open_client` with the CLI's warning display."""
    with open_client(conn, show=show_warning) as c:
        yield c


@contextlib.contextmanager
def _naming(record_id: str) -> Iterator[None]:
    """A 404 names the id the user gave: the service's answer names only the row's blind index
    (``no record at row 0199… in namespace 'patients'``), never the id. The client raises
    :class:`RecordNotFoundError` for that 404 (not a RecordsClientError)."""
    try:
        yield
    except RecordNotFoundError as e:
        raise RecordNotFoundError(f"no record {record_id!r} ({e})") from None
    except RecordsClientError as e:
        if e.status != 404:
            raise
        raise RecordsClientError(f"no record {record_id!r} ({e})", e.status, e.code) from None


def _stdout_closed() -> None:
    """After a BrokenPipeError on stdout: point stdout at /dev/null, so the interpreter's final
    flush does not raise again (the Python ``signal`` documentation's recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


_conn_options = [
    click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR",
                 help="Data directory of `safehold up` (holds up.json)."),
    click.option("--url", default=None, help="Records service URL (default: from up.json)."),
    click.option("--policy", default=None,
                 help="Appraisal policy TOML for the service's Evidence (default: the data directory's "
                      "policy.toml, only as `safehold up` pinned it in the owner directory's pins.json)."),
    click.option("--token", default=None, envvar="SAFEHOLD_TOKEN", help="Bearer token."),
    click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                 help="The data owner's directory of `safehold up` (its tokens.json gives the admin "
                      "token when --token is not given). Default: <data-dir>.owner."),
]


def conn_options(f: F) -> F:
    """Decorator adding the connection options."""
    for o in reversed(_conn_options):
        f = o(f)
    return f


def register(group: click.Group) -> None:
    """Add ``safehold patients`` to the CLI."""

    @group.group("patients")
    def patients() -> None:
        """Import, read, list, search and delete patient records (over attested TLS)."""

    @patients.command("import")
    @click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
    @conn_options
    @click.option("--restart", is_flag=True, help="Forget the resume checkpoint and start over.")
    @click.option("--on-conflict", type=click.Choice(ON_CONFLICT), default="fail", show_default=True,
                  help="An id met again in this run with different content: fail (report, keep the "
                       "first), skip (keep the first, note it) or overwrite (the later one wins).")
    def import_cmd(files: tuple[str, ...], data_dir: str, url: str | None, policy: str | None,
                   token: str | None, owner_dir: str | None, restart: bool, on_conflict: str) -> None:
        """Import Synthea CSV (patients.csv) and FHIR R4 Bundle / NDJSON / Patient JSON files.

        Patients go to the native API; the other resources of Bundles and NDJSON (Observation,
        Condition, Encounter, …) to the FHIR endpoint. Prints the counts of imported / skipped /
        failed records. Exit status 0 = everything
        imported or already there, 1 = a record or file failed or the service is unreachable,
        130 / 143 = interrupted by SIGINT / SIGTERM (progress checkpointed: run the same command
        again to resume).

        A named directory contributes its own patients.csv / *.json / *.ndjson (not its
        subdirectories'); one that contributes nothing is a usage error (exit status 2), not a
        silent "imported 0".
        """
        for f in files:
            if Path(f).is_dir() and not expand_paths([f]):
                raise click.UsageError(
                    f"{f}: no file to import directly in this directory (patients.csv, *.json, "
                    "*.ndjson; subdirectories are not searched: name them, e.g. DIR/*/)")
        conn = load_connection(data_dir, url, policy, token, owner_dir)
        # the checkpoint names record ids and how far each file got: the owner's, not the
        # operator's data directory (it could read the ids, or move the resume point)
        owner = owner_path(data_dir, owner_dir)
        if owner.is_dir():
            check_owner_private(owner)  # the checkpoint names record ids: not into someone else's
        ckpt_path = owner / STATE_FILE if owner.is_dir() else None
        counts = ImportCounts()
        failures: list[tuple[str, str]] = []

        def interrupted(signum: int, frame: object) -> None:
            raise _ImportInterrupted(signum)

        # --restart again would forget the checkpoint the hint promises to resume from
        again = "the same command again" + (" without --restart" if restart else "")
        old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _run_import(conn, expand_paths(files), ckpt_path, restart, counts, failures, on_conflict)
        except _ImportInterrupted as e:
            _print_failures(failures)
            click.secho(f"interrupted: {counts.acknowledged} records checkpointed; "
                        f"run {again} to resume", fg="yellow", err=True)
            sys.exit(128 + e.signum)
        except SafeholdError as e:
            _print_failures(failures)
            click.secho(f"error: {e}", fg="red", err=True)
            if counts.acknowledged:
                click.echo(f"{counts.acknowledged} records checkpointed; run {again} to resume",
                           err=True)
            sys.exit(1)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        _print_failures(failures)
        click.echo(f"imported {counts.imported}, skipped {counts.skipped}, failed {counts.failed}"
                   f"; other FHIR resources (Observation, Condition, …): imported "
                   f"{counts.resources_imported}, skipped {counts.resources_skipped}"
                   + (f", ignored {counts.other_resources}" if counts.other_resources else "")
                   + (f"; conflicts {counts.conflicts}" if counts.conflicts else ""))
        if counts.failed:
            files_note = f", {counts.files_failed} of them whole files" if counts.files_failed else ""
            click.secho(f"{counts.failed} failed{files_note}: see the lines above", fg="red", err=True)
            sys.exit(1)

    @patients.command("get")
    @click.argument("record_id")
    @conn_options
    def get_cmd(record_id: str, data_dir: str, url: str | None, policy: str | None,
                token: str | None, owner_dir: str | None) -> None:
        """Print one record as JSON."""
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c, _naming(record_id):
            rec = c.get(record_id)
        click.echo(json.dumps(rec.data, indent=2, ensure_ascii=False))

    @patients.command("list")
    @conn_options
    @click.option("--limit", default=0, type=click.IntRange(min=0),
                  help="Stop after this many ids (0 = all).")
    def list_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None,
                 owner_dir: str | None, limit: int) -> None:
        """Print record ids, one per line (`| head` ends the listing quietly, exit status 0).
        \f
        The BrokenPipeError of a closed stdout is a ConnectionError, which the client block
        would otherwise report as an unreachable service."""
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c:
            for n, rid in enumerate(c.list_ids(), start=1):
                try:
                    click.echo(rid)
                except BrokenPipeError:
                    _stdout_closed()
                    return
                if limit and n >= limit:
                    break

    @patients.command("search")
    @conn_options
    @click.option("--family", default=None, help="Family name, whole (not a prefix).")
    @click.option("--given", default=None, help="Given name, whole (not a prefix).")
    @click.option("--birth-date", "birthDate", default=None, help="FHIR date: YYYY, YYYY-MM or YYYY-MM-DD.")
    @click.option("--gender", default=None, help="male, female, other or unknown.")
    @click.option("--identifier", default=None, help="An identifier value (e.g. an SSN) or system|value.")
    def search_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None,
                   owner_dir: str | None, **criteria: str | None) -> None:
        """Exact-match search (case-insensitive) through blind indexes; prints id and name."""
        crit: dict[str, str] = {k: v for k, v in criteria.items() if v}
        if not crit:
            raise click.UsageError("give at least one of --family --given --birth-date --gender --identifier")
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c:
            hits = c.search(limit=100, **crit)
        for r in hits:
            click.echo(f"{r.id}\t{display_name(r.data)}")
        click.echo(f"{len(hits)} match(es)", err=True)

    @patients.command("delete")
    @click.argument("record_id")
    @conn_options
    def delete_cmd(record_id: str, data_dir: str, url: str | None, policy: str | None,
                   token: str | None, owner_dir: str | None) -> None:
        """Delete one record."""
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c, _naming(record_id):
            c.delete(record_id)
        click.echo(f"deleted {record_id}")


    @patients.group("audit")
    def audit() -> None:
        """The records service's access audit (admin): verify the chain, export old entries for
        retention and seal them off the live database."""

    @audit.command("verify")
    @conn_options
    @click.option("--full", is_flag=True, help="Walk the whole live chain, not only the entries "
                                                "appended since the last verified checkpoint.")
    def audit_verify_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None,
                         owner_dir: str | None, full: bool) -> None:
        """Verify the access-audit hash chain against its authenticated head.

        Prints the number of entries ever appended. Exit status 1 with the break named (e.g. a
        tail cut off behind the head, an edited entry) when it does not verify."""
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c:
            n = c.audit_verify_full() if full else c.audit_verify()
        click.echo(f"access audit verified: {n} entries")

    @audit.command("export")
    @click.argument("out", type=click.Path(dir_okay=False, writable=True))
    @conn_options
    @click.option("--through", required=True, type=click.IntRange(min=0),
                  help="Last entry number to export (from the oldest live one; the newest stays live).")
    def audit_export_cmd(out: str, data_dir: str, url: str | None, policy: str | None, token: str | None,
                         owner_dir: str | None, through: int) -> None:
        """Export the oldest live access-audit entries through --through to OUT (NDJSON).

        Nothing is dropped: keep OUT where audit records are retained, then run
        `safehold patients audit seal OUT`. OUT must not exist; it is written whole or not at
        all."""
        if Path(out).exists():
            raise click.UsageError(f"{out} exists: choose a new file (an export is never overwritten)")
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c:
            seg = c.audit_segment(through)
        write_atomic(out, seg.data, mode=0o600)
        click.echo(f"exported entries {seg.first}..{seg.last} to {out} (sha256 {seg.sha256})")

    @audit.command("seal")
    @click.argument("segment", type=click.Path(exists=True, dir_okay=False))
    @conn_options
    @click.option("--through", default=None, type=click.IntRange(min=0),
                  help="The --through the segment was exported with (default: the last entry "
                       "in SEGMENT; given, it must be that one).")
    def audit_seal_cmd(segment: str, data_dir: str, url: str | None, policy: str | None,
                       token: str | None, owner_dir: str | None, through: int | None) -> None:
        """Drop the entries in SEGMENT (a file `safehold patients audit export` wrote) from the
        live database.

        The service re-reads the live entries and drops them only if their SHA-256 equals
        SEGMENT's, so only what was exported and kept can be sealed; the digest stays in the
        signed chain (`safehold patients audit verify` still covers it)."""
        data = Path(segment).read_bytes()
        last = _segment_last_seq(data)
        if last is None:
            raise click.UsageError(f"{segment}: not an audit export (NDJSON entries with \"seq\")")
        if through is not None and through != last:
            raise click.UsageError(f"{segment} ends at entry {last}, not --through {through} "
                                   f"(leave --through out to take the file's)")
        digest = hashlib.sha256(data).hexdigest()
        through = last
        with client(load_connection(data_dir, url, policy, token, owner_dir)) as c:
            first, last, sha = c.audit_seal(through, digest)
        click.echo(f"sealed entries {first}..{last} (sha256 {sha})")


def _segment_last_seq(data: bytes) -> int | None:
    """The ``seq`` of the last entry of an ``audit export`` file, or None if it is not one."""
    lines = data.splitlines()
    try:
        seq = json.loads(lines[-1]).get("seq") if lines else None
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None


class _ImportInterrupted(BaseException):  # a signal like KeyboardInterrupt, not an error: no "Error" suffix
    """SIGINT / SIGTERM arrived during ``patients import`` (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _print_failures(failures: list[tuple[str, str]]) -> None:
    for src, reason in failures[:20]:
        click.echo(f"{click.style('failed', fg='yellow')} {src}: {reason}", err=True)
    if len(failures) > 20:
        click.echo(f"… and {len(failures) - 20} more failures", err=True)
    failures.clear()


def _run_import(conn: Connection, paths: list[Path], ckpt_path: Path | None, restart: bool,
                counts: ImportCounts, failures: list[tuple[str, str]], on_conflict: str = "fail") -> None:
    """The body of ``patients import`` (progress bar on stderr); updates ``counts``/``failures``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if restart:
        ImportCheckpoint(ckpt_path, conn.target).reset()
    console = Console(stderr=True)
    total = count_patients(paths)
    with client(conn) as records:
        records.list_page(limit=1)  # attest and authenticate before reading a record
        with Progress(TextColumn("[bold]importing[/] {task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=False) as prog:
            task = prog.add_task("", total=total)
            import_files(
                records, paths, ckpt_path, target=conn.target, counts=counts,
                progress=lambda n, d: prog.update(task, advance=n, description=d),
                on_failure=lambda s, r: failures.append((s, r)),
                on_notice=lambda m: console.print(f"[yellow]note[/] {m}"), on_conflict=on_conflict,
            )
