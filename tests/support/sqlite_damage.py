"""Damage a SQLite file the way a faulty disk or a hostile operator could, below SQLite's own
checks (for tests of what the stores detect)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def duplicate_leaf_page(path: Path, namespace: bytes) -> None:
    """Page-level corruption a quick_check does not see: copy one b-tree leaf page holding rows
    of ``namespace`` over a later one (a misdirected write), so scans return keys out of order."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ps = conn.execute("PRAGMA page_size").fetchone()[0]
    # rows carry the namespace's integer id (schema version 2): find its leaves by their keys
    keys = [bytes(k) for (k,) in conn.execute(
        "SELECT key FROM safehold_rows WHERE ns = (SELECT id FROM safehold_namespaces WHERE name = ?)",
        (namespace.decode(),))]
    conn.close()
    data = bytearray(path.read_bytes())

    def holds_rows(page: bytes) -> bool:
        found = 0
        for k in keys:
            found += k in page
            if found >= 3:
                return True
        return False

    leaves = [i for i in range(1, len(data) // ps)
              if data[i * ps] in (0x0A, 0x0D) and holds_rows(bytes(data[i * ps:(i + 1) * ps]))]
    assert len(leaves) >= 6, leaves
    src, dst = leaves[1], leaves[len(leaves) // 2]
    data[dst * ps:(dst + 1) * ps] = data[src * ps:(src + 1) * ps]
    path.write_bytes(bytes(data))
