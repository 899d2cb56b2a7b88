"""Subprocess helper for the store's crash and concurrency tests (not a test module itself).

Usage:
    python store_worker.py batches URL BATCH_ROWS [--no-tx]
        Writes batches 0, 1, 2, ... forever. Batch b puts BATCH_ROWS rows ``b:i`` and moves the
        ledger row (CAS) to b, all in one transaction. Prints ``MID b`` once half of batch b
        is written and ``ACK b`` after its commit returned (flushed at once), so the parent
        may SIGKILL it mid-batch. ``--no-tx`` writes each row on its own (negative control:
        the parent's checker must then find a half-written batch).
    python store_worker.py race URL NS KEY_HEX
        Prints ``READY``; then for every stdin line ``GO v`` tries put(NS, KEY, ..,
        expected_version=v) and prints ``WON new_version`` or ``CONFLICT expected actual``.
"""

from __future__ import annotations

import hashlib
import sys
import time

from safehold.errors import ConflictError
from safehold.store import open_store
from safehold.store.errors import VersionConflictError

NS = "crash"
LEDGER = b"\x00ledger"


def row_key(batch: int, i: int) -> bytes:
    """Key of row ``i`` of ``batch``."""
    return b"b%08d:%04d" % (batch, i)


def row_value(batch: int, i: int) -> bytes:
    """Deterministic 2 KiB value of row ``i`` of ``batch`` (so torn values are detectable)."""
    seed = hashlib.sha256(row_key(batch, i)).digest()
    return seed * 64


def _batches(url: str, rows: int, use_tx: bool) -> None:
    store = open_store(url)
    ledger_version = 0
    b = 0
    while True:
        if use_tx:
            with store.transaction() as tx:
                for i in range(rows):
                    tx.put(NS, row_key(b, i), row_value(b, i), expected_version=0)
                    if i == rows // 2:
                        print(f"MID {b}", flush=True)
                tx.put(NS, LEDGER, str(b).encode(), expected_version=ledger_version)
        else:
            for i in range(rows):
                store.put(NS, row_key(b, i), row_value(b, i), expected_version=0)
                if i == rows // 2:
                    print(f"MID {b}", flush=True)
                    time.sleep(0.05)  # widen the window so the parent's kill lands mid-batch
            store.put(NS, LEDGER, str(b).encode(), expected_version=ledger_version)
        ledger_version += 1
        print(f"ACK {b}", flush=True)
        b += 1


def _race(url: str, ns: str, key: bytes) -> None:
    store = open_store(url)
    store.get(ns, key)  # warm the connection before the start signal
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, v = line.split()
        assert cmd == "GO"
        try:
            new = store.put(ns, key, b"writer-value", expected_version=int(v))
            print(f"WON {new}", flush=True)
        except VersionConflictError as e:
            print(f"CONFLICT {e.expected} {e.actual}", flush=True)
        except ConflictError as e:  # a conflict without version detail would still be a conflict
            print(f"CONFLICT ? ? {e}", flush=True)
    store.close()


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "batches":
        _batches(argv[2], int(argv[3]), "--no-tx" not in argv[4:])
    elif mode == "race":
        _race(argv[2], argv[3], bytes.fromhex(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
