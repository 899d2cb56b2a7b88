"""Small file-system helpers shared by every layer (no framework, no Safehold imports)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one.

    A unique temporary file in the same directory is written, fsynced, given ``mode`` and
    renamed over ``path`` (POSIX ``rename(2)`` is atomic within a file system). Concurrent
    writers never share a temporary file; the last rename wins.

    Args:
        path: destination file.
        data: bytes, or str encoded as UTF-8.
        mode: permission bits of the new file (default 0600: owner only).

    Raises:
        OSError: the directory is missing or not writable; the old file is left untouched
            and no temporary file is left behind.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_toml(
    path: str | os.PathLike[str], *, known: Collection[str], error: type[Exception], what: str
) -> dict[str, Any]:
    """The TOML document at ``path`` (UTF-8, TOML 1.0 via :mod:`tomllib`) as a dict whose
    top-level keys are all in ``known`` (a measured configuration file: a key the code does not
    know is refused, never ignored).

    Raises:
        error: unreadable, not UTF-8 or not TOML (``"<what> <path>: <reason>"``), or top-level
            keys outside ``known`` (``"<what>: unknown keys [<sorted>]"``).
    """
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path}: {e}") from None
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{what}: unknown keys {unknown}")
    return data
