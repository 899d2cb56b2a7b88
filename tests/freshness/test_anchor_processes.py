"""The anchor as real member processes on loopback (RA-TLS, simulated TEE, mutual TLS with a
broker-CA workload certificate), driven through QuorumAnchor and a FreshStore."""

from __future__ import annotations

import pytest

from safehold.freshness.anchor.base import AnchorHead
from safehold.freshness.anchor.statements import (
    AnchorCheckpoint,
    OwnerStatement,
    sign_owner_statement,
    verify_endorsement,
    verify_head_signatures,
)
from safehold.freshness.errors import (
    AnchorConflictError,
    AnchorLostError,
    AnchorUnavailableError,
    LedgerUninitialisedError,
    OwnerStatementError,
    StoreRolledBackError,
)
from safehold.freshness.recovery import statement_for
from safehold.freshness.store import FreshStore
from safehold.ratls.cert import load_certificate
from tests.support.fresh_cluster import ClientIdentity
from tests.support.freshness import MAC_KEY, POLICY, SqliteEngine

pytestmark = pytest.mark.slow
NS = "records:patients"


def _fresh(engine, quorum, cluster) -> FreshStore:
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=quorum, policy=POLICY)
    if isinstance(fs.problem, LedgerUninitialisedError):
        fs.reanchor(sign_owner_statement(statement_for(fs, "initialise"), cluster.owner.private_pem()))
    return fs


def _put(fs, i: int) -> None:
    fs.put(NS, b"rec-%06d" % i, b"value %d" % i, expected_version=0)


def test_members_attested_quorum_survives_minority_loss(cluster, tmp_path):
    q = cluster.client()
    cluster.wait_ready(q)
    infos = q.members()
    assert len({m.member for m in infos}) == 3
    for link in q.links:  # the statement key is endorsed by the attested RA-TLS key
        assert verify_endorsement(load_certificate(link.info.certificate).public_key(), link.info.member,
                                  link.info.public_key, link.info.endorsement)
    engine = SqliteEngine(tmp_path / "records.db")
    fs = _fresh(engine, q, cluster)
    for i in range(5):
        _put(fs, i)
    head = q.head("records")
    assert head.epoch == fs.state.committed.epoch and verify_head_signatures("records", head) == 3
    cp = AnchorCheckpoint("records", head, {lk.info.member: (lk.info.certificate, lk.info.endorsement)
                                            for lk in q.links})
    cluster.kill(1)  # SIGKILL one member: nothing changes for the client
    for i in range(5, 10):
        _put(fs, i)
    cluster.start(1)
    cluster.wait_ready(q)  # the restarted member came up empty and caught up from its peers
    cluster.kill(2)
    for i in range(10, 15):
        _put(fs, i)
    assert q.head("records").epoch == fs.state.committed.epoch  # members 0 and 1 hold it
    cluster.start(2)
    cluster.wait_ready(q)
    fs.close()
    fs = _fresh(engine, q, cluster)
    fs.check()
    assert fs.get(NS, b"rec-000014").value == b"value 14"
    assert cp.head.epoch < fs.state.committed.epoch
    fs.close()
    q.close()


def test_majority_loss_means_anchor_lost_until_the_owner_reanchors(cluster, tmp_path):
    q = cluster.client()
    cluster.wait_ready(q)
    engine = SqliteEngine(tmp_path / "records.db")
    fs = _fresh(engine, q, cluster)
    for i in range(3):
        _put(fs, i)
    fs.close()
    cluster.kill(0)
    cluster.kill(1)
    cluster.start(0, wait=False)
    cluster.start(1, wait=False)
    cluster.wait_listening(0)
    cluster.wait_listening(1)
    cluster.wait_ready(q)
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=q, policy=POLICY)
    with pytest.raises(AnchorLostError, match="re-anchor"):
        fs.check()
    with pytest.raises(AnchorLostError):
        fs.get(NS, b"rec-000001")
    signed = sign_owner_statement(statement_for(fs, "reanchor"), cluster.owner.private_pem())
    fs.reanchor(signed)
    assert fs.get(NS, b"rec-000001").value == b"value 1"
    _put(fs, 3)
    fs.close()
    q.close()


def _one_write(cluster, tmp_path):
    """A client of the ready cluster, a FreshStore on a new SQLite file with one write, and the
    anchor's head after it."""
    q = cluster.client()
    cluster.wait_ready(q)
    fs = _fresh(SqliteEngine(tmp_path / "records.db"), q, cluster)
    _put(fs, 1)
    return q, fs, q.head("records")


def test_clients_are_authenticated_and_members_attested(cluster, tmp_path):
    q, fs, head = _one_write(cluster, tmp_path)
    nxt = AnchorHead(head.epoch + 1, b"\x01" * 32)
    broker = cluster.client("broker")  # a valid certificate, but for another workload
    with pytest.raises(AnchorConflictError, match="may not write ledger 'records'"):
        broker.advance("records", head, nxt)
    st = sign_owner_statement(OwnerStatement("reanchor", "records", 0, b"\x00" * 32,
                                             tuple(m.member for m in broker.members())),
                              cluster.owner.private_pem())
    with pytest.raises(OwnerStatementError):
        broker.initialise(st)
    from safehold.broker.ca import WorkloadCA

    stranger = ClientIdentity(WorkloadCA.generate("another broker"), "records")
    with pytest.raises(AnchorUnavailableError):  # TLS refuses a certificate of another CA
        cluster.client(identity=stranger, timeout=1.0).advance("records", head, nxt)
    wrong = cluster.client(measurement="ab" * 48, timeout=1.0)  # the members are not this build
    with pytest.raises(AnchorUnavailableError):
        wrong.head("records")
    assert q.head("records").same(head)  # nothing moved
    fs.close()
    broker.close()
    q.close()


def test_operator_admin_client_certificate_named_records_or_broker_cannot_advance_or_initialise(
        cluster, tmp_path):
    """Operator attack: ``safehold broker client-cert --name records`` had the broker's workload
    CA (the CA the members pin) issue CN=records to a key that never was in a TEE; advancing
    ledger ``records`` by 1000 epochs with it was accepted, the records service became fatal
    (StoreRolledBackError) and the owner's checkpoint kept the forged head. The members now let
    only certificates with the attested-workload key purpose (KBS issuance, the broker's own
    ledger certificate) write; the admin certificate (clientAuth only) writes nothing."""
    import os

    q = cluster.client()  # the records service: a certificate as KBS issues it after appraisal
    cluster.wait_ready(q)
    engine = SqliteEngine(tmp_path / "records.db")
    fs = _fresh(engine, q, cluster)
    _put(fs, 1)
    head = q.head("records")
    members = tuple(m.member for m in q.members())
    honest_broker = cluster.client("broker")
    for cn in ("records", "broker"):
        # issued exactly as /admin/client-certificates issues it (WorkloadCA.issue, client_only)
        op = cluster.client(identity=ClientIdentity(cluster.ca, cn, attested=False))
        target = head if cn == "records" else AnchorHead(0, b"\x00" * 32)
        forged = AnchorHead(target.epoch + 1000, os.urandom(32))
        with pytest.raises(AnchorConflictError, match="not issued to an attested workload"):
            op.advance(cn, target, forged)
        # a genuine owner statement forwarded by the operator's certificate is refused too
        action = "reanchor" if cn == "records" else "initialise"
        st = sign_owner_statement(OwnerStatement(action, cn, forged.epoch, forged.digest, members),
                                  cluster.owner.private_pem())
        with pytest.raises(OwnerStatementError, match="not issued to an attested workload"):
            op.initialise(st)
        if cn == "broker":  # not applied: the broker's own certificate still applies it once
            with pytest.raises(AnchorLostError):  # a new anchor is in lost mode: no head yet
                q.head("broker")
            assert honest_broker.initialise(st).same(forged)
        op.close()
    assert q.head("records").same(head)  # the records ledger head is unchanged
    _put(fs, 2)  # and the records service keeps serving: no StoreRolledBackError
    fs.close()
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=q, policy=POLICY)
    assert fs.problem is None and fs.get(NS, b"rec-000002").value == b"value 2"
    fs.close()
    honest_broker.close()
    q.close()


def test_restore_while_stopped_is_refused_with_real_members(cluster, tmp_path):
    q = cluster.client()
    cluster.wait_ready(q)
    engine = SqliteEngine(tmp_path / "records.db")
    fs = _fresh(engine, q, cluster)
    _put(fs, 1)
    fs.close()
    token = engine.backup()
    fs = _fresh(engine, q, cluster)
    fs.delete(NS, b"rec-000001")
    fs.close()
    engine.restore_file(token)
    fs = FreshStore(engine.open(), ledger="records", mac_key=MAC_KEY, anchor=q, policy=POLICY)
    with pytest.raises(StoreRolledBackError):
        fs.get(NS, b"rec-000001")
    fs.close()
    q.close()


def test_a_hung_minority_member_does_not_stall_writes(cluster, tmp_path):
    import signal
    import time

    q = cluster.client(timeout=1.0)
    cluster.wait_ready(q)
    engine = SqliteEngine(tmp_path / "records.db")
    fs = _fresh(engine, q, cluster)
    _put(fs, 0)
    cluster.procs[2].send_signal(signal.SIGSTOP)  # alive but silent: the worst kind of minority
    try:
        t0 = time.monotonic()
        for i in range(1, 21):
            _put(fs, i)
        took = time.monotonic() - t0
        print("20 writes with a hung member:", round(took, 2), "s")
        assert took < 8  # one timeout, then the member is skipped
    finally:
        cluster.procs[2].send_signal(signal.SIGCONT)
    _put(fs, 21)
    assert fs.get(NS, b"rec-000021").value == b"value 21"
    fs.close()
    q.close()


def test_member_http_checks_status_codes_and_error_bodies(cluster, tmp_path):
    """The member's plain ASGI routes (``anchor/http.py``) keep the checks and answers the
    FastAPI routes had: body limit, JSON shape, ledger names, client certificates, 404 / 405."""
    import json

    from safehold.freshness.anchor.http import MAX_BODY
    from safehold.freshness.anchor.wire import head_to

    q, fs, head = _one_write(cluster, tmp_path)
    link = q.links[0]

    def ask(method, path, body=None, on=link):
        on.send(method, path, body)
        return on.receive()

    ok = json.dumps({"prev": head_to(head), "new": head_to(AnchorHead(head.epoch + 1, b"\x02" * 32))})
    status, obj = ask("POST", "/v1/anchor/advance/records", b" " * (MAX_BODY - len(ok) + 1) + ok.encode())
    assert (status, obj["status"], obj["reason"]) == (400, "refused", f"request body over {MAX_BODY} bytes")
    assert ask("POST", "/v1/anchor/advance/records", b"{nope")[1]["reason"] == "request body is not JSON"
    assert ask("POST", "/v1/anchor/advance/records", b"[]") == (
        400, {"status": "refused", "head": None, "reason": "expected {prev, new}"})
    assert ask("POST", "/v1/anchor/advance/records", b'{"prev": {}, "new": {}}')[0] == 400
    assert ask("POST", "/v1/anchor/advance/" + "r" * 129, ok.encode())[1]["reason"].startswith(
        "ledger name must be")
    assert ask("GET", "/v1/anchor/ledgers/" + "r" * 129)[0] == 400
    assert ask("POST", "/v1/anchor/owner", b"[]")[0] == 400
    assert ask("GET", "/v1/anchor/nothing") == (404, {"detail": "Not Found"})
    assert ask("GET", "/v1/anchor/advance/records") == (405, {"detail": "Method Not Allowed"})
    assert ask("POST", "/v1/anchor/ledgers/records", b"{}") == (405, {"detail": "Method Not Allowed"})
    status, obj = ask("GET", "/v1/anchor/ledgers/records")
    assert status == 200 and obj["status"] == "known" and obj["head"]["epoch"] == head.epoch
    from safehold.freshness.anchor.client import QuorumAnchor

    reader = QuorumAnchor(cluster.urls, cluster.verifier())
    status, obj = ask("POST", "/v1/anchor/advance/records", ok.encode(), on=reader.links[0])
    assert (status, obj["status"]) == (401, "refused") and "client certificate" in obj["reason"]
    assert ask("GET", "/v1/anchor/state", on=reader.links[0])[1]["ledgers"]["records"]["epoch"] == head.epoch
    assert q.head("records").same(head)  # nothing of the above moved the head
    reader.close()
    fs.close()
    q.close()
