"""Helpers for the SVR tests: in-process services over a real store with the freshness test
double, a synchronous ASGI transport for the SDK, and SVR server processes with real anchor
members (RA-TLS on the simulated TEE, run from a package snapshot).

``TEST_ARGON2`` is a CHEAP Argon2id setting for tests that hash thousands of PINs (the
brute-force test); Signal's production parameters are tested by the known-answer tests in
tests/svr/test_pin.py and used everywhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from safehold.freshness.errors import LedgerUninitialisedError
from safehold.svr.core import SvrService
from safehold.svr.keys import SvrKeys
from safehold.svr.launch import LocalSvr
from safehold.svr.pin import Argon2Params
from tests.support.fresh_cluster import AnchorCluster, ClientIdentity
from tests.support.freshness import InProcessAnchor, Owner

#: CHEAP Argon2id, TEST ONLY (module docstring): 64 KiB, one pass.
TEST_ARGON2 = Argon2Params(memory_kib=64, iterations=1, parallelism=1, label="TEST-ONLY cheap Argon2id")
GROUP_ID = 0x5AFE_0000_0000_0013
SECRET = bytes(range(32))
USER_TOKEN, OTHER_TOKEN, ADMIN_TOKEN = "user-token-1", "user-token-2", "admin-token"


def access_list() -> dict[str, dict[str, Any]]:
    """Two users with the ``backup`` role and an admin (token hash → principal)."""
    def h(t: str) -> str:
        return hashlib.sha256(t.encode()).hexdigest()

    return {h(USER_TOKEN): {"name": "patient-1", "roles": ["backup"]},
            h(OTHER_TOKEN): {"name": "patient-2", "roles": ["backup"]},
            h(ADMIN_TOKEN): {"name": "owner", "roles": ["admin"]}}


def open_service(store, anchor: InProcessAnchor, *, name: str = "svr-0", secret: bytes = SECRET,
                 group_id: int = GROUP_ID, initialise: bool = True, **kw: Any) -> SvrService:
    """An SvrService on ``store``; a new ledger is initialised with the anchor's owner."""
    svc = SvrService(store, SvrKeys.from_secret(secret), name=name, group_id=group_id, anchor=anchor, **kw)
    if initialise and isinstance(svc.fresh.problem, LedgerUninitialisedError):
        svc.fresh.reanchor(anchor.sign_for(svc.fresh))
    return svc


class SyncAsgiTransport(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app (through ``httpx.ASGITransport``, one
    event loop per request): lets the synchronous SDK talk to in-process apps."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def go() -> httpx.Response:
            t = httpx.ASGITransport(app=self.app)
            req = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            resp = await t.handle_async_request(req)
            content = await resp.aread()
            return httpx.Response(resp.status_code, headers=resp.headers, content=content)

        return asyncio.run(go())


class TamperingTransport(httpx.BaseTransport):
    """STAND-IN FOR A COMPROMISED SERVER (the network cannot do this: RA-TLS): wraps a transport
    and rewrites the JSON answers of one path with ``edit``."""

    def __init__(self, inner: httpx.BaseTransport, path: str, edit) -> None:
        self.inner, self.path, self.edit = inner, path, edit

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if request.url.path != self.path:
            return resp
        obj = json.loads(resp.read())
        return httpx.Response(resp.status_code, json=self.edit(obj))


# --- processes ------------------------------------------------------------------------------------


def server_secrets(i: int, identity: ClientIdentity) -> dict[str, Any]:
    """Server ``i``'s standard-input document: its secret, the test access list, its anchor
    client certificate and key (CN = its name)."""
    return {"secret": hashlib.sha256(b"svr secret %d" % i).hexdigest(), "access": access_list(),
            "anchor_client_cert": identity.cert_pem.decode(), "anchor_client_key": identity.key_pem.decode()}


class SvrProcesses(LocalSvr):
    """``n`` SVR server processes (RA-TLS, simulated TEE; :class:`~safehold.svr.launch.LocalSvr`)
    over ``anchor_members`` anchor member processes with a test broker CA and a test owner.

    Each server has its own store (SQLite file unless ``store_urls``), its own ledger (its name
    ``svr-i``) and anchor client certificate, and the access list of :func:`access_list`.
    """

    def __init__(self, root: Path, package: Path, *, n: int = 3, store_urls: list[str] | None = None,
                 anchor_members: int = 3, wait_timeout: float = 5.0) -> None:
        self.root = root
        self.owner = Owner()
        self.anchor = AnchorCluster(root, package, self.owner, n=anchor_members)
        super().__init__(root, group_id=GROUP_ID, anchor_urls=self.anchor.urls, anchor_policy={},
                         data_dir=root / "tee", n=n, store_urls=store_urls, package_root=package,
                         wait_timeout=wait_timeout)
        self.identities = [ClientIdentity(self.anchor.ca, name) for name in self.names]

    def start(self, i: int, secrets: dict[str, Any] | None = None, **kw: Any) -> dict:
        return super().start(i, secrets or server_secrets(i, self.identities[i]), **kw)

    def start_all(self) -> None:
        self.anchor.start_all()
        q = self.anchor.client("probe")
        self.anchor.wait_ready(q)
        q.close()
        self.anchor_policy = {"allow_simulated": True, "simulated_root": str(self.anchor.simulated_root),
                              "reference_values": {"measurements": [self.anchor.measurement]}}
        self.write_configs()
        for i in range(self.n):
            self.start(i)

    def stop_all(self) -> None:
        super().stop_all()
        self.anchor.stop()

    def client(self, cls, token: str = USER_TOKEN, *, servers: list[int] | None = None, **kw: Any):
        """An SDK client of class ``cls`` (Svr2Client / Svr3Client) attesting every server."""
        idx = list(range(self.n)) if servers is None else servers
        kw.setdefault("policy", self.policy())
        if cls.__name__ == "Svr2Client":
            return cls(self.urls[idx[0]], token=token, **kw)
        return cls([self.urls[i] for i in idx], token=token, **kw)

    def initialise(self) -> list[str]:
        """Owner-initialise (or re-anchor) every server's ledger through the admin routes."""
        from safehold.client.svr import Svr3Client

        with self.client(Svr3Client, ADMIN_TOKEN) as admin:
            return admin.owner_initialise(self.owner.private_pem())
