"""The data directory of the local stack (the measured records configuration, the manifest,
the client policy, the servers' state) and the data owner's directory apart from it (the owner
key, the tokens): :func:`prepare`."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from safehold.attestation.closure import Closure
from safehold.client.connection import owner_dir
from safehold.client.owner_pins import CLIENT_POLICIES, OWNER_PINS_FILE, check_owner_private, read_owner_pins
from safehold.devstack.errors import StackError
from safehold.devstack.stack import (
    SCONE_AUTH_CHOICES,
    SESSION_NAME,
    WORKLOAD,
    Stack,
    base_env,
    broker_spec,
    lock_data_dir,
    records_spec,
    unlock_data_dir,
)
from safehold.errors import ConfigError
from safehold.fsutil import write_atomic
from safehold.jsontypes import JSONObject

__all__ = ["OWNER_FILES", "OWNER_PINS_FILE", "RECORDS_ACCESS", "broker_ca_pin", "check_old_layout",
           "https_url", "main_records_config", "make_data_dir", "make_owner_dir", "measure_records",
           "owner_key",
           "pin_client_policies", "pinned_workload_ca", "prepare", "read_owner_pins", "records_access",
           "records_config", "tokens", "write_private"]

#: What the data owner keeps in the owner directory (earlier versions kept them in the data dir).
OWNER_FILES = ("owner.key", "owner.pub", "tokens.json")

#: The manifest secret (type ``access``) that says who holds which records role.
RECORDS_ACCESS = "records-access"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically: a reader (``safehold patients``
    polling for ``up.json``) sees the old file or the whole new one, never an empty one."""
    write_atomic(path, data, mode=0o600)


def tokens(data_dir: Path, owner: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The stack's bearer tokens (created once, 256-bit random, base64url): role → token.

    Kept in the owner directory (:func:`safehold.client.connection.owner_dir` of ``data_dir``
    and ``owner``) as ``tokens.json`` (0600); the manifest holds only their SHA-256.
    """
    p = owner_dir(data_dir, owner) / "tokens.json"
    if p.exists():
        return json.loads(p.read_text("utf-8"))
    make_owner_dir(data_dir, owner)
    t = {role: secrets.token_urlsafe(32) for role in ("admin", "writer", "reader")}
    write_private(p, json.dumps(t, indent=2).encode())
    return t


def owner_key(data_dir: Path, owner: str | os.PathLike[str] | None = None) -> str:
    """The dev manifest owner's Ed25519 signing key (RFC 8032), created once: ``owner.key``
    (PKCS#8 PEM, 0600) and ``owner.pub`` in the owner directory (never the data directory).
    Returns the public key (SPKI PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    od = make_owner_dir(data_dir, owner)
    priv = od / "owner.key"
    if priv.exists():
        try:
            key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
        except ValueError:
            raise StackError(f"{priv} is not a PEM private key (remove it to make a new one)") from None
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    (od / "owner.pub").write_text(pub, "ascii")
    return pub


def make_owner_dir(data_dir: str | os.PathLike[str], owner: str | os.PathLike[str] | None = None) -> Path:
    """Create the owner directory (0700) if missing; refuse one inside the data directory.

    Raises:
        ConfigError: the owner directory is, or is inside, the data directory (whoever reads the
            server's data would hold the owner's key), or it cannot be created.
    """
    d, od = Path(data_dir).resolve(), owner_dir(data_dir, owner)
    if od == d or d in od.parents:
        raise ConfigError(f"owner directory {od} is inside the data directory {d}: the owner's key and "
                          "tokens must be kept apart from the server's data (choose another --owner-dir)")
    try:
        od.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"owner directory {od}: cannot create it ({e.strerror})") from None
    if not od.is_dir():
        raise ConfigError(f"owner directory {od}: not a directory")
    check_owner_private(od)  # not someone else's (e.g. on the operator's side of a symlink)
    return od


def check_old_layout(data_dir: Path, owner: str | os.PathLike[str] | None = None) -> None:
    """Refuse a data directory made by the old layout (owner key / tokens in the data directory).

    The files are not moved automatically: they sat where the threat model says the operator
    reads, so the owner should know (and may want to rotate them); the message names the move.

    Raises:
        ConfigError: ``owner.key``, ``owner.pub`` or ``tokens.json`` is in ``data_dir``.
    """
    old = [n for n in OWNER_FILES if (data_dir / n).exists()]
    if old:
        od = owner_dir(data_dir, owner)
        raise ConfigError(
            f"{data_dir} holds the data owner's {', '.join(old)} (the layout before the owner "
            f"directory): the server's data directory is readable by the operator, so Safehold no "
            f"longer keeps them there. Move them: mkdir -p -m 700 {od} && mv "
            + " ".join(str(data_dir / n) for n in old) + f" {od}/ "
            "(they were readable with the data directory: consider new tokens and a new owner key)"
        )


def _sha(t: str) -> str:
    return hashlib.sha256(t.encode("utf-8")).hexdigest()


def records_config(tok: dict[str, str] | None = None, *, encryption: bool = True,
                   scone_auth: str = "token", host: str = "127.0.0.1",
                   broker_ca_sha256: str = "", anchor_members: list[str] | None = None,
                   anchor_policy: dict[str, Any] | None = None) -> JSONObject:
    """The measured records configuration (see :class:`safehold.records.config.ServiceConfig`).

    It holds no access list: who may call the service is the manifest's ``records-access``
    secret (:func:`records_access`), written by the data owner. ``tok`` is not used (kept so
    that callers from before that change need not change). ``broker_ca_sha256`` (hex SHA-256 of
    the broker CA's DER) may be left empty: :func:`prepare` fills in the pin of the data
    directory's broker. ``anchor_members`` / ``anchor_policy``: the freshness anchor
    (:mod:`safehold.devstack.anchor`); without them freshness is off (loudly, at the service).
    """
    fresh: dict[str, Any] = ({"freshness": True, "anchor_members": anchor_members,
                              "anchor_policy": anchor_policy or {}}
                             if anchor_members else {"freshness": False})
    return {
        **fresh,
        "workload": WORKLOAD,
        "keyset_resource": "default/keyset/records-keyset",
        "tls_resource": "default/certificate/records-tls",
        "access_resource": f"default/access/{RECORDS_ACCESS}",
        "broker_ca_sha256": broker_ca_sha256,
        "host": host,
        "encryption": encryption,
        "audit": True,
        "scone_auth": scone_auth,
    }


def records_access(tok: dict[str, str], owner_pub_pem: str) -> JSONObject:
    """The dev manifest's ``records-access`` secret (type ``access``): who holds which role at
    the records service, every identity pinned by the owner.

    Principals ``admin`` / ``writer`` / ``reader`` hold their bearer token (SHA-256); ``admin``
    is also the owner's own key (``<owner dir>/owner.key``: SHA-256 of its SubjectPublicKeyInfo), so a client
    certificate the broker issues to that key (``safehold broker client-cert --key owner.key``)
    is the records admin. No other client certificate maps to a role, whatever its CN.
    """
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(owner_pub_pem.encode("ascii"))
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    principals: dict[str, Any] = {role: {"role": role, "token_sha256": _sha(t)} for role, t in tok.items()}
    principals["admin"]["public_key_sha256"] = hashlib.sha256(spki).hexdigest()
    return {"type": "access", "principals": principals}


def measure_records(data_dir: Path, config_path: Path, *, package_root: str | None = None,
                    base: Closure | None = None) -> tuple[str, Path, Closure]:
    """Measure the records workload as its simulated TEE will at start: the closure of its
    launch (:func:`~safehold.devstack.stack.records_spec`: interpreter, standard library,
    site-packages, the app directory, the launch) with ``config_path``.

    Args:
        base: a closure already measured over the same interpreter and ``sys.path`` (its code
            file hashes are reused).

    Returns:
        ``(hex measurement, simulated root CA path, the closure)``.
    """
    from safehold.attestation.attesters.simulated import SimulatedAttester

    root = SimulatedAttester(data_dir / "tee").root_ca_path  # creates the node's simulated TEE
    c = records_spec(Stack(data_dir, 0, 0, None, package_root=package_root)).closure([config_path],
                                                                                     base=base)
    return c.hex(), root, c


def broker_ca_pin(data_dir: Path, package_root: str | None = None) -> str:
    """Create the broker's state (keys, workload CA) if new and return the pin of its CA:
    hex SHA-256 of the DER of ``<data_dir>/broker/ca.pem``.

    The broker state is opened in a child process launched exactly as the broker is
    (:func:`~safehold.devstack.stack.broker_spec`: the same closure, so the same sealing
    identity), without a manifest (``serve --init-only``); it writes ``broker/ca.pem``.

    Raises:
        StackError: the broker state did not open (e.g. recovery mode: no CA available).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = data_dir / "broker" / "ca.pem"
    if not ca.exists():
        s = Stack(data_dir, 0, 0, None, package_root=package_root)
        argv = broker_spec(s).argv("serve", "--data-dir", str(data_dir / "broker"), "--init-only")
        r = subprocess.run(argv, env=base_env(s), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0 or not ca.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no workload CA written"]
            raise StackError(f"the broker's state did not open to create its workload CA: {tail[0]}")
    try:
        cert = x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError:
        raise StackError(f"{ca} is not a PEM certificate") from None
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def pin_workload_ca(d: Path, owner: str | os.PathLike[str] | None, pin: str, *, created: bool) -> None:
    """Record in the owner directory which workload CA (hex SHA-256 of its DER) the owner's
    tools accept for data directory ``d`` (``pins.json``: ``{abs data dir: {workload_ca_sha256,
    …}}``; the client policies' pins: :func:`pin_client_policies`).

    The owner's steps (``safehold freshness``, the ledger settling of ``safehold up``) send the
    admin token and ask for statements to sign; they check the service's TLS against this pin,
    never against the data directory's ``ca.pem`` alone, which the operator can replace.

    Args:
        created: the CA was created just now (a new data directory): the pin is (re)written.

    Raises:
        ConfigError: the data directory's CA differs from the pinned one and was not created
            now (the operator replaced it), or ``pins.json`` is unreadable.
    """
    p = owner_dir(d, owner) / OWNER_PINS_FILE
    pins = read_owner_pins(p)
    key = str(d.resolve())
    old = pins.get(key, {}).get("workload_ca_sha256")
    if old == pin:
        return
    if old is not None and not created:
        raise ConfigError(f"{d}/broker/ca.pem is not the workload CA the owner pinned for this data "
                          f"directory ({p}: {old[:16]}…, found {pin[:16]}…): the CA was replaced; "
                          "if this is a new data directory on purpose, remove its entry from that file")
    pins[key] = {"workload_ca_sha256": pin}
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(p, json.dumps(pins, indent=1, sort_keys=True), mode=0o600)


def pinned_workload_ca(data_dir: Path, pins: Path) -> tuple[str | None, bytes | None]:
    """The workload CA of ``data_dir`` the owner pinned in ``pins`` (``pins.json``): its
    ``ca.pem`` or ``broker/ca.pem``, whichever has the pinned SHA-256 of its DER (X.509).

    Returns:
        ``(pinned SHA-256 hex or None when nothing is pinned, that CA's PEM bytes or None when
        no CA file there is the pinned one)``.

    Raises:
        ConfigError: ``pins`` unreadable or malformed.
    """
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    want = read_owner_pins(pins).get(str(data_dir.resolve()), {}).get("workload_ca_sha256")
    if not want:
        return None, None
    for f in (data_dir / "ca.pem", data_dir / "broker" / "ca.pem"):
        try:
            pem = f.read_bytes()
            der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
        except (OSError, ValueError):
            continue
        if hashlib.sha256(der).hexdigest() == want:
            return want, pem
    return want, None


def pinned_ca_context(data_dir: Path, pins: Path, *, hint: str = "") -> ssl.SSLContext:
    """A TLS context trusting only the workload CA the owner pinned for ``data_dir`` in
    ``pins`` (:func:`pinned_workload_ca`), built from the PEM read once (no path kept).

    Args:
        hint: appended to the error messages (what the caller's user can do instead).

    Raises:
        ConfigError: ``pins`` pins no workload CA for ``data_dir``, or no CA file there is the
            pinned one (or as :func:`pinned_workload_ca`).
    """
    want, pem = pinned_workload_ca(data_dir, pins)
    if not want:
        raise ConfigError(f"{pins} pins no workload CA for {data_dir.resolve()}{hint}")
    if pem is None:
        raise ConfigError(f"the workload CA in {data_dir} is not the one the owner pinned ({pins}){hint}")
    return ssl.create_default_context(cadata=pem.decode("ascii"))


def https_url(url: object, where: str) -> str:
    """``url`` if it is an ``https://`` URL, for a URL the data directory names (``up.json``:
    the operator's). The owner's tools check a service only in the TLS handshake (pinned
    workload CA, RA-TLS): over ``http://`` there is none, and the token or signature would go in
    the clear to whoever listens there.

    Raises:
        ConfigError: not a string, or not https (names ``where`` and the URL).
    """
    from urllib.parse import urlsplit

    if not isinstance(url, str) or urlsplit(url).scheme.lower() != "https":
        raise ConfigError(f"{where} names {url!r}, not an https URL: refusing to send anything there "
                          "(the owner's tools talk to a stack's services only over TLS they check)")
    return url


def edited_client_policies(d: Path, owner: str | os.PathLike[str] | None) -> list[str]:
    """The client policy files of ``d`` (:data:`~safehold.client.owner_pins.CLIENT_POLICIES`)
    that differ from what the owner pinned at the last ``safehold up`` — edited since, by a
    user or the operator; ``up`` rewrites them and says so. Files without a pin (a first run)
    are not listed; an unreadable ``pins.json`` lists nothing (``up`` fails on it later, clearly).
    """
    try:
        entry = read_owner_pins(owner_dir(d, owner) / OWNER_PINS_FILE).get(str(d.resolve()), {})
    except ConfigError:
        return []
    pinned = entry.get("client_policies_sha256")
    out = []
    for service, fname in CLIENT_POLICIES.items():
        want = pinned.get(service) if isinstance(pinned, dict) else None
        try:
            got = hashlib.sha256((d / fname).read_bytes()).hexdigest()
        except OSError:
            continue
        if isinstance(want, str) and got != want:
            out.append(fname)
    return out


def pin_client_policies(d: Path, owner: str | os.PathLike[str] | None, texts: dict[str, str],
                        simulated_root: Path | None) -> None:
    """Record in the owner directory's ``pins.json`` which client policies the owner's tools
    accept for data directory ``d``: the SHA-256 of each text ``safehold up`` wrote
    (``texts``: service of :data:`~safehold.client.owner_pins.CLIENT_POLICIES` → TOML text, the
    bytes written, never read back from the data directory) and of the simulated root CA they
    name (``simulated_root``; None: no simulated root, its pin is dropped).

    Rewritten at every ``safehold up``: ``up`` is the owner's act that measures the workloads
    and writes these policies; between two runs, a CLI refuses a policy file that differs
    (:func:`safehold.client.owner_pins.pinned_policy`).

    Raises:
        ConfigError: ``pins.json`` unreadable, or ``simulated_root`` unreadable.
    """
    unknown = set(texts) - set(CLIENT_POLICIES)
    if unknown:
        raise ValueError(f"no client policy file for {sorted(unknown)}")
    p = owner_dir(d, owner) / OWNER_PINS_FILE
    pins = read_owner_pins(p)
    entry = pins.setdefault(str(d.resolve()), {})
    entry["client_policies_sha256"] = {s: hashlib.sha256(t.encode("utf-8")).hexdigest()
                                       for s, t in sorted(texts.items())}
    entry.pop("simulated_root_sha256", None)
    if simulated_root is not None:
        try:
            entry["simulated_root_sha256"] = hashlib.sha256(simulated_root.read_bytes()).hexdigest()
        except OSError as e:
            raise ConfigError(f"{simulated_root}: cannot read the simulated root CA ({e.strerror})") from None
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(p, json.dumps(pins, indent=1, sort_keys=True), mode=0o600)


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
                        reset: bool, anchor: dict[str, Any] | None = None,
                        workers: int | None = None) -> JSONObject:
    """The ``records.toml`` that ``safehold up`` uses for data directory ``d``.

    An existing file is never overwritten silently: ``scone_auth`` defaults to the file's
    value (else ``"token"``: authentication on; ``"none"`` is an explicit opt-in) and
    ``workers`` (records worker processes, ``--records-workers``) to the file's (else 1); a
    file that differs in anything else (an edit, or one from another Safehold version) is
    refused unless ``reset`` (regenerate). An explicit ``scone_auth`` or ``workers`` that
    differs from the file's is a requested change and is applied.

    Raises:
        ConfigError: the existing file differs (names the keys) and ``reset`` is false.
    """
    path = d / "records.toml"
    existing = None if reset else _read_toml(path)
    explicit = scone_auth is not None
    if scone_auth is None:
        old = (existing or {}).get("scone_auth")
        scone_auth = old if old in SCONE_AUTH_CHOICES else "token"
    if scone_auth not in SCONE_AUTH_CHOICES:
        raise ConfigError(f"scone_auth must be one of {', '.join(SCONE_AUTH_CHOICES)}, got {scone_auth!r}")
    explicit_workers = workers is not None
    if workers is None:
        old_w = (existing or {}).get("workers", 1)
        workers = old_w if isinstance(old_w, int) and not isinstance(old_w, bool) and old_w >= 1 else 1
    cfg = {**records_config(tok, scone_auth=scone_auth, **(anchor or {})), "broker_ca_sha256": pin}
    if workers != 1:  # written only when asked for: a default file measures as before
        cfg["workers"] = workers
    if existing is not None:
        diff = sorted(k for k in set(existing) | set(cfg) if existing.get(k) != cfg.get(k))
        if explicit:
            diff = [k for k in diff if k != "scone_auth"]
        if explicit_workers:
            diff = [k for k in diff if k != "workers"]
        if diff:
            # anchor_policy pins the anchor members' measurement: it changes with Safehold's own
            # code (an upgrade, an edited checkout), not only with an edit of the file
            why = ("; `anchor_policy` pins the anchor members' measurement, which changes when "
                   "Safehold itself changed (an upgrade or edited code): the broker's sealed state "
                   "then does not open either, so use a fresh --data-dir or `safehold broker "
                   "recover` (README, Limits)"
                   if "anchor_policy" in diff else "")
            raise ConfigError(
                f"{path} differs from what `safehold up` writes (key(s): {', '.join(diff)}); "
                "it is not overwritten: undo the edit, or pass --reset to regenerate it "
                f"(the measurement, and so the manifest, may change){why}"
            )
    return cfg


def prepare(data_dir: str | os.PathLike[str], *, broker_port: int = 8443, records_port: int = 8700,
            scone_port: int | None = 4996, store_url: str | None = None,
            extra_configs: dict[str, JSONObject] | None = None,
            package_root: str | None = None, scone_auth: str | None = None,
            reset: bool = False, owner: str | os.PathLike[str] | None = None,
            services: tuple[str, ...] | None = None, service_ports: Any = None,
            records_workers: int | None = None) -> Stack:
    """Lock the data directory, then create tokens, the broker's workload CA, the measured
    config (pinning that CA), the manifest and the client policy.

    The returned Stack holds ``<data_dir>/up.lock`` until :func:`stop` (see
    :func:`lock_data_dir`).

    Args:
        extra_configs: more measured records configurations (file name → config) whose
            measurements the manifest also accepts (the benchmark's encryption-off service).
        package_root: run the processes from this copy of the ``safehold`` package (tests use a
            snapshot so that edits to the working tree cannot change the measurement mid-run).
        scone_auth: ``"token"`` / ``"none"`` for the SCONE-compatible port; None keeps an
            existing ``records.toml``'s value (else ``"token"``). See :func:`main_records_config`.
        reset: regenerate ``records.toml`` even if it differs from what ``up`` writes.
        owner: the owner directory (``--owner-dir``; default
            :func:`safehold.client.connection.owner_dir`): the owner key and the tokens.
        services: which of :data:`safehold.devstack.services.ALL_SERVICES` :func:`start`
            starts (default: none; ``safehold up`` passes all unless told otherwise). Their
            workloads are in the manifest either way, so choosing fewer changes no Reference
            Value.
        service_ports: a :class:`safehold.devstack.services.ServicePorts` (default ports).
        records_workers: records worker processes (``workers`` in ``records.toml``; None keeps
            the file's value, else 1). See :mod:`safehold.records.workers`.

    Raises:
        DataDirBusyError: another stack runs on this data directory.
        ConfigError: unusable data or owner directory, a data directory of the old layout
            (:func:`check_old_layout`), edited ``records.toml`` (without ``reset``), or the
            manifest does not validate.
    """
    d = make_data_dir(data_dir)
    lock = lock_data_dir(d)
    try:
        check_old_layout(d, owner)
        s = _prepare(d, broker_port=broker_port, records_port=records_port, scone_port=scone_port,
                     store_url=store_url, extra_configs=extra_configs, package_root=package_root,
                     scone_auth=scone_auth, reset=reset, owner=owner, service_ports=service_ports,
                     records_workers=records_workers)
    except BaseException:
        unlock_data_dir(lock)
        raise
    s.lock = lock
    s.services = tuple(services or ())
    return s


def _prepare(d: Path, *, broker_port: int, records_port: int, scone_port: int | None,
             store_url: str | None, extra_configs: dict[str, dict[str, Any]] | None,
             package_root: str | None, scone_auth: str | None, reset: bool,
             owner: str | os.PathLike[str] | None, service_ports: Any = None,
             records_workers: int | None = None) -> Stack:
    """:func:`prepare` after the data directory is created and locked."""
    from safehold.broker.manifest import load_manifest
    from safehold.devstack import anchor as anc

    tok = tokens(d, owner)
    created = not (d / "broker" / "ca.pem").exists()
    pin = broker_ca_pin(d, package_root)
    pin_workload_ca(d, owner, pin, created=created)
    owner_pub = owner_key(d, owner)
    la = anc.local_anchor(d, owner_pub, package_root)
    anchor_closure = anc.measure_anchor(d, la, package_root)
    a_policy = anc.anchor_policy(la, anchor_closure.hex())
    fresh = {"anchor_members": la.urls, "anchor_policy": a_policy}
    anc.write_broker_anchor(d, la.urls, a_policy)
    cfgs = {"records.toml": main_records_config(d, tok, pin, scone_auth, reset, fresh, records_workers),
            **(extra_configs or {})}
    measurements = []
    root = None
    base: Closure | None = anchor_closure  # same interpreter and sys.path: code hashed once
    for name, cfg in cfgs.items():
        cfg = {**cfg, "broker_ca_sha256": cfg.get("broker_ca_sha256") or pin}
        p = d / name
        p.write_text(tomli_w.dumps(cfg), "utf-8")
        m, root, base = measure_records(d, p, package_root=package_root, base=base)
        measurements.append(m)
    assert root is not None
    policy = {
        "name": "safehold-records-dev",
        "allow_simulated": True,
        "simulated_root": str(root),
        "reference_values": {"measurements": measurements},
    }
    owner_pub = owner_key(d, owner)
    manifest: dict[str, Any] = {
        "name": SESSION_NAME,
        "repository": "default",
        "workloads": {WORKLOAD: {"secrets": ["records-keyset", "records-tls", RECORDS_ACCESS],
                                 "policy": policy},
                      # the freshness anchor's own Reference Value (its members need no secret;
                      # the relying parties' measured configs pin the same measurement)
                      "anchor": {"secrets": [], "policy": a_policy}},
        "secrets": {
            "records-keyset": {"type": "keyset"},
            "records-tls": {"type": "certificate", "dns_names": ["api", "localhost"],
                            "ip_addresses": ["127.0.0.1"], "validity_days": 30},
            # who holds which records role: pinned tokens and the owner's key, never a CN
            RECORDS_ACCESS: records_access(tok, owner_pub),
        },
        # the owner's public key lets `safehold broker manifest update --signer admin --key
        # <owner-dir>/owner.key` sign updates of this dev manifest
        "users": {"admin": {"roles": ["owner"], "token_sha256": _sha(tok["admin"]),
                            "public_key": owner_pub}},
    }
    # the services' workloads (SVR, discovery, VAU): their own Reference Values and secrets
    from safehold.devstack import services as svc

    ports = service_ports or svc.ServicePorts()
    edited = edited_client_policies(d, owner)  # before anything below rewrites them
    written = svc.write_configs(d, pin=pin, owner_pub=owner_pub, ports=ports, owner=make_owner_dir(d, owner),
                                records_policy={**policy, "name": "safehold-records-behind-epa-vau",
                                                "report_data": "required"},
                                measure=lambda module, p: (svc.service_spec(package_root, module).closure(
                                    [p], base=base).hex(), root))
    extra_w, extra_s = svc.manifest_entries(tok, written)
    manifest["workloads"].update(extra_w)
    manifest["secrets"].update(extra_s)
    text = tomli_w.dumps(manifest)
    load_manifest(text.encode(), filename="manifest.toml")  # fail here, clearly, not in the broker
    old_manifest = _read_toml(d / "manifest.toml")
    (d / "manifest.toml").write_text(text, "utf-8")
    client_policy = {**policy, "name": "safehold-records-client", "report_data": "required"}
    client_text = tomli_w.dumps(client_policy)
    (d / CLIENT_POLICIES["records"]).write_text(client_text, "utf-8")
    # the owner's tools accept these policies (and their simulated root) only as written now
    pin_client_policies(d, owner, {"records": client_text, **written["policies"]}, root)
    s = Stack(d, broker_port, records_port, scone_port,
              store_url or f"sqlite:///{d / 'records.db'}", package_root,
              owner_dir=owner_dir(d, owner))
    s.anchor = la
    s.info = {"measurements": measurements, "anchor_measurement": anchor_closure.hex(),
              "anchor_urls": la.urls}
    s.service_ports = ports
    if edited:
        s.info["policies_edited"] = edited
    if old_manifest is not None and old_manifest != manifest:
        s.info["manifest_changed"] = True  # a broker that installed the old one refuses the new
    return s

