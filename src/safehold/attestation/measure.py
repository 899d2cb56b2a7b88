"""The package-only workload measurement (format v1): SHA-384 over the ``safehold`` package
files and the workload's configuration.

**Superseded** by :mod:`safehold.attestation.closure`, which measures everything that can
execute in the workload (interpreter, libpython, standard library, every distribution on the
workload's ``sys.path``, the package, the config, the launch). This v1 value skips code that
runs — a planted ``__pycache__/*.pyc``, a ``sitecustomize.py``, a ``.pth`` file, any
dependency — and stays only until the process launches start workloads through
:class:`safehold.attestation.workload.LaunchSpec` (then the simulated TEE reports
:func:`safehold.attestation.workload.current_closure`). ``safehold measure --package-only``
prints it.

"Measure, then compare" (DESIGN.md): the simulated TEE reports this value as its measurement,
``safehold measure`` prints it as a Reference Value (RFC 9334 §3.2), and an appraisal policy
compares the two. It plays the role MRENCLAVE / MRTD / the SNP MEASUREMENT play on hardware.

Canonical serialisation (version 1), UTF-8, one line per file, sorted by path (bytewise):

.. code-block:: text

    safehold-measurement-v1\\n
    <sha256 hex, 64 lowercase chars> <two spaces> <relative path>\\n
    ...

* Package files are named ``safehold/<posix path relative to the package directory>``; byte
  code caches (``__pycache__``, ``*.pyc``, ``*.pyo``) are not part of the workload and are
  skipped. Every other regular file counts (``.py``, ``py.typed``, data files).
* Workload configuration files are named ``config/<file name>``; two config files with the same
  name are refused (the manifest would be ambiguous).

The measurement is SHA-384 (FIPS 180-4) over those bytes, 48 bytes. Absolute paths, file
times and owners never enter it, so the same files give the same value on any machine and path,
and changing one byte of one file changes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safehold.errors import ConfigError

MANIFEST_HEADER = "safehold-measurement-v1"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
#: Refuse absurd trees (a wrong ``root`` pointing at ``/``) instead of hashing for minutes.
MAX_FILES = 20_000


@dataclass(frozen=True)
class Measurement:
    """A workload measurement.

    Attributes:
        manifest: ``(relative path, SHA-256 hex)`` pairs, sorted by path.
        digest: SHA-384 over :meth:`canonical`, 48 bytes.
    """

    manifest: tuple[tuple[str, str], ...]
    digest: bytes

    def hex(self) -> str:
        """The digest as 96 lowercase hex characters."""
        return self.digest.hex()

    def canonical(self) -> bytes:
        """The exact bytes that were hashed (see the module docstring)."""
        return _serialise(self.manifest)

    def to_toml(self) -> str:
        """A reference-values snippet for an appraisal policy (``safehold.attestation.policy``)."""
        return (
            "# Reference Value from `safehold measure` (SHA-384 over "
            f"{len(self.manifest)} workload files)\n"
            "[reference_values]\n"
            f'measurements = ["{self.hex()}"]\n'
        )


def _serialise(manifest: Iterable[tuple[str, str]]) -> bytes:
    lines = [MANIFEST_HEADER]
    lines += [f"{digest}  {path}" for path, digest in manifest]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read workload file {path.name!r}: {e.strerror}") from None
    return h.hexdigest()


def package_root() -> Path:
    """The directory of the installed ``safehold`` package (what the simulated TEE measures)."""
    import safehold

    return Path(safehold.__file__).resolve().parent


def measure_workload(extra_files: Iterable[str | os.PathLike[str]] = (), *,
                     root: str | os.PathLike[str] | None = None) -> Measurement:
    """Measure the workload: the ``safehold`` package files plus its configuration files.

    Args:
        extra_files: the workload's configuration files (TOML policy, manifest, ...); each is
            named ``config/<file name>`` in the manifest.
        root: the package directory to measure; None means the installed ``safehold`` package.
            Tests pass a copy of the tree.

    Returns:
        The :class:`Measurement` (manifest and 48-byte SHA-384 digest).

    Raises:
        ConfigError: ``root`` is not a directory, a file cannot be read, two config files share
            a name, or the tree holds more than :data:`MAX_FILES` files.
    """
    base = Path(root) if root is not None else package_root()
    if not base.is_dir():
        raise ConfigError(f"measurement root is not a directory: {base}")
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            full = Path(dirpath) / name
            if not full.is_file():
                continue
            rel = full.relative_to(base).as_posix()
            entries[f"safehold/{rel}"] = _sha256_file(full)
            if len(entries) > MAX_FILES:
                raise ConfigError(f"measurement root {base} holds more than {MAX_FILES} files")
    for extra in extra_files:
        p = Path(extra)
        if not p.is_file():
            raise ConfigError(f"workload config file not found: {p}")
        key = f"config/{p.name}"
        if key in entries:
            raise ConfigError(f"two workload config files are named {p.name!r}")
        entries[key] = _sha256_file(p)
    if not entries:
        raise ConfigError(f"measurement root {base} holds no files")
    manifest = tuple(sorted(entries.items(), key=lambda kv: kv[0].encode("utf-8")))
    return Measurement(manifest, hashlib.sha384(_serialise(manifest)).digest())
