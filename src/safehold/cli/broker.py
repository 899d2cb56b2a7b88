"""``safehold broker …``: run the key broker, manage its manifest, audit log and recovery."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from safehold.errors import BrokerError, SafeholdError

_URL = click.option("--url", default=lambda: os.environ.get("SAFEHOLD_BROKER_URL"),
                    show_default="$SAFEHOLD_BROKER_URL, else the broker of a running `safehold up` "
                                 "(`safehold broker --data-dir`, $SAFEHOLD_DATA_DIR or ./safehold-data), "
                                 "else https://127.0.0.1:8443",
                    help="Broker base URL.")
_CACERT = click.option("--cacert", type=click.Path(dir_okay=False), default=None,
                       help="Broker CA certificate (PEM) to verify TLS; default: the CA of the "
                            "`safehold up` whose broker is used, else the system's.")
_TOKEN = click.option("--token", default=lambda: os.environ.get("SAFEHOLD_BROKER_TOKEN"),
                      help="User bearer token (or $SAFEHOLD_BROKER_TOKEN).")
DEFAULT_URL = "https://127.0.0.1:8443"


def broker_target(url: str | None, cacert: str | None,
                  data_dir: str | None = None) -> tuple[str, str | ssl.SSLContext | None]:
    """The broker URL and how to verify its TLS: ``url`` (``--url`` / ``$SAFEHOLD_BROKER_URL``)
    with ``cacert`` (a path; None: the system CAs) when given; else the broker of a running
    ``safehold up`` (``broker_url`` of ``up.json`` in ``data_dir`` — ``safehold broker
    --data-dir`` —, ``$SAFEHOLD_DATA_DIR`` or ``./safehold-data``); else :data:`DEFAULT_URL`.
    An explicit ``cacert`` always wins.

    With up.json's URL and no ``cacert``, TLS is checked against the workload CA the data
    owner pinned for that data directory (``<owner dir>/pins.json``, written by ``safehold up``
    when it created the CA; owner dir: ``$SAFEHOLD_OWNER_DIR`` or ``<data dir>.owner``), loaded
    once into an ``ssl.SSLContext`` — never against a CA file that up.json names or the data
    directory holds unchecked: the operator owns the data directory, and the broker token and
    owner-signed manifests must not go to its server (docs/threat-model.md).

    Raises:
        ConfigError: up.json exists but is not readable JSON; or up.json names a broker but the
            owner directory pins no workload CA for the data directory, or the data directory's
            CA is not the pinned one (both: give ``--url`` and ``--cacert``).
    """
    if url:
        return url, cacert
    from safehold.errors import ConfigError

    d = Path(data_dir or os.environ.get("SAFEHOLD_DATA_DIR") or "./safehold-data")
    p = d / "up.json"
    if p.is_file():
        try:
            info = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: unreadable ({e}); give --url") from None
        if isinstance(info, dict) and isinstance(info.get("broker_url"), str):
            from safehold.devstack.datadir import https_url

            # the pinned CA is checked in the TLS handshake: over http:// there is none
            return https_url(info["broker_url"], f"{p} (broker_url)"), cacert or _pinned_context(d)
    return DEFAULT_URL, cacert


def _pinned_context(d: Path) -> ssl.SSLContext:
    """A TLS context trusting only the workload CA the owner pinned for data directory ``d``
    (the data directory's ``ca.pem`` or ``broker/ca.pem``, whichever has the pinned SHA-256 of
    its DER). Raises ConfigError: no pin, or no CA file there is the pinned one."""
    from safehold.client.connection import owner_dir
    from safehold.devstack.datadir import OWNER_PINS_FILE, pinned_ca_context

    return pinned_ca_context(d, owner_dir(d) / OWNER_PINS_FILE,
                             hint=" (up.json there names a broker): refusing to send a token or a "
                                  "signature to it; give --url and --cacert")


def _http(url: str | None, cacert: str | None, *, insecure: bool = False) -> Any:
    import httpx

    ctx = click.get_current_context(silent=True)
    url, ca = broker_target(url, cacert, ctx.meta.get(_STACK_DIR) if ctx is not None else None)
    verify: Any = False if insecure else (ca or True)
    return httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=30.0)


def _call(client: Any, method: str, path: str, **kw: Any) -> Any:
    import httpx

    try:
        r = client.request(method, path, **kw)
    except httpx.HTTPError as e:
        from safehold.client.connection import transport_reason

        raise BrokerError(f"cannot reach the broker at {client.base_url}: {transport_reason(e)}"
                          " (is `safehold up` running? outside the directory holding its "
                          "safehold-data give `safehold broker --data-dir DIR …`; another broker: "
                          "--url and --cacert)") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text[:300]
        raise BrokerError(f"{method} {path}: {r.status_code}: {detail}")
    return r.json()


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


_STACK_DIR = "safehold.broker.stack_dir"  # click context meta: the group's --data-dir


@click.group("broker")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Data directory of the `safehold up` whose broker the client commands use "
                   "(default: $SAFEHOLD_DATA_DIR, else ./safehold-data). `broker serve` takes "
                   "its own --data-dir: the broker's state.")
@click.pass_context
def broker(ctx: click.Context, data_dir: str | None) -> None:
    """Key broker service (KBS): attestation-gated secrets, workload CA, audit, recovery."""
    ctx.meta[_STACK_DIR] = data_dir


@broker.command("serve")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Broker data directory.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Manifest (TOML/JSON) to install if none is set yet.")
@click.option("--store", "store_url", default=None, envvar="SAFEHOLD_BROKER_STORE_URL",
              help="Store URL (default sqlite in the data dir); or SAFEHOLD_BROKER_STORE_URL.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=int)
@click.option("--nonce-ttl", default=300, show_default=True, type=int, help="Challenge lifetime, s.")
@click.option("--token-ttl", default=600, show_default=True, type=int, help="EAR token lifetime, s.")
@click.option("--max-body", default=1024 * 1024, show_default=True, type=int, help="Body limit, bytes.")
@click.option("--tls-name", multiple=True, envvar="SAFEHOLD_BROKER_TLS_NAMES",
              help="Extra DNS name/IP for the broker's TLS certificate (repeatable; or "
                   "SAFEHOLD_BROKER_TLS_NAMES, space-separated).")
@click.option("--no-tls", is_flag=True, help="Serve plain HTTP (development only).")
@click.option("--static-value", default=None, hidden=True, help="Serve GET /static (benchmark baseline).")
@click.option("--init-only", is_flag=True,
              help="Open (or create) the state, write <data-dir>/ca.pem and exit without serving "
                   "(run under the same launch as `serve`: the master key is sealed to it).")
@click.option("--anchor", "anchor_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Freshness anchor settings (TOML: anchor_members, anchor_policy): the state is "
                   "verified against the attested anchor (docs/freshness.md). Without it: off, loudly.")
@click.option("--exit-with-parent", "parent", type=int, default=None, metavar="PID",
              help="Stop (gracefully, as on SIGTERM) when the parent process PID is gone "
                   "(`safehold up` passes its own pid).")
def serve_cmd(data_dir: str, manifest_path: str | None, store_url: str | None, host: str, port: int,
              nonce_ttl: int, token_ttl: int, max_body: int, tls_name: tuple[str, ...], no_tls: bool,
              static_value: str | None, init_only: bool, anchor_file: str | None, parent: int | None) -> None:
    """Start the broker (unseals its master key; recovery mode if that fails).

    The broker runs as a measured workload: started from a shell (not by its launch), this
    command replaces itself by the broker's isolated launch (``safehold.attestation.workload.
    LaunchSpec``: ``-I -S -B``, explicit ``sys.path``, environment allow-list
    ``SAFEHOLD_BROKER_STORE_URL`` / ``SAFEHOLD_BROKER_TLS_NAMES``), whose closure is the
    measurement the master key is sealed to. With ``--anchor`` the state is a freshness ledger
    (docs/freshness.md)."""
    _exec_as_broker("serve")
    import logging

    from safehold.broker.core import BrokerConfig
    from safehold.broker.server import open_broker, serve
    from safehold.procutil import exit_with_parent

    exit_with_parent(parent)  # after the exec above: same pid, same parent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if init_only:
        b = open_broker(data_dir, store_url, manifest_path=manifest_path,
                        config=BrokerConfig(nonce_ttl=nonce_ttl, token_ttl=token_ttl))
        b.state.store.close()
        if b.mode != "ready":
            raise click.ClickException(f"broker state opened in {b.mode} mode (see docs/broker.md)")
        return
    if anchor_file is not None:
        from safehold.broker.server import open_fresh_broker, serve_fresh

        if no_tls or static_value is not None:
            raise click.UsageError("--anchor serves TLS only (no --no-tls / --static-value)")
        gate, ca = open_fresh_broker(data_dir, store_url, anchor_file, manifest_path=manifest_path,
                                     config=BrokerConfig(nonce_ttl=nonce_ttl, token_ttl=token_ttl))
        st = gate.broker.status() if gate.broker is not None else {"mode": "not-fresh",
                                                                    "reason": gate.reason()}
        click.echo(json.dumps({"listening": f"https://{host}:{port}", **st}), err=True)
        serve_fresh(gate, ca, host=host, port=port, tls_names=list(tls_name), max_body=max_body)
        return
    logging.getLogger("safehold.broker").warning(
        "FRESHNESS OFF (no --anchor): a restored or rolled-back broker state is not detected")
    b = open_broker(data_dir, store_url, manifest_path=manifest_path,
                    config=BrokerConfig(nonce_ttl=nonce_ttl, token_ttl=token_ttl))
    scheme = "http" if no_tls else "https"
    click.echo(json.dumps({"listening": f"{scheme}://{host}:{port}", **b.status()}), err=True)
    serve(b, host=host, port=port, tls=not no_tls, tls_names=list(tls_name), max_body=max_body,
          static_value=static_value.encode() if static_value is not None else None)


@broker.command("status")
@_URL
@_CACERT
@click.option("--insecure", is_flag=True, help="Do not verify TLS (e.g. a broker in recovery mode).")
def status_cmd(url: str | None, cacert: str | None, insecure: bool) -> None:
    """Print the broker's mode, manifest version and measurement; when unsealed also its broker id
    and master-key fingerprint (recovery-key holders record it for `recover --expect-fingerprint`)."""
    with _http(url, cacert, insecure=insecure) as c:
        click.echo(json.dumps(_call(c, "GET", "/status"), indent=2))


# --- manifest -----------------------------------------------------------------------------------


@broker.group("manifest")
def manifest_grp() -> None:
    """Set, update (signed) and show the manifest."""


def _load(path: str) -> Any:
    from safehold.broker.manifest import load_manifest

    p = Path(path)
    return load_manifest(p.read_bytes(), filename=str(p), base_dir=p.resolve().parent)


@manifest_grp.command("check")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
def manifest_check(path: str) -> None:
    """Validate a manifest file, load every workload's appraisal policy (as `serve` does, so a
    `simulated_root` that cannot be read fails here) and print its digest."""
    from safehold.broker.installed import build_verifiers

    m = _load(path)
    build_verifiers(m)
    click.echo(json.dumps({"ok": True, "digest": m.digest, "workloads": sorted(m.workloads),
                           "secrets": sorted(m.secrets)}))


@manifest_grp.command("set")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@_URL
@_CACERT
def manifest_set(path: str, url: str | None, cacert: str | None) -> None:
    """Install the FIRST manifest (later changes need `manifest update`)."""
    m = _load(path)
    with _http(url, cacert) as c:
        click.echo(json.dumps(_call(c, "POST", "/admin/manifest", content=m.to_json(),
                                    headers={"content-type": "application/json"})))


@manifest_grp.command("update")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--signer", required=True, help="Owner user name in the current manifest.")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The owner's private signing key (PEM).")
@click.option("--version", "version", type=int, default=None, help="New version (default current + 1).")
@_URL
@_CACERT
@_TOKEN
def manifest_update(path: str, signer: str, key_path: str, version: int | None, url: str | None,
                    cacert: str | None, token: str | None) -> None:
    """Sign PATH as the next manifest version with an owner key and install it.

    The signature binds the broker's id and the SHA-256 digest of its current manifest (both read
    from /status over verified TLS), so it cannot be replayed on another broker or history."""
    from safehold.broker.manifest import sign_update

    m = _load(path)
    with _http(url, cacert) as c:
        st = _call(c, "GET", "/status")
        if st.get("mode") != "ready" or not st.get("broker_id") or not st.get("manifest_digest"):
            raise BrokerError(f"broker is not ready for a manifest update (status: {st.get('mode')})")
        if version is None:
            version = int(st["manifest_version"]) + 1
        sig = sign_update(m, version, Path(key_path).read_bytes(), broker_id=st["broker_id"],
                          previous_sha256=st["manifest_digest"])
        out = _call(c, "POST", "/admin/manifest/update",
                    json={"manifest": m.raw, "version": version, "signer": signer, "signature": sig})
    click.echo(json.dumps(out))


@manifest_grp.command("show")
@click.option("--version", "version", type=int, default=None, help="Version (default current).")
@_URL
@_CACERT
@_TOKEN
def manifest_show(version: int | None, url: str | None, cacert: str | None, token: str | None) -> None:
    """Print a manifest version with its signer (reader role or above)."""
    with _http(url, cacert) as c:
        params = {"version": version} if version is not None else {}
        click.echo(json.dumps(_call(c, "GET", "/admin/manifest", params=params, headers=_auth(token)),
                              indent=2))


# --- secrets -------------------------------------------------------------------------------------


@broker.command("set-value")
@click.argument("name")
@click.option("--file", "file_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read the value from a file (default: stdin).")
@_URL
@_CACERT
@_TOKEN
def set_value(name: str, file_path: str | None, url: str | None, cacert: str | None,
              token: str | None) -> None:
    """Supply the opaque `value` secret NAME (operator or owner role)."""
    data = Path(file_path).read_bytes() if file_path else sys.stdin.buffer.read()
    with _http(url, cacert) as c:
        click.echo(json.dumps(_call(c, "PUT", f"/admin/secrets/{name}", content=data, headers=_auth(token))))


@broker.command("client-cert")
@click.option("--name", required=True,
              help="Subject CN, a label only: roles follow the key (public_key_sha256), never the CN.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Write OUT.key (private, 0600), OUT.pem (certificate) and OUT-ca.pem.")
@click.option("--validity-days", default=30, show_default=True, type=int)
@click.option("--key", "key_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Use this existing private key (PEM, e.g. an owner's key) instead of a new one.")
@_URL
@_CACERT
@_TOKEN
def client_cert(name: str, out: str, validity_days: int, key_path: str | None, url: str | None,
                cacert: str | None, token: str | None) -> None:
    """Have the broker's CA issue a client (mTLS) certificate for a new or given key.

    Prints the key's ``public_key_sha256`` (SHA-256 of its SubjectPublicKeyInfo DER): what the
    data owner pins in a manifest ``access`` secret to give this key a role at a workload.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    key: Any = (serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
                if key_path else ec.generate_private_key(ec.SECP256R1()))
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, algo))
    with _http(url, cacert) as c:
        res = _call(c, "POST", "/admin/client-certificates", headers=_auth(token),
                    json={"csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                          "validity_days": validity_days})
    if not key_path:
        fd = os.open(out + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    Path(out + ".pem").write_text(res["certificate"])
    Path(out + "-ca.pem").write_text(res["ca"])
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    click.echo(json.dumps({"key": key_path or out + ".key", "certificate": out + ".pem",
                           "ca": out + "-ca.pem", "public_key_sha256": hashlib.sha256(spki).hexdigest()}))


# --- audit ---------------------------------------------------------------------------------------


@broker.group("audit")
def audit_grp() -> None:
    """Read and verify the hash-chained, signed audit log."""


@audit_grp.command("verify")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Verify offline from the broker's data directory (same TEE identity).")
@click.option("--store", "store_url", default=None, help="Store URL (with --data-dir).")
@_URL
@_CACERT
@_TOKEN
def audit_verify(data_dir: str | None, store_url: str | None, url: str | None, cacert: str | None,
                 token: str | None) -> None:
    """Check the chain and every signature; name the first broken entry (exit 1).

    With ``--data-dir`` the state is unsealed, which only the broker's own launch can do (the
    master key is sealed to its measured closure): run from elsewhere, this command runs itself
    again under that launch (``safehold.devstack.stack.BROKER_MODULE``) and relays its answer."""
    if data_dir:
        from safehold.attestation.workload import launched_module
        from safehold.devstack.stack import BROKER_MODULE

        if launched_module() != BROKER_MODULE:
            _relay_as_broker(["audit", "verify", "--data-dir", data_dir,
                              *(["--store", store_url] if store_url else [])])
            return
        from safehold.broker.errors import StateIntegrityError
        from safehold.broker.server import open_broker

        try:
            b = open_broker(data_dir, store_url, repair=False)
        except StateIntegrityError as e:
            res: Mapping[str, object] = {"ok": False, "error": str(e)}
        else:
            try:
                res = b.audit_verify() if b.mode == "ready" else {"ok": False, "error": b.state.reason}
            finally:
                b.state.store.close()
    else:
        with _http(url, cacert) as c:
            res = _call(c, "GET", "/admin/audit/verify", headers=_auth(token))
    click.echo(json.dumps(res))
    if not res.get("ok"):
        raise SafeholdError(f"audit log broken: {res.get('error')}")


def _exec_as_broker(command: str) -> None:
    """Unless this process is the broker's launch: ``exec`` the broker's launch with this
    command line's arguments after ``command`` (same pid, so signals and waits still apply).
    In-process invocations (click's test runner: ``command`` is not in ``sys.argv``) run as is."""
    from safehold.attestation.workload import LaunchSpec, launched_module
    from safehold.devstack.stack import BROKER_ENV, BROKER_MODULE, app_dir

    if launched_module() == BROKER_MODULE or command not in sys.argv[1:]:
        return
    rest = sys.argv[sys.argv.index(command, 1) + 1:]
    spec = LaunchSpec(BROKER_MODULE, app_dir=app_dir(None), passthrough=BROKER_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(spec.executable, spec.argv(command, *rest), spec.env())  # noqa: S606 - exec, no shell


def _relay_as_broker(args: list[str]) -> None:
    """Run ``safehold broker <args>`` under the broker's workload launch; copy its output and
    exit with its status."""
    import subprocess

    from safehold.attestation.workload import LaunchSpec
    from safehold.devstack.stack import BROKER_ENV, BROKER_MODULE, app_dir

    spec = LaunchSpec(BROKER_MODULE, app_dir=app_dir(None), passthrough=BROKER_ENV)
    r = subprocess.run(spec.argv(*args), env=spec.env(), stdin=subprocess.DEVNULL, capture_output=True,
                       check=False)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr)
    sys.stderr.flush()
    if r.returncode:
        sys.exit(r.returncode)


@audit_grp.command("show")
@_URL
@_CACERT
@_TOKEN
def audit_show(url: str | None, cacert: str | None, token: str | None) -> None:
    """Print the verified audit entries as JSON lines."""
    with _http(url, cacert) as c:
        for e in _call(c, "GET", "/admin/audit", headers=_auth(token))["entries"]:
            click.echo(json.dumps(e))


# --- recovery ------------------------------------------------------------------------------------


@broker.command("recover")
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(dir_okay=False, exists=True),
              help="A recovery private key (PEM); give k of them.")
@click.option("--policy", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Appraisal policy for the broker's own Evidence (binds its recovery key).")
@click.option("--expect-fingerprint", "expect_fp", required=True,
              help="The master-key fingerprint (32 hex) recorded at the broker's first start "
                   "(or from `safehold broker status`); refuse if the shares give another key.")
@click.option("--insecure-no-attestation", is_flag=True,
              help="Send shares without appraising the broker's Evidence (testing only).")
@_URL
@_CACERT
def recover_cmd(keys: tuple[str, ...], policy: str | None, expect_fp: str, insecure_no_attestation: bool,
                url: str | None, cacert: str | None) -> None:
    """Restore a broker in recovery mode with k of the n recovery private keys.

    The shares are combined here first: if the key they give does not have the recorded
    fingerprint (a recovery record forged in the store), nothing is sent to the broker."""
    import hmac

    from joserfc.jwk import ECKey

    from safehold.broker import protocol
    from safehold.broker.shares import (
        combine_shares,
        decrypt_share,
        master_fingerprint,
        normalize_fingerprint,
    )

    if not policy and not insecure_no_attestation:
        raise click.UsageError("give --policy for the broker's Evidence (or --insecure-no-attestation)")
    try:
        expect = normalize_fingerprint(expect_fp)
    except SafeholdError as e:
        raise click.UsageError(f"--expect-fingerprint: {e}") from None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pems: dict[str, bytes] = {}
    for kp in keys:  # load every key before contacting the broker
        pems[kp] = Path(kp).read_bytes()
        try:
            k = serialization.load_pem_private_key(pems[kp], password=None)
        except (ValueError, TypeError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise BrokerError(f"cannot load recovery key {kp}: {why}") from None
        if not isinstance(k, rsa.RSAPrivateKey):
            raise BrokerError(f"cannot load recovery key {kp}: not an RSA private key")
    with _http(url, cacert, insecure=True) as c:  # TLS in recovery mode is self-signed; Evidence binds
        info = _call(c, "GET", "/recovery")
        broker_jwk = info["broker_key"]
        if policy:
            from safehold.attestation.evidence import Evidence
            from safehold.attestation.policy import AppraisalPolicy
            from safehold.attestation.verifier import Verifier

            rd = protocol.recovery_report_data(broker_jwk)
            Verifier(AppraisalPolicy.from_toml(Path(policy))).appraise(
                Evidence.from_cmw(info["evidence"]), expected_report_data=rd)
        bkey = ECKey.import_key(broker_jwk)
        plain: list[bytes] = []
        for kp, pem in pems.items():
            share = None
            for jwe_compact in info["shares"].values():
                try:
                    share = decrypt_share(jwe_compact, pem)
                    break
                except SafeholdError:
                    continue
            if share is None:
                raise BrokerError(f"recovery key {kp} decrypts none of the stored shares")
            plain.append(share)
        try:
            threshold = int(info["threshold"])
        except (KeyError, TypeError, ValueError):
            raise BrokerError("recovery: the broker's recovery record has no valid threshold") from None
        got = master_fingerprint(combine_shares(plain, threshold))
        if not hmac.compare_digest(got, expect):
            raise BrokerError(
                f"recovery refused, nothing sent: the shares give a master key with fingerprint {got}, "
                f"expected {expect}; the recovery record is not the one made for this broker "
                "(forged or replaced in the store?)"
            )
        shares = [protocol.encrypt_response(s, bkey) for s in plain]
        out = _call(c, "POST", "/recovery", json={"shares": shares, "expect_fingerprint": expect})
    click.echo(json.dumps(out))


# --- keys ----------------------------------------------------------------------------------------


@broker.command("keygen")
@click.option("--kind", type=click.Choice(["owner", "recovery", "token"]), required=True,
              help="owner: Ed25519 signing key; recovery: RSA-3072 (RSA-OAEP-256); token: bearer token.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Write OUT.key (private, 0600) and OUT.pub; for tokens OUT holds the token.")
def keygen(kind: str, out: str | None) -> None:
    """Generate an owner signing key, a recovery key pair, or a user token (prints manifest values)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if kind == "token":
        tok = secrets.token_urlsafe(32)
        if out:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok + "\n")
        click.echo(json.dumps({"token": None if out else tok,
                               "token_sha256": hashlib.sha256(tok.encode()).hexdigest()}))
        return
    if not out:
        raise click.UsageError("--out is required for key pairs")
    key: Any = (ed25519.Ed25519PrivateKey.generate() if kind == "owner"
                else rsa.generate_private_key(65537, 3072))
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(out + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    Path(out + ".pub").write_bytes(pub)
    click.echo(json.dumps({"private": out + ".key", "public": out + ".pub"}))


def register(group: click.Group) -> None:
    """Add ``safehold broker`` to the root command."""
    group.add_command(broker)


if __name__ == "__main__":  # a workload launch (safehold.attestation.workload.LaunchSpec) runs this
    try:
        broker.main(prog_name="safehold broker")
    except SafeholdError as _e:  # one clear line, as the `safehold` group prints it
        click.secho(f"error: {_e}", fg="red", err=True)
        sys.exit(1)
