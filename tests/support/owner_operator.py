"""A running dev stack (broker and records service as processes, from a snapshot of the package)
and what its data owner and a broker operator can do to it: owner-signed manifest updates, and
client certificates from the broker's workload CA through ``safehold broker client-cert``."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from safehold.broker.manifest import manifest_from_dict, sign_update
from safehold.devstack import Stack, tokens
from tests.support import records_stack


@contextmanager
def running_stack(tmp: Path) -> Iterator[Stack]:
    """``safehold up``'s stack on free loopback ports (SCONE port off), run from a snapshot of
    ``src/safehold`` under ``tmp`` so edits to the tree cannot change its measurement."""
    with records_stack.running_stack(tmp / "pkg", tmp / "data") as s:
        yield s


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def broker(stack: Stack, token: str | None = None) -> httpx.Client:
    """An HTTPS client of the stack's broker (TLS verified against its CA), as ``token``'s user."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=stack.broker_url, headers=headers, timeout=30,
                        verify=ssl.create_default_context(cafile=str(stack.path("ca.pem"))))


def owner_update(stack: Stack, edit: Callable[[dict], None]) -> int:
    """Install the current manifest, changed by ``edit``, as the next version: signed by the
    owner's key (``<owner dir>/owner.key``, user ``admin``) for this broker over the current manifest.
    Returns the new version."""
    with broker(stack, tokens(stack.data_dir)["admin"]) as b:
        st = b.get("/status").json()
        raw = b.get("/admin/manifest").json()["manifest"]
        edit(raw)
        m = manifest_from_dict(raw)
        version = st["manifest_version"] + 1
        sig = sign_update(m, version, stack.owner_path("owner.key").read_bytes(), broker_id=st["broker_id"],
                          previous_sha256=st["manifest_digest"])
        r = b.post("/admin/manifest/update", json={"manifest": m.raw, "version": version,
                                                   "signer": "admin", "signature": sig})
        assert r.status_code == 200, r.text
    return version


def client_cert(stack: Stack, token: str, name: str, out: Path,
                key: Path | None = None) -> tuple[str, str]:
    """``safehold broker client-cert --name NAME`` as the user of ``token`` (a new key, or
    ``key``): the certificate and key file paths for ``RecordsClient(client_cert=…)``."""
    args = [sys.executable, "-m", "safehold.cli.main", "broker", "client-cert", "--name", name,
            "--out", str(out), "--url", stack.broker_url, "--cacert", str(stack.path("ca.pem")),
            "--token", token]
    if key is not None:
        args += ["--key", str(key)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return f"{out}.pem", str(key or f"{out}.key")
