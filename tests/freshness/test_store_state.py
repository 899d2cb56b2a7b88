"""Whole-store attacks and recovery on both engines, with the in-process anchor TEST DOUBLE:
restore from an earlier copy (running and stopped), a fork onto two copies, the crash between
COMMIT and anchor advance, the anchor losing its majority, the owner's re-anchoring."""

from __future__ import annotations

import json

import pytest

from safehold.freshness.anchor.core import MemberCore
from safehold.freshness.anchor.statements import (
    AnchorCheckpoint,
    check_against_checkpoint,
    sign_owner_statement,
)
from safehold.freshness.errors import (
    AnchorLostError,
    AnchorUnavailableError,
    LedgerUninitialisedError,
    NotAnchoredError,
    OwnerStatementError,
    RowRestoredError,
    RowRolledBackError,
    StoreForkedError,
    StoreRolledBackError,
)
from safehold.freshness.journal import JOURNAL_NS
from safehold.freshness.recovery import statement_for
from tests.support.freshness import SqliteEngine, open_fresh

NS = "broker:state"


def k(i: int) -> bytes:
    return b"row-%04d" % i


def write(fs, start: int, n: int, value: bytes = b"v") -> None:
    for i in range(start, start + n):
        row = fs.get(NS, k(i))
        fs.put(NS, k(i), value + b"%d" % i, expected_version=0 if row is None else row.version)


def test_new_store_needs_the_owner(engine, anchor):
    fs = open_fresh(engine.open(), anchor, initialise=False)
    with pytest.raises(LedgerUninitialisedError, match="data owner must initialise"):
        fs.get(NS, k(1))
    st = statement_for(fs, "initialise")
    other = sign_owner_statement(st, type(anchor.owner)().private_pem())  # someone else's key
    with pytest.raises(OwnerStatementError, match="not signed by the pinned owner key"):
        fs.reanchor(other)
    fs.reanchor(anchor.sign_for(fs))
    write(fs, 0, 3)
    assert fs.get(NS, k(2)).value == b"v2"
    fs.close()


def test_whole_store_restored_while_stopped(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 10)
    fs.delete(NS, k(3))  # e.g. a revocation
    fs.close()
    token = engine.backup()
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 5, b"newer")
    fs.delete(NS, k(7))
    fs.close()
    engine.restore_file(token)
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(StoreRolledBackError) as e:
        fs.check()
    assert "behind the anchor" in str(e.value) and e.value.store_epoch < e.value.anchor_epoch
    with pytest.raises(StoreRolledBackError):
        fs.get(NS, k(7))  # nothing is served, not even a row the copy has right
    with pytest.raises(StoreRolledBackError):
        fs.put(NS, k(50), b"x", expected_version=0)
    fs.close()


def test_whole_store_restored_while_running(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 10)
    token = engine.backup()
    write(fs, 0, 10, b"newer")
    fs.delete(NS, k(4))
    engine.restore(token)  # the operator swaps the rows under the running service
    with pytest.raises(RowRolledBackError):
        fs.get(NS, k(1))
    with pytest.raises(RowRestoredError):
        fs.get(NS, k(4))
    assert len(fs.audit()) == 10
    fs.close()
    fs = open_fresh(engine.open(), anchor)  # the journal came back with the copy
    with pytest.raises(StoreRolledBackError):
        fs.check()
    fs.close()


def test_fork_two_copies_one_anchor(engine, anchor, tmp_path):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 5)
    fs.close()
    other = SqliteEngine(tmp_path / "copy.db")
    token = engine.backup()
    if engine.name == "sqlite":
        other.restore_file(token)
    else:  # copy the schema's rows into a SQLite file: another database with the same history
        import psycopg

        with psycopg.connect(engine.dsn) as c:
            q = (f'SELECT n.name, b.key, b.version, b.value FROM "{engine.schema}".{token} b '
                 f'JOIN "{engine.schema}".safehold_namespaces n ON n.id = b.ns')
            rows = c.execute(q).fetchall()
        other.open().close()
        for r in rows:  # the copy's namespace ids are its own: map by name
            other.sql("INSERT INTO safehold_namespaces (name) "
                      "VALUES (?) ON CONFLICT (name) DO NOTHING", (r[0],))
            other.sql("INSERT INTO safehold_rows "
                      "VALUES ((SELECT id FROM safehold_namespaces WHERE name = ?), ?, ?, ?)", tuple(r))
    a = open_fresh(engine.open(), anchor)
    b = open_fresh(other.open(), anchor)
    a.check()
    b.check()  # both are at the anchor's head: identical so far
    write(a, 0, 1, b"history-a")
    with pytest.raises(StoreForkedError):  # b's next commit meets a's head at the anchor
        write(b, 0, 1, b"history-b")
    with pytest.raises(StoreForkedError):
        b.get(NS, k(0))
    a.close()
    b.close()
    b = open_fresh(other.open(), anchor)  # its journal names another entry at that epoch
    with pytest.raises((StoreForkedError, StoreRolledBackError)):
        b.check()
    b.close()


def test_crash_between_commit_and_anchor_rolls_forward(engine, anchor):
    fs = open_fresh(engine.open(), anchor, wait_timeout=0.3)
    write(fs, 0, 3)
    cores = list(anchor.cores)
    anchor.cores = [None, None, cores[2]]  # the anchor does not answer
    with pytest.raises(NotAnchoredError, match="stored .* not yet anchored"):
        fs.put(NS, k(10), b"unacknowledged", expected_version=0)
    with pytest.raises(AnchorUnavailableError, match="not written"):  # no second unanchored write
        fs.put(NS, k(11), b"refused", expected_version=0)
    with pytest.raises(NotAnchoredError):  # the stored value is not served before it is anchored
        fs.get(NS, k(10))
    assert fs.get(NS, k(1)).value == b"v1"  # other rows are
    fs.close()  # "crash": the process goes, the entry stays in the database
    anchor.cores = cores
    fs = open_fresh(engine.open(), anchor)
    fs.check()  # no false alarm: rolled forward
    assert fs.get(NS, k(10)).value == b"unacknowledged"
    assert fs.get(NS, k(11)) is None
    assert fs.status()["unanchored"] == 0
    fs.close()


def test_anchor_recovers_while_running(engine, anchor):
    fs = open_fresh(engine.open(), anchor, wait_timeout=0.3)
    cores = list(anchor.cores)
    anchor.cores = [None, None, cores[2]]
    with pytest.raises(NotAnchoredError):
        fs.put(NS, k(1), b"x", expected_version=0)
    anchor.cores = cores
    assert fs.state.wait_anchored(fs.state.committed.epoch, 5.0)  # the anchorer retries
    assert fs.get(NS, k(1)).value == b"x"
    fs.put(NS, k(2), b"y", expected_version=0)
    fs.close()


def test_minority_loss_changes_nothing_and_restart_catches_up(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    anchor.kill(0)
    write(fs, 0, 5)
    assert anchor.restart(0)  # empty, catches up from the two others
    anchor.kill(1)
    write(fs, 5, 5)
    assert anchor.restart(1)
    anchor.kill(2)
    fs.close()
    fs = open_fresh(engine.open(), anchor)
    fs.check()
    assert fs.get(NS, k(9)).value == b"v9"
    fs.close()


def test_majority_loss_then_owner_reanchors(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 5)
    fs.close()
    anchor.kill(0)
    anchor.kill(1)
    anchor.cores[0] = MemberCore(3, anchor.owner.public)  # two empty members start
    anchor.cores[1] = MemberCore(3, anchor.owner.public)
    # member 0 sees member 1 catching up too: two of three have no state, the heads are lost
    assert anchor.catch_up(0) and anchor.cores[0].lost_mode
    # member 1 sees two ready members, one of them lost: what member 2 holds is not enough
    assert anchor.catch_up(1) and anchor.cores[1].lost_mode
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(AnchorLostError, match="re-anchor"):
        fs.check()
    with pytest.raises(AnchorLostError):
        fs.get(NS, k(1))
    proposal = fs.reanchor_proposal()
    assert proposal["rows"] == 5 and proposal["epoch"] == fs.state.committed.epoch
    signed = anchor.sign_for(fs, "reanchor")
    head = fs.reanchor(signed)
    assert head.epoch == proposal["epoch"]
    assert fs.get(NS, k(4)).value == b"v4"
    # the re-anchoring is in the hash chain: the journal's newest entry carries the statement
    last = list(fs.inner.scan_all(JOURNAL_NS))[-1]
    assert b"owner-statement" in last.value
    with pytest.raises(OwnerStatementError):  # the same statement cannot be applied again
        anchor.initialise(signed)
    fs.close()


def test_owner_statement_is_bound_to_member_incarnations(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 2)
    stale = sign_owner_statement(statement_for(fs, "reanchor"), anchor.owner.private_pem())
    anchor.cores = [MemberCore(3, anchor.owner.public) for _ in range(3)]  # all three restarted
    for i in range(3):
        anchor.catch_up(i)
    fs.close()
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(AnchorLostError):
        fs.check()
    with pytest.raises(OwnerStatementError, match="not addressed to this member incarnation"):
        fs.reanchor(stale)  # signed before the restart: replay refused
    fs.reanchor(anchor.sign_for(fs, "reanchor"))
    fs.close()


def test_owner_checkpoint_refuses_an_older_head(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 3)
    fs.close()
    token = engine.backup()
    fs = open_fresh(engine.open(), anchor)
    write(fs, 3, 3)
    cp = AnchorCheckpoint("records", anchor.head("records"))
    assert AnchorCheckpoint.from_json(json.loads(json.dumps(cp.to_json()))).head == cp.head
    fs.close()
    engine.restore_file(token)  # restored while "the stack was stopped"
    anchor.cores = [MemberCore(3, anchor.owner.public) for _ in anchor.cores]  # and the anchor lost
    for i in range(3):
        anchor.catch_up(i)
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(AnchorLostError):
        fs.check()
    candidate = statement_for(fs, "reanchor").head()
    with pytest.raises(StoreRolledBackError, match="older than the owner's checkpoint"):
        check_against_checkpoint("records", candidate, cp)
    check_against_checkpoint("records", candidate, cp, accept_rollback=True)  # explicit only
    fs.close()


def test_anchor_unavailable_at_start_then_recover(engine, anchor):
    fs = open_fresh(engine.open(), anchor)
    write(fs, 0, 2)
    fs.close()
    cores = list(anchor.cores)
    anchor.cores = [cores[0], None, None]  # one member of three answers: no majority
    fs = open_fresh(engine.open(), anchor)
    with pytest.raises(AnchorUnavailableError, match="1 of 3 members answered"):
        fs.get(NS, k(1))
    anchor.cores = cores
    fs.recover()
    assert fs.get(NS, k(1)).value == b"v1"
    fs.close()
