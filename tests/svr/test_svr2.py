"""SVR2 semantics of the service core on a real SQLite file and the real PostgreSQL server
(freshness anchored by the in-process TEST DOUBLE of the anchor members)."""

from __future__ import annotations

import os

import pytest

from safehold.svr.protocol import ZERO_TOKEN, Status, backup_id
from safehold.svr.rows import Svr2Row, decode_row
from tests.support.svr import open_service

BID = backup_id("patient-1", "default")
DATA = b"\x01" * 48
PIN = b"\xaa" * 32
WRONG = b"\xbb" * 32


def _backup(svc, tries=10, data=DATA, pin=PIN):
    q = svc.svr2.query(BID)
    a = svc.svr2.backup(BID, data, pin, tries, q.token)
    assert a.status == Status.OK
    assert svc.svr2.expose(BID, data).status == Status.OK
    return a


def test_backup_expose_restore(service):
    q = service.svr2.query(BID)
    assert (q.status, q.tries, q.exposed, q.token) == (Status.MISSING, 0, False, ZERO_TOKEN)
    a = service.svr2.backup(BID, DATA, PIN, 5, ZERO_TOKEN)
    assert a.status == Status.OK and a.token != ZERO_TOKEN
    q = service.svr2.query(BID)
    assert (q.status, q.tries, q.max_tries, q.exposed) == (Status.OK, 5, 5, False)
    # two-phase: not restorable before expose, and asking charges nothing
    assert service.svr2.restore(BID, PIN).status == Status.MISSING
    assert service.svr2.query(BID).tries == 5
    assert service.svr2.expose(BID, b"\x02" * 48).status == Status.ERROR  # not the data backed up
    assert service.svr2.expose(BID, DATA).status == Status.OK
    assert service.svr2.expose(BID, DATA).status == Status.OK  # a retry is fine
    r = service.svr2.restore(BID, PIN)
    assert (r.status, r.tries, r.data) == (Status.OK, 5, DATA)


def test_wrong_guesses_count_down_and_the_last_erases(service):
    _backup(service, tries=3)
    r = service.svr2.restore(BID, WRONG)
    assert (r.status, r.tries, r.data) == (Status.PIN_MISMATCH, 2, b"")
    assert service.svr2.restore(BID, PIN).tries == 2  # a success does not refill
    assert service.svr2.restore(BID, WRONG).tries == 1
    r = service.svr2.restore(BID, WRONG)
    assert (r.status, r.tries) == (Status.MISSING, 0)
    assert service.svr2.restore(BID, PIN).status == Status.MISSING  # gone, even with the right PIN
    assert service.svr2.query(BID).status == Status.MISSING
    row, _ = service.svr2.table.read(BID)
    assert row.state == "empty" and row.data == b"" and row.access_key == b""  # secrets erased


def test_every_restore_is_one_anchored_write(service):
    _backup(service)
    fs = service.fresh
    for guess in (WRONG, PIN, WRONG):
        before = fs.state.committed.epoch
        service.svr2.restore(BID, guess)
        st = fs.status()
        # one journal entry per guess, right or wrong, anchored before the call returned
        assert st["committed_epoch"] == before + 1 == st["anchored_epoch"]


def test_a_charged_guess_survives_a_restart(engine, anchor):
    svc = open_service(engine.open(), anchor)
    _backup(svc, tries=4)
    assert svc.svr2.restore(BID, WRONG).tries == 3
    svc.close()  # the process is gone; what it answered must be in the database and the anchor
    svc = open_service(engine.open(), anchor)
    svc.fresh.check()
    assert svc.svr2.query(BID).tries == 3
    svc.close()


def test_a_replayed_backup_cannot_reset_tries(service):
    first_token = service.svr2.query(BID).token
    service.svr2.backup(BID, DATA, PIN, 10, first_token)
    service.svr2.expose(BID, DATA)
    for _ in range(4):
        service.svr2.restore(BID, WRONG)
    assert service.svr2.query(BID).tries == 6
    # the network held the original request back and delivers it now: refused
    again = service.svr2.backup(BID, DATA, PIN, 10, first_token)
    assert again.status == Status.ALREADY_EXISTS
    assert service.svr2.query(BID).tries == 6
    assert service.svr2.expose(BID, DATA).status == Status.OK  # and expose adds nothing
    assert service.svr2.query(BID).tries == 6


def test_a_held_back_first_backup_cannot_resurrect_an_erased_backup(service):
    service.svr2.backup(BID, DATA, PIN, 2, ZERO_TOKEN)
    service.svr2.expose(BID, DATA)
    service.svr2.restore(BID, WRONG)
    assert service.svr2.restore(BID, WRONG).status == Status.MISSING  # erased
    assert service.svr2.backup(BID, DATA, PIN, 2, ZERO_TOKEN).status == Status.ALREADY_EXISTS
    assert service.svr2.query(BID).status == Status.MISSING


def test_delete_erases_and_blocks_old_requests(service):
    token = service.svr2.query(BID).token
    service.svr2.delete(BID)  # even before any backup: the id now has a token
    assert service.svr2.backup(BID, DATA, PIN, 5, token).status == Status.ALREADY_EXISTS
    _backup(service)
    service.svr2.delete(BID)
    assert service.svr2.restore(BID, PIN).status == Status.MISSING
    assert service.svr2.expose(BID, DATA).status == Status.ERROR


def test_backup_replaces_with_the_current_token(service):
    _backup(service, tries=3)
    service.svr2.restore(BID, WRONG)
    q = service.svr2.query(BID)
    assert service.svr2.backup(BID, b"\x03" * 20, PIN, 7, q.token).status == Status.OK
    assert service.svr2.restore(BID, PIN).status == Status.MISSING  # the new one is not exposed yet
    assert service.svr2.expose(BID, b"\x03" * 20).status == Status.OK
    r = service.svr2.restore(BID, PIN)
    assert (r.tries, r.data) == (7, b"\x03" * 20)


@pytest.mark.parametrize(("args", "field"), [
    ((BID, b"x" * 16, PIN, 5, ZERO_TOKEN), "data"),
    ((BID, b"x" * 273, PIN, 5, ZERO_TOKEN), "data"),
    ((BID, DATA, PIN[:31], 5, ZERO_TOKEN), "pin"),
    ((BID, DATA, PIN, 0, ZERO_TOKEN), "max_tries"),
    ((BID, DATA, PIN, 256, ZERO_TOKEN), "max_tries"),
    ((BID, DATA, PIN, 5, ZERO_TOKEN[:8]), "token"),
    ((BID[:8], DATA, PIN, 5, ZERO_TOKEN), "backup id"),
])
def test_malformed_requests_are_refused_before_anything_is_read(service, args, field):
    from safehold.svr.errors import InvalidRequestError

    before = service.fresh.state.committed.epoch
    with pytest.raises(InvalidRequestError, match=field):
        service.svr2.backup(*args)
    assert service.fresh.state.committed.epoch == before


def test_the_database_holds_no_secret_or_backup_id(engine, anchor):
    svc = open_service(engine.open(), anchor)
    data, pin = os.urandom(40), os.urandom(32)
    svc.svr2.backup(BID, data, pin, 9, ZERO_TOKEN)
    svc.svr2.expose(BID, data)
    svc.svr2.restore(BID, os.urandom(32))
    svc.close()
    with engine.open() as store:
        raw = b"".join(r.key + r.value for ns in ("svr:svr2", "svr:_namespaces") for r in store.scan_all(ns))
        journal = [r.value for r in store.scan_all("_fresh.journal")]
    assert raw and len(journal) >= 3
    blob = raw + b"".join(journal)
    for needle in (data, pin, BID, BID.hex().encode(), data[:16], pin[:16]):
        assert needle not in blob
    # and the row is the engine's envelope: it opens only with the service's keys
    svc = open_service(engine.open(), anchor)
    row, _ = svc.svr2.table.read(BID)
    assert isinstance(row, Svr2Row) and row.tries == 8 and row.access_key == pin
    svc.close()


def test_row_codec_refuses_other_shapes():
    from safehold.svr.errors import SvrStateError

    for raw in (b"{}", b"[]", b'{"v":2}', b"not json"):
        with pytest.raises(SvrStateError):
            decode_row(Svr2Row, raw, "svr2/00")
