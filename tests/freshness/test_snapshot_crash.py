"""A process killed while a snapshot's garbage collection deletes the journal (step 4 of
docs/freshness.md "Snapshots", in batches of separate transactions) must leave a journal the
next start replays."""

from __future__ import annotations

from safehold.freshness import snapshot as snapmod
from safehold.freshness.journal import JOURNAL_NS
from safehold.freshness.snapshot import Snapshotter
from tests.support.freshness import open_fresh

NS = "records:patients"


def k(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


class _Killed(Exception):
    """Stands for the process dying between two journal-deletion transactions."""


def test_kill_between_journal_deletion_batches_leaves_a_replayable_journal(engine, anchor, monkeypatch):
    fs = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, snapshot_bytes=0)
    for i in range(12):
        fs.put(NS, k(i), b"v%d" % i, expected_version=0)
    fs.sync()
    monkeypatch.setattr(snapmod, "_BATCH", 3)
    real = Snapshotter._delete_journal

    def one_batch_then_die(self: Snapshotter, *, upto: int, start: int) -> None:
        real(self, upto=min(upto, max(start, 1) + 2), start=start)  # the first batch commits
        raise _Killed("process killed during the journal deletion")

    monkeypatch.setattr(Snapshotter, "_delete_journal", one_batch_then_die)
    assert fs.snapshotter.run() is False and isinstance(fs.snapshotter.last_error, _Killed)
    epochs = [int.from_bytes(r.key, "big") for r in fs.inner.scan_all(JOURNAL_NS)]
    assert epochs[0] == 4  # entries 1..3 gone, the rest of the snapshot's range still there
    head = fs.state.committed
    fs.close()
    monkeypatch.setattr(Snapshotter, "_delete_journal", real)

    fs = open_fresh(engine.open(), anchor, snapshot_every=0, snapshot_seconds=0, snapshot_bytes=0)
    try:
        assert fs.problem is None, fs.problem
        fs.check()
        assert fs.state.committed == head
        assert [fs.get(NS, k(i)).value for i in range(12)] == [b"v%d" % i for i in range(12)]
        fs.put(NS, k(99), b"w", expected_version=0)
        assert fs.snapshotter.run() is True  # the next snapshot collects what was left
        assert fs.audit() == []
    finally:
        fs.close()
    fs = open_fresh(engine.open(), anchor)
    try:
        assert fs.problem is None and fs.get(NS, k(99)).value == b"w"
    finally:
        fs.close()
