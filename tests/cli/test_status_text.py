"""`safehold status` text: anchor members that started in lost mode (every member after a
`safehold up`, re-anchored by the owner) are ready; the line said "3/3 members ready (3 in lost
mode)", which reads as if they were still lost. `safehold freshness status` words it "started
in lost mode"."""

from __future__ import annotations

from click.testing import CliRunner

from safehold.cli import status as cli_status
from safehold.cli.main import cli


def test_members_that_started_in_lost_mode_are_worded_as_freshness_status_does(monkeypatch):
    st = {"broker": {"ok": True, "url": "https://b", "status": {"mode": "ready"}},
          "records": {"attested": True, "url": "https://r", "tee_type": "simulated",
                      "measurement": "d4e3" * 24, "records": 3},
          "freshness": {"member_urls": ["a", "b", "c"],
                        "members": [{"ready": True, "lost_mode": True}] * 3,
                        "ledgers": {"records": {"committed_epoch": 5, "anchored_epoch": 5,
                                                "checkpoint_epoch": 4, "serving": True}}}}
    monkeypatch.setattr(cli_status, "stack_status", lambda *a, **k: st)
    r = CliRunner().invoke(cli, ["status"])
    assert r.exit_code == 0, r.output
    assert "anchor   3/3 members ready, 3 started in lost mode\n" in r.output


def test_a_ledger_without_a_checkpoint_says_so(monkeypatch):
    """A fresh stack's records ledger has no checkpoint yet: it printed "checkpoint None"."""
    st = {"broker": {"ok": True, "url": "https://b", "status": {"mode": "ready"}},
          "records": {"attested": True, "url": "https://r", "records": 0},
          "freshness": {"member_urls": ["a"], "members": [{"ready": True}],
                        "ledgers": {"records": {"committed_epoch": 7, "anchored_epoch": 7,
                                                "checkpoint_epoch": None, "serving": True}}}}
    monkeypatch.setattr(cli_status, "stack_status", lambda *a, **k: st)
    r = CliRunner().invoke(cli, ["status"])
    assert "  records  committed epoch 7, anchored 7, checkpoint none yet\n" in r.output


def test_freshness_status_says_none_yet_too(monkeypatch):
    import safehold.devstack.anchor as dev_anchor

    st = {"member_urls": ["a"], "members": [{"ready": True, "lost_mode": False}],
          "ledgers": {"records": {"committed_epoch": 7, "anchored_epoch": 7,
                                  "checkpoint_epoch": None, "serving": True}}}
    monkeypatch.setattr(dev_anchor, "freshness_status", lambda *a, **k: st)
    r = CliRunner().invoke(cli, ["freshness", "status"])
    assert r.exit_code == 0, r.output
    assert "records  committed 7  anchored 7  checkpoint none yet  serving" in r.output
