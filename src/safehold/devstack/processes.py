"""Starting, watching and stopping the local stack's processes (broker, records service)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

import httpx

from safehold.devstack.datadir import tokens, write_private
from safehold.devstack.errors import StackError
from safehold.devstack.stack import (
    Stack,
    base_env,
    broker_spec,
    lock_data_dir,
    records_spec,
    unlock_data_dir,
)
from safehold.errors import ConfigError
from safehold.jsontypes import JSONObject
from safehold.procutil import EXIT_WITH_PARENT, clean_exit_code, terminate

__all__ = ["MANIFEST_REFUSED", "Supervisor", "broker_cmd", "check_port", "lifeline", "records_cmd",
           "records_env", "start", "stop", "summary_lines", "update_manifest", "wait_broker", "wait_records"]


def check_port(port: int, what: str, host: str = "127.0.0.1") -> None:
    """Fail early and by name if ``host:port`` cannot be bound (in use, or not permitted).

    Binds with ``SO_REUSEADDR`` as the servers do, so a port in TIME_WAIT is not reported.
    The port may still be taken between this check and the child's bind (then the child's
    start-up error names it).

    Raises:
        ConfigError: ``port {port} on {host} is in use ({what})``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise ConfigError(f"port {port} on {host} {why} ({what})") from None


def _log_tail(path: Path) -> str:
    """Last non-empty line of a log file (≤ 200 characters), or "" if none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def lifeline(parent: int | None) -> list[str]:
    """``["--exit-with-parent", "<parent>"]`` (``[]`` for None): the run-time option that makes a
    workload stop by itself once ``parent`` (``safehold up``) is gone
    (:func:`safehold.procutil.exit_with_parent`). Unmeasured and not secret."""
    return [] if parent is None else [EXIT_WITH_PARENT, str(parent)]


def broker_cmd(s: Stack, *, manifest: bool = True, parent: int | None = None) -> list[str]:
    """Command line of the broker process (``safehold broker serve`` on loopback; with the data
    directory's ``manifest.toml`` unless ``manifest`` is false), launched by
    :func:`~safehold.devstack.stack.broker_spec` (isolated; run with :func:`base_env`).
    ``parent``: the pid it stops with (:func:`lifeline`; ``safehold up`` passes its own)."""
    m = ["--manifest", str(s.path("manifest.toml"))] if manifest else []
    if s.anchor is not None:
        from safehold.devstack.anchor import BROKER_ANCHOR_FILE

        m += ["--anchor", str(s.path(BROKER_ANCHOR_FILE))]
    return broker_spec(s).argv("serve", "--data-dir", str(s.path("broker")), *m,
                               "--host", "127.0.0.1", "--port", str(s.broker_port), "--tls-name", "api",
                               *lifeline(parent))


MANIFEST_REFUSED = "differs from the stored manifest"


def update_manifest(s: Stack) -> int:
    """Install ``<data_dir>/manifest.toml`` on the running broker as a signed update (the next
    version), signed by the dev owner key ``<owner_dir>/owner.key`` as user ``admin``.

    Used by :func:`start` when the broker refuses a changed manifest (``records.toml`` changed,
    e.g. ``--scone-auth``): the broker accepts only owner-signed updates. The signature binds
    the broker id and the current manifest's digest, both read from ``/status`` over TLS
    verified against the broker's CA.

    Returns:
        the new manifest version.

    Raises:
        StackError: no owner key, the broker is not ready, or it refused the update (its reason).
    """
    from safehold.broker.manifest import load_manifest, sign_update

    key = s.owner_path("owner.key")
    if not key.exists():
        raise StackError(f"the manifest changed and there is no owner key ({key}) to sign the update")
    path = s.path("manifest.toml")
    m = load_manifest(path.read_bytes(), filename=str(path), base_dir=path.parent)
    ctx = ssl.create_default_context(cafile=str(s.path("ca.pem")))
    hdr = {"Authorization": f"Bearer {tokens(s.data_dir, s.owner_dir)['admin']}"}
    try:
        with httpx.Client(base_url=s.broker_url, verify=ctx, timeout=30, headers=hdr) as c:
            st = c.get("/status").json()
            if st.get("mode") != "ready" or not st.get("broker_id") or not st.get("manifest_digest"):
                raise StackError(f"broker is not ready for a manifest update (mode {st.get('mode')!r})")
            version = int(st["manifest_version"]) + 1
            sig = sign_update(m, version, key.read_bytes(), broker_id=st["broker_id"],
                              previous_sha256=st["manifest_digest"])
            r = c.post("/admin/manifest/update", json={"manifest": m.raw, "version": version,
                                                       "signer": "admin", "signature": sig})
    except (httpx.HTTPError, ValueError) as e:
        raise StackError(f"manifest update: broker unreachable or garbled answer ({type(e).__name__})"
                         ) from None
    if r.status_code != 200:
        raise StackError(f"the broker refused the signed manifest update: HTTP {r.status_code} "
                         f"{r.text[:200]}")
    return version


def records_env(s: Stack, config: str = "records.toml", *, port: int | None = None,
                scone_port: int | None | str = "default", store_url: str | None = None,
                ready: str = "records-ready.json") -> dict[str, str]:
    """Environment for one records service process: the launch's fixed variables and only the
    unmeasured run-time settings (the listen host is measured, in ``records.toml``); nothing of
    this process's environment."""
    spec = records_spec(s)
    env = spec.env({})
    sp = s.scone_port if scone_port == "default" else scone_port
    env.update({
        "SAFEHOLD_RECORDS_DATA_DIR": str(s.path("tee")),
        "SAFEHOLD_RECORDS_BROKER_URL": s.broker_url,
        # the CA the broker wrote at creation (prepare): records may start before the broker
        # answers; its identity is checked against the measured pin anyway
        "SAFEHOLD_RECORDS_BROKER_CA": str(s.path("broker") / "ca.pem"),
        "SAFEHOLD_RECORDS_STORE_URL": store_url or s.store_url,
        "SAFEHOLD_RECORDS_PORT": str(port if port is not None else s.records_port),
        "SAFEHOLD_RECORDS_SCONE_PORT": "none" if sp is None else str(sp),
        "SAFEHOLD_RECORDS_READY_FILE": str(s.path(ready)),
    })
    assert set(env) <= set(spec.fixed_env) | set(spec.passthrough)
    return env


def records_cmd(s: Stack, config: str = "records.toml", *, parent: int | None = None) -> list[str]:
    """Command line of a records service process, launched by
    :func:`~safehold.devstack.stack.records_spec` (isolated interpreter; run with
    :func:`records_env`). ``parent``: the pid it stops with (:func:`lifeline`)."""
    return records_spec(s).argv("--config", str(s.path(config)), *lifeline(parent))


def wait_broker(s: Stack, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the broker serves its workload CA; copy it to ``<data_dir>/ca.pem``.

    Raises:
        StackError: the broker exited (names the last line of its log), started in recovery
            mode, or did not answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    ca = s.path("broker") / "ca.pem"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(s.path("broker.log"))
            hint = ("; the manifest changed (records.toml or the Safehold package measure differently "
                    "now) and the broker accepts only owner-signed updates: undo the change (e.g. "
                    "--scone-auth back to its old value) or use a fresh --data-dir"
                    if s.info.get("manifest_changed") and "manifest" in tail else "")
            raise StackError(f"broker exited with status {proc.returncode}"
                             + (f": {tail}" if tail else "") + f" (see {s.path('broker.log')})" + hint)
        if ca.exists():
            try:
                ctx = ssl.create_default_context(cafile=str(ca))
                r = httpx.get(f"{s.broker_url}/ca", verify=ctx, timeout=2)
                if r.status_code == 200:
                    s.path("ca.pem").write_text(r.text, "utf-8")
                    return
            except (httpx.HTTPError, ssl.SSLError, OSError):
                pass  # ca.pem may still be being written, or the port not yet open: retry
        _raise_if_recovery(s)
        time.sleep(0.1)
    raise StackError(f"broker did not answer on {s.broker_url} within {timeout:.0f} s")


def _raise_if_recovery(s: Stack) -> None:
    """The broker prints one JSON line when it listens; in recovery mode it serves no CA, so
    say so at once instead of waiting for the timeout."""
    tail = _log_tail(s.path("broker.log"))
    if tail.startswith("{") and '"recovery"' in tail:
        with contextlib.suppress(ValueError, OSError):
            lines = s.path("broker.log").read_text("utf-8", "replace").strip().splitlines()
            st = json.loads(lines[-1])
            if st.get("mode") == "recovery":
                raise StackError(f"broker started in RECOVERY MODE: {st.get('reason', '?')} "
                                 "(see docs/broker.md: `safehold broker recover`)")


def wait_records(s: Stack, proc: subprocess.Popen[bytes], ready: Path, timeout: float,
                 log: Path | None = None) -> JSONObject:
    """Wait until a records process has written its ready file; return its content.

    Raises:
        StackError: the process exited first (e.g. status 2: the broker released no keys) or
            the timeout passed.
    """
    info = ready_info(proc, ready, time.monotonic() + timeout, "records service", log, interval=0.1)
    if info is None:
        raise StackError(f"records service did not become ready within {timeout:.0f} s")
    return info


def ready_info(proc: subprocess.Popen[bytes], ready: Path, deadline: float, name: str,
               log: Path | None, *, interval: float) -> JSONObject | None:
    """Poll every ``interval`` seconds, until ``deadline`` (``time.monotonic()``), for the ready
    file ``proc`` writes (JSON whose ``pid`` is its own); ``None`` if the deadline passes.

    Raises:
        StackError: the process exited first; names status 2 (the broker released no keys),
            the tail of ``log`` and its path.
    """
    while time.monotonic() < deadline:
        if ready.exists():
            with contextlib.suppress(ValueError, OSError):
                info = json.loads(ready.read_text("utf-8"))
                if info.get("pid") == proc.pid:
                    return info
        if proc.poll() is not None:
            why = "the broker released no keys to it" if proc.returncode == 2 else "see its log"
            tail = _log_tail(log) if log else ""
            raise StackError(f"{name} exited with status {proc.returncode}: {why}"
                             + (f": {tail}" if tail else "") + (f" ({log})" if log else ""))
        time.sleep(interval)
    return None


def start(s: Stack, *, timeout: float = 60.0) -> Stack:
    """Start the broker, then the records service; write ``up.json``. Stops both on failure.

    Takes the data directory's lock if this Stack does not hold it (a restart after
    :func:`stop`) and checks that the loopback ports are free before starting anything.

    Raises:
        DataDirBusyError / ConfigError: as :func:`lock_data_dir` / :func:`check_port`.
        StackError: a process did not start (names which, and the last line of its log).
    """
    if s.lock is None:
        s.lock = lock_data_dir(s.data_dir)
    try:
        ports = [(s.broker_port, "--broker-port"), (s.records_port, "--port")]
        if s.scone_port:
            ports.append((s.scone_port, "--scone-port"))
        seen: dict[int, str] = {}
        for port, what in ports:
            if port in seen:
                raise ConfigError(f"{seen[port]} and {what} are both {port}")
            seen[port] = what
            check_port(port, what)
        if s.services:  # SVR, discovery, VAU (devstack/services.py): their ports too, up front
            from safehold.devstack.services import ServicePorts, check_service_ports, launch_services

            check_service_ports(s.services, s.service_ports or ServicePorts(), seen)
        for name in ("records-ready.json",):
            with contextlib.suppress(FileNotFoundError):
                s.path(name).unlink()
        _start_anchor(s)
        blog = s.path("broker.log").open("ab")
        rlog_path = s.path("records.log")
        rlog = rlog_path.open("ab")
        # own sessions: a terminal's Ctrl-C reaches only `safehold up`, which then stops the
        # records service first and the broker second; --exit-with-parent: each child stops by
        # itself if `up` dies without stopping them (SIGKILL, a crash)
        # records.toml changed (so its measurement, so the manifest) over a broker state that
        # holds the old manifest: with freshness the broker installs its --manifest file only once
        # its ledger is settled, and would refuse it there; start it on its stored manifest and
        # sign the new one as an update once it serves
        changed = bool(s.info.get("manifest_changed")) and s.anchor is not None and s.path("broker").is_dir()
        s.procs["broker"] = subprocess.Popen(broker_cmd(s, manifest=not changed, parent=os.getpid()),
                                             stdout=blog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=base_env(s), start_new_session=True)
        # with freshness the broker releases nothing until its ledger is settled below
        early = not s.info.get("manifest_changed") and s.anchor is None
        if early:  # both measure themselves at once (the records service waits for the broker)
            s.procs["records"] = _start_records(s, rlog)
        try:
            wait_broker(s, s.procs["broker"], timeout)
        except StackError:
            # records.toml (so the measurement, so the manifest) changed after the broker
            # installed the old manifest: start it on its stored manifest, sign the new one
            if (s.procs["broker"].poll() is None or not s.owner_path("owner.key").exists()
                    or MANIFEST_REFUSED not in _log_tail(s.path("broker.log"))):
                raise
            s.procs["broker"] = subprocess.Popen(broker_cmd(s, manifest=False, parent=os.getpid()),
                                                 stdout=blog, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=base_env(s),
                                                 start_new_session=True)
            wait_broker(s, s.procs["broker"], timeout)
            s.info["manifest_updated"] = update_manifest(s)
        if not _settle_broker(s):
            return _write_up(s, None)
        if changed:
            s.info["manifest_updated"] = update_manifest(s)
        # the services need only the broker: launch them now, alongside records (started early
        # above, it may have exited while the broker's ledger was not yet settled: start it again)
        pending = launch_services(s, s.services, s.service_ports or ServicePorts()) if s.services else None
        if "records" not in s.procs or s.procs["records"].poll() is not None:
            s.procs["records"] = _start_records(s, rlog)
        info = wait_records(s, s.procs["records"], s.path("records-ready.json"), timeout, rlog_path)
        _settle_freshness(s, info)
        if pending is not None:
            from safehold.devstack.services import finish_services

            s.info.update(finish_services(s, pending, timeout=max(timeout, 120.0)))
    except BaseException:
        stop(s)
        raise
    return _write_up(s, info)


def _write_up(s: Stack, info: JSONObject | None) -> Stack:
    """Record the running stack in ``up.json`` (``info``: the records service's ready file;
    None when the records service was not started)."""
    info = info or {}
    s.info.update({
        "broker_url": s.broker_url,
        "records_url": info.get("records_url"),
        "scone_url": f"https://api:{info['scone_port']}" if info.get("scone_port") else None,
        "scone_port": info.get("scone_port"),
        "ca": str(s.path("ca.pem")),
        "policy": str(s.path("policy.toml")),
        "manifest": str(s.path("manifest.toml")),
        "store_url": s.store_url,
        "scone_auth": info.get("scone_auth"),
        "pids": {k: p.pid for k, p in s.procs.items()},
    })
    write_private(s.path("up.json"), json.dumps(s.info, indent=2).encode())
    return s


def _start_records(s: Stack, log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(records_cmd(s, parent=os.getpid()), env=records_env(s), stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


class Supervisor:
    """Keeps the stack's processes running (``safehold up``'s loop calls :meth:`check`).

    The records service needs the broker only at start (attestation, keys): a broker that
    exits is restarted with a bounded exponential back-off while the records service keeps
    serving; a records service that exits is restarted the same way (it attests again). Every
    exit and restart is logged (returned to the caller, appended to the process's log) and
    recorded in ``up.json`` under ``restarts`` (``safehold status`` shows it).

    Args:
        s: the started stack.
        max_restarts: exits of one process within ``window`` seconds after which it is given
            up (:class:`StackError`): a crash loop is not hidden.
        first_delay / max_delay: back-off before the n-th restart: ``first_delay * 2**(n-1)``,
            at most ``max_delay`` seconds.
        timeout: seconds a restarted process has to become ready.
    """

    def __init__(self, s: Stack, *, max_restarts: int = 5, window: float = 300.0,
                 first_delay: float = 0.5, max_delay: float = 30.0, timeout: float = 60.0) -> None:
        self.s, self.max_restarts, self.window = s, max_restarts, window
        self.first_delay, self.max_delay, self.timeout = first_delay, max_delay, timeout
        self._due: dict[str, float] = {}
        self._exits: dict[str, list[float]] = {}

    def _log(self, name: str, msg: str) -> str:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} safehold up: {msg}"
        with contextlib.suppress(OSError), self.s.path(f"{name}.log").open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        return msg

    def _record(self, name: str, **kw: object) -> None:
        r = self.s.info.setdefault("restarts", {}).setdefault(name, {"count": 0})
        r.update(kw)
        self.s.info["pids"] = {k: p.pid for k, p in self.s.procs.items()}
        with contextlib.suppress(OSError):
            write_private(self.s.path("up.json"), json.dumps(self.s.info, indent=2).encode())

    def _exited(self, name: str, code: int | None) -> str:
        now = time.monotonic()
        recent = [t for t in self._exits.get(name, []) if now - t < self.window] + [now]
        self._exits[name] = recent
        if len(recent) > self.max_restarts:
            raise StackError(f"{name} exited {len(recent)} times within {self.window:.0f} s (last status "
                             f"{code}); giving up (see {self.s.path(name + '.log')})")
        delay = min(self.first_delay * 2 ** (len(recent) - 1), self.max_delay)
        self._due[name] = now + delay
        self._record(name, last_exit_status=code,
                     last_exit_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return self._log(name, f"{name} exited with status {code}; restarting in {delay:.1f} s")

    def _restart(self, name: str) -> str:
        s = self.s
        del self._due[name]
        if name == "broker":
            with s.path("broker.log").open("ab") as blog:
                s.procs["broker"] = subprocess.Popen(broker_cmd(s, parent=os.getpid()), stdout=blog,
                                                     stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, env=base_env(s),
                                                     start_new_session=True)
            try:
                wait_broker(s, s.procs["broker"], self.timeout)
            except StackError as e:
                if s.procs["broker"].poll() is None:
                    s.procs["broker"].kill()
                    s.procs["broker"].wait()
                return self._log(name, f"broker restart failed: {e}")  # next exit is scheduled
        elif name != "records":  # SVR, discovery, VAU, SVR anchor members: devstack/services.py
            from safehold.devstack.services import restart_service

            try:
                restart_service(s, name, timeout=self.timeout)
            except StackError as e:
                return self._log(name, f"{name} restart failed: {e}")
        else:
            with contextlib.suppress(FileNotFoundError):
                s.path("records-ready.json").unlink()
            with s.path("records.log").open("ab") as rlog:
                s.procs["records"] = _start_records(s, rlog)
            try:
                wait_records(s, s.procs["records"], s.path("records-ready.json"), self.timeout,
                             s.path("records.log"))
            except StackError as e:
                if s.procs["records"].poll() is None:
                    s.procs["records"].kill()
                    s.procs["records"].wait()
                return self._log(name, f"records restart failed: {e}")
        count = int(s.info.get("restarts", {}).get(name, {}).get("count", 0)) + 1
        self._record(name, count=count, last_restart_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return self._log(name, f"{name} restarted (pid {s.procs[name].pid}, restart #{count})")

    def check(self) -> list[str]:
        """One supervision step: note exits, restart what is due. Returns log lines.

        Raises:
            StackError: a process exited more than ``max_restarts`` times within ``window``.
        """
        out: list[str] = []
        for name, p in list(self.s.procs.items()):
            if name not in self._due and p.poll() is not None:
                out.append(self._exited(name, p.returncode))
        for name, due in sorted(self._due.items(), key=lambda kv: kv[0] != "broker"):
            if time.monotonic() >= due and (name == "broker" or "broker" not in self._due):
                out.append(self._restart(name))
        return out


def stop(s: Stack, *, timeout: float = 15.0) -> dict[str, int | None]:
    """SIGTERM the services, the records service, then the broker; SIGKILL after ``timeout``; a
    last anchor checkpoint, then the anchor members. Returns exit codes."""
    from safehold.devstack.services import stop_services

    codes: dict[str, int | None] = stop_services(s)
    for name in ("records", "broker"):
        p = s.procs.get(name)
        if p is None:
            continue
        codes[name] = clean_exit_code(terminate(p, timeout))
    _stop_anchor(s)
    if s.lock is not None:  # only the lock holder may remove up.json (never another stack's)
        with contextlib.suppress(FileNotFoundError):
            s.path("up.json").unlink()
        unlock_data_dir(s.lock)
        s.lock = None
    return codes


# --- the freshness anchor (safehold.devstack.anchor) -------------------------------------------


def _start_anchor(s: Stack) -> None:
    """Start the anchor members (before the services: their FreshStores wait for them)."""
    if s.anchor is None:
        return
    for i, port in enumerate(s.anchor.ports):
        check_port(port, f"anchor member {i} (ports kept in {s.path('anchor')}/ports.json)")
    s.anchor.exit_with_parent = os.getpid()  # the members stop by themselves if `up` is killed
    try:
        s.anchor.start_all()
    except ConfigError as e:
        raise StackError(f"anchor members did not start: {e}") from None


def _settle_broker(s: Stack) -> bool:
    """Settle the broker's ledger (as :func:`_settle_freshness`); False if it is refused: the
    broker then releases nothing, so the records service is not started (``safehold up`` stays
    up with the broker alone, for the owner's decision)."""
    if s.anchor is None:
        return True
    from safehold.devstack.anchor import CheckpointKeeper, settle_ledger

    outcome = settle_ledger(s, s.broker_url, "broker", say=lambda m: print(m, flush=True))
    s.info["freshness"] = {"broker": outcome}
    if s.keeper is None:
        s.keeper = CheckpointKeeper(s).start()
    if outcome.startswith("refused"):
        print(f"!!! broker ledger NOT re-anchored: {outcome[9:]}\n!!! the broker releases NO keys "
              "(503 not-fresh) and the records service is NOT started until the data owner decides: "
              "safehold freshness proposal --service broker / reanchor --service broker", flush=True)
        return False
    return True


def _settle_freshness(s: Stack, info: JSONObject) -> None:
    """Initialise (first start) or re-anchor (after the members restarted) the records ledger
    with the development owner key where the checkpoint allows it; then keep the checkpoint."""
    if s.anchor is None or not info.get("freshness"):
        return
    from safehold.devstack.anchor import CheckpointKeeper, settle_ledger

    outcome = settle_ledger(s, str(info["records_url"]), "records", say=lambda m: print(m, flush=True))
    s.info.setdefault("freshness", {})["records"] = outcome
    if outcome.startswith("refused"):
        print(f"!!! records ledger NOT re-anchored: {outcome[9:]}\n!!! the records service answers "
              "503 not-fresh until the data owner decides: safehold freshness proposal / reanchor",
              flush=True)
    if s.keeper is None:
        s.keeper = CheckpointKeeper(s).start()


def _stop_anchor(s: Stack) -> None:
    if s.keeper is not None:
        s.keeper.stop()  # the last checkpoint, while the members still hold the heads
        s.keeper = None
    if s.anchor is not None:
        s.anchor.stop()


def summary_lines(s: Stack) -> list[tuple[str, bool]]:
    """What ``safehold up`` prints once the stack runs: ``(line, is_warning)`` pairs (URLs, the
    SCONE port's authentication, CA, policy, manifest, tokens, database, measurement)."""
    i = s.info
    out: list[tuple[str, bool]] = [(f"broker          {i['broker_url']}", False)]
    if i.get("records_url"):
        out += [(f"records API     {i['records_url']}", False),
                (f"FHIR R4         {i['records_url']}/fhir  (CapabilityStatement: "
                 f"/fhir/metadata; TLS: ca.pem)", False)]
    else:
        out.append(("records API     NOT STARTED (the broker's state is not fresh: see above)", True))
    if i.get("scone_port"):
        sp = i["scone_port"]
        out.append((f"SCONE demo API  https://api:{sp}  (curl --resolve api:{sp}:127.0.0.1)", False))
        if i.get("scone_auth") == "none":
            out.append((f"  WARNING: the SCONE port {sp} has NO AUTHENTICATION (--scone-auth none, as in "
                        "SCONE's demo): any process on this machine can read and create every record "
                        "there. Drop --scone-auth none (the default is token), or --scone-port 0 to close "
                        "it.", True))
        else:
            out.append((f"  SCONE port authentication: {i.get('scone_auth')} "
                        "(bearer tokens, as on the native API)", False))
    if i.get("policies_edited"):
        out.append((f"client policy rewritten: {', '.join(i['policies_edited'])} differed from what the "
                    "owner pinned at the last `safehold up` (edited since); `up` wrote and pinned its "
                    "own again — keep a policy of your own outside the data directory (--policy)", True))
    if i.get("manifest_updated"):
        out.append((f"manifest update version {i['manifest_updated']}, signed with "
                    f"{s.owner_path('owner.key')} (records.toml changed its measurement)", False))
    out += [(f"workload CA     {i['ca']}", False),
            (f"client policy   {i['policy']}", False),
            (f"manifest        {i['manifest']}", False),
            (f"owner directory {s.owner_path('')}  (owner.key, tokens.json: the owner's side, "
             "never read by the servers)", False),
            (f"database        {i['store_url']}", False),
            (f"measurement     {i['measurements'][0]}", False)]
    if i.get("anchor_urls"):
        out.append((f"anchor members  {', '.join(i['anchor_urls'])}  (measurement "
                    f"{str(i.get('anchor_measurement', ''))[:16]}…)", False))
        for led, what in (i.get("freshness") or {}).items():
            out.append((f"freshness       ledger {led}: {what}", what.startswith("refused")))
    from safehold.devstack.services import summary

    return out + summary(i)
