"""The resumable import engine of ``safehold patients import`` (client side).

Reads Synthea CSV and FHIR R4 files (:mod:`safehold.records.importers`, which checks every
record against the record rules) and sends the records through a records client in batches of
:data:`BATCH`: patients through the native batch route, the other FHIR resources of Bundles and
NDJSON (Observation, Condition, Encounter, …) through ``POST /fhir/`` (a FHIR ``batch``).
An id seen again in one run with different content is a conflict (``--on-conflict``).

Import is resumable (:class:`ImportCheckpoint`): after each acknowledged batch the position
reached in each input file is saved in ``import-state.json`` in the owner directory (the CLI's
choice: never the operator's data directory), keyed by the file's
SHA-256 *and* the target service (URL, store, workload CA); a file's entry is removed when the
file is done, so a later import of the same file sends every record again (the service leaves
byte-identical records alone: counted as skipped). On resume the last acknowledged record is
read back first; if it is gone (deleted, new store) the file starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from safehold.client.records import BatchItem
from safehold.errors import ConfigError, RecordNotFoundError
from safehold.jsontypes import JSONObject
from safehold.records.errors import ImportFormatError
from safehold.records.importers import ImportItem, ImportProblem, ImportResource, iter_file

__all__ = ["BATCH", "ON_CONFLICT", "STATE_FILE", "BatchClient", "ImportCheckpoint", "ImportCounts",
           "count_patients", "expand_paths", "file_digest", "import_files"]

#: Records per batch request.
BATCH = 100
#: The checkpoint file's name in the data directory.
STATE_FILE = "import-state.json"


class BatchClient(Protocol):
    """What the importer needs from a records client
    (:class:`~safehold.client.records.RecordsClient` has it)."""

    def batch(self, items: Iterable[BatchItem]) -> list[JSONObject]:
        """Upsert ``(id, record)`` items; one result dict per item (``status``, ``error``)."""
        ...

    def get(self, rid: str) -> object:
        """Read one record; RecordNotFoundError if it is not there."""
        ...

    def fhir_batch(self, resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Store FHIR resources (``PUT <type>/<id>`` in a batch Bundle); one result per item."""
        ...

    def fhir_read(self, rtype: str, rid: str) -> object:
        """Read one FHIR resource; RecordNotFoundError if it is not there."""
        ...


#: What ``--on-conflict`` may say (an id seen twice in one run with different content).
ON_CONFLICT = ("fail", "skip", "overwrite")


def file_digest(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 64 KiB chunks)."""
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
    :attr:`~safehold.client.connection.Connection.target`), ``done`` = number of input items
    (records and problems) of that file handled. Every read-modify-write holds an exclusive
    ``flock`` on ``<file>.lock`` and writes through a unique temporary file + ``os.replace``
    (never half-written; signals are deferred meanwhile). A file of another format is ignored
    (the import starts over, which is safe: identical records come back unchanged).

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
    ``imported``/``skipped`` count patient records, ``resources_imported`` /
    ``resources_skipped`` the other FHIR resources (unchanged ones are skipped);
    ``conflicts`` = ids met again in this run with different content (:data:`ON_CONFLICT`).
    """

    imported: int = 0
    skipped: int = 0
    failed: int = 0
    other_resources: int = 0
    files_failed: int = 0
    acknowledged: int = 0
    resources_imported: int = 0
    resources_skipped: int = 0
    conflicts: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return dict(self.__dict__)


def import_files(client: BatchClient, files: list[Path], state_path: Path | None, *,
                 progress: Callable[[int, str], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None, target: str = "",
                 counts: ImportCounts | None = None,
                 on_notice: Callable[[str], None] | None = None,
                 on_conflict: str = "fail", resources: bool = True) -> ImportCounts:
    """Import ``files`` through ``client`` in batches of :data:`BATCH`; resumable via ``state_path``.

    Patient records go through the native batch route, other FHIR resources of Bundles and
    NDJSON (``resources=True``) through the FHIR endpoint's batch interaction. An id met again
    in the same run with different content (another file, or a resumed part of this one) is a
    *conflict*, handled by ``on_conflict``: ``fail`` (default: reported as a failure, not
    sent, so the first one stays), ``skip`` (not sent, reported as a notice), ``overwrite``
    (sent: the later one wins, reported as a notice). Within one file the first occurrence
    always wins (:mod:`safehold.records.importers`).

    Args:
        client: a RecordsClient (or anything with ``batch(items)`` and ``get(id)``).
        files: input files (Synthea CSV, FHIR Bundle/NDJSON/Patient JSON).
        state_path: JSON checkpoint file (None = not resumable); see :class:`ImportCheckpoint`.
        progress: optional callable ``(advance_items: int, description: str)``.
        on_failure: optional callable ``(source: str, reason: str)``.
        target: the service identity the checkpoint is keyed on
            (:attr:`~safehold.client.connection.Connection.target`).
        counts: totals to update in place (so a caller still has them after an exception).
        on_notice: optional callable ``(message: str)`` (e.g. a stale checkpoint restarted).

    Raises:
        ValueError: ``on_conflict`` is not one of :data:`ON_CONFLICT`.
        RecordsClientError / AttestationError / transport errors: the service failed or failed
            appraisal (the checkpoint keeps what was acknowledged so far).
    """
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict must be one of {ON_CONFLICT}, got {on_conflict!r}")
    ckpt = ImportCheckpoint(state_path, target)
    counts = counts if counts is not None else ImportCounts()
    seen: dict[str, tuple[bytes, str]] = {}  # key → (content digest, first source)

    def conflict(it: ImportItem | ImportResource) -> bool:
        """True if ``it`` must not be sent (a conflict under fail/skip)."""
        key, rec = (it.id, it.record) if isinstance(it, ImportItem) else (it.key, it.resource)
        digest = hashlib.sha256(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode()).digest()
        first = seen.setdefault(key, (digest, it.source))
        if first[0] == digest:
            return False
        counts.conflicts += 1
        what = f"id also at {first[1]} with different content"
        if on_conflict == "fail":
            counts.failed += 1
            if on_failure:
                on_failure(it.source, f"{what}; not imported (--on-conflict fail keeps the first)")
            return True
        if on_conflict == "skip":
            counts.skipped += 1
            if on_notice:
                on_notice(f"{it.source}: {what}; skipped (--on-conflict skip)")
            return True
        if on_notice:
            on_notice(f"{it.source}: {what}; overwriting (--on-conflict overwrite)")
        return False

    def file_failed(f: Path, reason: str) -> None:
        counts.failed += 1
        counts.files_failed += 1
        if on_failure:
            on_failure(str(f), reason.removeprefix(f"{f}: "))

    for f in files:
        try:
            digest = file_digest(f)
        except OSError as e:
            file_failed(f, f"cannot read ({e.strerror})")
            continue
        done, last_id = ckpt.get(digest)
        if done and last_id is not None:
            try:
                if "/" in last_id:  # a FHIR resource, <type>/<id> (record ids hold no "/")
                    client.fhir_read(*last_id.split("/", 1))
                else:
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
        batch: list[ImportItem | ImportResource] = []

        def flush(batch: list[ImportItem | ImportResource], pos: int, digest: str = digest,
                  name: str = f.name) -> None:
            nonlocal last_ok
            if not batch:
                return
            pats = [it for it in batch if isinstance(it, ImportItem)]
            res_items = [it for it in batch if isinstance(it, ImportResource)]
            answered: dict[int, dict[str, Any]] = {}
            if pats:
                results = client.batch([(it.id, it.record) for it in pats])
                answered.update(zip(map(id, pats), results, strict=True))
            if res_items:
                results = client.fhir_batch([(it.type, it.id, it.resource) for it in res_items])
                answered.update(zip(map(id, res_items), results, strict=True))
            for it in batch:  # in file order, so last_ok is the last acknowledged item
                res = answered[id(it)]
                st = res.get("status")
                is_pat = isinstance(it, ImportItem)
                if st in ("created", "updated"):
                    if is_pat:
                        counts.imported += 1
                    else:
                        counts.resources_imported += 1
                    last_ok = it.id if isinstance(it, ImportItem) else it.key
                elif st == "unchanged":
                    if is_pat:
                        counts.skipped += 1
                    else:
                        counts.resources_skipped += 1
                    last_ok = it.id if isinstance(it, ImportItem) else it.key
                else:
                    counts.failed += 1
                    if on_failure:
                        on_failure(it.source, str(res.get("error", "failed")))
            counts.acknowledged += len(batch)
            ckpt.set(digest, pos, last_ok, name)
            if progress:
                progress(len(batch), name)

        try:
            for item in iter_file(f, resources=resources):
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
                if conflict(item) or pos <= done:
                    if pos <= done:  # settled by an earlier run (seen above for conflicts)
                        if isinstance(item, ImportItem):
                            counts.skipped += 1
                        else:  # a FHIR resource is counted with the resources, not the patients
                            counts.resources_skipped += 1
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


def count_patients(files: list[Path], *, resources: bool = True) -> int:
    """Number of importable records (and, with ``resources``, other FHIR resources) in
    ``files`` (for the progress bar total)."""
    n = 0
    for f in files:
        try:
            n += sum(1 for x in iter_file(f, resources=resources)
                     if isinstance(x, ImportItem | ImportResource))
        except ImportFormatError:
            pass
    return n


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files named directly, plus ``*.csv`` / ``*.json`` / ``*.ndjson`` inside named directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.suffix in (".csv", ".json", ".ndjson")
                          and x.name != "package.json" and not (x.suffix == ".csv" and x.stem != "patients"))
        else:
            out.append(p)
    return out
