"""Starting, watching and stopping the local stack's processes (broker, records service)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from safehold.devstack.datadir import tokens, write_private
from safehold.devstack.errors import StackError
from safehold.devstack.stack import Stack, base_env, lock_data_dir, unlock_data_dir
from safehold.errors import ConfigError
from safehold.jsontypes import JSONObject

__all__ = ["MANIFEST_REFUSED", "broker_cmd", "check_port", "records_cmd", "records_env", "start",
           "stop", "summary_lines", "update_manifest", "wait_broker", "wait_records"]


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


def broker_cmd(s: Stack, *, manifest: bool = True) -> list[str]:
    """Command line of the broker process (``safehold broker serve`` on loopback; with the data
    directory's ``manifest.toml`` unless ``manifest`` is false)."""
    m = ["--manifest", str(s.path("manifest.toml"))] if manifest else []
    return [sys.executable, "-c",
            "import sys; from safehold.cli.broker import broker; "
            "broker.main(sys.argv[1:], prog_name='safehold broker')",
            "serve", "--data-dir", str(s.path("broker")), *m,
            "--host", "127.0.0.1", "--port", str(s.broker_port), "--tls-name", "api"]


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
    """Environment for one records service process: only the unmeasured run-time settings
    (the listen host is measured, in ``records.toml``)."""
    env = base_env(s)
    sp = s.scone_port if scone_port == "default" else scone_port
    env.update({
        "SAFEHOLD_RECORDS_DATA_DIR": str(s.path("tee")),
        "SAFEHOLD_RECORDS_BROKER_URL": s.broker_url,
        "SAFEHOLD_RECORDS_BROKER_CA": str(s.path("ca.pem")),
        "SAFEHOLD_RECORDS_STORE_URL": store_url or s.store_url,
        "SAFEHOLD_RECORDS_PORT": str(port if port is not None else s.records_port),
        "SAFEHOLD_RECORDS_SCONE_PORT": "none" if sp is None else str(sp),
        "SAFEHOLD_RECORDS_READY_FILE": str(s.path(ready)),
    })
    return env


def records_cmd(s: Stack, config: str = "records.toml") -> list[str]:
    """Command line of a records service process."""
    return [sys.executable, "-m", "safehold.records.server", "--config", str(s.path(config))]


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            with contextlib.suppress(ValueError, OSError):
                info = json.loads(ready.read_text("utf-8"))
                if info.get("pid") == proc.pid:
                    return info
        if proc.poll() is not None:
            why = "the broker released no keys to it" if proc.returncode == 2 else "see its log"
            tail = _log_tail(log) if log else ""
            raise StackError(f"records service exited with status {proc.returncode}: {why}"
                             + (f": {tail}" if tail else "") + (f" ({log})" if log else ""))
        time.sleep(0.1)
    raise StackError(f"records service did not become ready within {timeout:.0f} s")


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
        for name in ("records-ready.json",):
            with contextlib.suppress(FileNotFoundError):
                s.path(name).unlink()
        blog = s.path("broker.log").open("ab")
        # own sessions: a terminal's Ctrl-C reaches only `safehold up`, which then stops the
        # records service first and the broker second
        s.procs["broker"] = subprocess.Popen(broker_cmd(s), stdout=blog, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=base_env(s),
                                             start_new_session=True)
        try:
            wait_broker(s, s.procs["broker"], timeout)
        except StackError:
            # records.toml (so the measurement, so the manifest) changed after the broker
            # installed the old manifest: start it on its stored manifest, sign the new one
            if (s.procs["broker"].poll() is None or not s.owner_path("owner.key").exists()
                    or MANIFEST_REFUSED not in _log_tail(s.path("broker.log"))):
                raise
            s.procs["broker"] = subprocess.Popen(broker_cmd(s, manifest=False), stdout=blog,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=base_env(s), start_new_session=True)
            wait_broker(s, s.procs["broker"], timeout)
            s.info["manifest_updated"] = update_manifest(s)
        rlog_path = s.path("records.log")
        rlog = rlog_path.open("ab")
        s.procs["records"] = subprocess.Popen(records_cmd(s), env=records_env(s), stdout=rlog,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)
        info = wait_records(s, s.procs["records"], s.path("records-ready.json"), timeout, rlog_path)
    except BaseException:
        stop(s)
        raise
    s.info.update({
        "broker_url": s.broker_url,
        "records_url": info["records_url"],
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


def stop(s: Stack, *, timeout: float = 15.0) -> dict[str, int | None]:
    """SIGTERM the records service, then the broker; SIGKILL after ``timeout``. Returns exit codes."""
    codes: dict[str, int | None] = {}
    for name in ("records", "broker"):
        p = s.procs.get(name)
        if p is None:
            continue
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # uvicorn re-raises the SIGTERM it handled after a graceful shutdown: that is a clean stop
        codes[name] = 0 if p.returncode in (-signal.SIGTERM, -signal.SIGINT) else p.returncode
    if s.lock is not None:  # only the lock holder may remove up.json (never another stack's)
        with contextlib.suppress(FileNotFoundError):
            s.path("up.json").unlink()
        unlock_data_dir(s.lock)
        s.lock = None
    return codes


def summary_lines(s: Stack) -> list[tuple[str, bool]]:
    """What ``safehold up`` prints once the stack runs: ``(line, is_warning)`` pairs (URLs, the
    SCONE port's authentication, CA, policy, manifest, tokens, database, measurement)."""
    i = s.info
    out: list[tuple[str, bool]] = [(f"broker          {i['broker_url']}", False),
                                   (f"records API     {i['records_url']}", False),
                                   (f"FHIR R4         {i['records_url']}/fhir  (CapabilityStatement: "
                                    f"/fhir/metadata; TLS: ca.pem)", False)]
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
    return out
