"""The measured closure: every file that can execute in a workload, as one SHA-384 value.

``safehold.attestation.measure`` hashes the ``safehold`` package and the configuration only;
a planted ``__pycache__/*.pyc``, a ``sitecustomize.py``, a ``.pth`` file or a changed byte in a
dependency ran in the workload without changing that value. This module measures what a
hardware TEE running under Gramine lists as ``sgx.trusted_files``: the interpreter executable
and ``libpython`` (when shared), the standard library (with ``lib-dynload``), every directory on
the workload's ``sys.path`` (site-packages with its ``.pth`` files and every distribution, the
application directory that holds the package), the bytecode-cache prefix and the workload's
configuration files. :attr:`Closure.files` is the one list a Gramine manifest generator uses;
:attr:`Closure.digest` is the Reference Value (RFC 9334 §3.2) a policy compares.

Roots and names. Every file is named ``<label>/<posix path relative to its root>`` so the list
does not depend on where the host installed things:

========================  ====================================================================
label                     root
========================  ====================================================================
``interpreter``           the executable (real path) and the loaded ``libpython`` (file roots:
                          ``interpreter/python3.11``, ``interpreter/libpython3.11.so.1.0``)
``stdlib-zip``            ``<prefix>/lib/pythonXY.zip`` (a file root) when it exists
``stdlib``                ``sysconfig`` "stdlib" (``lib-dynload`` is ``stdlib/lib-dynload``)
``platstdlib``            "platstdlib" of the base installation, when it differs from stdlib
``site-packages``         the (virtual) environment's purelib; ``site-packages-plat`` for a
                          different platlib; ``system-site-packages`` for the base
                          installation's, when a venv includes it
``app``, ``app.2``, ...   other ``sys.path`` entries in order (the directory holding the
                          package: ``src/`` or a test snapshot)
``bytecode``              the ``sys.pycache_prefix`` directory, when it exists
``config``                configuration files by file name (``config/records.toml``)
========================  ====================================================================

A ``sys.path`` entry inside an anchor (``.../lib-dynload`` inside stdlib) is named through that
anchor, so nested entries never count a file twice. Inside ``stdlib`` the ``site-packages`` and
``dist-packages`` directories are skipped: they are code only when they are ``sys.path``
entries of their own, and then they are roots. A ``sys.path`` entry that does not exist
contributes nothing (if it appears later, the files it brings change the value).

Bytecode. With ``pycache_prefix`` (the workload runs with ``-X pycache_prefix=...``, see
``safehold.attestation.workload``) Python reads and writes byte-code caches only under that
prefix, never in ``__pycache__`` directories, so the ``*.pyc`` files inside ``__pycache__`` are
not code of the workload and are left out (a host-planted ``.pyc`` there cannot run); every
other file in a ``__pycache__`` directory, and every file under the prefix, is measured. Without
``pycache_prefix`` the interpreter would load those caches, so they are measured too.

Canonical serialisation (UTF-8), lines sorted by name (bytewise)::

    safehold-closure-v1\\n
    launch <SHA-384 hex of the launch description, or "none">\\n
    <SHA-384 hex, 96 lowercase chars> <two spaces> <name>\\n
    ...

The digest is SHA-384 (FIPS 180-4) over those bytes. Absolute paths, sizes, times and owners
never enter it. Files are hashed in a thread pool (``hashlib`` releases the GIL); nothing is
cached on disk, so nothing the host could poison stands between a file and its hash.

Raises (from :func:`closure`): ``ConfigError`` for an unreadable file, a name that is not
UTF-8 or holds a newline, a special file (FIFO, device, socket: it could block the measurement
forever), more than :data:`MAX_FILES` files, or two config files with one name.
"""

from __future__ import annotations

import hashlib
import os
import site as site_mod
import stat
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from safehold.errors import ConfigError

__all__ = ["CLOSURE_HEADER", "MAX_FILES", "Closure", "ClosureFile", "InterpreterLayout", "Root",
           "closure", "derive", "interpreter_layout", "label_roots"]

CLOSURE_HEADER = "safehold-closure-v1"
#: Refuse absurd trees (a ``sys.path`` entry of ``/``) instead of hashing for minutes.
MAX_FILES = 200_000
_SKIP_IN_STDLIB = frozenset({"site-packages", "dist-packages"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Root:
    """One measured root: a directory (or a single file) and the label its files are named by."""

    label: str
    path: str
    is_file: bool = False


@dataclass(frozen=True)
class ClosureFile:
    """One measured file.

    Attributes:
        name: ``<label>/<relative posix path>`` (host-independent, what is hashed).
        sha384: SHA-384 of the file's bytes, 96 lowercase hex characters.
        path: the absolute host path that was read (for a Gramine ``trusted_files`` URI; not
            part of the digest).
        size: bytes read.
    """

    name: str
    sha384: str
    path: str
    size: int


@dataclass(frozen=True)
class Closure:
    """A measured closure: the sorted file list, the launch description's hash, the digest.

    Attributes:
        files: every measured file, sorted by ``name`` (bytewise UTF-8).
        roots: the roots that were walked, in ``sys.path`` order after the interpreter.
        launch_sha384: SHA-384 hex of the launch description, or None (not measured).
        digest: SHA-384 over :meth:`canonical`, 48 bytes.
    """

    files: tuple[ClosureFile, ...]
    roots: tuple[Root, ...]
    launch_sha384: str | None
    digest: bytes = field(repr=False)

    @property
    def entries(self) -> list[tuple[str, str]]:
        """``(name, sha384 hex)`` pairs in canonical order: the one list a Gramine
        ``sgx.trusted_files`` generator and this digest share."""
        return [(f.name, f.sha384) for f in self.files]

    @property
    def total_bytes(self) -> int:
        """Bytes hashed over all files."""
        return sum(f.size for f in self.files)

    def hex(self) -> str:
        """The digest as 96 lowercase hex characters."""
        return self.digest.hex()

    def canonical(self) -> bytes:
        """The exact bytes the digest is taken over (module docstring)."""
        return _serialise(self.entries, self.launch_sha384)

    def to_toml(self) -> str:
        """A reference-values snippet for an appraisal policy (``safehold.attestation.policy``)."""
        return (
            f"# Reference Value from `safehold measure`: SHA-384 over the workload closure "
            f"({len(self.files)} files, {self.total_bytes} bytes)\n"
            "[reference_values]\n"
            f'measurements = ["{self.hex()}"]\n'
        )

    def diff(self, other: Closure) -> list[tuple[str, str | None, str | None]]:
        """``(name, this sha384 or None, other sha384 or None)`` for every name that differs."""
        a, b = dict(self.entries), dict(other.entries)
        return [(n, a.get(n), b.get(n)) for n in sorted(a.keys() | b.keys(), key=str.encode)
                if a.get(n) != b.get(n)]


def _serialise(entries: Iterable[tuple[str, str]], launch_sha384: str | None) -> bytes:
    lines = [CLOSURE_HEADER, f"launch {launch_sha384 or 'none'}"]
    lines += [f"{digest}  {name}" for name, digest in entries]
    return ("\n".join(lines) + "\n").encode("utf-8")


# --- the interpreter and its anchors -----------------------------------------------------------


@dataclass(frozen=True)
class InterpreterLayout:
    """Where an interpreter keeps its code (CPython's own ``sysconfig`` / ``getpath`` rules).

    Attributes:
        executable: the path as invoked (a venv's ``bin/python``).
        real_executable: that path with symlinks resolved (the file that runs).
        libpython: the shared ``libpython`` it loads, or None (static build).
        stdlib_path: the standard library ``sys.path`` entries ``-I -S`` gives: the zip (even
            if absent), stdlib, lib-dynload.
        site_packages: the environment's site-packages directories, in ``site`` order.
        anchors: label -> directory, for naming (module docstring).
    """

    executable: str
    real_executable: str
    libpython: str | None
    stdlib_path: tuple[str, ...]
    site_packages: tuple[str, ...]
    anchors: tuple[tuple[str, str], ...]


def _venv_prefix(executable: str) -> tuple[str | None, bool]:
    """``(venv prefix, include-system-site-packages)`` the way ``site.venv()`` finds
    ``pyvenv.cfg`` (next to the executable or one level up), or ``(None, False)``."""
    exe_dir = os.path.dirname(os.path.abspath(executable))
    for cand in (exe_dir, os.path.dirname(exe_dir)):
        cfg = os.path.join(cand, "pyvenv.cfg")
        if os.path.isfile(cfg):
            system = False
            try:
                with open(cfg, encoding="utf-8") as f:
                    for line in f:
                        key, sep, value = line.partition("=")
                        if sep and key.strip().lower() == "include-system-site-packages":
                            system = value.strip().lower() == "true"
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read {cfg}: {e}") from None
            return os.path.dirname(cfg), system
    return None, False


def _loaded_libpython() -> str | None:
    """The ``libpython`` mapped into this process (``/proc/self/maps``): what actually runs,
    whatever ``LD_LIBRARY_PATH`` said. None where there is no /proc or no shared libpython."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith("libpython") and ".so" in path:
                    return os.path.realpath(path)
    except OSError:
        pass
    return None


def interpreter_layout(executable: str | None = None, *, loaded: bool = False) -> InterpreterLayout:
    """The layout of ``executable`` (default ``sys.executable``), which must be this
    interpreter build or a virtual environment of it.

    Args:
        executable: the interpreter path the workload is started with.
        loaded: take ``libpython`` from this process's memory map (the workload measuring
            itself) instead of ``sysconfig``'s LIBDIR/INSTSONAME (the owner computing a
            Reference Value).

    Raises:
        ConfigError: ``executable`` is another interpreter build (run ``safehold measure``
            with that interpreter instead), or does not exist.
    """
    exe = executable or sys.executable
    real = os.path.realpath(exe)
    if not os.path.isfile(real):
        raise ConfigError(f"interpreter not found: {exe}")
    mine = os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
    if real != mine and real != os.path.realpath(sys.executable):
        raise ConfigError(f"{exe} is another interpreter than the one measuring ({mine}); "
                          "run `safehold measure` with that interpreter")
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(scheme="posix_prefix", vars=base) if os.name == "posix" \
        else sysconfig.get_paths(vars=base)
    stdlib, platstdlib = paths["stdlib"], paths["platstdlib"]
    v = sys.version_info
    zip_path = os.path.join(sys.base_prefix, "lib", f"python{v.major}{v.minor}.zip")
    stdlib_path = (zip_path, stdlib, os.path.join(platstdlib, "lib-dynload"))
    venv, system = _venv_prefix(exe)
    site_dirs: list[tuple[str, str]] = []

    def add(label: str, prefix: str) -> None:
        # site.getsitepackages follows the platform's own rules (Debian's dist-packages too)
        for i, d in enumerate(dict.fromkeys(site_mod.getsitepackages([prefix]))):
            site_dirs.append((label if i == 0 else f"{label}.{i + 1}", d))

    if venv is not None:
        add("site-packages", venv)
    if venv is None or system:
        add("site-packages" if venv is None else "system-site-packages", sys.base_prefix)
    anchors = [("stdlib", stdlib)]
    if platstdlib != stdlib:
        anchors.append(("platstdlib", platstdlib))
    anchors += site_dirs
    if loaded:
        lib = _loaded_libpython()
    else:
        lib = None
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
            libdir = sysconfig.get_config_var("LIBDIR")
            if name and libdir and os.path.isfile(os.path.join(libdir, name)):
                lib = os.path.realpath(os.path.join(libdir, name))
    return InterpreterLayout(exe, real, lib, stdlib_path, tuple(p for _, p in site_dirs),
                             tuple((lab, os.path.abspath(p)) for lab, p in anchors))


def label_roots(sys_path: Sequence[str], layout: InterpreterLayout) -> list[Root]:
    """Name each ``sys.path`` entry (module docstring): through the deepest anchor that holds
    it, ``stdlib-zip`` for the standard library zip, ``app``, ``app.2``, ... for the rest in
    order. Duplicates are dropped (the first occurrence wins, as in the import system)."""
    anchors = sorted(layout.anchors, key=lambda a: len(a[1]), reverse=True)
    zip_path = os.path.abspath(layout.stdlib_path[0])
    roots: list[Root] = []
    seen: set[str] = set()
    n_app = 0
    for entry in sys_path:
        p = os.path.abspath(entry or os.curdir)
        if p in seen:
            continue
        seen.add(p)
        if p == zip_path:
            roots.append(Root("stdlib-zip", p, is_file=True))
            continue
        for label, anchor in anchors:
            if p == anchor or p.startswith(anchor.rstrip(os.sep) + os.sep):
                rel = os.path.relpath(p, anchor)
                name = label if rel == os.curdir else f"{label}/{Path(rel).as_posix()}"
                roots.append(Root(name, p, is_file=os.path.isfile(p)))
                break
        else:
            n_app += 1
            label = "app" if n_app == 1 else f"app.{n_app}"
            roots.append(Root(label, p, is_file=os.path.isfile(p)))
    return roots


# --- walking and hashing -----------------------------------------------------------------------


def _check_name(name: str, where: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: a file name is not UTF-8; it cannot be named in the closure") from None
    if "\n" in name or "\r" in name:
        raise ConfigError(f"{where}: a file name holds a line break; it cannot be named in the closure")
    return name


def _walk(root: Root, skip_dirs: set[str], skip_caches: bool, in_stdlib: bool,
          out: dict[str, str]) -> None:
    """Collect ``name -> host path`` for every regular file under ``root`` (following
    symlinks to files and directories, each real directory once)."""
    if root.is_file:
        if os.path.isfile(root.path):
            out.setdefault(root.label, root.path)
        return
    if not os.path.isdir(root.path):
        return
    visited: set[tuple[int, int]] = set()
    stack = [(root.path, "")]
    while stack:
        d, rel = stack.pop()
        try:
            st = os.stat(d)
        except OSError as e:
            raise ConfigError(f"cannot read directory {d}: {e.strerror}") from None
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(d) as it:
                ents = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise ConfigError(f"cannot read directory {d}: {e.strerror}") from None
        caches_here = skip_caches and os.path.basename(d) == "__pycache__"  # once per directory
        for ent in ents:
            name = _check_name(ent.name, d)
            full = ent.path  # os.path.join(d, name), computed by scandir
            r = f"{rel}/{name}" if rel else name
            try:
                is_dir = ent.is_dir()  # follows symlinks: a linked directory is importable too
                is_file = not is_dir and ent.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if full in skip_dirs or (in_stdlib and not rel and name in _SKIP_IN_STDLIB):
                    continue
                stack.append((full, r))
            elif is_file:
                if caches_here and name.endswith((".pyc", ".pyo")):
                    continue
                out.setdefault(f"{root.label}/{r}", full)
                if len(out) > MAX_FILES:
                    raise ConfigError(f"the closure holds more than {MAX_FILES} files (root {root.path})")
            elif ent.is_symlink() and not os.path.exists(full):
                continue  # a dangling link names nothing that can be imported
            else:
                raise ConfigError(f"{full} is not a regular file or directory (FIFO, socket or device); "
                                  "it cannot be measured")


def _sha384(path: str) -> tuple[str, int]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigError(f"cannot read workload file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO since the walk
            raise ConfigError(f"{path} is not a regular file; it cannot be measured")
        h = hashlib.sha384()
        size = 0
        while True:
            chunk = os.read(fd, _CHUNK)  # hashlib releases the GIL for chunks over 2 KiB
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size
    except OSError as e:
        raise ConfigError(f"cannot read workload file {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _hash_all(paths: list[str], workers: int) -> list[tuple[str, int]]:
    """SHA-384 of every path, in order, on ``workers`` threads that each take one batch (one
    future per file would cost more in locking than small files cost to hash)."""
    sizes = []
    for p in paths:
        try:
            sizes.append(os.stat(p).st_size)
        except OSError:
            sizes.append(0)  # reported by _sha384
    batches: list[list[int]] = [[] for _ in range(max(1, workers))]
    loads = [0] * len(batches)
    for i in sorted(range(len(paths)), key=lambda i: -sizes[i]):  # largest first, to the lightest
        k = loads.index(min(loads))
        batches[k].append(i)
        loads[k] += sizes[i] + 16384  # a per-file cost, so many small files spread too
    out: list[tuple[str, int]] = [("", 0)] * len(paths)

    def work(batch: list[int]) -> None:
        for i in batch:
            out[i] = _sha384(paths[i])

    with ThreadPoolExecutor(max_workers=len(batches), thread_name_prefix="closure") as pool:
        for f in [pool.submit(work, b) for b in batches if b]:
            f.result()
    return out


def closure(sys_path: Sequence[str], executable: str | None = None, *,
            config_files: Iterable[str | os.PathLike[str]] = (),
            pycache_prefix: str | None = None, launch: str | None = None,
            layout: InterpreterLayout | None = None, workers: int | None = None) -> Closure:
    """Measure everything that can execute in a workload (module docstring).

    Args:
        sys_path: the workload's ``sys.path``, in order.
        executable: the interpreter it runs (default ``sys.executable``); its real file and
            ``libpython`` are measured.
        config_files: the workload's configuration files, named ``config/<file name>``.
        pycache_prefix: the workload's ``sys.pycache_prefix``; None means it reads
            ``__pycache__`` caches, which are then measured.
        launch: the launch description (argv template, environment allow-list); its SHA-384
            enters the digest. None for a bare file closure.
        layout: a precomputed :func:`interpreter_layout` (default: computed for ``executable``).
        workers: hashing threads (default: one per CPU, at most 8).

    Returns:
        the :class:`Closure`.

    Raises:
        ConfigError: see the module docstring.
    """
    lay = layout or interpreter_layout(executable)
    roots = [Root("interpreter", lay.real_executable, is_file=True)]
    files: dict[str, str] = {f"interpreter/{os.path.basename(lay.real_executable)}": lay.real_executable}
    if lay.libpython:
        roots.append(Root("interpreter", lay.libpython, is_file=True))
        files[f"interpreter/{os.path.basename(lay.libpython)}"] = lay.libpython
    path_roots = label_roots(sys_path, lay)
    if pycache_prefix is not None:
        path_roots.append(Root("bytecode", os.path.abspath(pycache_prefix)))
    roots += path_roots
    dir_roots = {r.path for r in path_roots if not r.is_file}
    anchors = dict(lay.anchors)
    for r in path_roots:
        in_stdlib = r.label in ("stdlib", "platstdlib") and r.path in (anchors.get("stdlib"),
                                                                     anchors.get("platstdlib"))
        _walk(r, dir_roots - {r.path}, pycache_prefix is not None, in_stdlib, files)
    for key, path in _config_entries(config_files).items():
        if key in files:  # pragma: no cover - code names never start with "config/"
            raise ConfigError(f"workload config file {key} clashes with a code file")
        files[key] = path
    names = sorted(files, key=str.encode)
    hashed = _hash_all([files[n] for n in names], workers or min(8, os.cpu_count() or 1))
    out = tuple(ClosureFile(n, h, files[n], size) for n, (h, size) in zip(names, hashed, strict=True))
    launch_sha = hashlib.sha384(launch.encode("utf-8")).hexdigest() if launch is not None else None
    digest = hashlib.sha384(_serialise(((f.name, f.sha384) for f in out), launch_sha)).digest()
    return Closure(out, tuple(roots), launch_sha, digest)


def _config_entries(config_files: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cfg in config_files:
        p = Path(cfg)
        if not p.is_file():
            raise ConfigError(f"workload config file not found: {p}")
        key = f"config/{_check_name(p.name, str(p.parent))}"
        if key in out:
            raise ConfigError(f"two workload config files are named {p.name!r}")
        out[key] = str(p.resolve())
    return out


def derive(base: Closure, *, launch: str | None,
           config_files: Iterable[str | os.PathLike[str]] = ()) -> Closure:
    """The closure of the same code files as ``base`` with another launch description and
    other configuration files: exactly what :func:`closure` returns for the same roots with
    ``launch`` and ``config_files``, without hashing the code files again.

    A workload measures its code once, at start (as a TEE measures at load time), and each
    configuration when asked; the data owner measures several workloads that share one
    interpreter and ``sys.path`` (the broker and the records service) with one walk.

    Raises:
        ConfigError: a configuration file is missing or unreadable, or two share a name.
    """
    code = [f for f in base.files if not f.name.startswith("config/")]
    cfg = _config_entries(config_files)
    names = sorted(cfg, key=str.encode)
    hashed = _hash_all([cfg[n] for n in names], 1)
    extra = [ClosureFile(n, h, cfg[n], size) for n, (h, size) in zip(names, hashed, strict=True)]
    out = tuple(sorted([*code, *extra], key=lambda f: f.name.encode()))
    launch_sha = hashlib.sha384(launch.encode("utf-8")).hexdigest() if launch is not None else None
    digest = hashlib.sha384(_serialise(((f.name, f.sha384) for f in out), launch_sha)).digest()
    return Closure(out, base.roots, launch_sha, digest)


def describe(c: Closure) -> Mapping[str, object]:
    """A JSON-able summary: digest, counts, roots (label and host path), files."""
    return {"measurement": c.hex(), "algorithm": "sha-384", "format": CLOSURE_HEADER,
            "launch_sha384": c.launch_sha384, "file_count": len(c.files), "bytes": c.total_bytes,
            "roots": [{"label": r.label, "path": r.path} for r in c.roots],
            "files": [{"name": f.name, "sha384": f.sha384} for f in c.files]}
