"""``safehold up``: run the key broker and the records service on this machine (development).

Layout of the data directory (default ``./safehold-data``, created 0700)::

    manifest.toml      the data owner's manifest: Reference Values = the measured records workload
    records.toml       the records service's measured configuration (access list, resources)
    policy.toml        the appraisal policy clients use for the records service's Evidence
    tokens.json        bearer tokens (0600): admin / writer / reader
    owner.key          the manifest owner's (user admin) Ed25519 signing key (0600), owner.pub
    ca.pem             the broker's workload CA (also GET /ca, /v1/values/session=safehold)
    up.json            URLs, paths and the admin token for `safehold patients` (0600)
    broker/            broker state (sealed master key, SQLite), its simulated TEE
    tee/               the records node's simulated TEE (platform key, simulated root CA)
    records.db         the encrypted records (SQLite; or --store postgresql://…)

The broker and the records service run as separate processes on loopback. The records service
attests to the broker at start; only a workload whose measurement equals the manifest's
Reference Value gets its keyset and TLS identity. Ctrl-C / SIGTERM stops both cleanly.

Every security setting is in the measured ``records.toml`` — encryption, audit, listen host,
SCONE authentication, the access list and the pin of the broker's identity (SHA-256 of the
broker's workload CA certificate, so the broker's CA is created before anything is measured).
Only plumbing (ports, URLs, paths, the store location) is passed as ``SAFEHOLD_RECORDS_*``
environment variables, so changing a port does not change the measurement (the database is
untrusted by design, its location is not a secret); the service refuses a variable that names a
measured setting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import tomli_w

from safehold.errors import ConfigError, SafeholdError


class StackError(SafeholdError):
    """The broker or the records service did not start (names which, and why)."""


class DataDirBusyError(StackError):
    """Another ``safehold up`` / ``safehold demo`` holds the data directory's ``up.lock``."""


LOCK_FILE = "up.lock"
SCONE_AUTH_CHOICES = ("none", "token")


SESSION_NAME = "safehold"
WORKLOAD = "records"


@dataclass
class Stack:
    """A running (or prepared) broker + records service pair.

    Attributes:
        data_dir: the data directory.
        broker_port / records_port / scone_port: loopback ports.
        procs: name → Popen of the running processes.
        info: what ``up.json`` holds.
    """

    data_dir: Path
    broker_port: int
    records_port: int
    scone_port: int | None
    store_url: str = ""
    package_root: str | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    lock: Any = None  # the open, flock-ed up.lock while this Stack owns the data directory

    @property
    def broker_url(self) -> str:
        return f"https://127.0.0.1:{self.broker_port}"

    @property
    def records_url(self) -> str:
        return f"https://127.0.0.1:{self.records_port}"

    def path(self, name: str) -> Path:
        return self.data_dir / name


def lock_data_dir(data_dir: Path) -> Any:
    """Take the exclusive ``<data_dir>/up.lock`` (``flock``, non-blocking) for a running stack.

    Held from :func:`prepare` until :func:`stop` (or process exit, when the kernel drops it), so
    a second ``safehold up`` on the same directory refuses before writing or starting anything.

    Returns:
        the open lock file (pass to :func:`unlock_data_dir`).

    Raises:
        DataDirBusyError: another process holds the lock (names its pid when recorded).
        ConfigError: the lock file cannot be opened.
    """
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ConfigError(f"data directory {data_dir}: cannot open {LOCK_FILE} ({e.strerror})") from None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip()
        f.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise DataDirBusyError(
            f"another `safehold up` or `safehold demo`{who} is running on {data_dir}; "
            "stop it first (Ctrl-C there) or use another --data-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def unlock_data_dir(lock: Any) -> None:
    """Release a lock from :func:`lock_data_dir` (idempotent; None is ignored)."""
    if lock is not None and not lock.closed:
        with contextlib.suppress(OSError):
            lock.seek(0)
            lock.truncate()
        lock.close()  # closing the file releases the flock


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


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def tokens(data_dir: Path) -> dict[str, str]:
    """The stack's bearer tokens (created once, 256-bit random, base64url): role → token."""
    p = data_dir / "tokens.json"
    if p.exists():
        return json.loads(p.read_text("utf-8"))
    t = {role: secrets.token_urlsafe(32) for role in ("admin", "writer", "reader")}
    _write_private(p, json.dumps(t, indent=2).encode())
    return t


def owner_key(data_dir: Path) -> str:
    """The dev manifest owner's Ed25519 signing key (RFC 8032), created once: ``owner.key``
    (PKCS#8 PEM, 0600) and ``owner.pub`` in ``data_dir``. Returns the public key (SPKI PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    priv = data_dir / "owner.key"
    if priv.exists():
        try:
            key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
        except ValueError:
            raise StackError(f"{priv} is not a PEM private key (remove it to make a new one)") from None
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    (data_dir / "owner.pub").write_text(pub, "ascii")
    return pub


def _sha(t: str) -> str:
    return hashlib.sha256(t.encode("utf-8")).hexdigest()


def records_config(tok: dict[str, str], *, encryption: bool = True, scone_auth: str = "none",
                   host: str = "127.0.0.1", broker_ca_sha256: str = "") -> dict[str, Any]:
    """The measured records configuration (see :class:`safehold.records.config.ServiceConfig`).

    ``broker_ca_sha256`` (hex SHA-256 of the broker CA's DER) may be left empty:
    :func:`prepare` fills in the pin of the data directory's broker.
    """
    return {
        "workload": WORKLOAD,
        "keyset_resource": "default/keyset/records-keyset",
        "tls_resource": "default/certificate/records-tls",
        "broker_ca_sha256": broker_ca_sha256,
        "host": host,
        "encryption": encryption,
        "audit": True,
        "scone_auth": scone_auth,
        "access": {
            "tokens": {_sha(t): {"name": role, "role": role} for role, t in tok.items()},
            # client certificates from the broker (`safehold broker client-cert <CN>`), by CN
            "certificates": {"admin": "admin", "writer": "writer", "reader": "reader"},
        },
    }


def measure_records(data_dir: Path, config_path: Path, *,
                    package_root: str | None = None) -> tuple[str, Path]:
    """Measure the records workload as its simulated TEE will: ``(hex measurement, root CA path)``."""
    from safehold.attestation.attesters.simulated import SimulatedAttester

    att = SimulatedAttester(data_dir / "tee", workload_files=[config_path], package_root=package_root)
    return att.measurement.hex(), att.root_ca_path


def broker_ca_pin(data_dir: Path, package_root: str | None = None) -> str:
    """Create the broker's state (keys, workload CA) if new and return the pin of its CA:
    hex SHA-256 of the DER of ``<data_dir>/broker/ca.pem``.

    The broker state is opened in a child process with the broker's own environment (same
    package, so the same sealing identity), without a manifest; it writes ``broker/ca.pem``.

    Raises:
        StackError: the broker state did not open (e.g. recovery mode: no CA available).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = data_dir / "broker" / "ca.pem"
    if not ca.exists():
        env = base_env(Stack(data_dir, 0, 0, None, package_root=package_root))
        code = ("import sys; from safehold.broker.server import open_broker; "
                "open_broker(sys.argv[1]).state.store.close()")
        r = subprocess.run([sys.executable, "-c", code, str(data_dir / "broker")], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or not ca.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no workload CA written"]
            raise StackError(f"the broker's state did not open to create its workload CA: {tail[0]}")
    try:
        cert = x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError:
        raise StackError(f"{ca} is not a PEM certificate") from None
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def make_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Create the data directory (0700) if missing and check it is a writable directory.

    Returns:
        its resolved path.

    Raises:
        ConfigError: one line naming the directory and why it is unusable.
    """
    d = Path(data_dir).resolve()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise ConfigError(f"data directory {d}: exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"data directory {d}: cannot create it ({e.strerror})") from None
    if not d.is_dir():
        raise ConfigError(f"data directory {d}: not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"data directory {d}: not writable")
    return d


def _read_toml(path: Path) -> dict[str, Any] | None:
    """The parsed TOML file, None if it does not exist; unparsable → ``{"<unparsable>": …}``."""
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"<unparsable>": str(e)}


def main_records_config(d: Path, tok: dict[str, str], pin: str, scone_auth: str | None,
                        reset: bool) -> dict[str, Any]:
    """The ``records.toml`` that ``safehold up`` uses for data directory ``d``.

    An existing file is never overwritten silently: ``scone_auth`` defaults to the file's value
    (else ``"none"``); a file that differs in anything else (an edit, or one from another
    Safehold version) is refused unless ``reset`` (regenerate). An explicit ``scone_auth`` that
    differs from the file's is a requested change and is applied.

    Raises:
        ConfigError: the existing file differs (names the keys) and ``reset`` is false.
    """
    path = d / "records.toml"
    existing = None if reset else _read_toml(path)
    explicit = scone_auth is not None
    if scone_auth is None:
        old = (existing or {}).get("scone_auth")
        scone_auth = old if old in SCONE_AUTH_CHOICES else "none"
    if scone_auth not in SCONE_AUTH_CHOICES:
        raise ConfigError(f"scone_auth must be one of {', '.join(SCONE_AUTH_CHOICES)}, got {scone_auth!r}")
    cfg = {**records_config(tok, scone_auth=scone_auth), "broker_ca_sha256": pin}
    if existing is not None:
        diff = sorted(k for k in set(existing) | set(cfg) if existing.get(k) != cfg.get(k))
        if explicit:
            diff = [k for k in diff if k != "scone_auth"]
        if diff:
            raise ConfigError(
                f"{path} differs from what `safehold up` writes (key(s): {', '.join(diff)}); "
                "it is not overwritten: undo the edit, or pass --reset to regenerate it "
                "(the measurement, and so the manifest, may change)"
            )
    return cfg


def prepare(data_dir: str | os.PathLike[str], *, broker_port: int = 8443, records_port: int = 8700,
            scone_port: int | None = 4996, store_url: str | None = None,
            extra_configs: dict[str, dict[str, Any]] | None = None,
            package_root: str | None = None, scone_auth: str | None = None,
            reset: bool = False) -> Stack:
    """Lock the data directory, then create tokens, the broker's workload CA, the measured
    config (pinning that CA), the manifest and the client policy.

    The returned Stack holds ``<data_dir>/up.lock`` until :func:`stop` (see
    :func:`lock_data_dir`).

    Args:
        extra_configs: more measured records configurations (file name → config) whose
            measurements the manifest also accepts (the benchmark's encryption-off service).
        package_root: run the processes from this copy of the ``safehold`` package (tests use a
            snapshot so that edits to the working tree cannot change the measurement mid-run).
        scone_auth: ``"none"`` / ``"token"`` for the SCONE-compatible port; None keeps an
            existing ``records.toml``'s value (else ``"none"``). See :func:`main_records_config`.
        reset: regenerate ``records.toml`` even if it differs from what ``up`` writes.

    Raises:
        DataDirBusyError: another stack runs on this data directory.
        ConfigError: unusable data directory, edited ``records.toml`` (without ``reset``), or
            the manifest does not validate.
    """
    d = make_data_dir(data_dir)
    lock = lock_data_dir(d)
    try:
        s = _prepare(d, broker_port=broker_port, records_port=records_port, scone_port=scone_port,
                     store_url=store_url, extra_configs=extra_configs, package_root=package_root,
                     scone_auth=scone_auth, reset=reset)
    except BaseException:
        unlock_data_dir(lock)
        raise
    s.lock = lock
    return s


def _prepare(d: Path, *, broker_port: int, records_port: int, scone_port: int | None,
             store_url: str | None, extra_configs: dict[str, dict[str, Any]] | None,
             package_root: str | None, scone_auth: str | None, reset: bool) -> Stack:
    """:func:`prepare` after the data directory is created and locked."""
    from safehold.broker.manifest import load_manifest

    tok = tokens(d)
    pin = broker_ca_pin(d, package_root)
    cfgs = {"records.toml": main_records_config(d, tok, pin, scone_auth, reset), **(extra_configs or {})}
    measurements = []
    root = None
    for name, cfg in cfgs.items():
        cfg = {**cfg, "broker_ca_sha256": cfg.get("broker_ca_sha256") or pin}
        p = d / name
        p.write_text(tomli_w.dumps(cfg), "utf-8")
        m, root = measure_records(d, p, package_root=package_root)
        measurements.append(m)
    assert root is not None
    policy = {
        "name": "safehold-records-dev",
        "allow_simulated": True,
        "simulated_root": str(root),
        "reference_values": {"measurements": measurements},
    }
    manifest = {
        "name": SESSION_NAME,
        "repository": "default",
        "workloads": {WORKLOAD: {"secrets": ["records-keyset", "records-tls"], "policy": policy}},
        "secrets": {
            "records-keyset": {"type": "keyset"},
            "records-tls": {"type": "certificate", "dns_names": ["api", "localhost"],
                            "ip_addresses": ["127.0.0.1"], "validity_days": 30},
        },
        # the owner's public key lets `safehold broker manifest update --signer admin --key
        # <data-dir>/owner.key` sign updates of this dev manifest
        "users": {"admin": {"roles": ["owner"], "token_sha256": _sha(tok["admin"]),
                            "public_key": owner_key(d)}},
    }
    text = tomli_w.dumps(manifest)
    load_manifest(text.encode(), filename="manifest.toml")  # fail here, clearly, not in the broker
    old_manifest = _read_toml(d / "manifest.toml")
    (d / "manifest.toml").write_text(text, "utf-8")
    client_policy = {**policy, "name": "safehold-records-client", "report_data": "required"}
    (d / "policy.toml").write_text(tomli_w.dumps(client_policy), "utf-8")
    s = Stack(d, broker_port, records_port, scone_port,
              store_url or f"sqlite:///{d / 'records.db'}", package_root)
    s.info = {"measurements": measurements}
    if old_manifest is not None and old_manifest != manifest:
        s.info["manifest_changed"] = True  # a broker that installed the old one refuses the new
    return s


def base_env(s: Stack) -> dict[str, str]:
    """Environment of the child processes (PYTHONPATH pointing at ``package_root`` if set)."""
    env = dict(os.environ)
    if s.package_root:
        parent = str(Path(s.package_root).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join([parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _broker_cmd(s: Stack, *, manifest: bool = True) -> list[str]:
    m = ["--manifest", str(s.path("manifest.toml"))] if manifest else []
    return [sys.executable, "-c",
            "import sys; from safehold.cli.broker import broker; "
            "broker.main(sys.argv[1:], prog_name='safehold broker')",
            "serve", "--data-dir", str(s.path("broker")), *m,
            "--host", "127.0.0.1", "--port", str(s.broker_port), "--tls-name", "api"]


MANIFEST_REFUSED = "differs from the stored manifest"


def update_manifest(s: Stack) -> int:
    """Install ``<data_dir>/manifest.toml`` on the running broker as a signed update (the next
    version), signed by the dev owner key ``<data_dir>/owner.key`` as user ``admin``.

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

    key = s.path("owner.key")
    if not key.exists():
        raise StackError(f"the manifest changed and there is no owner key ({key}) to sign the update")
    path = s.path("manifest.toml")
    m = load_manifest(path.read_bytes(), filename=str(path), base_dir=path.parent)
    ctx = ssl.create_default_context(cafile=str(s.path("ca.pem")))
    hdr = {"Authorization": f"Bearer {tokens(s.data_dir)['admin']}"}
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


def _wait_broker(s: Stack, proc: subprocess.Popen[bytes], timeout: float) -> None:
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
                 log: Path | None = None) -> dict[str, Any]:
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
        s.procs["broker"] = subprocess.Popen(_broker_cmd(s), stdout=blog, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=base_env(s),
                                             start_new_session=True)
        try:
            _wait_broker(s, s.procs["broker"], timeout)
        except StackError:
            # records.toml (so the measurement, so the manifest) changed after the broker
            # installed the old manifest: start it on its stored manifest, sign the new one
            if (s.procs["broker"].poll() is None or not s.path("owner.key").exists()
                    or MANIFEST_REFUSED not in _log_tail(s.path("broker.log"))):
                raise
            s.procs["broker"] = subprocess.Popen(_broker_cmd(s, manifest=False), stdout=blog,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=base_env(s), start_new_session=True)
            _wait_broker(s, s.procs["broker"], timeout)
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
    tok = tokens(s.data_dir)
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
        "admin_token": tok["admin"],
        "pids": {k: p.pid for k, p in s.procs.items()},
    })
    _write_private(s.path("up.json"), json.dumps(s.info, indent=2).encode())
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


def print_summary(s: Stack) -> None:
    """Print URLs, CA path and policy path."""
    i = s.info
    click.echo(f"broker          {i['broker_url']}")
    click.echo(f"records API     {i['records_url']}")
    if i.get("scone_port"):
        sp = i["scone_port"]
        click.echo(f"SCONE demo API  https://api:{sp}  (curl --resolve api:{sp}:127.0.0.1)")
        if i.get("scone_auth") == "none":
            click.secho(f"  WARNING: the SCONE port {sp} has NO AUTHENTICATION (scone_auth = none, as in "
                        "SCONE's demo): any process on this machine can read and create every record "
                        "there. Use --scone-auth token, or --scone-port 0 to close it.",
                        fg="yellow", bold=True, err=True)
        else:
            click.echo(f"  SCONE port authentication: {i.get('scone_auth')} "
                       "(bearer tokens, as on the native API)")
    if i.get("manifest_updated"):
        click.echo(f"manifest update version {i['manifest_updated']}, signed with "
                   f"{s.path('owner.key')} (records.toml changed its measurement)")
    click.echo(f"workload CA     {i['ca']}")
    click.echo(f"client policy   {i['policy']}")
    click.echo(f"manifest        {i['manifest']}")
    click.echo(f"tokens          {s.path('tokens.json')}")
    click.echo(f"database        {i['store_url']}")
    click.echo(f"measurement     {i['measurements'][0]}")


def register(group: click.Group) -> None:
    """Add ``safehold up``."""

    @group.command("up")
    @click.option("--data-dir", default="./safehold-data", show_default=True, envvar="SAFEHOLD_DATA_DIR")
    @click.option("--broker-port", default=8443, show_default=True, type=click.IntRange(1, 65535))
    @click.option("--port", "records_port", default=8700, show_default=True, type=click.IntRange(1, 65535),
                  help="Records API port.")
    @click.option("--scone-port", default=4996, show_default=True, type=click.IntRange(0, 65535),
                  help="SCONE-compatible port (0 = off).")
    @click.option("--scone-auth", type=click.Choice(SCONE_AUTH_CHOICES), default=None,
                  help="Authentication on the SCONE port: none (as SCONE's demo; loopback only; anyone "
                       "on this machine can read and write records) or token (bearer tokens). "
                       "Default: the value in an existing records.toml, else none.")
    @click.option("--reset", is_flag=True,
                  help="Regenerate records.toml even if it was edited (otherwise up refuses).")
    @click.option("--store", "store_url", default=None, help="Store URL (default: sqlite in the data dir).")
    def up(data_dir: str, broker_port: int, records_port: int, scone_port: int, scone_auth: str | None,
           reset: bool, store_url: str | None) -> None:
        """Start the key broker and the records service (simulated TEE) until Ctrl-C."""
        s = prepare(data_dir, broker_port=broker_port, records_port=records_port,
                    scone_port=scone_port or None, store_url=store_url, scone_auth=scone_auth,
                    reset=reset)
        stopping = {"flag": False}

        def on_signal(signum: int, frame: object) -> None:
            stopping["flag"] = True

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            start(s)
            print_summary(s)
            click.echo("running; Ctrl-C stops both")
            while not stopping["flag"]:
                for name, p in s.procs.items():
                    if p.poll() is not None:
                        raise StackError(f"{name} exited unexpectedly with status {p.returncode}")
                time.sleep(0.2)
        finally:
            codes = stop(s)
            for sig, h in old.items():
                signal.signal(sig, h)
        click.echo(f"stopped ({', '.join(f'{k} exit {v}' for k, v in codes.items())})")

    _ = ConfigError  # re-exported for callers catching configuration problems
