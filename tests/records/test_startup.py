"""Issue 17: start-up is not O(database size). The SQLite integrity check runs in the
background after serving starts, and a corrupt file found there refuses every operation
(real SQLite files, real damage)."""

from __future__ import annotations

import random

import pytest

from safehold.records.server import start_integrity_check
from safehold.store import open_store
from safehold.store.errors import StoreCorruptError


def _fill(url: str, n: int = 3000) -> None:
    store = open_store(url)
    with store.transaction() as tx:
        for i in range(n):
            tx.put("t", i.to_bytes(4, "big"), bytes(200), expected_version=0)
    store.close()


def test_background_quick_check_passes_on_a_sound_file(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 's.db'}"
    _fill(url)
    store = open_store(url)
    try:
        caplog.set_level("INFO", logger="safehold.records")
        start_integrity_check(store).join(30)
        assert "quick_check ok" in caplog.text
        assert store.get("t", (7).to_bytes(4, "big")) is not None
    finally:
        store.close()


def test_background_quick_check_finding_refuses_every_operation(tmp_path, caplog):
    db = tmp_path / "c.db"
    _fill(f"sqlite:///{db}")
    data = bytearray(db.read_bytes())
    ps = int.from_bytes(data[16:18], "big") or 65536  # the header's page size (1 means 65536)
    mid = (len(data) // ps // 2) * ps
    rnd = random.Random(5)
    for j in range(200):
        data[mid + j] ^= rnd.randrange(1, 256)
    db.write_bytes(bytes(data))
    store = open_store(f"sqlite:///{db}")
    try:
        start_integrity_check(store).join(30)
        assert "STORE CORRUPT" in caplog.text
        with pytest.raises(StoreCorruptError, match="PRAGMA quick_check"):
            store.get("t", (1).to_bytes(4, "big"))
        with pytest.raises(StoreCorruptError):
            store.put("t", b"new", b"x", expected_version=0)
    finally:
        store.close()
