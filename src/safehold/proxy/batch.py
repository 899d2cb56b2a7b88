"""Batch tokenize / detokenize of CSV and NDJSON files (``safehold tokenize`` / ``detokenize``).

Streams row by row (memory stays flat for any file size), writes to a temporary file beside
the output and renames it into place only when every row succeeded: a failure never leaves a
half-written output. CSV values are text; the key-id tag becomes an extra column
(``schema.key_id_field``) on tokenize and is removed on detokenize.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safehold.csvtext import FIELD_TOO_LARGE, UNCLOSED_QUOTE, CountedLines, diagnose
from safehold.errors import ConfigError, TransformError
from safehold.proxy.core import LONE_SURROGATE, Protector, has_lone_surrogate

__all__ = ["detect_format", "run_batch"]

#: ``progress(bytes_done, bytes_total)`` callback.
Progress = Callable[[int, int], None]


def detect_format(path: Path, explicit: str | None = None) -> str:
    """``"csv"`` or ``"ndjson"`` from ``explicit`` or the file suffix. Raises ConfigError."""
    if explicit:
        if explicit not in ("csv", "ndjson"):
            raise ConfigError(f"format must be csv or ndjson, got {explicit!r}")
        return explicit
    suf = path.suffix.lower()
    if suf == ".csv":
        return "csv"
    if suf in (".ndjson", ".jsonl"):
        return "ndjson"
    raise ConfigError(f"cannot tell the format of {path.name} (use --format csv|ndjson)")


def run_batch(protector: Protector, src: Path, dst: Path, *, reveal: bool, fmt: str,
              progress: Progress | None = None) -> int:
    """Protect (or reveal) every record of ``src`` into ``dst``; returns the record count.

    Raises:
        TransformError: a record cannot be transformed (names the line/row and the field).
        ConfigError: ``src`` unreadable or not in ``fmt``.
    """
    total = src.stat().st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with open(src, "rb") as raw, os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if fmt == "csv":
                n = _csv(protector, text, out, reveal, lambda: raw.tell(), total, progress)
            else:
                n = _ndjson(protector, text, out, reveal, lambda: raw.tell(), total, progress)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return n


def _csv_error(e: csv.Error | UnicodeDecodeError, start: int, end: int) -> ConfigError:
    """A clear message for a CSV row that does not parse; ``start``..``end`` are the physical
    lines (1-based) the reader consumed for it (:func:`safehold.csvtext.diagnose`). Never shows
    cell contents."""
    if isinstance(e, UnicodeDecodeError):
        return ConfigError(f"CSV line {start} is not UTF-8")
    problem = diagnose(e, start, end)
    if problem.kind == FIELD_TOO_LARGE:
        return ConfigError(f"{problem.message}; split the value or protect it in NDJSON")
    if problem.kind == UNCLOSED_QUOTE:
        return ConfigError(f"{problem.message}; nothing was written")
    return ConfigError(problem.message)


def _csv(p: Protector, src: io.TextIOWrapper, out, reveal: bool, pos, total: int,
         progress: Progress | None) -> int:
    lines = CountedLines(src)
    try:
        reader = csv.DictReader(lines, strict=True)
        header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise _csv_error(e, 1, max(lines.n, 1)) from None
    if not header:
        raise ConfigError("CSV input has no header row")
    kf = p.schema.key_id_field
    if reveal:
        cols = [c for c in header if c != kf]
    else:
        if kf in header:
            raise TransformError(f"CSV already has key-id column {kf!r}: refusing to protect it twice")
        cols = header + ([kf] if p.schema.needs_key_id else [])
    writer = csv.DictWriter(out, fieldnames=cols, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    n = 0
    start = lines.n + 1
    try:
        for row in reader:
            if None in row:
                raise TransformError(f"CSV row {n + 1} (line {start}) has more cells than the header")
            try:
                rec = p.reveal(row, flat=True) if reveal else p.protect(row, key_id_as_text=True, flat=True)
            except TransformError as e:
                raise TransformError(f"CSV row {n + 1} (line {start}): {e}") from None
            if not reveal and kf not in rec and kf in cols:
                rec[kf] = ""
            writer.writerow(rec)
            n += 1
            start = lines.n + 1
            if progress and n % 256 == 0:
                progress(pos(), total)
    except (UnicodeDecodeError, csv.Error) as e:
        raise _csv_error(e, start, max(lines.n, start)) from None
    if progress:
        progress(total, total)
    return n


def _ndjson(p: Protector, src: io.TextIOWrapper, out, reveal: bool, pos, total: int,
            progress: Progress | None) -> int:
    n = 0
    lineno = 0
    try:
        for line in src:
            lineno += 1
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                raise ConfigError(f"NDJSON line {lineno} is not JSON") from None
            if has_lone_surrogate(line, doc):
                raise ConfigError(f"NDJSON line {lineno} {LONE_SURROGATE}")
            try:
                rec = p.reveal(doc) if reveal else p.protect(doc)
            except TransformError as e:
                raise TransformError(f"NDJSON line {lineno}: {e}") from None
            out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
            if progress and n % 256 == 0:
                progress(pos(), total)
    except UnicodeDecodeError:
        raise ConfigError(f"NDJSON line {lineno + 1} is not UTF-8") from None
    if progress:
        progress(total, total)
    return n
