"""Only the data owner grants a records role; a broker operator mints nothing that maps to one.

The attack (issue: a broker ``operator`` can become records ``admin``): the owner adds an
operator by a signed manifest update; the operator has the broker's workload CA issue client
certificates with the CN ``admin`` (and every other role's name) and calls the records service
with them. Before, the service mapped CN ``admin`` to its admin role: the operator read every
record and the admin-only audit. Now roles follow the owner's ``records-access`` secret, which
pins keys and tokens: the operator gets 401 everywhere, while the owner's pinned key still works.

Real processes on loopback (broker + records service, from a snapshot of the package).
"""

from __future__ import annotations

import secrets

import pytest

from safehold.client.errors import AccessDeniedError
from safehold.client.records import RecordsClient
from safehold.devstack import tokens
from safehold.errors import RecordNotFoundError
from tests.support.owner_operator import broker, client_cert, owner_update, running_stack, sha256_hex

pytestmark = pytest.mark.slow

PATIENT = {"resourceType": "Patient", "id": "rp-1", "name": [{"family": "Mosciski958"}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("roles")) as s:
        yield s


def records(stack, **kw) -> RecordsClient:
    return RecordsClient(stack.records_url, policy=stack.path("policy.toml"), **kw)


def test_operator_minted_admin_certificate_is_refused_by_records(stack, tmp_path):
    owner_token = tokens(stack.data_dir)["admin"]
    with records(stack, token=owner_token) as owner:
        owner.put("rp-1", PATIENT)
    # the owner adds an operator (a signed manifest update: the only way users change)
    op_token = secrets.token_urlsafe(32)
    owner_update(stack, lambda m: m["users"].update(
        {"olga": {"roles": ["operator"], "token_sha256": sha256_hex(op_token)}}))

    # the operator mints client certificates with every role's name (and its own) as CN; the
    # broker issues them (issuing is an operator's right) ...
    for cn in ("admin", "writer", "reader", "olga"):
        cert = client_cert(stack, op_token, cn, tmp_path / cn)
        # ... and the records service maps none of them to anything
        with records(stack, client_cert=cert) as minted:
            for call in (lambda: minted.get("rp-1"), lambda: list(minted.list_ids()),
                         lambda: minted.search(family="Mosciski958"), minted.audit_verify,
                         lambda c=cn: minted.put(f"op-{c}", {"resourceType": "Patient"})):
                with pytest.raises(AccessDeniedError, match="401"):
                    call()
    # the operator's broker token is no records token either
    with records(stack, token=op_token) as op:
        with pytest.raises(AccessDeniedError, match="401"):
            op.get("rp-1")
    # and the operator cannot rewrite who holds a role: the role table is the owner's manifest,
    # not a value an operator supplies
    with broker(stack, op_token) as b:
        r = b.put("/admin/secrets/records-access", content=b'{"keys": {}, "tokens": {}}')
        assert r.status_code == 400 and "only 'value' secrets" in r.json()["detail"], r.text

    # the owner's pinned key is the records admin, whatever CN its certificate carries
    owner_cert = client_cert(stack, owner_token, "any-label", tmp_path / "owner",
                             key=stack.owner_path("owner.key"))
    with records(stack, client_cert=owner_cert) as admin:
        assert admin.get("rp-1").data == PATIENT
        for cn in ("admin", "writer", "reader", "olga"):  # nothing the operator sent was stored
            with pytest.raises(RecordNotFoundError):
                admin.get(f"op-{cn}")
        assert admin.audit_verify() > 0


def test_broker_audit_names_the_key_of_every_client_certificate(stack, tmp_path):
    """Whoever has a certificate issued, the broker's audit log says which key it binds, so the
    owner can tell an operator's certificate from a pinned identity's."""
    owner_token = tokens(stack.data_dir)["admin"]
    client_cert(stack, owner_token, "admin", tmp_path / "again")
    with broker(stack, owner_token) as b:
        entries = [e for e in b.get("/admin/audit").json()["entries"] if e["event"] == "client-certificate"]
    assert entries and all(len(e["detail"]["public_key_sha256"]) == 64 for e in entries)
