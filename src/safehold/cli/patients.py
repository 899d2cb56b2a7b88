"""``safehold patients …``: import, get, list, search and delete patient records.

Connection settings come from the ``up.json`` that ``safehold up`` writes into the data
directory (records URL, the appraisal policy for the service's Evidence, the workload CA, the
bearer token), or from ``--url`` / ``--policy`` / ``--token`` / ``SAFEHOLD_TOKEN``. Every
request goes over the attesting transport: no byte is sent before the service's Evidence
passes the policy.

Import is resumable: after each acknowledged batch the number of items done per input file
(keyed by the file's SHA-256) is saved in ``<data dir>/import-state.json``; a re-run skips them,
and the service itself leaves byte-identical records alone (counted as skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from safehold.errors import ConfigError

BATCH = 100
UP_FILE = "up.json"


@dataclass
class Connection:
    """How to reach the records service: ``url``, ``policy`` (path), ``token``, ``ca`` (path)."""

    url: str
    policy: str
    token: str | None
    ca: str | None


def load_connection(data_dir: str | os.PathLike[str], url: str | None = None,
                    policy: str | None = None, token: str | None = None) -> Connection:
    """Merge ``<data_dir>/up.json`` with explicit options (options win).

    Raises:
        ConfigError: no URL or policy known (``safehold up`` not running and no options).
    """
    info: dict[str, Any] = {}
    p = Path(data_dir) / UP_FILE
    if p.exists():
        try:
            info = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: unreadable ({e})") from None
    url = url or info.get("records_url")
    policy = policy or info.get("policy")
    token = token or os.environ.get("SAFEHOLD_TOKEN") or info.get("admin_token")
    if not url or not policy:
        raise ConfigError(
            f"no records service known: run `safehold up` (writes {p}) or pass --url and --policy"
        )
    return Connection(url, policy, token, info.get("ca"))


def make_client(conn: Connection) -> Any:
    """A :class:`~safehold.client.records.RecordsClient` over the attesting transport."""
    from safehold.client.records import RecordsClient

    return RecordsClient(conn.url, token=conn.token, policy=conn.policy)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ImportCounts:
    """Totals of one import run."""

    imported: int = 0
    skipped: int = 0
    failed: int = 0
    other_resources: int = 0
    files_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return dict(self.__dict__)


def import_files(client: Any, files: list[Path], state_path: Path | None, *,
                 progress: Any = None, on_failure: Any = None) -> ImportCounts:
    """Import ``files`` through ``client`` in batches of :data:`BATCH`; resumable via ``state_path``.

    Args:
        client: a RecordsClient (or anything with ``batch(items)``).
        files: input files (Synthea CSV, FHIR Bundle/NDJSON/Patient JSON).
        state_path: JSON checkpoint file (None = not resumable).
        progress: optional callable ``(advance_items: int, description: str)``.
        on_failure: optional callable ``(source: str, reason: str)``.

    Raises:
        RecordsClientError / AttestationError: the service failed or failed appraisal (the
            checkpoint keeps what was acknowledged so far).
    """
    from safehold.records.importers import ImportFormatError, ImportItem, ImportProblem, iter_file

    state: dict[str, int] = {}
    if state_path and state_path.exists():
        try:
            state = json.loads(state_path.read_text("utf-8"))
        except (OSError, ValueError):
            state = {}
    counts = ImportCounts()

    def save() -> None:
        if state_path:
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state), "utf-8")
            os.replace(tmp, state_path)

    for f in files:
        try:
            digest = _file_digest(f)
            stream: Iterator[ImportItem | ImportProblem] = iter_file(f)
            done = state.get(digest, 0)
            pos = 0
            batch: list[ImportItem] = []

            def flush(batch: list[ImportItem], pos: int, digest: str = digest, name: str = f.name) -> None:
                if not batch:
                    return
                results = client.batch([(it.id, it.record) for it in batch])
                for it, res in zip(batch, results, strict=True):
                    st = res.get("status")
                    if st in ("created", "updated"):
                        counts.imported += 1
                    elif st == "unchanged":
                        counts.skipped += 1
                    else:
                        counts.failed += 1
                        if on_failure:
                            on_failure(it.source, str(res.get("error", "failed")))
                state[digest] = pos
                save()
                if progress:
                    progress(len(batch), name)

            for item in stream:
                pos += 1
                if pos <= done:
                    if isinstance(item, ImportItem):
                        counts.skipped += 1
                        if progress:
                            progress(1, f.name)
                    continue
                if isinstance(item, ImportProblem):
                    if item.skipped:
                        counts.other_resources += 1
                    else:
                        counts.failed += 1
                        if on_failure:
                            on_failure(item.source, item.reason)
                    continue
                batch.append(item)
                if len(batch) >= BATCH:
                    flush(batch, pos)
                    batch = []
            flush(batch, pos)
            state[digest] = pos
            save()
        except ImportFormatError as e:
            counts.files_failed += 1
            if on_failure:
                on_failure(str(f), str(e))
    return counts


def count_patients(files: list[Path]) -> int:
    """Number of importable records in ``files`` (for the progress bar total)."""
    from safehold.records.importers import ImportFormatError, ImportItem, iter_file

    n = 0
    for f in files:
        try:
            n += sum(1 for x in iter_file(f) if isinstance(x, ImportItem))
        except ImportFormatError:
            pass
    return n


def expand(paths: tuple[str, ...]) -> list[Path]:
    """Files named directly, plus ``*.csv`` / ``*.json`` / ``*.ndjson`` inside named directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.suffix in (".csv", ".json", ".ndjson")
                          and x.name != "package.json" and not (x.suffix == ".csv" and x.stem != "patients"))
        else:
            out.append(p)
    return out


_conn_options = [
    click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR",
                 help="Data directory of `safehold up` (holds up.json)."),
    click.option("--url", default=None, help="Records service URL (default: from up.json)."),
    click.option("--policy", default=None, help="Appraisal policy TOML for the service's Evidence."),
    click.option("--token", default=None, envvar="SAFEHOLD_TOKEN", help="Bearer token."),
]


def conn_options(f: Any) -> Any:
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
    def import_cmd(files: tuple[str, ...], data_dir: str, url: str | None, policy: str | None,
                   token: str | None, restart: bool) -> None:
        """Import Synthea CSV (patients.csv) and FHIR R4 Bundle / NDJSON / Patient JSON files.

        Prints the counts of imported / skipped / failed records.
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        conn = load_connection(data_dir, url, policy, token)
        paths = expand(files)
        state = Path(data_dir) / "import-state.json"
        if restart and state.exists():
            state.unlink()
        console = Console(stderr=True)
        failures: list[tuple[str, str]] = []
        total = count_patients(paths)
        with make_client(conn) as client, Progress(
            TextColumn("[bold]importing[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        ) as prog:
            task = prog.add_task("", total=total)
            counts = import_files(
                client, paths, state if Path(data_dir).is_dir() else None,
                progress=lambda n, d: prog.update(task, advance=n, description=d),
                on_failure=lambda s, r: failures.append((s, r)),
            )
        for s, r in failures[:20]:
            console.print(f"[yellow]failed[/] {s}: {r}")
        if len(failures) > 20:
            console.print(f"… and {len(failures) - 20} more failures")
        click.echo(f"imported {counts.imported}, skipped {counts.skipped}, failed {counts.failed}"
                   f" (other FHIR resources ignored: {counts.other_resources})")

    @patients.command("get")
    @click.argument("record_id")
    @conn_options
    def get_cmd(record_id: str, data_dir: str, url: str | None, policy: str | None,
                token: str | None) -> None:
        """Print one record as JSON."""
        with make_client(load_connection(data_dir, url, policy, token)) as c:
            rec = c.get(record_id)
        click.echo(json.dumps(rec.data, indent=2, ensure_ascii=False))

    @patients.command("list")
    @conn_options
    @click.option("--limit", default=0, help="Stop after this many ids (0 = all).")
    def list_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None, limit: int) -> None:
        """Print record ids, one per line."""
        with make_client(load_connection(data_dir, url, policy, token)) as c:
            for n, rid in enumerate(c.list_ids(), start=1):
                click.echo(rid)
                if limit and n >= limit:
                    break

    @patients.command("search")
    @conn_options
    @click.option("--family", default=None)
    @click.option("--given", default=None)
    @click.option("--birth-date", "birthDate", default=None)
    @click.option("--gender", default=None)
    @click.option("--identifier", default=None)
    def search_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None,
                   **criteria: str | None) -> None:
        """Exact-match search (case-insensitive) through blind indexes; prints id and name."""
        crit = {k: v for k, v in criteria.items() if v}
        if not crit:
            raise click.UsageError("give at least one of --family --given --birth-date --gender --identifier")
        with make_client(load_connection(data_dir, url, policy, token)) as c:
            hits = c.search(**crit)
        for r in hits:
            click.echo(f"{r.id}\t{_display_name(r.data)}")
        click.echo(f"{len(hits)} match(es)", err=True)

    @patients.command("delete")
    @click.argument("record_id")
    @conn_options
    def delete_cmd(record_id: str, data_dir: str, url: str | None, policy: str | None,
                   token: str | None) -> None:
        """Delete one record."""
        with make_client(load_connection(data_dir, url, policy, token)) as c:
            c.delete(record_id)
        click.echo(f"deleted {record_id}")


def _display_name(rec: dict[str, Any]) -> str:
    if rec.get("resourceType") == "Patient":
        for n in rec.get("name") or []:
            if isinstance(n, dict):
                return " ".join([*(n.get("given") or []), n.get("family") or ""]).strip()
        return ""
    if "FIRST" in rec or "LAST" in rec:
        return f"{rec.get('FIRST', '')} {rec.get('LAST', '')}".strip()
    return f"{rec.get('fname', '')} {rec.get('lname', '')}".strip()
