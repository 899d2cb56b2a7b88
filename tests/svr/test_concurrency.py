"""50 parallel wrong guesses never consume more than the limit, nor get more answers than
tries: on a real SQLite file and the real PostgreSQL server, SVR2 and SVR3, one thread per
guess released together (the process test repeats it over RA-TLS)."""

from __future__ import annotations

import threading
from collections import Counter

from safehold.crypto import oprf
from safehold.svr import db4
from safehold.svr.protocol import ZERO_TOKEN, Status, backup_id

BID = backup_id("patient-1", "default")
GUESSES = 50
LIMIT = 10


def _race(fn, n=GUESSES):
    start = threading.Barrier(n)
    out, errors = [None] * n, []

    def run(i):
        start.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def test_svr2_parallel_wrong_guesses(service):
    data, pin = b"\x01" * 40, b"\xaa" * 32
    service.svr2.backup(BID, data, pin, LIMIT, ZERO_TOKEN)
    service.svr2.expose(BID, data)
    epoch = service.fresh.state.committed.epoch
    answers = _race(lambda i: service.svr2.restore(BID, bytes([i]) * 32))
    counts = Counter(a.status for a in answers)
    mismatches = sorted(a.tries for a in answers if a.status == Status.PIN_MISMATCH)
    # each of the 10 charged guesses got a distinct answer; the 10th erased the backup
    assert mismatches == list(range(1, LIMIT))
    assert counts == {Status.PIN_MISMATCH: LIMIT - 1, Status.MISSING: GUESSES - LIMIT + 1}
    assert service.fresh.state.committed.epoch == epoch + LIMIT  # exactly 10 charged writes
    assert service.svr2.restore(BID, pin).status == Status.MISSING


def test_svr3_parallel_evaluations(service):
    shares = db4.split(1)
    service.svr3.create(BID, version=1, max_tries=LIMIT, oprf_share=shares.oprf_shares[0],
                        zero_share=shares.zero_shares[0], encryption_share=bytes(32),
                        auth_commitment=oprf.scalar_mult_base(oprf.random_scalar()), sealed=b"s" * 20,
                        token=ZERO_TOKEN)
    blinded = [oprf.blind([b"guess %d" % i]).elements[0] for i in range(GUESSES)]
    answers = _race(lambda i: service.svr3.restore1(BID, blinded[i]))
    evaluated = [a for a in answers if a.status == Status.OK]
    assert len(evaluated) == LIMIT  # no more evaluations than tries
    assert sorted(a.tries for a in evaluated) == list(range(LIMIT))
    assert len({a.session for a in evaluated}) == LIMIT
    assert sum(a.status == Status.MISSING for a in answers) == GUESSES - LIMIT
    assert service.svr3.query(BID).status == Status.MISSING
