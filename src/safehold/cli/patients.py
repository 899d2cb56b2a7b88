"""``safehold patients …``: import, get, list, search and delete patient records.

Connection settings come from the ``up.json`` that ``safehold up`` writes into the data
directory (records URL, the appraisal policy for the service's Evidence, the workload CA, the
bearer token), or from ``--url`` / ``--policy`` / ``--token`` / ``SAFEHOLD_TOKEN``. Every
request goes over the attesting transport: no byte is sent before the service's Evidence
passes the policy. Every command goes through :func:`open_client`, which turns a transport
failure (refused, dropped, timed out, TLS) into one line naming the URL and exit status 1, and
shows the simulated-TEE warning once as one line.

Import is resumable (:class:`ImportCheckpoint`): after each acknowledged batch the position
reached in each input file is saved in ``<data dir>/import-state.json``, keyed by the file's
SHA-256 *and* the target service (URL, store, workload CA); a file's entry is removed when the
file is done, so a later import of the same file sends every record again (the service leaves
byte-identical records alone: counted as skipped). On resume the last acknowledged record is
read back first; if it is gone (deleted, new store) the file starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import ssl
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx

from safehold.errors import ConfigError, RecordNotFoundError, SafeholdError

BATCH = 100
UP_FILE = "up.json"
STATE_FILE = "import-state.json"


class ServiceUnreachableError(SafeholdError):
    """The records service could not be reached, or dropped the connection / did not answer
    (the message names the URL and the transport failure, never request content)."""


@dataclass
class Connection:
    """How to reach the records service: ``url``, ``policy`` (path), ``token``, ``ca`` (path),
    and ``target``: the service identity import checkpoints are keyed on (URL, plus the store
    URL and the SHA-256 of the workload CA when they come from ``up.json`` for this URL)."""

    url: str
    policy: str
    token: str | None
    ca: str | None
    target: str = ""


def load_connection(data_dir: str | os.PathLike[str], url: str | None = None,
                    policy: str | None = None, token: str | None = None) -> Connection:
    """Merge ``<data_dir>/up.json`` with explicit options (options win).

    Raises:
        ConfigError: no URL or policy known (``safehold up`` not running and no options), or
            ``up.json`` is unreadable.
    """
    info: dict[str, Any] = {}
    p = Path(data_dir) / UP_FILE
    if p.exists():
        try:
            info = json.loads(p.read_text("utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: unreadable ({e})") from None
    same = url is None or url == info.get("records_url")
    url = url or info.get("records_url")
    policy = policy or info.get("policy")
    token = token or os.environ.get("SAFEHOLD_TOKEN") or info.get("admin_token")
    if not url or not policy:
        raise ConfigError(
            f"no records service known: run `safehold up` (writes {p}) or pass --url and --policy"
        )
    target = str(url)
    if same and info:
        ca_digest = ""
        with contextlib.suppress(OSError, TypeError):
            ca_digest = hashlib.sha256(Path(info["ca"]).read_bytes()).hexdigest()
        target += f" store={info.get('store_url', '')} ca={ca_digest}"
    return Connection(url, policy, token, info.get("ca"), target)


def make_client(conn: Connection) -> Any:
    """A :class:`~safehold.client.records.RecordsClient` over the attesting transport."""
    from safehold.client.records import RecordsClient

    return RecordsClient(conn.url, token=conn.token, policy=conn.policy)


def transport_reason(e: BaseException) -> str:
    """One short phrase for a transport failure (``connection refused``, ``TLS handshake
    failed (…)``, ``no answer within the timeout``, ``connection closed …``)."""
    text = str(e).strip()
    low = text.lower()
    if isinstance(e, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(e, httpx.TimeoutException):
        return "no answer within the timeout (the service may be stuck or overloaded)"
    if isinstance(e, httpx.RemoteProtocolError):
        return "the connection was closed before a complete answer (the service stopped or crashed?)"
    if isinstance(e, ssl.SSLError) or "ssl" in low or "certificate" in low or "handshake" in low:
        return f"TLS handshake failed ({text[:160] or type(e).__name__})"
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "host name not found"
    if "reset by peer" in low:
        return "connection reset by the service"
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


class _SimulatedTEENotice(logging.Filter):
    """Drops the policy logger's copies of the simulated-TEE warning (at policy load and at
    appraisal): the CLI prints the warning itself, once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIMULATED TEE Evidence" not in record.getMessage()


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """Show :class:`~safehold.attestation.policy.SimulatedTEEWarning` once, as one styled line
    on stderr (not Python's two-line ``file:line: Warning`` display, not a second log line).
    The library still issues the warning; only its display here changes."""
    from safehold.attestation.policy import SimulatedTEEWarning

    shown = False
    log = logging.getLogger("safehold.attestation.policy")
    flt = _SimulatedTEENotice()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SimulatedTEEWarning)
        original = warnings.showwarning

        def show(message: Any, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            nonlocal shown
            if issubclass(category, SimulatedTEEWarning):
                if not shown:
                    shown = True
                    click.secho(f"warning: {message}", fg="yellow", err=True)
                return
            original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        log.addFilter(flt)
        try:
            yield
        finally:
            log.removeFilter(flt)


@contextlib.contextmanager
def service_errors(url: str) -> Iterator[None]:
    """Map transport failures inside the block to :class:`ServiceUnreachableError`
    (``cannot reach the records service at URL: connection refused``).

    Raises:
        ServiceUnreachableError: for httpx transport errors (connect, protocol, timeouts, TLS)
            and socket / TLS errors escaping the transport.
    """
    try:
        yield
    except (httpx.TransportError, ssl.SSLError, ConnectionError) as e:
        raise ServiceUnreachableError(
            f"cannot reach the records service at {url}: {transport_reason(e)}") from None


@contextlib.contextmanager
def open_client(conn: Connection) -> Iterator[Any]:
    """The one way CLI commands talk to the records service: a client from
    :func:`make_client` inside :func:`cli_warnings` and :func:`service_errors`."""
    with cli_warnings(), service_errors(conn.url), make_client(conn) as client:
        yield client


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the checkpoint is written (delivered right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ImportCheckpoint:
    """The resume checkpoint of ``safehold patients import`` (safe for concurrent imports).

    File: JSON ``{"version": 2, "files": {key: {"done": n, "last_id": id|null, "file": name}}}``,
    ``key`` = hex SHA-256 of ``file SHA-256 hex || 0x00 || target`` (see
    :attr:`Connection.target`), ``done`` = number of input items (records and problems) of that
    file handled. Every read-modify-write holds an exclusive ``flock`` on ``<file>.lock`` and
    writes through a unique temporary file + ``os.replace`` (never half-written; signals are
    deferred meanwhile). A file of another format is ignored (the import starts over, which is
    safe: identical records come back unchanged).

    Args:
        path: the checkpoint file; None = not resumable (every method is a no-op).
        target: the service identity.

    Raises:
        ConfigError: (``set`` / ``clear`` / ``reset``) the checkpoint cannot be written.
    """

    VERSION = 2

    def __init__(self, path: Path | None, target: str = "") -> None:
        self.path = path
        self.target = target

    def key(self, digest: str) -> str:
        """Checkpoint key for a file's SHA-256 hex ``digest`` at this target."""
        return hashlib.sha256(f"{digest}\0{self.target}".encode()).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        assert self.path is not None
        with _signals_deferred():
            try:
                fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise ConfigError(f"cannot write the import checkpoint in {self.path.parent} "
                                  f"({e.strerror}); pass a writable --data-dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("version") == self.VERSION else None
        return files if isinstance(files, dict) else {}

    def _write(self, files: dict[str, Any]) -> None:
        assert self.path is not None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        except OSError as e:
            raise ConfigError(f"cannot write the import checkpoint in {self.path.parent} "
                              f"({e.strerror}); pass a writable --data-dir") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": self.VERSION, "files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, digest: str) -> tuple[int, str | None]:
        """``(items done, last acknowledged record id)`` for a file; ``(0, None)`` if none."""
        if self.path is None:
            return 0, None
        e = self._read().get(self.key(digest))
        if not isinstance(e, dict) or not isinstance(e.get("done"), int) or e["done"] < 0:
            return 0, None
        last = e.get("last_id")
        return e["done"], last if isinstance(last, str) else None

    def set(self, digest: str, done: int, last_id: str | None, name: str) -> None:
        """Record progress for a file."""
        if self.path is None:
            return
        with self._locked():
            files = self._read()
            files[self.key(digest)] = {"done": done, "last_id": last_id, "file": name}
            self._write(files)

    def clear(self, digest: str) -> None:
        """Forget a file (its import completed)."""
        if self.path is None:
            return
        with self._locked():
            files = self._read()
            if files.pop(self.key(digest), None) is not None:
                self._write(files)

    def reset(self) -> None:
        """Forget every file (``--restart``)."""
        if self.path is None:
            return
        with self._locked(), contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class ImportCounts:
    """Totals of one import run.

    ``failed`` counts records the service or the importer refused *and* whole files that could
    not be read (each such file once; also in ``files_failed``). ``acknowledged`` = records
    whose handling is settled: answered by the service in this run or skipped by the checkpoint.
    """

    imported: int = 0
    skipped: int = 0
    failed: int = 0
    other_resources: int = 0
    files_failed: int = 0
    acknowledged: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return dict(self.__dict__)


def import_files(client: Any, files: list[Path], state_path: Path | None, *,
                 progress: Any = None, on_failure: Any = None, target: str = "",
                 counts: ImportCounts | None = None, on_notice: Any = None) -> ImportCounts:
    """Import ``files`` through ``client`` in batches of :data:`BATCH`; resumable via ``state_path``.

    Args:
        client: a RecordsClient (or anything with ``batch(items)`` and ``get(id)``).
        files: input files (Synthea CSV, FHIR Bundle/NDJSON/Patient JSON).
        state_path: JSON checkpoint file (None = not resumable); see :class:`ImportCheckpoint`.
        progress: optional callable ``(advance_items: int, description: str)``.
        on_failure: optional callable ``(source: str, reason: str)``.
        target: the service identity the checkpoint is keyed on (:attr:`Connection.target`).
        counts: totals to update in place (so a caller still has them after an exception).
        on_notice: optional callable ``(message: str)`` (e.g. a stale checkpoint restarted).

    Raises:
        RecordsClientError / AttestationError / transport errors: the service failed or failed
            appraisal (the checkpoint keeps what was acknowledged so far).
    """
    from safehold.records.importers import ImportFormatError, ImportItem, ImportProblem, iter_file

    ckpt = ImportCheckpoint(state_path, target)
    counts = counts if counts is not None else ImportCounts()

    def file_failed(f: Path, reason: str) -> None:
        counts.failed += 1
        counts.files_failed += 1
        if on_failure:
            on_failure(str(f), reason.removeprefix(f"{f}: "))

    for f in files:
        try:
            digest = _file_digest(f)
        except OSError as e:
            file_failed(f, f"cannot read ({e.strerror})")
            continue
        done, last_id = ckpt.get(digest)
        if done and last_id is not None:
            try:
                client.get(last_id)
            except RecordNotFoundError:
                done = 0
                if on_notice:
                    on_notice(f"{f.name}: the last checkpointed record is not on the service "
                              "(deleted, or a new store): importing the file from the start")
        elif done:
            done = 0  # nothing to verify the checkpoint against: start over (safe, idempotent)
        pos = 0
        last_ok = last_id if done else None
        batch: list[ImportItem] = []

        def flush(batch: list[ImportItem], pos: int, digest: str = digest, name: str = f.name) -> None:
            nonlocal last_ok
            if not batch:
                return
            results = client.batch([(it.id, it.record) for it in batch])
            for it, res in zip(batch, results, strict=True):
                st = res.get("status")
                if st in ("created", "updated"):
                    counts.imported += 1
                    last_ok = it.id
                elif st == "unchanged":
                    counts.skipped += 1
                    last_ok = it.id
                else:
                    counts.failed += 1
                    if on_failure:
                        on_failure(it.source, str(res.get("error", "failed")))
            counts.acknowledged += len(batch)
            ckpt.set(digest, pos, last_ok, name)
            if progress:
                progress(len(batch), name)

        try:
            for item in iter_file(f):
                pos += 1
                if isinstance(item, ImportProblem):
                    # counted on every run, resumed or not, so the totals do not depend on it
                    if item.skipped:
                        counts.other_resources += 1
                    else:
                        counts.failed += 1
                        if on_failure:
                            on_failure(item.source, item.reason)
                    continue
                if pos <= done:
                    counts.skipped += 1
                    counts.acknowledged += 1
                    if progress:
                        progress(1, f.name)
                    continue
                batch.append(item)
                if len(batch) >= BATCH:
                    flush(batch, pos)
                    batch = []
            flush(batch, pos)
            ckpt.clear(digest)
        except ImportFormatError as e:
            file_failed(f, str(e))
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

        Prints the counts of imported / skipped / failed records. Exit status 0 = everything
        imported or already there, 1 = a record or file failed or the service is unreachable,
        130 / 143 = interrupted by SIGINT / SIGTERM (progress checkpointed: run the same command
        again to resume).
        """
        conn = load_connection(data_dir, url, policy, token)
        state = Path(data_dir) / STATE_FILE
        ckpt_path = state if Path(data_dir).is_dir() else None
        counts = ImportCounts()
        failures: list[tuple[str, str]] = []

        def interrupted(signum: int, frame: object) -> None:
            raise ImportInterrupted(signum)

        old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _run_import(conn, expand(files), ckpt_path, restart, counts, failures)
        except ImportInterrupted as e:
            _print_failures(failures)
            click.secho(f"interrupted: {counts.acknowledged} records checkpointed; "
                        "run the same command again to resume", fg="yellow", err=True)
            sys.exit(128 + e.signum)
        except SafeholdError as e:
            _print_failures(failures)
            click.secho(f"error: {e}", fg="red", err=True)
            if counts.acknowledged:
                click.echo(f"{counts.acknowledged} records checkpointed; run the same command "
                           "again to resume", err=True)
            sys.exit(1)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        _print_failures(failures)
        click.echo(f"imported {counts.imported}, skipped {counts.skipped}, failed {counts.failed}"
                   f" (other FHIR resources ignored: {counts.other_resources})")
        if counts.failed:
            files_note = f", {counts.files_failed} of them whole files" if counts.files_failed else ""
            click.secho(f"{counts.failed} failed{files_note}: see the lines above", fg="red", err=True)
            sys.exit(1)

    @patients.command("get")
    @click.argument("record_id")
    @conn_options
    def get_cmd(record_id: str, data_dir: str, url: str | None, policy: str | None,
                token: str | None) -> None:
        """Print one record as JSON."""
        with open_client(load_connection(data_dir, url, policy, token)) as c:
            rec = c.get(record_id)
        click.echo(json.dumps(rec.data, indent=2, ensure_ascii=False))

    @patients.command("list")
    @conn_options
    @click.option("--limit", default=0, type=click.IntRange(min=0),
                  help="Stop after this many ids (0 = all).")
    def list_cmd(data_dir: str, url: str | None, policy: str | None, token: str | None, limit: int) -> None:
        """Print record ids, one per line."""
        with open_client(load_connection(data_dir, url, policy, token)) as c:
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
        with open_client(load_connection(data_dir, url, policy, token)) as c:
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
        with open_client(load_connection(data_dir, url, policy, token)) as c:
            c.delete(record_id)
        click.echo(f"deleted {record_id}")


class ImportInterrupted(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
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
                counts: ImportCounts, failures: list[tuple[str, str]]) -> None:
    """The body of ``patients import`` (progress bar on stderr); updates ``counts``/``failures``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if restart:
        ImportCheckpoint(ckpt_path, conn.target).reset()
    console = Console(stderr=True)
    total = count_patients(paths)
    with open_client(conn) as client:
        client.list_page(limit=1)  # attest and authenticate before reading a record
        with Progress(TextColumn("[bold]importing[/] {task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=False) as prog:
            task = prog.add_task("", total=total)
            import_files(
                client, paths, ckpt_path, target=conn.target, counts=counts,
                progress=lambda n, d: prog.update(task, advance=n, description=d),
                on_failure=lambda s, r: failures.append((s, r)),
                on_notice=lambda m: console.print(f"[yellow]note[/] {m}"),
            )


def _display_name(rec: dict[str, Any]) -> str:
    if rec.get("resourceType") == "Patient":
        for n in rec.get("name") or []:
            if isinstance(n, dict):
                return " ".join([*(n.get("given") or []), n.get("family") or ""]).strip()
        return ""
    if "FIRST" in rec or "LAST" in rec:
        return f"{rec.get('FIRST', '')} {rec.get('LAST', '')}".strip()
    return f"{rec.get('fname', '')} {rec.get('lname', '')}".strip()
