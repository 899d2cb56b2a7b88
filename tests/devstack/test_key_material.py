"""Issue 11, finding 1: no key material outside the TEE.

The attack: an operator on the host watches the temp dir and the data dir while ``safehold up``
starts and reads every file written there (before: the records service wrote its attested TLS
key to ``$TMPDIR/safehold-tls-*/key.pem`` and removed it at once; an inotify reader won the
race, and with the key an impostor passed the SDK's attestation). Here the whole stack starts as
a process from a snapshot of the package under a fanotify watch (every write's content is read
through the event's own descriptor: a file removed a millisecond later is still read), and every
file written, every child's command line and environment are scanned for:

* PEM and DER (PKCS#8, SEC 1) private keys, whatever their owner;
* the secrets the processes hold: the records TLS key and the broker's keys (read from the
  processes' memory — the test is root on the host, as the adversary; under a hardware TEE that
  memory is encrypted), the records keyset (received over the KBS protocol as the attested
  workload would), the bearer tokens and the owner's signing key (from the owner directory),
  as raw bytes, hex, base64 and base64url.

The only private keys allowed on the host are the simulated TEE's own "hardware" keys
(``simulated-tee/root-ca.key``, ``simulated-tee/platform.key``): a real TEE keeps them in the CPU
(docs/threat-model.md, "Simulated TEE").
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.devstack import SAMPLE, wait_up
from tests.support.filewatch import FileWatch, fanotify_available
from tests.support.shared import free_port, snapshot_package

pytestmark = pytest.mark.slow  # starts the whole stack

#: Simulated TEE "hardware" keys (a real TEE holds them in the CPU): ``simulated-tee/<name>``
#: and the temporary names ``write_atomic`` gives them (``.<name>.XXXXXXXX.tmp``).
SIMULATED_HARDWARE_KEYS = re.compile(r"\.?(root-ca|platform)\.key(\.[a-z0-9_]+\.tmp)?")


def _is_hardware_key(path: str) -> bool:
    p = Path(path)
    return p.parent.name == "simulated-tee" and SIMULATED_HARDWARE_KEYS.fullmatch(p.name) is not None

PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
PEM_BLOCK = re.compile(rb"-----BEGIN (?:EC |RSA |)PRIVATE KEY-----[A-Za-z0-9+/=\r\n]+-----END (?:EC |RSA |)"
                       rb"PRIVATE KEY-----")
DER_PRIVATE = [  # PKCS#8 (RFC 5208) and SEC 1 (RFC 5915) encodings of private keys
    bytes.fromhex("020100301306072a8648ce3d0201"),  # PKCS#8 version 0 + id-ecPublicKey
    bytes.fromhex("020100300506032b6570"),  # PKCS#8 version 0 + Ed25519 (RFC 8410)
    bytes.fromhex("020100300d06092a864886f70d0101010500"),  # PKCS#8 version 0 + rsaEncryption
    bytes.fromhex("30770201010420"),  # SEC 1 ECPrivateKey, P-256
    bytes.fromhex("3081a40201010430"),  # SEC 1 ECPrivateKey, P-384
]


def _encodings(secret: bytes) -> list[bytes]:
    """The ways a secret may be written: raw, hex (both cases), base64, base64url (unpadded)."""
    out = [secret, secret.hex().encode(), secret.hex().upper().encode(),
           base64.b64encode(secret).rstrip(b"="), base64.urlsafe_b64encode(secret).rstrip(b"=")]
    return [e for e in out if len(e) >= 16]


def _private_scalars(pem: bytes) -> list[bytes]:
    """The private numbers of a PEM private key (EC scalar / Ed25519 seed / RSA d, p, q)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = serialization.load_pem_private_key(pem, password=None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        n = key.private_numbers().private_value
        nums = [n.to_bytes((key.curve.key_size + 7) // 8, "big")]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        nums = [key.private_bytes_raw()]
    elif isinstance(key, rsa.RSAPrivateKey):
        pn = key.private_numbers()
        nums = [x.to_bytes((x.bit_length() + 7) // 8, "big") for x in (pn.d, pn.p, pn.q)]
    else:
        nums = []
    return [der, *nums]


def _memory_private_keys(pid: int) -> set[bytes]:
    """PEM private keys found in the writable memory of process ``pid`` (root reads
    ``/proc/<pid>/mem``; this is the test's hook into the keys a service holds)."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                chunk = mem.read(hi - lo)
            except (OSError, OverflowError, ValueError):
                continue
            found.update(m.group(0) for m in PEM_BLOCK.finditer(chunk))
    return found


def _spki(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(pem, password=None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _served_spki(port: int) -> bytes:
    """The SubjectPublicKeyInfo of the certificate the service on ``port`` presents."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by /proc/*/stat's parent pid)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _keyset_secrets(data: Path, pkg: Path) -> list[bytes]:
    """The records keyset's raw keys, received over the KBS protocol as the attested records
    workload receives them (same package snapshot, same measured config, same simulated TEE)."""
    from safehold.devstack.processes import records_env
    from safehold.devstack.stack import Stack
    from safehold.records.config import ServiceConfig
    from safehold.records.server import provision

    info = json.loads((data / "up.json").read_text())
    s = Stack(data, int(info["broker_url"].rsplit(":", 1)[1]), 0, None)
    cfg = ServiceConfig.load(data / "records.toml", env=records_env(s))
    prov = provision(cfg, str(data / "records.toml"), package_root=str(pkg))
    ks = prov.keyset
    return [ks.index_key, *(ks.key(i) for i in ks.ids())]


@pytest.mark.skipif(not fanotify_available() and not os.environ.get("CI"),
                    reason="needs fanotify (root): inotify or polling can miss a file removed at once")
def test_operator_watching_tmp_and_data_dir_during_up_finds_no_key_material(tmp_path):
    pkg = snapshot_package(tmp_path / "pkg")
    tmp, data, owner = tmp_path / "tmp", tmp_path / "safehold-data", tmp_path / "safehold-data.owner"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
    env.update({"PYTHONPATH": str(pkg.parent), "TMPDIR": str(tmp)})
    bport, rport, sport = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "safehold.cli.main", "up", "--data-dir", str(data),
           "--broker-port", str(bport), "--port", str(rport), "--scone-port", str(sport)]
    procs: dict[int, tuple[bytes, bytes]] = {}
    held: set[bytes] = set()
    with FileWatch([tmp, data]) as watch:
        up = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            info = wait_up(up, data, timeout=120)
            for pid in [up.pid, *_children(up.pid)]:
                try:
                    procs[pid] = (Path(f"/proc/{pid}/cmdline").read_bytes(),
                                  Path(f"/proc/{pid}/environ").read_bytes())
                except OSError:
                    pass
            for name in ("records", "broker"):
                held |= _memory_private_keys(info["pids"][name])
            served_spki = _served_spki(rport)
            keyset = _keyset_secrets(data, pkg)
            # requests with the admin token: logs and the import checkpoint must not keep it
            for args in (["status"], ["patients", "import", str(SAMPLE / "patients.csv")],
                         ["patients", "list"]):
                subprocess.run([sys.executable, "-m", "safehold.cli.main", *args, "--data-dir", str(data)],
                               env=env, capture_output=True, timeout=120, check=True)
        finally:
            up.send_signal(signal.SIGTERM)
            up.communicate(timeout=60)
        watch.scan_now()

    assert up.returncode == 0
    assert set(info["pids"].values()) <= set(procs), "a child process ended before it was read"
    # the simulated hardware's own keys (the attesters hold them too) are not the services' keys
    hardware = {n for f in data.glob("*/simulated-tee/*.key") for n in _private_scalars(f.read_bytes())[1:]}
    held = {pem for pem in held if not set(_private_scalars(pem)[1:]) & hardware}
    # the hook works: the key of the records service's served TLS certificate was found in memory
    assert served_spki in {_spki(pem) for pem in held}, "records TLS key not found in memory: hook broken"
    tokens = json.loads((owner / "tokens.json").read_text())
    owner_pem = (owner / "owner.key").read_bytes()
    secrets: dict[str, bytes] = {}
    for i, pem in enumerate(sorted(held)):
        for j, s in enumerate(_private_scalars(pem)):
            secrets[f"service key {i} number {j}"] = s
    for j, s in enumerate(_private_scalars(owner_pem)):
        secrets[f"owner key number {j}"] = s
    for role, t in tokens.items():
        secrets[f"{role} token"] = t.encode()
        secrets[f"{role} token bytes"] = base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
    for i, k in enumerate(keyset):
        secrets[f"keyset key {i}"] = k
    needles = [(f"{what} ({enc[:6]!r}…)", enc) for what, s in secrets.items() for enc in _encodings(s)]

    hits: list[str] = []
    files = sorted(watch.seen)
    assert any(f.endswith("records-ready.json") for f in files), "the watch saw no write: broken"
    assert len(files) > 10
    for path, contents in watch.seen.items():
        hw = _is_hardware_key(path)
        for blob in contents:
            if not hw and PEM_PRIVATE.search(blob):
                hits.append(f"{path}: PEM private key")
            if not hw:
                hits += [f"{path}: DER private key ({m.hex()})" for m in DER_PRIVATE if m in blob]
            hits += [f"{path}: {what}" for what, n in needles if n in blob]
    for pid, (argv, environ) in procs.items():
        for where, blob in (("argv", argv), ("environment", environ)):
            if PEM_PRIVATE.search(blob):
                hits.append(f"pid {pid} {where}: PEM private key")
            hits += [f"pid {pid} {where}: {what}" for what, n in needles if n in blob]
    assert hits == [], "\n".join(sorted(set(hits)))
    print(f"{len(files)} files written, {len(held)} service keys, {len(needles)} secret encodings, "
          f"{len(procs)} processes: no key material")
    # the owner's directory is the only place the owner's key and the tokens are written
    assert not any(Path(f).is_relative_to(owner) for f in files)
