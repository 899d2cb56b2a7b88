"""Brute force: with a limit of 10 tries, an attacker who holds the user's bearer token and
tries the whole 4-digit PIN space recovers nothing, and the backup is gone.

The PIN stretch here is the CHEAP TEST-ONLY Argon2id of tests/support/svr.py (10,000 hashes);
Signal's production parameters are pinned by the known-answer tests in test_pin.py. The guess
limit does not depend on the stretch: the service counts guesses, whatever they cost.
"""

from __future__ import annotations

import asyncio
import base64

import httpx

from safehold.client.svr import Svr2Client, Svr3Client
from safehold.crypto import oprf
from safehold.svr import db4
from safehold.svr.errors import BackupMissingError
from safehold.svr.pin import make_salt, normalise_pin, stretch
from safehold.svr.protocol import Status, backup_id
from tests.support.svr import GROUP_ID, TEST_ARGON2, USER_TOKEN, SyncAsgiTransport

PIN = "7391"
SECRET = b"the patient's export key"


def test_svr2_whole_pin_space_over_http_recovers_nothing(trio):
    services, apps = trio
    with Svr2Client("https://svr-0.test", token=USER_TOKEN, transports=[SyncAsgiTransport(apps[0])],
                    argon2=TEST_ARGON2) as user:
        user.backup(PIN, SECRET, max_tries=10)
    salt = make_salt(backup_id("patient-1", "default"), GROUP_ID)
    statuses: dict[str, int] = {}
    recovered = []

    async def attack() -> None:  # the attacker's own script: raw HTTP, every PIN in order
        transport = httpx.ASGITransport(app=apps[0])
        async with httpx.AsyncClient(transport=transport, base_url="https://svr-0.test",
                                     headers={"Authorization": f"Bearer {USER_TOKEN}"}) as c:
            for n in range(10_000):
                key = stretch(normalise_pin(f"{n:04d}"), salt, TEST_ARGON2).access_key
                r = (await c.post("/v1/svr2/restore", json={"pin": base64.b64encode(key).decode()})).json()
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
                if r["status"] == "OK":
                    recovered.append(n)

    asyncio.run(attack())
    assert recovered == []
    assert statuses == {"PIN_MISMATCH": 9, "MISSING": 10_000 - 9}  # the 10th wrong guess erased it
    row, _ = services[0].svr2.table.read(backup_id("patient-1", "default"))
    assert row.state == "empty" and not row.data and not row.access_key
    with Svr2Client("https://svr-0.test", token=USER_TOKEN, transports=[SyncAsgiTransport(apps[0])],
                    argon2=TEST_ARGON2) as user:
        assert user.query().status == "MISSING"
        try:
            user.restore(PIN)
            raise AssertionError("recovered after erasure")
        except BackupMissingError:
            pass


def test_svr3_whole_pin_space_against_the_three_servers_recovers_nothing(trio):
    """The attacker script speaks DB4 to the three servers' cores (the HTTP layer is the same
    code path, tested elsewhere): Blind, restore1 everywhere, combine, prove, restore2."""
    services, apps = trio
    with Svr3Client([f"https://svr-{i}.test" for i in range(3)], token=USER_TOKEN,
                    transports=[SyncAsgiTransport(a) for a in apps], argon2=TEST_ARGON2) as victim:
        victim.backup(PIN, SECRET, max_tries=10)
    bid = backup_id("patient-1", "default")
    salt = make_salt(bid, GROUP_ID)
    outcomes: dict[str, int] = {}
    for n in range(10_000):
        x = db4.oprf_input(stretch(normalise_pin(f"{n:04d}"), salt, TEST_ARGON2).raw)
        blinded = oprf.blind([x])
        r1 = [svc.svr3.restore1(bid, blinded.elements[0]) for svc in services]
        if any(r.status != Status.OK for r in r1):
            outcomes["missing"] = outcomes.get("missing", 0) + 1
            continue
        combined = db4.combine([r.element for r in r1])
        k_auth = db4.master_auth_key(oprf.finalize([x], blinded.blinds, [combined])[0])
        released = []
        for svc, r in zip(services, r1, strict=True):
            sk = db4.server_auth_key(k_auth, svc.name)
            point, scalar = db4.prove(sk, blinded.elements[0], r.session)
            a = svc.svr3.restore2(bid, session=r.session, version=r.version, auth_point=point,
                                  auth_scalar=scalar)
            released.append(a.status == Status.OK)
        key = "recovered" if all(released) else "mismatch" if not any(released) else "partial"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes == {"mismatch": 10, "missing": 10_000 - 10}
    for svc in services:
        row, _ = svc.svr3.table.read(bid)
        assert row.state == "empty" and not row.oprf_share and not row.encryption_share and not row.sealed
