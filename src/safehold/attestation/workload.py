"""How a workload is started, and what it measures about itself: the launch spec.

A workload process must run only measured code, from a launch the measurement describes —
what Gramine does with ``loader.argv``, ``loader.env`` and ``sgx.trusted_files``. The launch::

    <python> -I -S -B -X utf8 -X pycache_prefix=<python>/no-bytecode \
        -c BOOT <module> <env-policy> <sys.path ...> -- <args>

* ``-I`` (isolated: ignore ``PYTHON*`` variables, no user site, no script directory on the
  path), ``-S`` (``site`` is not imported: no ``.pth`` file is executed and no
  ``sitecustomize``/``usercustomize`` is imported, not even when the host plants one),
  ``-B`` (no byte code written).
* ``-X pycache_prefix`` points *below the interpreter binary*, a regular file: no directory
  can exist there (ENOTDIR), so Python never reads a cached ``.pyc`` — not from a
  ``__pycache__`` directory (the prefix replaces them) and not from the prefix — and compiles
  every module from its measured source. Were the path ever a directory, its files would be
  measured under ``bytecode/``.
* ``BOOT`` (:data:`BOOT`, a constant of this measured module) replaces ``sys.path`` by the
  explicit list in argv (nothing is added by ``site``, ``PYTHONPATH`` or ``.pth`` files),
  refuses to start if the environment holds any variable outside the allow-list or a fixed
  variable with another value (like Gramine's ``loader.env``: fixed values, or passthrough of
  named run-time settings whose values are not measured), and runs ``<module>`` as
  ``__main__``.

The **launch description** (:meth:`LaunchSpec.description`) is this argv with every host path
replaced by its closure label (``{interpreter}``, ``{app}``, ``{stdlib}``, ...) — host-
independent, and measured: its SHA-384 enters the closure digest, so the module run, the
interpreter flags, the order of ``sys.path`` and the environment policy are all part of the
Reference Value. Run-time arguments after ``--`` (ports, data directories) are not.

Two sides compute the same value:

* the data owner (``safehold measure``): :meth:`LaunchSpec.closure`;
* the workload itself at start (the simulated TEE's measurement): :func:`current_closure`,
  which reads ``sys.orig_argv``. A process not started by this launch (``python -m ...``,
  ``PYTHONPATH``, another ``-c``) measures as ``unrecognised launch`` and can never match a
  Reference Value, so it gets no keys.

A test or development stack runs a *snapshot copy* of the package by passing its parent
directory as ``app_dir``: the snapshot is the ``app`` root of the closure, so its files are
measured, and editing the working tree does not change the running workload's value.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from safehold.attestation.closure import (
    Closure,
    InterpreterLayout,
    closure,
    derive,
    interpreter_layout,
    label_roots,
)
from safehold.errors import ConfigError

__all__ = ["BOOT", "FIXED_ENV", "FLAGS", "LaunchSpec", "current_closure", "launch_description",
           "measure_at_boot",
           "launched_module", "package_app_dir"]

#: Interpreter options of every workload launch (module docstring).
FLAGS = ("-I", "-S", "-B", "-X", "utf8")
#: Environment variables every workload gets with these fixed values (Gramine loader.env style).
FIXED_ENV: Mapping[str, str] = {"LC_ALL": "C.UTF-8", "TZ": "UTC"}
#: The bootstrap run with ``-c``: explicit sys.path, environment allow-list, then the module.
#: argv: -c MODULE ENV_POLICY_JSON PATH... -- ARGS...
BOOT = (
    "import sys\n"
    "a = sys.argv\n"
    "i = a.index('--')\n"
    "sys.path[:] = a[3:i]\n"
    "import json, os\n"
    "p = json.loads(a[2])\n"
    "bad = sorted(k for k in os.environ if k not in p['fixed'] and k not in p['passthrough'])\n"
    "bad += sorted(k for k, v in p['fixed'].items() if os.environ.get(k) != v)\n"
    "if bad:\n"
    "    sys.exit('safehold workload: refusing to start, environment variables outside the '\n"
    "             'allow-list or with other values than fixed: ' + ', '.join(bad))\n"
    "m = a[1]\n"
    "sys.argv = [m] + a[i + 1:]\n"
    "from safehold.attestation.workload import measure_at_boot\n"
    "measure_at_boot()\n"
    "import runpy\n"
    "runpy.run_module(m, run_name='__main__', alter_sys=True)\n"
)


def _no_bytecode_prefix(layout: InterpreterLayout) -> str:
    return os.path.join(layout.real_executable, "no-bytecode")


def package_app_dir(package_dir: str | os.PathLike[str] | None = None,
                    layout: InterpreterLayout | None = None) -> str | None:
    """The ``sys.path`` entry that makes ``safehold`` importable, when it is not one of the
    environment's site-packages: ``src/`` of a checkout (editable install) or a snapshot's
    parent. None when the package is installed in site-packages.

    Args:
        package_dir: the ``safehold`` package directory (default: the imported one).
    """
    if package_dir is None:
        import safehold

        package_dir = os.path.dirname(os.path.abspath(safehold.__file__))
    parent = os.path.dirname(os.path.abspath(package_dir))
    lay = layout or interpreter_layout()
    return None if parent in {os.path.abspath(p) for p in lay.site_packages} else parent


def _env_policy(fixed: Mapping[str, str], passthrough: Iterable[str]) -> str:
    return json.dumps({"fixed": dict(sorted(fixed.items())), "passthrough": sorted(set(passthrough))},
                      separators=(",", ":"), sort_keys=True)


def launch_description(module: str, env_policy: str, path_labels: Sequence[str]) -> str:
    """The host-independent launch description that is measured (module docstring): canonical
    JSON of the argv template with host paths as ``{label}``."""
    argv = ["{interpreter}", *FLAGS, "-X", "pycache_prefix={bytecode}", "-c", BOOT, module, env_policy,
            *[f"{{{label}}}" for label in path_labels], "--"]
    return json.dumps({"launch": "safehold-workload-v1", "argv": argv}, separators=(",", ":"),
                      ensure_ascii=False)


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one workload, and its measured closure.

    Args:
        module: the module run as ``__main__`` (``safehold.records.service``).
        app_dir: a directory put first on ``sys.path`` (the snapshot's parent, or ``src/`` of
            an editable install: :func:`package_app_dir`); None when the package is installed
            in site-packages.
        passthrough: environment variable names whose values the host supplies (the
            workload's unmeasured run-time settings); every other variable is refused.
        fixed_env: variables with fixed, measured values (default :data:`FIXED_ENV`).
        executable: the interpreter (default ``sys.executable``: this interpreter or a venv of it).
    """

    module: str
    app_dir: str | None = None
    passthrough: tuple[str, ...] = ()
    fixed_env: Mapping[str, str] = field(default_factory=lambda: dict(FIXED_ENV))
    executable: str = field(default_factory=lambda: sys.executable)

    def layout(self) -> InterpreterLayout:
        """The interpreter's layout (:func:`interpreter_layout`)."""
        return interpreter_layout(self.executable)

    def sys_path(self, layout: InterpreterLayout | None = None) -> list[str]:
        """The workload's ``sys.path``: app dir, the standard library, site-packages."""
        lay = layout or self.layout()
        head = [os.path.abspath(self.app_dir)] if self.app_dir else []
        return [*head, *lay.stdlib_path, *lay.site_packages]

    def env_policy(self) -> str:
        """The canonical JSON environment policy that BOOT enforces (and the launch measures)."""
        bad = [n for n in (*self.passthrough, *self.fixed_env) if not n or "=" in n]
        if bad:
            raise ConfigError(f"invalid environment variable name(s) {bad!r}")
        clash = set(self.passthrough) & set(self.fixed_env)
        if clash:
            raise ConfigError(f"environment variable(s) {sorted(clash)} are both fixed and passed through")
        return _env_policy(self.fixed_env, self.passthrough)

    def argv(self, *args: str, layout: InterpreterLayout | None = None) -> list[str]:
        """The full command line; ``args`` are the workload's run-time arguments."""
        lay = layout or self.layout()
        return [self.executable, *FLAGS, "-X", f"pycache_prefix={_no_bytecode_prefix(lay)}", "-c", BOOT,
                self.module, self.env_policy(), *self.sys_path(lay), "--", *args]

    def env(self, source: Mapping[str, str] | None = None) -> dict[str, str]:
        """The workload's environment: the fixed variables, plus each passthrough variable
        that ``source`` (default ``os.environ``) sets. Nothing else (no ``PYTHONPATH``,
        ``LD_PRELOAD``, ``SSLKEYLOGFILE``, ``OPENSSL_CONF``, proxies ...)."""
        src = os.environ if source is None else source
        env = dict(self.fixed_env)
        env.update({k: src[k] for k in self.passthrough if k in src})
        return env

    def description(self, layout: InterpreterLayout | None = None) -> str:
        """The measured launch description (:func:`launch_description`)."""
        lay = layout or self.layout()
        labels = [r.label for r in label_roots(self.sys_path(lay), lay)]
        return launch_description(self.module, self.env_policy(), labels)

    def closure(self, config_files: Iterable[str | os.PathLike[str]] = (), *,
                base: Closure | None = None) -> Closure:
        """The Reference Value side: the closure this launch will measure at start.

        Args:
            config_files: the workload's measured configuration files.
            base: a closure already measured for another launch over the same interpreter and
                ``sys.path`` (same roots): its code files are reused
                (:func:`~safehold.attestation.closure.derive`), not hashed again. Ignored when
                the roots differ.

        Raises:
            ConfigError: see :func:`safehold.attestation.closure.closure`.
        """
        lay = self.layout()
        prefix = _no_bytecode_prefix(lay)
        path = self.sys_path(lay)
        desc = self.description(lay)
        if base is not None:
            roots = (label_roots(path, lay), os.path.abspath(prefix))
            mine = [r for r in base.roots if r.label != "interpreter" and r.label != "bytecode"]
            prefix_root = [r.path for r in base.roots if r.label == "bytecode"]
            if mine == roots[0] and prefix_root == [roots[1]]:
                return derive(base, launch=desc, config_files=config_files)
        return closure(path, self.executable, config_files=config_files, pycache_prefix=prefix,
                       launch=desc, layout=lay)


def _parse_launch(orig_argv: Sequence[str]) -> tuple[str, str, list[str], str] | None:
    """``(module, env policy, sys.path entries, pycache prefix)`` when ``orig_argv`` is a
    :class:`LaunchSpec` launch, else None."""
    a = list(orig_argv)
    n = len(FLAGS)
    if len(a) < n + 8 or tuple(a[1:1 + n]) != FLAGS or a[1 + n] != "-X":
        return None
    opt = a[2 + n]
    if not opt.startswith("pycache_prefix=") or a[3 + n] != "-c" or a[4 + n] != BOOT:
        return None
    rest = a[5 + n:]
    if "--" not in rest:
        return None
    end = rest.index("--")
    if end < 2:
        return None
    return rest[0], rest[1], rest[2:end], opt[len("pycache_prefix="):]


def launched_module() -> str | None:
    """The module this process runs when it was started by a :class:`LaunchSpec` launch
    (isolated, no ``site``, no byte code written), else None."""
    parsed = _parse_launch(getattr(sys, "orig_argv", []))
    if parsed is None or not (sys.flags.isolated and sys.flags.no_site and sys.flags.dont_write_bytecode):
        return None
    return parsed[0]


#: This process's code closure and launch description, measured once (as a TEE at load time).
_CODE: list[tuple[Closure, str]] = []


def current_closure(config_files: Iterable[str | os.PathLike[str]] = ()) -> Closure:
    """The workload measuring itself (the simulated TEE's measurement): the closure of the
    launch it was started with, read from ``sys.orig_argv``, with ``libpython`` taken from the
    process's own memory map, plus ``config_files``.

    The code files are measured once per process: by :func:`measure_at_boot` before the
    workload's module runs (a :class:`LaunchSpec` launch), else at the first call; a file
    changed later is seen by the next process. Configuration files are hashed at every call.

    A process that was not started by a :class:`LaunchSpec` launch (other flags, another
    ``-c``, ``python -m``) is measured over its actual ``sys.path`` with byte-code caches and
    the launch described as ``unrecognised``: that value matches no Reference Value.

    Raises:
        ConfigError: see :func:`safehold.attestation.closure.closure`.
    """
    if not _CODE:
        _CODE.append(_measure_code())
    base, desc = _CODE[0]
    return derive(base, launch=desc, config_files=config_files)


def measure_at_boot() -> None:
    """Measure the workload's code now, before its module runs (called by :data:`BOOT`).

    A TEE measures at load time; measuring at the first attestation instead let code that ran
    during the workload's imports restore the files it came from before they were hashed (a
    payload appended to a package module that writes the original bytes back). What runs
    before this call is the interpreter's start-up, :data:`BOOT` (measured as part of the launch
    description) and the measurement's own modules: ``safehold``, ``safehold.attestation``
    (both without imports), ``attestation.workload``, ``attestation.closure``,
    ``safehold.errors`` and the standard-library modules they import. A self-restoring change to
    one of those is the simulated TEE's residual gap; under Gramine every file is checked
    against ``sgx.trusted_files`` as it is opened (docs/attestation.md).

    Raises:
        ConfigError: see :func:`safehold.attestation.closure.closure` (the workload does not start).
    """
    if not _CODE:
        _CODE.append(_measure_code())


def _measure_code() -> tuple[Closure, str]:
    lay = interpreter_layout(sys.executable, loaded=True)
    parsed = _parse_launch(getattr(sys, "orig_argv", []))
    if parsed is not None and sys.flags.isolated and sys.flags.no_site and sys.flags.dont_write_bytecode:
        module, policy, path, prefix = parsed
        labels = [r.label for r in label_roots(path, lay)]
        desc = launch_description(module, policy, labels)
        if prefix == _no_bytecode_prefix(lay) and prefix == sys.pycache_prefix:
            return closure(path, sys.executable, pycache_prefix=prefix, launch=desc, layout=lay), desc
    desc = json.dumps({"launch": "unrecognised", "flags": repr(sys.flags)})
    return (closure(sys.path, sys.executable, pycache_prefix=sys.pycache_prefix, launch=desc, layout=lay),
            desc)
