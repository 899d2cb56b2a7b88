"""SVR3 (DB4) end to end through the client SDK and three in-process services (each its own
SQLite file and its own anchor TEST DOUBLE), and one server's rules in the core."""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from safehold.client.svr import Svr3Client
from safehold.crypto import oprf
from safehold.svr import db4
from safehold.svr.errors import BackupMissingError, PinMismatchError, RecoveryFailedError
from safehold.svr.protocol import ZERO_TOKEN, Status, backup_id
from tests.support.svr import TEST_ARGON2, USER_TOKEN, SyncAsgiTransport, TamperingTransport

SECRET = b"export key \x00\x01\x02 of patient-1"


class Recorder(httpx.BaseTransport):
    """Keeps every (path, JSON answer) a server gave the client."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.seen = inner, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        resp.read()
        self.seen.append((request.url.path, resp.json()))
        return resp


def _client(apps, wrap=None, **kw) -> Svr3Client:
    ts = [SyncAsgiTransport(a) for a in apps]
    if wrap:
        ts = [wrap(i, t) for i, t in enumerate(ts)]
    return Svr3Client([f"https://svr-{i}.test" for i in range(len(apps))], token=USER_TOKEN,
                      transports=ts, argon2=kw.pop("argon2", TEST_ARGON2), **kw)


def test_backup_restore_and_refill(svr3):
    assert svr3.backup("2468", SECRET, max_tries=4) == 4
    states = svr3.query()
    assert [s.server for s in states] == ["svr-0", "svr-1", "svr-2"]
    assert {(s.status, s.tries, s.max_tries) for s in states} == {("OK", 4, 4)}
    assert len({s.version for s in states}) == 1
    with pytest.raises(PinMismatchError) as e:
        svr3.restore("1357")
    assert e.value.tries == 3
    assert {s.tries for s in svr3.query()} == {3}  # charged on every server
    assert svr3.restore("2468") == SECRET
    after = svr3.query()
    assert {s.tries for s in after} == {4} and after[0].version != states[0].version  # fresh shares
    assert svr3.restore("2468", refill=False) == SECRET
    assert {s.tries for s in svr3.query()} == {3}


def test_max_tries_guesses_and_the_last_one_still_counts(svr3):
    svr3.backup("2468", SECRET, max_tries=3)
    for left in (2, 1):
        with pytest.raises(PinMismatchError) as e:
            svr3.restore("0000")
        assert e.value.tries == left
    # the third (last allowed) guess is still evaluated, as in DB4: right PIN → recovered,
    # and the shares are erased all the same
    assert svr3.restore("2468", refill=False) == SECRET
    assert {s.status for s in svr3.query()} == {"MISSING"}
    with pytest.raises(BackupMissingError):
        svr3.restore("2468")


def test_last_wrong_guess_reports_the_erasure(svr3):
    svr3.backup("2468", SECRET, max_tries=1)
    with pytest.raises(BackupMissingError, match="last allowed guess"):
        svr3.restore("1111")
    with pytest.raises(BackupMissingError):
        svr3.restore("2468")


def test_production_argon2_round_trip(trio):
    _, apps = trio
    with _client(apps, argon2=__import__("safehold.svr.pin", fromlist=["x"]).SIGNAL_ARGON2) as c:
        c.backup("583920", SECRET, max_tries=2)
        assert c.restore("583920") == SECRET


def test_one_server_missing_fails_before_any_guess(trio, svr3):
    services, _ = trio
    svr3.backup("2468", SECRET, max_tries=5)
    services[1].svr3.remove(backup_id("patient-1", "default"))
    with pytest.raises(BackupMissingError, match="svr-1"):
        svr3.restore("2468")
    assert [s.tries for s in svr3.query()] == [5, 0, 5]  # nothing charged


def test_one_server_answering_wrongly_looks_exactly_like_a_wrong_pin(trio):
    """n-of-n: a wrong share evaluation from one server (a compromised server; the network
    cannot alter RA-TLS) and a wrong PIN give the client the same answers and the same error;
    no server releases its share in either case, and which PIN digit was wrong never shows."""
    _, apps = trio

    def corrupt(obj):
        el = base64.b64decode(obj["element"])
        wrong = oprf.element_add(el, oprf.scalar_mult_base(oprf.random_scalar()))
        obj["element"] = base64.b64encode(wrong).decode()
        return obj

    recorders: list[Recorder] = []

    def wrap_record(i, t):
        rec = Recorder(t)
        recorders.append(rec)
        return rec

    with _client(apps) as c:
        c.backup("2468", SECRET, max_tries=20)

    def observe(pin, tamper: bool):
        recorders.clear()

        def wrap(i, t):
            bad = tamper and i == 2
            return wrap_record(i, TamperingTransport(t, "/v1/svr3/restore1", corrupt) if bad else t)

        with _client(apps, wrap) as c, pytest.raises(PinMismatchError) as e:
            c.restore(pin)
        r2 = [[ans for path, ans in rec.seen if path == "/v1/svr3/restore2"] for rec in recorders]
        return re.sub(r"\d+ tries", "N tries", str(e.value)), r2

    outcomes = [observe("2468", tamper=True)]
    outcomes += [observe(p, tamper=False) for p in ("2469", "2478", "2568", "3468", "9999")]
    messages = {m for m, _ in outcomes}
    assert len(messages) == 1
    for _, r2 in outcomes:
        assert [[a["status"] for a in answers] for answers in r2] == [["ERROR"]] * 3
        assert all(a["encryption_share"] == "" and a["sealed"] == "" for answers in r2 for a in answers)
    with _client(apps) as c:
        assert {s.tries for s in c.query()} == {14}  # every attempt charged on every server
        assert c.restore("2468") == SECRET


def test_servers_holding_different_versions_refuse_before_guessing(trio, svr3):
    services, _ = trio
    svr3.backup("2468", SECRET, max_tries=5)
    bid = backup_id("patient-1", "default")
    # an interrupted second backup reached only svr-0
    s0 = services[0].svr3
    q = s0.query(bid)
    shares = db4.split(1)
    s0.create(bid, version=q.version + 1 if q.version < 2**32 - 1 else 1, max_tries=5,
              oprf_share=shares.oprf_shares[0], zero_share=oprf.random_scalar(),
              encryption_share=bytes(32), auth_commitment=oprf.scalar_mult_base(oprf.random_scalar()),
              sealed=b"x" * 40, token=q.token)
    with pytest.raises(RecoveryFailedError, match="different versions"):
        svr3.restore("2468")
    assert {s.tries for s in svr3.query()} == {5}
    svr3.backup("2468", SECRET, max_tries=5)  # backing up again repairs it
    assert svr3.restore("2468") == SECRET


def test_labels_and_principals_are_separate_backups(trio):
    _, apps = trio
    with _client(apps) as a:
        a.backup("1111", b"one", label="export", max_tries=3)
        a.backup("2222", b"two", label="device", max_tries=3)
        assert a.restore("1111", label="export") == b"one"
        assert a.restore("2222", label="device") == b"two"
    other = Svr3Client([f"https://svr-{i}.test" for i in range(3)], token="user-token-2",
                       transports=[SyncAsgiTransport(x) for x in apps], argon2=TEST_ARGON2)
    with other, pytest.raises(BackupMissingError):
        other.restore("1111", label="export")  # patient-2 cannot even reach patient-1's backup


def test_delete_removes_every_share(svr3):
    svr3.backup("2468", SECRET)
    svr3.delete()
    assert {s.status for s in svr3.query()} == {"MISSING"}


# --- one server's rules (the core) ---------------------------------------------------------------

BID = backup_id("patient-1", "default")


def _create(svc, tries=5, version=7, token=None):
    shares = db4.split(1)
    sk = oprf.random_scalar()
    a = svc.svr3.create(BID, version=version, max_tries=tries, oprf_share=shares.oprf_shares[0],
                        zero_share=shares.zero_shares[0], encryption_share=b"\x05" * 32,
                        auth_commitment=db4.auth_commitment(sk), sealed=b"s" * 30,
                        token=svc.svr3.query(BID).token if token is None else token)
    return a, sk, shares


def test_restore2_needs_a_live_single_use_session_and_a_valid_proof(service):
    a, sk, _ = _create(service)
    assert a.status == Status.OK
    b = oprf.blind([b"pin"]).elements[0]
    r1 = service.svr3.restore1(BID, b)
    assert (r1.status, r1.tries, r1.version) == (Status.OK, 4, 7)
    bad_point, bad_scalar = db4.prove(oprf.random_scalar(), b, r1.session)
    assert service.svr3.restore2(BID, session=r1.session, version=7, auth_point=bad_point,
                                 auth_scalar=bad_scalar).status == Status.ERROR
    point, scalar = db4.prove(sk, b, r1.session)  # the session was used up by the failed try
    assert service.svr3.restore2(BID, session=r1.session, version=7, auth_point=point,
                                 auth_scalar=scalar).status == Status.RESTORE1_MISSING
    r1 = service.svr3.restore1(BID, b)
    point, scalar = db4.prove(sk, b, r1.session)
    assert service.svr3.restore2(BID, session=r1.session, version=8, auth_point=point,
                                 auth_scalar=scalar).status == Status.VERSION_MISMATCH
    r1 = service.svr3.restore1(BID, b)
    point, scalar = db4.prove(sk, b, r1.session)
    other = backup_id("patient-2", "default")
    assert service.svr3.restore2(other, session=r1.session, version=7, auth_point=point,
                                 auth_scalar=scalar).status == Status.RESTORE1_MISSING
    r1 = service.svr3.restore1(BID, b)
    point, scalar = db4.prove(sk, b, r1.session)
    ok = service.svr3.restore2(BID, session=r1.session, version=7, auth_point=point, auth_scalar=scalar)
    assert (ok.status, ok.encryption_share, ok.sealed) == (Status.OK, b"\x05" * 32, b"s" * 30)
    # a proof for one session does not open another
    r1b = service.svr3.restore1(BID, b)
    assert r1b.status == Status.MISSING or service.svr3.restore2(
        BID, session=r1b.session, version=7, auth_point=point, auth_scalar=scalar).status == Status.ERROR


def test_create_token_rules(service):
    assert _create(service, token=ZERO_TOKEN)[0].status == Status.OK
    assert _create(service, token=ZERO_TOKEN)[0].status == Status.ALREADY_EXISTS
    assert _create(service)[0].status == Status.OK


@pytest.mark.parametrize("field", ["oprf_share", "zero_share", "auth_commitment", "version", "max_tries"])
def test_create_refuses_malformed_shares(service, field):
    from safehold.svr.errors import InvalidRequestError

    kw = dict(version=1, max_tries=5, oprf_share=oprf.random_scalar(), zero_share=oprf.random_scalar(),
              encryption_share=bytes(32), auth_commitment=oprf.scalar_mult_base(oprf.random_scalar()),
              sealed=b"s" * 20, token=ZERO_TOKEN)
    kw[field] = {"oprf_share": bytes(32), "zero_share": b"\xff" * 32, "auth_commitment": bytes(32),
                 "version": 0, "max_tries": 300}[field]
    with pytest.raises(InvalidRequestError):
        service.svr3.create(BID, **kw)


def test_restore1_refuses_a_bad_element_before_charging(service):
    from safehold.svr.errors import InvalidRequestError

    _create(service)
    with pytest.raises(InvalidRequestError):
        service.svr3.restore1(BID, bytes(32))
    assert service.svr3.query(BID).tries == 5
